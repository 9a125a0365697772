"""The master's percentiles with several Locust worker processes are exact: the same as
recomputing them from every request line the workers wrote (same HDR bucketing)."""
from __future__ import annotations

from harness.results import summary_from_requests
from loadrun import harness_load, locust, locust_aggregated, read_jsonl, summary

STATS = ("p50", "p90", "p95", "p99", "p99_9", "mean", "min", "max", "count")
# About merging and ports, not generator health: a busy shared machine's CPU samples must not
# turn the exit code into 3.
NO_CPU_CHECK = ("--cpu-limit", "1000")


def test_two_worker_summary_equals_percentiles_recomputed_from_requests_jsonl(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    n = 31   # odd: the workers' shares differ (16 + 15)
    rc, log = harness_load("--url", url, "--users", "6", "--workers", "2", "--num-requests", str(n),
                           "--input-len", "64", "--output-len", "12", "--output-len-range", "0.5",
                           "--out", str(out), "--quiet", *NO_CPU_CHECK, timeout=90)
    assert rc == 0, log
    records = read_jsonl(out / "requests.jsonl")
    assert len(records) == n and all(r["ok"] for r in records)
    s = summary(out)
    # both worker processes sent requests, and together exactly the requested number
    by_worker = s["generator"]["requests_by_worker"]
    assert len(by_worker) == 2 and sorted(by_worker.values()) == [15, 16], by_worker
    assert s["generator"]["workers"] == 2

    again = summary_from_requests(records)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "icl_ms", "e2e_ms"):
        for stat in STATS:
            assert s[key][stat] == again[key][stat], (key, stat, s[key], again[key])
    assert s["itl_ms"]["count"] == sum(len(r["itl_ms"]) for r in records)
    assert s["requests"]["completed"] == n
    assert s["output_tokens"] == sum(r["output_tokens"] for r in records)
    # Locust's own table: exactly one entry per LLM request
    assert int(locust_aggregated(out)["Request Count"]) == n


def test_multi_worker_run_starts_while_locusts_default_master_port_is_taken(start_sim, tmp_path):
    """Locust's master listens on *:5557 by default; `harness load --workers` must not need that
    port (a second run on the same machine, or anything else holding it, would stop it)."""
    import socket

    url, _ = start_sim()
    holder = socket.socket()
    try:
        holder.bind(("0.0.0.0", 5557))   # bound, never listening: it accepts no connection
    except OSError:
        pass   # already taken by something else: the run must cope just the same
    try:
        out = tmp_path / "run"
        rc, log = harness_load("--url", url, "--users", "2", "--workers", "2", "--num-requests", "4",
                               "--input-len", "16", "--output-len", "4", "--out", str(out),
                               "--quiet", *NO_CPU_CHECK, timeout=90)
        assert rc == 0, log
        assert len(read_jsonl(out / "requests.jsonl")) == 4
    finally:
        holder.close()


# Registered before harness.plugin's own init listener, this one yields on a worker, as any
# listener doing I/O does: the worker's message loop then takes the master's spawn (Locust
# connects workers before it fires init, and the master starts once the last one is ready).
LATE_INIT_LOCUSTFILE = '''
import gevent
from locust import events
from locust.runners import WorkerRunner

@events.init.add_listener
def _slow_worker_init(environment, **_kw):
    if isinstance(environment.runner, WorkerRunner):
        gevent.sleep(1.5)

import harness.plugin  # noqa: E402,F401
from harness.llm_user import ChatUser  # noqa: E402


class Chat(ChatUser):
    pass
'''


def test_a_worker_whose_first_spawn_comes_before_its_init_runs_its_share(start_sim, tmp_path):
    url, _ = start_sim()
    lf = tmp_path / "late_init.py"
    lf.write_text(LATE_INIT_LOCUSTFILE)
    out = tmp_path / "run"
    rc, log = locust("-f", str(lf), "--headless", "--host", url, "--processes", "2",
                     "-u", "2", "-r", "2", "--run-time", "30s", "--llm-num-requests", "6",
                     "--llm-out", str(out), "--llm-input-len", "32", "--llm-output-len", "8",
                     "--only-summary", "--llm-cpu-limit", "1000", timeout=60)
    assert rc == 0, log
    assert "has no attribute 'llm'" not in log and "Unknown message type" not in log, log
    records = read_jsonl(out / "requests.jsonl")
    assert len(records) == 6 and all(r["ok"] for r in records)
    assert sorted(summary(out)["generator"]["requests_by_worker"].values()) == [3, 3]
