"""`harness sim replay` and servers.simulator.replay: the engine in virtual time.

The agreement tests send a workload to the live simulator and compare what its truth log
says (server time: received_ns and the engine's model_ns per token) with the replay of the
same arrivals; never client timings, so a busy machine cannot fail them.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from loadrun import REPO, harness_load, read_jsonl, wait_for, whole_lines
from servers.simulator.replay import Arrival, ReplayInputError, load_arrivals, replay

PROFILE = "l40s-llama-3-8b-bf16"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "sim", "replay", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _truth_arrivals(truths: list[dict]) -> tuple[list[Arrival], dict[str, float], dict[str, float]]:
    """Arrivals (server receive times) and the truth's TTFT and E2E per request, in ms."""
    t0 = min(t["received_ns"] for t in truths)
    arrivals, ttft, e2e = [], {}, {}
    for t in truths:
        arrivals.append(Arrival((t["received_ns"] - t0) / 1e9, t["prompt_tokens"],
                                t["completion_tokens"], t["id"]))
        ttft[t["id"]] = (t["model_ns"][0] - t["received_ns"]) / 1e6
        e2e[t["id"]] = (t["model_ns"][-1] - t["received_ns"]) / 1e6
    return arrivals, ttft, e2e


def _close(replayed: float, truth: float) -> bool:
    return abs(replayed - truth) <= 0.15 * truth + 5.0


def _send_completion(url: str, prompt_len: int, max_tokens: int) -> None:
    body = json.dumps({"model": "meta-llama/Meta-Llama-3-8B-Instruct", "prompt": [7] * prompt_len,
                       "max_tokens": max_tokens, "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()


def test_replay_agrees_with_the_live_simulators_truth_log(start_sim, tmp_path):
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--profile", PROFILE, "--truth-log", str(truth_path))
    rng = random.Random(3)
    plan = [(rng.expovariate(40.0), rng.randint(16, 600), rng.randint(4, 48)) for _ in range(40)]
    threads, t = [], time.monotonic()
    for gap, prompt_len, max_tokens in plan:   # open loop: overlapping prefills and decodes
        t += gap
        time.sleep(max(0.0, t - time.monotonic()))
        th = threading.Thread(target=_send_completion, args=(url, prompt_len, max_tokens))
        th.start()
        threads.append(th)
    for th in threads:
        th.join(60)
    assert wait_for(lambda: whole_lines(truth_path) >= len(plan), 15.0)
    truths = read_jsonl(truth_path)
    arrivals, ttft, e2e = _truth_arrivals(truths)

    result = replay(PROFILE, arrivals)

    assert len(result.served) == len(plan)
    got_ttft = np.median([r.ttft_ms for r in result.served])
    got_e2e = np.median([r.e2e_ms for r in result.served])
    assert _close(got_ttft, np.median(list(ttft.values()))), (got_ttft, sorted(ttft.values()))
    assert _close(got_e2e, np.median(list(e2e.values()))), (got_e2e, sorted(e2e.values()))


def test_replay_of_a_harness_load_results_directory_agrees_with_its_truth_log(start_sim, tmp_path):
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--profile", PROFILE, "--truth-log", str(truth_path))
    out = tmp_path / "run"
    rc, log = harness_load("--url", url, "--rate", "20", "--num-requests", "30",
                           "--input-len", "256", "--output-len", "32", "--out", str(out),
                           "--quiet", "--cpu-limit", "1000", timeout=120)
    assert rc == 0, log
    assert wait_for(lambda: whole_lines(truth_path) >= 30, 15.0)
    _, ttft, e2e = _truth_arrivals(read_jsonl(truth_path))

    proc = _cli("--profile", PROFILE, "--requests", str(out), "--json")

    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["requests"] == 30 and s["skipped"] == {}
    assert _close(s["ttft_ms"]["p50"], np.median(list(ttft.values()))), (s["ttft_ms"], sorted(ttft.values()))
    assert _close(s["e2e_ms"]["p50"], np.median(list(e2e.values()))), (s["e2e_ms"], sorted(e2e.values()))


def test_summary_computes_metrics_as_vllm_bench_serve_does():
    # Two requests far apart, each alone on an idle engine: token times are the engine's steps.
    result = replay(PROFILE, [(0.0, 100, 3), (50.0, 100, 1)])
    a, b = result.records
    ta, tb = list(a.token_times_s), list(b.token_times_s)
    s = result.summary()
    assert s["requests"] == 2
    assert s["duration_s"] == pytest.approx(tb[-1] - 0.0)
    assert s["output_tokens_per_s"] == pytest.approx(4 / (tb[-1] - 0.0))
    assert s["ttft_ms"]["p50"] == pytest.approx(np.percentile([ta[0] * 1e3, (tb[0] - 50) * 1e3], 50))
    # TPOT only over requests with more than one token: (e2e - ttft) / (n - 1)
    assert s["tpot_ms"]["mean"] == pytest.approx((ta[2] - ta[0]) * 1e3 / 2)
    # ITL: every gap of every request, pooled
    gaps = [(ta[1] - ta[0]) * 1e3, (ta[2] - ta[1]) * 1e3]
    assert s["itl_ms"]["p90"] == pytest.approx(np.percentile(gaps, 90))
    assert s["e2e_ms"]["mean"] == pytest.approx((ta[2] * 1e3 + (tb[0] - 50) * 1e3) / 2)


def test_arrivals_wait_for_virtual_time_to_reach_them():
    # The second request comes in while the first is decoding: it is first scheduled at a step
    # boundary at or after its arrival, never before.
    result = replay(PROFILE, [(0.0, 500, 40), (0.2, 500, 40)])
    first, second = result.records
    assert second.first_scheduled_s >= 0.2
    assert second.first_scheduled_s in list(first.token_times_s)   # the step that just ended
    assert len(first.token_times_s) == len(second.token_times_s) == 40


def test_replicas_share_requests_round_robin_and_halve_the_queue():
    burst = [(0.0, 1000, 64)] * 400
    one = replay(PROFILE, burst)
    two = replay(PROFILE, burst, replicas=2)
    assert [r.replica for r in two.records[:4]] == [0, 1, 0, 1]
    assert two.duration_s < 0.75 * one.duration_s


def test_request_longer_than_max_model_len_is_rejected_not_served():
    result = replay(PROFILE, [(0.0, 8000, 500), (0.0, 10, 5)])
    assert "max_model_len" in result.records[0].rejected
    assert result.summary()["requests"] == 1 and result.summary()["rejected"] == 1


def test_gpu_memory_utilization_sets_the_kv_cache():
    low = replay(PROFILE, [(0.0, 10, 2)], gpu_memory_utilization=0.5)
    high = replay(PROFILE, [(0.0, 10, 2)], gpu_memory_utilization=0.95)
    assert 0 < low.kv_capacity_tokens < high.kv_capacity_tokens


def test_results_directory_skips_failed_and_incomplete_requests(tmp_path):
    rows = [{"id": "a", "sent_at": 1000.5, "ok": True, "input_tokens": 10, "output_tokens": 4},
            {"id": "b", "sent_at": 1000.0, "ok": False, "error_kind": "http_500",
             "input_tokens": 10, "output_tokens": None},
            {"id": "c", "sent_at": 1001.0, "ok": False, "error_kind": "incomplete",
             "input_tokens": 10, "output_tokens": None},
            {"id": "d", "sent_at": 1002.0, "ok": True, "input_tokens": 12, "output_tokens": 7}]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    arrivals, skipped = load_arrivals(tmp_path)
    assert [(a.id, a.arrival_s, a.input_len, a.output_len) for a in arrivals] == [
        ("a", 0.5, 10, 4), ("d", 2.0, 12, 7)]
    assert skipped == {"failed": 1, "incomplete": 1}


def test_malformed_line_is_a_usage_error_naming_the_line(tmp_path):
    f = tmp_path / "arrivals.jsonl"
    f.write_text('{"arrival_s": 0, "input_len": 5, "output_len": 5}\n'
                 '{"arrival_s": 1, "input_len": 5}\n')
    proc = _cli("--profile", PROFILE, "--requests", str(f))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "line 2" in proc.stderr and "output_len" in proc.stderr


def test_zero_output_len_is_rejected_with_its_line(tmp_path):
    f = tmp_path / "arrivals.jsonl"
    f.write_text('{"arrival_s": 0, "input_len": 5, "output_len": 0}\n')
    with pytest.raises(ReplayInputError, match="line 1: output_len"):
        load_arrivals(f)


def test_unknown_profile_is_a_usage_error_naming_profiles(tmp_path):
    f = tmp_path / "arrivals.jsonl"
    f.write_text('{"arrival_s": 0, "input_len": 5, "output_len": 5}\n')
    proc = _cli("--profile", "h200-nosuch-model", "--requests", str(f))
    assert proc.returncode == 2
    assert "unknown profile" in proc.stderr and "h200-llama-3-8b-bf16" in proc.stderr


def test_missing_requests_file_is_a_usage_error(tmp_path):
    proc = _cli("--profile", PROFILE, "--requests", str(tmp_path / "absent.jsonl"))
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_zero_max_num_seqs_is_a_usage_error(tmp_path):
    f = tmp_path / "arrivals.jsonl"
    f.write_text('{"arrival_s": 0, "input_len": 5, "output_len": 5}\n')
    proc = _cli("--profile", PROFILE, "--requests", str(f), "--max-num-seqs", "0")
    assert proc.returncode == 2 and "--max-num-seqs" in proc.stderr


def test_out_writes_one_line_per_request(tmp_path):
    f = tmp_path / "arrivals.jsonl"
    f.write_text("".join(json.dumps({"arrival_s": i * 0.01, "input_len": 50, "output_len": 6}) + "\n"
                         for i in range(5)))
    out = tmp_path / "replay.jsonl"
    proc = _cli("--profile", PROFILE, "--requests", str(f), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = read_jsonl(out)
    assert len(lines) == 5
    assert all(r["ok"] and len(r["itl_ms"]) == 5 and r["e2e_ms"] >= r["ttft_ms"] for r in lines)
    assert "TTFT" in proc.stdout
