"""Drift analysis over timeseries lines (harness/drift.py, harness/run_summary.RunSummary.add_drift), with
synthetic windows; the real soak runs against the simulator are in test_soak.py."""
from __future__ import annotations

import numpy as np
import pytest

from harness import drift
from harness.run_summary import RunSummary
from harness.slo import parse_slo, run_exit_code

T0 = 1_800_000_000.0


def windows(ttft, tpot, window_s=60.0, t0=T0, count=50, server=None):
    out = []
    for i, (a, b) in enumerate(zip(ttft, tpot)):
        line = {"t": t0 + (i + 1) * window_s, "window_s": window_s, "users": 8, "completed": count,
                "ttft_ms": {"p50": a * 0.7, "p90": a * 0.9, "p99": a, "mean": a * 0.7, "count": count},
                "tpot_ms": {"p50": b * 0.8, "p90": b * 0.9, "p99": b, "mean": b * 0.8, "count": count}}
        if server is not None:
            line["server"] = server(i)
        out.append(line)
    return out


@pytest.mark.parametrize("t,df,p", [(1.0, 1, 0.5), (2.228139, 10, 0.05), (3.169273, 10, 0.01),
                                    (2.0, 10, 0.0733880), (1.959964, 10**6, 0.05), (0.0, 5, 1.0)])
def test_t_distribution_matches_tables(t, df, p):
    assert drift.t_two_sided_p(t, df) == pytest.approx(p, abs=2e-6)


def test_t_quantile_inverts_the_tail():
    assert drift.t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-5)
    assert drift.t_quantile(0.995, 3) == pytest.approx(5.840909, abs=1e-5)


def test_growing_latency_is_significant_and_slope_is_per_hour():
    rng = np.random.default_rng(1)
    n = 60                                   # one hour of 60 s windows
    ttft = 100 + 40 * np.arange(n) / n + rng.normal(0, 3, n)    # +40 ms over the hour
    tpot = 20 + 6 * np.arange(n) / n + rng.normal(0, 0.5, n)    # +6 ms over the hour
    d = drift.analyze(windows(ttft, tpot))
    assert d["windows"] == n and d["detected"] is True
    assert d["significant"] == {"ttft_p99": True, "tpot_p99": True}
    assert d["ttft_p99_ms_per_h"] == pytest.approx(40, rel=0.2)
    assert d["tpot_p99_ms_per_h"] == pytest.approx(6, rel=0.2)
    lo, hi = d["series"]["tpot_p99"]["ci_per_h"]
    assert lo < 6 < hi
    assert d["p_values"]["tpot_p99"] < 1e-6
    sc = drift.drift_scalars(d)
    assert sc["tpot_drift_ms_per_h"] == pytest.approx(d["tpot_p99_ms_per_h"])
    assert d["server"] == {}                 # no server metrics in these lines: handled


def test_flat_latency_has_no_significant_drift_and_false_positive_rate_is_near_alpha():
    rng = np.random.default_rng(7)
    hits = 0
    trials = 300
    for _ in range(trials):
        ttft = 100 + rng.normal(0, 5, 30)
        tpot = 20 + rng.normal(0, 1, 30)
        d = drift.analyze(windows(ttft, tpot))
        hits += d["significant"]["tpot_p99"]
    assert hits / trials <= 0.03            # alpha = 0.01, with room for chance
    d = drift.analyze(windows(100 + rng.normal(0, 5, 30), 20 + rng.normal(0, 1, 30)))
    if not d["significant"]["tpot_p99"]:
        assert drift.drift_scalars(d)["tpot_drift_ms_per_h"] == 0.0


def test_too_few_windows_is_not_measured_and_a_drift_slo_fails():
    d = drift.analyze(windows([100, 110, 120], [20, 21, 22]))
    assert d["ttft_p99_ms_per_h"] is None and "note" in d
    assert drift.drift_scalars(d) == {"ttft_drift_ms_per_h": None, "tpot_drift_ms_per_h": None}


def test_windows_before_the_start_and_empty_windows_are_ignored():
    old_run = windows([500] * 10, [90] * 10, t0=T0 - 10_000)      # an earlier run appended here
    empty = [{"t": T0 + 30, "window_s": 60.0, "ttft_ms": {"p99": None, "count": 0},
              "tpot_ms": {"p99": None, "count": 0}}]
    flat = windows([100.0, 101.0, 99.0, 100.5, 99.5, 100.0, 100.2, 99.8], [20.0] * 8)
    d = drift.analyze(old_run + empty + flat, start=T0)
    assert d["series"]["ttft_p99"]["windows"] == 8
    assert not d["significant"]["ttft_p99"]


def test_server_kv_cache_trend_from_timeseries_server_block():
    rng = np.random.default_rng(3)
    n = 40
    kv = 0.2 + 0.5 * np.arange(n) / n + rng.normal(0, 0.01, n)

    def server(i):
        return {"num_requests_running": 8, "num_requests_waiting": 0, "kv_cache_usage_perc": float(kv[i]),
                "num_preemptions_total": 0, "scrape_ms": 1.5, "error": None}
    lines = windows([100.0] * n, [20.0] * n, server=server)
    # the window flushed at shutdown scrapes an idle server: left out of server trends
    lines.append({**lines[-1], "t": lines[-1]["t"] + 1, "window_s": 1.0, "users": 0,
                  "server": {"kv_cache_usage_perc": 0.0, "num_requests_running": 0}})
    d = drift.analyze(lines)
    s = d["server"]
    assert "server.scrape_ms" not in s and "server.error" not in s
    kvs = s["server.kv_cache_usage_perc"]
    assert kvs["significant"] and kvs["per_h"] == pytest.approx(0.5 * 60 / 40, rel=0.1)
    assert not s["server.num_requests_running"]["significant"]
    assert s["server.num_requests_running"]["windows"] == n and kvs["last"] == pytest.approx(kv[-1])
    assert "kv_cache_usage_perc" in drift.describe(d)


def test_server_values_handles_nulls_nesting_and_vllm_keys():
    line = {"server": {"kv_cache_usage_perc": None, "error": "timed out",
                       "127.0.0.1:8000": {"num_requests_waiting": 3}},
            "vllm:gpu_cache_usage_perc": 0.5, "ttft_ms": {"p99": 1.0}}
    assert drift.server_values(line) == {"server.127.0.0.1:8000.num_requests_waiting": 3.0,
                                         "vllm:gpu_cache_usage_perc": 0.5}


def test_add_drift_puts_scalars_in_summary_and_rechecks_slos():
    n = 20
    ts = windows(100 + 10 * np.arange(n), 20 + 2 * np.arange(n), window_s=2.0)  # steep growth
    slos = [parse_slo("tpot_drift_ms_per_h<=5"), parse_slo("ttft_p99_ms<=100000")]
    summary = {"started_at": T0, "workload": {"warmup_s": 0.0},
               "requests": {"completed": 100, "failed": 0}, "generator": {"valid": True},
               "ttft_ms": {"p99": 250.0},
               # as the plugin writes it: the drift metric was not measurable during the run
               "slo": {"passed": False, "checks": [s.check({"ttft_ms": {"p99": 250.0}}) for s in slos]}}
    summary = RunSummary(summary, slos)
    summary.add_drift(ts)
    steep = summary.to_dict()
    assert steep["drift"]["detected"] is True
    assert steep["tpot_drift_ms_per_h"] == pytest.approx(2 * 3600 / 2.0, rel=1e-6)
    checks = {c["slo"]: c for c in steep["slo"]["checks"]}
    assert checks["tpot_drift_ms_per_h<=5"]["passed"] is False
    assert checks["ttft_p99_ms<=100000"]["passed"] is True
    assert run_exit_code(steep) == 1

    flat = windows([100.0, 101, 99, 100, 100.5, 99.5, 100, 101], [20.0, 20.1, 19.9, 20, 20, 20.1, 19.9, 20])
    summary.figures["started_at"] = T0
    summary.add_drift(flat)
    flat_doc = summary.to_dict()
    assert flat_doc["tpot_drift_ms_per_h"] == 0.0
    assert flat_doc["slo"]["passed"] is True and run_exit_code(flat_doc) == 0
