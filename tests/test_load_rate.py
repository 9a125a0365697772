"""Open loop: the dispatcher keeps the schedule, independent of the server."""
from __future__ import annotations

from loadrun import harness_load, read_jsonl, summary

# The generator's own validity check (schedule lag p99 <= 10 ms by default) is the subject
# of test_load_run_control; here it must not fail a run on a machine shared with others.
LAG_LIMIT_MS = "250"
# Likewise the CPU check (closed or open loop): not the subject of these tests.
NO_CPU_CHECK = ("--cpu-limit", "1000")


def _fitted_rate(times: list[float]) -> float:
    """Requests/s from a least-squares line through the sorted send times against their
    index: every send counts, so one late first or last send (a busy machine's hiccup, within
    the lag limit) cannot move the rate the way (n - 1) / (last - first) lets it."""
    n = len(times)
    mx = (n - 1) / 2
    my = sum(times) / n
    slope = sum((i - mx) * (t - my) for i, t in enumerate(times)) / sum((i - mx) ** 2 for i in range(n))
    return 1.0 / slope


def test_constant_open_loop_rate_is_achieved_within_2_percent(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    rate, n = 20.0, 100
    rc, log = harness_load("--url", url, "--rate", str(rate), "--arrival", "constant",
                           "--num-requests", str(n), "--input-len", "32", "--output-len", "8",
                           "--lag-limit-ms", LAG_LIMIT_MS, *NO_CPU_CHECK, "--out", str(out), "--quiet",
                           timeout=60)
    assert rc == 0, log
    records = read_jsonl(out / "requests.jsonl")
    assert len(records) == n and all(r["ok"] for r in records)
    sched = sorted(r["scheduled_at"] for r in records)
    sent = sorted(r["sent_at"] for r in records)
    sched_rate = (n - 1) / (sched[-1] - sched[0])
    sent_rate = _fitted_rate(sent)
    assert abs(sched_rate / rate - 1) < 0.001, sched_rate
    assert abs(sent_rate / rate - 1) < 0.02, sent_rate
    # every request carries its lag, and the summary reports it
    lags = [r["schedule_lag_ms"] for r in records]
    assert all(lag is not None and lag >= 0 for lag in lags)
    s = summary(out)
    assert s["schedule_lag_ms"]["count"] == n
    assert s["schedule_lag_ms"]["max"] == max(lags)
    assert s["ttft_from_schedule_ms"]["count"] == n
    assert s["workload"]["rate"] == rate and s["workload"]["arrival"] == "constant"
    assert s["generator"]["valid"], s["generator"]


def test_workers_draw_independent_poisson_schedules(start_sim, tmp_path):
    """Each worker seeds its arrivals with its index: two workers must not replay one
    schedule shifted by their start offset (then half of all pairs of send times would be
    that same offset apart)."""
    from collections import Counter

    url, _ = start_sim()
    out = tmp_path / "run"
    n = 40
    rc, log = harness_load("--url", url, "--rate", "20", "--workers", "2", "--num-requests", str(n),
                           "--input-len", "32", "--output-len", "4", "--lag-limit-ms", LAG_LIMIT_MS,
                           *NO_CPU_CHECK, "--out", str(out), "--quiet", timeout=60)
    assert rc == 0, log
    sched = sorted(r["scheduled_at"] for r in read_jsonl(out / "requests.jsonl"))
    assert len(sched) == n
    offsets = Counter(round((b - a) * 1000) for i, a in enumerate(sched) for b in sched[i + 1:])
    assert offsets.most_common(1)[0][1] < n // 4, offsets.most_common(3)
