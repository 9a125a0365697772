"""Results survive interruption: every line of requests.jsonl is whole JSON at any moment,
and an interrupted (SIGINT/SIGTERM) run still writes a summary that counts every line."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from loadrun import read_jsonl, start_load, summary, wait_for, whole_lines


def _start_long_run(url, out, workers="2"):
    run = start_load("--url", url, "--users", "4", "--workers", workers, "--duration", "60",
                     "--input-len", "32", "--output-len", "16", "--out", str(out), "--quiet",
                     # about interruption, not generator health: a busy shared machine's
                     # start-up CPU samples must not turn the exit code into 3
                     "--cpu-limit", "1000", "--stamp-delay-limit-ms", "0")
    assert wait_for(lambda: whole_lines(out / "requests.jsonl") >= 8 or run.proc.poll() is not None, 30), \
        run.output()
    assert run.proc.poll() is None, run.output()
    return run


def _locust_master(run) -> psutil.Process:
    kids = psutil.Process(run.proc.pid).children()
    assert len(kids) == 1 and "locust" in " ".join(kids[0].cmdline())
    return kids[0]


def test_sigint_to_the_process_group_still_writes_a_complete_summary(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    run = _start_long_run(url, out)
    run.signal_group(signal.SIGINT)          # Ctrl-C in a terminal: every process gets it
    rc, log = run.wait(30)
    records = read_jsonl(out / "requests.jsonl")
    s = summary(out)
    # the workers shipped their last measurements before leaving: nothing was lost
    assert s["requests"]["completed"] + s["requests"]["failed"] + s["requests"]["incomplete"] == len(records) >= 8, log
    assert "recovered" not in s
    assert s["interrupted"] is True
    assert rc == 128 + signal.SIGINT, log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_harness_load_alone_reaches_locust_once_and_exits_128_plus_it(start_sim, tmp_path, sig):
    url, _ = start_sim()
    out = tmp_path / "run"
    run = _start_long_run(url, out)
    run.proc.send_signal(sig)                # `kill -INT PID` / `kill PID`: not the group
    rc, log = run.wait(30)
    assert rc == 128 + sig, log
    s = summary(out)
    assert s["interrupted"] is True and "recovered" not in s
    records = read_jsonl(out / "requests.jsonl")
    assert s["requests"]["completed"] + s["requests"]["failed"] + s["requests"]["incomplete"] == len(records)

def test_sigkill_of_the_whole_run_leaves_only_whole_lines(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    run = _start_long_run(url, out)
    time.sleep(0.3)
    run.signal_group(signal.SIGKILL)
    run.wait(10)
    records = read_jsonl(out / "requests.jsonl")   # asserts every line is whole
    assert len(records) >= 8 and all(r["id"] and r["ok"] for r in records)


def test_sigkill_of_the_locust_master_stops_its_workers_and_keeps_lines_whole(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    run = _start_long_run(url, out)
    master = _locust_master(run)
    workers = master.children()
    assert len(workers) == 2
    master.kill()
    try:
        rc = run.proc.wait(15)
        # the orphaned workers shut down at once (parent-death signal) instead of loading the
        # server until their heartbeat to the master times out; checked before `run.wait`,
        # whose clean-up SIGKILLs the whole process group (workers included) and would make
        # this vacuous
        gone, alive = psutil.wait_procs(workers, timeout=10)
    finally:
        rc, log = run.wait(5)
    assert rc != 0 and "no summary was written" in log
    assert not alive, alive
    read_jsonl(out / "requests.jsonl")


def test_sigkill_of_harness_load_lets_locust_finish_and_write_the_summary(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    run = _start_long_run(url, out, workers="1")
    master = _locust_master(run)
    run.proc.kill()                           # only `harness load` itself
    run.proc.wait(5)
    try:
        assert wait_for(lambda: (out / "summary.json").exists(), 15), "no summary after SIGTERM"
        psutil.wait_procs([master], timeout=10)
    finally:
        run.cleanup()
    records = read_jsonl(out / "requests.jsonl")
    s = summary(out)
    assert s["requests"]["completed"] + s["requests"]["failed"] + s["requests"]["incomplete"] == len(records) >= 8


def _append_offset(proc: psutil.Process, path) -> int | None:
    """Where `proc`'s O_APPEND descriptor of `path` stands: the end of its own last write."""
    real = os.path.realpath(path)
    for f in proc.open_files():
        if os.path.realpath(f.path) == real:
            return f.position
    return None


def _kill_right_after_its_next_line(proc: psutil.Process, path, timeout: float = 20.0) -> None:
    first = _append_offset(proc, path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pos = _append_offset(proc, path)
        if pos is not None and pos != first:
            proc.kill()
            return
        time.sleep(0.002)
    raise AssertionError(f"worker {proc.pid} wrote no line to {path} in {timeout} s")


def test_summary_is_rebuilt_from_requests_jsonl_when_a_worker_is_killed(start_sim, tmp_path):
    """A worker killed outright never sends its last report; the master notices that
    requests.jsonl holds more requests than the reports carried and rebuilds from it."""
    url, _ = start_sim()
    out = tmp_path / "run"
    run = start_load("--url", url, "--users", "4", "--workers", "2", "--duration", "7",
                     "--input-len", "32", "--output-len", "16", "--out", str(out), "--quiet",
                     # about interruption, not generator health: a busy shared machine's
                     # start-up CPU samples must not turn the exit code into 3
                     "--cpu-limit", "1000")
    try:
        assert wait_for(lambda: whole_lines(out / "requests.jsonl") >= 6, 30), run.output()
        worker = _locust_master(run).children()[0]
        # Kill it within milliseconds of appending a line, so that line is not in a report
        # yet (a worker reports every 3 s: killed at an arbitrary moment, e.g. a slow
        # machine's, it may have no line newer than its last report, and then there is
        # nothing to rebuild; now that needs a report in those few milliseconds, ~0.1%).
        _kill_right_after_its_next_line(worker, out / "requests.jsonl")
        rc, log = run.wait(40)
    finally:
        run.cleanup()
    records = read_jsonl(out / "requests.jsonl")
    s = summary(out)
    assert "recovered" in s, s.get("generator")
    assert s["requests"]["completed"] + s["requests"]["failed"] + s["requests"]["incomplete"] == len(records)
    # a run that lost a worker did not offer the load it was asked for
    assert s["generator"]["valid"] is False and rc == 3, (rc, s["generator"])
    assert any("worker stopped mid-run" in r for r in s["generator"]["reasons"])
