"""Every request the server saw is one line in requests.jsonl, however the run ends.

The simulator's truth log has one line per request it received, named by the client's
X-Request-Id (as vLLM names requests), so the two records are compared id by id: a run that
ends by its --duration (drained, or cut after --drain-timeout), over two worker processes,
interrupted by Ctrl-C, with a worker killed, and under plain `locust --run-time`.
"""
from __future__ import annotations

import collections
import signal
import time

import psutil

from loadrun import (
    harness_load,
    locust,
    read_jsonl,
    start_load,
    summary,
    wait_for,
    whole_lines,
)

# Requests of about 1.5 s on the default profile (~25 ms a token): a 4 s run ends with several
# in flight.
LOAD = ("--input-len", "64", "--output-len", "64",
        # about the run's bookkeeping, not generator health: a busy shared machine's CPU,
        # schedule-lag and stamp-delay samples must not turn the exit code into 3 (CI saw a
        # schedule lag p99 over 10 ms on a loaded machine)
        "--cpu-limit", "1000", "--lag-limit-ms", "1000000", "--stamp-delay-limit-ms", "0")


def _why(out, log: str) -> str:
    """The run's log and, when it wrote one, the summary's verdict on its own generator."""
    try:
        return f"{log}\ngenerator: {summary(out).get('generator')}"
    except (OSError, ValueError):
        return log


def _truth(path, at_least: int) -> dict[str, dict]:
    """The simulator's lines by client request id (it flushes them in idle gaps: wait for them)."""
    wait_for(lambda: whole_lines(path) >= at_least, 15.0)
    return {t["id"].split("-", 1)[1]: t for t in read_jsonl(path)}


def _records(out) -> dict[str, dict]:
    recs = read_jsonl(out / "requests.jsonl")
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "a request recorded twice"
    return {r["id"]: r for r in recs}


def _assert_every_server_request_recorded(truth: dict, recs: dict) -> None:
    missing = set(truth) - set(recs)
    assert not missing, f"{len(missing)} requests the server saw have no requests.jsonl line"
    for rid in set(recs) - set(truth):   # killed before the server read it: nothing measured
        assert recs[rid]["error_kind"] == "incomplete" and recs[rid]["ttft_ms"] is None, recs[rid]
    for rid, t in truth.items():
        r = recs[rid]
        if t["finish_reason"] == "abort":       # the client hung up: it was cut off
            assert r["error_kind"] == "incomplete", r
        elif r["ok"]:
            assert r["output_tokens"] == t["completion_tokens"], (r, t)
        else:   # the server wrote its last event while the client was being stopped
            assert r["error_kind"] == "incomplete", r


def _assert_summary_counts(out, recs: dict) -> None:
    s = summary(out)
    kinds = collections.Counter(r["error_kind"] for r in recs.values())
    assert s["requests"]["completed"] == kinds[None]
    assert s["requests"]["incomplete"] == kinds["incomplete"]
    assert s["requests"]["failed"] == sum(n for k, n in kinds.items() if k not in (None, "incomplete"))


def test_duration_run_drains_requests_in_flight(start_sim, tmp_path):
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--truth-log", str(truth_path))
    out = tmp_path / "run"
    t0 = time.monotonic()
    rc, log = harness_load("--url", url, "--rate", "4", "--duration", "4", *LOAD, "--out", str(out),
                           "--quiet", timeout=90)
    assert rc == 0, _why(out, log)
    recs = _records(out)
    truth = _truth(truth_path, len(recs))
    assert set(truth) == set(recs)
    assert all(r["ok"] for r in recs.values()), "the drain lets every request finish"
    assert all(t["finish_reason"] != "abort" for t in truth.values())
    s = summary(out)
    assert s["requests"]["incomplete"] == 0 and s["drain"]["waited_s"] > 0.2
    assert s["drain"]["timeout_s"] == 600.0   # the default is the request --timeout
    # the measured window is first send to last finish, the drain included
    first = min(r["sent_at"] for r in recs.values())
    last = max(r["finished_at"] for r in recs.values())
    assert abs(s["duration_s"] - (last - first)) < 0.05
    assert s["duration_s"] > 4.0 and time.monotonic() - t0 < 60


def test_requests_still_running_after_the_drain_timeout_are_incomplete(start_sim, tmp_path):
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--truth-log", str(truth_path))
    out = tmp_path / "run"
    rc, log = harness_load("--url", url, "--rate", "4", "--duration", "6", "--drain-timeout", "0.3",
                           "--input-len", "64", "--output-len", "150", *LOAD[4:], "--out", str(out),
                           timeout=90)
    assert rc == 0, _why(out, log)   # incomplete requests are not failures
    recs = _records(out)
    truth = _truth(truth_path, len(recs))
    _assert_every_server_request_recorded(truth, recs)
    incomplete = [r for r in recs.values() if r["error_kind"] == "incomplete"]
    assert incomplete, "150-token requests (~4 s) sent late in a 6 s run cannot all finish in 0.3 s"
    # what was measured before the stop is kept: TTFT and the tokens so far
    started = [r for r in incomplete if r["ttft_ms"] is not None]
    assert started and all(0 < r["output_tokens"] < 150 and r["e2e_ms"] is None for r in started)
    _assert_summary_counts(out, recs)
    assert "incomplete" in log and summary(out)["drain"]["timeout_s"] == 0.3


def test_two_workers_duration_run_records_every_request(start_sim, tmp_path):
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--truth-log", str(truth_path))
    out = tmp_path / "run"
    rc, log = harness_load("--url", url, "--rate", "6", "--duration", "4", "--workers", "2",
                           "--drain-timeout", "0.5", "--input-len", "64", "--output-len", "120",
                           *LOAD[4:], "--out", str(out), "--quiet", timeout=90)
    assert rc == 0, _why(out, log)
    recs = _records(out)
    truth = _truth(truth_path, len(recs))
    _assert_every_server_request_recorded(truth, recs)
    _assert_summary_counts(out, recs)
    assert "recovered" not in summary(out), "both workers' last reports reached the master"


def test_ctrl_c_records_requests_in_flight_as_incomplete(start_sim, tmp_path):
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--truth-log", str(truth_path))
    out = tmp_path / "run"
    run = start_load("--url", url, "--rate", "6", "--duration", "60", "--workers", "2", *LOAD,
                     "--out", str(out), "--quiet")
    assert wait_for(lambda: whole_lines(truth_path) >= 3 or run.proc.poll() is not None, 30)
    run.signal_group(signal.SIGINT)   # Ctrl-C reaches the whole process group
    rc, log = run.wait(60)
    recs = _records(out)
    truth = _truth(truth_path, sum(1 for r in recs.values() if r["ttft_ms"] is not None))
    _assert_every_server_request_recorded(truth, recs)
    assert any(r["error_kind"] == "incomplete" for r in recs.values())
    s = summary(out)
    assert s["interrupted"] is True and s["drain"]["waited_s"] is None   # a signal does not drain
    _assert_summary_counts(out, recs)


def test_killed_worker_requests_are_still_recorded(start_sim, tmp_path):
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--truth-log", str(truth_path))
    out = tmp_path / "run"
    run = start_load("--url", url, "--rate", "6", "--duration", "8", "--workers", "2",
                     "--drain-timeout", "0.5", "--input-len", "64", "--output-len", "120",
                     *LOAD[4:], "--out", str(out), "--quiet")

    def workers():
        try:
            master = psutil.Process(run.proc.pid).children()
            return master[0].children() if master else []
        except psutil.Error:
            return []
    assert wait_for(lambda: len(workers()) == 2 and whole_lines(out / "started.jsonl") >= 4, 30)
    workers()[0].kill()   # SIGKILL: it writes nothing more
    rc, log = run.wait(90)
    recs = _records(out)
    truth = _truth(truth_path, len(recs))
    _assert_every_server_request_recorded(truth, recs)
    s = summary(out)
    assert "recovered" in s
    _assert_summary_counts(out, recs)


def test_plain_locust_run_time_drains_and_records_every_request(start_sim, tmp_path):
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--truth-log", str(truth_path))
    out = tmp_path / "run"
    rc, log = locust("-f", "locustfiles/chat.py", "--headless", "--host", url, "-u", "1", "-r", "1",
                     "--run-time", "4s", "--llm-rate", "4", "--llm-input-len", "64",
                     "--llm-output-len", "64", "--llm-cpu-limit", "1000", "--llm-lag-limit-ms", "1000000",
                     "--llm-stamp-delay-limit-ms", "0", "--llm-out", str(out), timeout=90)
    assert rc == 0, _why(out, log)
    recs = _records(out)
    truth = _truth(truth_path, len(recs))
    assert set(truth) == set(recs) and all(r["ok"] for r in recs.values())
    assert summary(out)["drain"]["waited_s"] > 0.2


def test_num_requests_with_a_concurrency_cap_sends_and_records_every_one(start_sim, tmp_path):
    """The last arrivals wait for a --max-concurrency slot: the run must not end under them."""
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--truth-log", str(truth_path))
    out = tmp_path / "run"
    rc, log = harness_load("--url", url, "--rate", "50", "--max-concurrency", "2", "--num-requests", "7",
                           *LOAD, "--out", str(out), "--quiet",
                           timeout=90)
    assert rc == 0, _why(out, log)
    recs = _records(out)
    assert len(recs) == 7 and all(r["ok"] for r in recs.values())
    assert set(_truth(truth_path, 7)) == set(recs)
