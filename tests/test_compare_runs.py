"""`harness compare` on real runs against the simulator: the same profile twice is no
regression; a run on a slower simulated GPU (L40S) against a baseline on a faster one
(H100) is, with exit code 1, and the reverse is an improvement.

The runs are open loop with a fixed seed, so both runs of a profile offer the same
arrival schedule, as a user comparing builds would. A closed loop is a poor A/B workload:
its users fall into phase with the server's steps, and which phase a run lands in moves
TTFT p50 between two modes (42 ms and 60 ms for this workload, seen in CI) with nothing
else changed. Scheduling jitter on a shared CPU still moves short runs by several percent,
so the test gates at 25%, as a user would after running the baseline twice; the slower
GPU is more than 2x slower."""
from __future__ import annotations

import json

import pytest

from conftest import launch_sim, stop_process
from gates_util import harness, load

# Poisson at 16 requests/s keeps about 7 requests in flight on the L40S profile. The
# generator's schedule-lag check is not what this file tests; a shared CI machine must not
# fail it here.
RUN = ("--rate", "16", "--seed", "7", "--num-requests", "64", "--duration", "40",
       "--input-len", "64", "--output-len", "16", "--lag-limit-ms", "250")
GATE = ("--threshold", "0.25")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    out = {}
    for profile, names in (("l40s-llama-3-8b-bf16", ("l40s_a", "l40s_b")), ("h100-llama-3-8b-bf16", ("h100",))):
        url, proc = launch_sim("--profile", profile)
        try:
            for name in names:
                r = load(url, base / name, *RUN)
                assert r.returncode == 0, r.stdout + r.stderr
                out[name] = base / name
        finally:
            stop_process(proc)
            proc.log.close()
    return out


def test_same_profile_twice_is_no_regression(runs):
    r = harness("compare", str(runs["l40s_a"]), str(runs["l40s_b"]), *GATE, "--json")
    result = json.loads(r.stdout)
    assert r.returncode == 0, r.stdout
    assert result["regression"] is False
    rows = {m["metric"]: m for m in result["metrics"]}
    assert rows["tpot_p50_ms"]["ci"] is not None and rows["tpot_p50_ms"]["n_run"] == 64
    assert abs(rows["tpot_p50_ms"]["rel_change"]) < 0.25
    assert json.loads((runs["l40s_b"] / "compare.json").read_text()) == result


def test_slower_gpu_is_a_regression_exit_1(runs):
    r = harness("compare", str(runs["h100"]), str(runs["l40s_a"]), *GATE)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "REGRESSION" in r.stdout
    result = json.loads((runs["l40s_a"] / "compare.json").read_text())
    rows = {m["metric"]: m for m in result["metrics"]}
    for key in ("ttft_p50_ms", "tpot_p50_ms", "itl_p50_ms", "e2e_p50_ms"):
        assert rows[key]["verdict"] == "REGRESSION", rows[key]
        assert rows[key]["ci"][0] > 0, rows[key]
    # open loop below both GPUs' capacity: throughput is the offered load on either
    assert rows["output_tokens_per_s"]["verdict"] != "REGRESSION", rows["output_tokens_per_s"]
    # and the other way round: faster hardware is an improvement, exit 0
    back = harness("compare", str(runs["l40s_a"]), str(runs["h100"]), *GATE, "--json")
    assert back.returncode == 0 and json.loads(back.stdout)["regression"] is False
