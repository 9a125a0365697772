"""How a load run is bounded, windowed and judged: warm-up/cool-down exclusion, the
request-count stop, SLO exit codes, bad input, and the generator's self-check."""
from __future__ import annotations

import time

from harness.results import summary_from_requests
from loadrun import harness_load, read_jsonl, summary

SMALL = ("--input-len", "32", "--output-len", "8")
# For the tests that are not about the generator's self-check: a busy shared machine's CPU
# samples must not turn the exit code into 3 (the last test here is about that check).
NO_CPU_CHECK = ("--cpu-limit", "1000")


def test_warmup_and_cooldown_are_excluded_from_the_summary(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    rc, log = harness_load("--url", url, "--users", "3", "--duration", "7", "--warmup", "2",
                           "--cooldown", "1.5", *SMALL, "--out", str(out), "--quiet", *NO_CPU_CHECK)
    assert rc == 0, log
    records = read_jsonl(out / "requests.jsonl")
    s = summary(out)
    t0 = s["started_at"]
    kept = [r for r in records if r["sent_at"] >= t0 + 2 and r["finished_at"] <= t0 + 7 - 1.5]
    assert 0 < len(kept) < len(records)
    assert any(r["sent_at"] < t0 + 2 for r in records)          # warm-up requests were sent...
    assert s["requests"]["completed"] == len(kept)              # ...and not counted
    again = summary_from_requests(kept)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert s[key] == again[key], key
    assert s["workload"]["warmup_s"] == 2 and s["workload"]["cooldown_s"] == 1.5
    # the measured window, not the whole run, is the rates' denominator
    assert s["duration_s"] <= 7 - 2 - 1.5 + 0.01


def test_num_requests_stops_the_run_after_exactly_that_many(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    t = time.monotonic()
    rc, log = harness_load("--url", url, "--users", "4", "--num-requests", "10", *SMALL,
                           "--out", str(out), "--quiet", *NO_CPU_CHECK)
    assert rc == 0, log
    assert time.monotonic() - t < 30          # not the 1 h safety run time
    assert len(read_jsonl(out / "requests.jsonl")) == 10
    assert summary(out)["requests"]["completed"] == 10


def test_slo_breach_exits_1_and_a_met_slo_exits_0(start_sim, tmp_path):
    url, _ = start_sim()
    rc, log = harness_load("--url", url, "--users", "2", "--num-requests", "6", *SMALL,
                           "--slo", "ttft_p99_ms<=0.001", "--out", str(tmp_path / "a"), "--quiet")
    assert rc == 1, log
    s = summary(tmp_path / "a")
    assert s["slo"]["passed"] is False and s["slo"]["checks"][0]["passed"] is False
    assert s["goodput_rps"] == 0   # no request met the per-request TTFT objective

    rc, log = harness_load("--url", url, "--users", "2", "--num-requests", "6", *SMALL,
                           "--slo", "ttft_p99_ms<=60000", "--slo", "error_rate<=0",
                           "--out", str(tmp_path / "b"), "--quiet", *NO_CPU_CHECK)
    assert rc == 0, log
    s = summary(tmp_path / "b")
    assert s["slo"]["passed"] is True and len(s["slo"]["checks"]) == 2
    assert s["goodput_rps"] == s["requests_per_s"]


def test_bad_input_exits_2_with_a_message(tmp_path):
    for args, words in ((("--rate", "0", "--num-requests", "5"), "--rate"),
                        (("--users", "2"), "--duration or --num-requests"),
                        (("--users", "2", "--num-requests", "5", "--slo", "ttft<5"), "bad --slo")):
        rc, log = harness_load("--url", "http://127.0.0.1:9", *args, "--out", str(tmp_path / "x"),
                               timeout=20)
        assert rc == 2, log
        assert words in log, log


def test_generator_that_cannot_keep_the_schedule_is_invalid_and_exits_3(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    rc, log = harness_load("--url", url, "--rate", "10", "--num-requests", "10", *SMALL,
                           "--lag-limit-ms", "0.0001", "--out", str(out))
    assert rc == 3, log
    gen = summary(out)["generator"]
    assert gen["valid"] is False
    assert any("schedule lag" in r and "add workers" in r for r in gen["reasons"]), gen
    assert "generator INVALID" in log and "add workers" in log
