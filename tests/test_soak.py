"""`harness load --soak` against the real simulator: with `--slowdown-per-hour` huge, the
simulator's step time grows within seconds (720/h: +20% per second of uptime), the drift
analysis finds it and a drift SLO fails the run; a flat simulator shows no drift."""
from __future__ import annotations

import pytest

from conftest import launch_sim, stop_process
from gates_util import load, summary


@pytest.fixture
def sim_factory():
    procs = []

    def start(*args):
        url, proc = launch_sim(*args)
        procs.append(proc)
        return url
    yield start
    for proc in procs:
        stop_process(proc)
        proc.log.close()


def test_soak_detects_growing_latency_and_drift_slo_fails(sim_factory, tmp_path):
    url = sim_factory("--slowdown-per-hour", "720")
    r = load(url, tmp_path, "--soak", "--users", "4", "--duration", "14", "--window", "1.5",
             "--output-len", "16", "--slo", "tpot_drift_ms_per_h<=5", "--slo", "ttft_p99_ms<=60000",
             timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    s = summary(tmp_path)
    assert s["workload"]["soak_mix"] is True          # --soak implies the seed's three prompts
    d = s["drift"]
    assert d["windows"] >= 6
    assert d["detected"] is True and d["significant"]["tpot_p99"] is True
    assert d["p_values"]["tpot_p99"] < 0.01
    assert d["tpot_p99_ms_per_h"] > 1000 and d["ttft_p99_ms_per_h"] > 0
    assert s["tpot_drift_ms_per_h"] == pytest.approx(d["tpot_p99_ms_per_h"])
    series = d["series"]["tpot_p99"]
    assert series["last"] > 1.5 * series["first"]    # the simulator really slowed down
    checks = {c["slo"]: c for c in s["slo"]["checks"]}
    assert checks["tpot_drift_ms_per_h<=5"]["passed"] is False
    assert checks["ttft_p99_ms<=60000"]["passed"] is True
    assert isinstance(d["server"], dict)              # server metrics trend when scraped, else {}


def test_flat_simulator_shows_no_significant_drift(sim_factory, tmp_path):
    url = sim_factory()
    r = load(url, tmp_path, "--soak", "--users", "4", "--duration", "12", "--window", "1.5",
             "--warmup", "1.5", "--output-len", "16", "--slo", "tpot_drift_ms_per_h<=5",
             "--slo", "ttft_drift_ms_per_h<=5",
             # about drift, not generator health: a busy shared machine's CPU samples must
             # not turn the exit code into 3
             "--cpu-limit", "1000", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(tmp_path)
    d = s["drift"]
    assert d["windows"] >= 5
    assert d["detected"] is False
    assert s["tpot_drift_ms_per_h"] is not None and s["tpot_drift_ms_per_h"] <= 5
    assert s["ttft_drift_ms_per_h"] is not None and s["ttft_drift_ms_per_h"] <= 5
    assert s["slo"]["passed"] is True
