"""`harness capacity --url` against the real simulator: every step a `harness load` run.

The server is the default profile with four sequence slots, 64 tokens in and 16 out, and
constant arrivals: below about 10 requests/s every request finds a free slot, above it the
queue grows for the whole step, so the TTFT p90 SLO has one sharp knee that the virtual-time
search (--profile, the simulator's replay) finds too. Steps are 6 s of arrivals (at least
the 50 requests a p90 needs) with 3 s of drain.
"""
from __future__ import annotations

import json
import signal
import sys
import time

from tests.loadrun import Run, wait_for

SERVER = ("--max-num-seqs", "4")
WORKLOAD = ["--input-len", "64", "--output-len", "16", "--arrival", "constant",
            "--duration-per-step", "6", "--drain-timeout", "3"]
LIMITS = ["--cpu-limit", "1000", "--lag-limit-ms", "1000000", "--stamp-delay-limit-ms", "0"]
SLO = ["--slo", "ttft_p90_ms<=300"]


def capacity(*args: str) -> Run:
    return Run([sys.executable, "-m", "harness.cli", "capacity", *args])


def read(out) -> dict:
    return json.loads((out / "capacity.json").read_text())


def test_capacity_known_in_virtual_time_is_found_over_real_sockets(start_sim, tmp_path):
    rates = ["--min-rate", "4", "--max-rate", "16", "--resolution", "0.1"]
    virt = tmp_path / "virtual"
    rc, out = capacity("--profile", "l40s-llama-3-8b-bf16", *SERVER, *WORKLOAD, *SLO, *rates,
                       "--out", str(virt)).wait(60)
    assert rc == 0, out
    expected = read(virt)["answer"]["rate"]

    url, _ = start_sim(*SERVER)
    live = tmp_path / "live"
    rc, out = capacity("--url", url, *WORKLOAD, *SLO, *rates, *LIMITS, "--out", str(live)).wait(400)
    assert rc == 0, out
    doc = read(live)
    assert doc["mode"] == "live"
    found = doc["answer"]["rate"]
    assert abs(found - expected) <= 0.1 * expected, (found, expected, out)
    assert max(s["rate"] for s in doc["steps"]) <= 16
    for s in doc["steps"]:   # each step a normal results directory
        step_dir = live / s["dir"]
        summary = json.loads((step_dir / "summary.json").read_text())
        assert summary["generator"]["valid"] and (step_dir / "requests.jsonl").exists()
        assert s["requests"]["sent"] >= 50
    assert "sustains" in out and f"{found:.4g} req/s" in out


def test_an_slo_unreachable_even_at_min_rate_exits_1(start_sim, tmp_path):
    url, _ = start_sim(*SERVER)
    out = tmp_path / "cap"
    rc, text = capacity("--url", url, *WORKLOAD, "--slo", "ttft_p90_ms<=1", "--min-rate", "4",
                        *LIMITS, "--out", str(out)).wait(120)
    assert rc == 1, text
    doc = read(out)
    assert not doc["answer"]["found"] and len(doc["steps"]) == 1
    assert doc["steps"][0]["status"] == "fail"
    assert doc["steps"][0]["checks"][0]["verdict"] == "breaks"
    assert "no capacity in range: even 4 req/s breaks an SLO" in text


def test_a_step_whose_generator_is_invalid_is_not_a_pass(start_sim, tmp_path):
    url, _ = start_sim(*SERVER)
    out = tmp_path / "cap"
    # an SLO every step meets, and a CPU limit no load generator can stay under
    rc, text = capacity("--url", url, *WORKLOAD, "--slo", "ttft_p90_ms<=100000", "--min-rate", "4",
                        "--cpu-limit", "0.001", "--lag-limit-ms", "1000000", "--stamp-delay-limit-ms", "0",
                        "--out", str(out)).wait(120)
    assert rc == 3, text
    doc = read(out)
    step = doc["steps"][0]
    assert step["status"] == "invalid"
    assert step["checks"][0]["verdict"] == "holds"        # the SLO held; the step still did not pass
    assert any("load generator invalid" in r for r in step["reasons"])
    assert not doc["answer"]["found"]


def test_ctrl_c_mid_search_keeps_the_finished_steps(start_sim, tmp_path):
    url, _ = start_sim(*SERVER)
    out = tmp_path / "cap"
    run = capacity("--url", url, "--input-len", "64", "--output-len", "16", "--arrival", "constant",
                   "--duration-per-step", "30", "--drain-timeout", "3", "--slo", "ttft_p90_ms<=100000",
                   "--min-rate", "2", *LIMITS, "--out", str(out))
    try:
        # the first step sends its 50 requests in ~25 s; interrupt once the second has begun
        assert wait_for(lambda: (out / "steps").is_dir() and len(list((out / "steps").iterdir())) >= 2,
                        timeout=150), run.output()
        second = sorted((out / "steps").iterdir())[1]
        assert wait_for(lambda: (second / "requests.jsonl").exists(), timeout=30), run.output()
        time.sleep(1.0)
        run.proc.send_signal(signal.SIGINT)    # the process itself, as a terminal's Ctrl-C reaches it
        rc, text = run.wait(90)
    finally:
        run.cleanup()
    assert rc == 130, text
    doc = read(out)
    assert doc["interrupted"] is True
    first, interrupted = doc["steps"][0], doc["steps"][-1]
    assert first["status"] == "pass" and (out / first["dir"] / "summary.json").exists()
    assert interrupted["status"] == "interrupted" and (out / interrupted["dir"]).is_dir()
    assert doc["answer"]["rate"] == first["rate"] and not doc["answer"]["complete"]
    assert "search unfinished" in doc["answer"]["text"]
    assert (out / "report.html").exists()


def test_a_search_over_an_endpoint_list_spreads_each_step_over_every_endpoint(start_sim, tmp_path):
    from servers.launcher.endpoints import Endpoint, write_endpoints

    url, _ = start_sim("--replicas", "2", *SERVER)
    base = int(url.rsplit(":", 1)[1])
    eps = tmp_path / "endpoints.json"
    write_endpoints(str(eps), [Endpoint(name=f"r{i}", role="small", url=f"http://127.0.0.1:{base + i}",
                                        model="meta-llama/Meta-Llama-3-8B-Instruct", port=base + i)
                               for i in range(2)], layout="test")
    out = tmp_path / "cap"
    # 12 req/s is over one replica's ~10 but within two's: only a spread step passes
    rc, text = capacity("--endpoints", str(eps), *WORKLOAD, *SLO, "--min-rate", "12", "--max-rate", "12",
                        *LIMITS, "--out", str(out)).wait(120)
    assert rc == 0, text
    assert "each step runs 2 workers" in text
    doc = read(out)
    assert doc["target"]["endpoint_count"] == 2 and doc["answer"]["rate"] == 12
    summary = json.loads((out / doc["steps"][0]["dir"] / "summary.json").read_text())
    done = [e["completed"] for e in summary["by_endpoint"].values()]
    assert len(done) == 2 and min(done) >= 0.4 * sum(done)


def test_users_search_over_real_sockets_finds_the_virtual_concurrency(start_sim, tmp_path):
    users = ["--users", "--min-users", "4", "--max-users", "8", "--duration-per-step", "30",
             "--drain-timeout", "3", "--input-len", "64", "--output-len", "16"]
    virt = tmp_path / "virtual"
    rc, out = capacity("--profile", "l40s-llama-3-8b-bf16", *SERVER, *users, *SLO, "--out", str(virt)).wait(60)
    assert rc == 0, out
    expected = read(virt)["answer"]["rate"]

    url, _ = start_sim(*SERVER)
    live = tmp_path / "live"
    rc, out = capacity("--url", url, *users, *SLO, *LIMITS, "--out", str(live)).wait(300)
    assert rc == 0, out
    doc = read(live)
    assert doc["load"] == "users" and doc["mode"] == "live"
    assert abs(doc["answer"]["rate"] - expected) <= 1, (doc["answer"], expected, out)
    for s in doc["steps"]:
        summary = json.loads((live / s["dir"] / "summary.json").read_text())
        assert summary["generator"]["valid"] and s["dir"].endswith(f"{int(s['rate'])}users")
        assert s["requests"]["sent"] >= 50
