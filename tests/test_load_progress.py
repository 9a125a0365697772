"""Live progress while a load runs (harness.progress, harness.live_progress), and what the end of
`harness load` prints: a bar on a terminal, plain lines on a pipe at the configured interval, the
same figures for `harness run`'s load stages, nothing with --quiet, and Locust's own
"approximated" tables only when asked for."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

from harness import progress
from loadrun import REPO, Run, harness_load, locust, summary

GEN_OK = ("--cpu-limit", "1000", "--lag-limit-ms", "1000000", "--stamp-delay-limit-ms", "0")
PLAIN_GEN_OK = ("--llm-cpu-limit", "1000", "--llm-lag-limit-ms", "1000000",
                "--llm-stamp-delay-limit-ms", "0")
SMALL = ("--input-len", "16", "--output-len", "16")
NUM = r"(-|[\d,]+\.\d)"
LINE = re.compile(rf"^progress: (\d+)/(\d+) requests, (\d+) s( \(end\))?: TTFT p50 {NUM}( ms)?, "
                  rf"TPOT p50 {NUM}( ms)?, {NUM} output tok/s, (\d+) failed$")
LOCUST_TABLE = "Response time percentiles (approximated)"


def _lines(log: str) -> list[dict]:
    out = []
    for text in log.splitlines():
        m = LINE.match(text.strip())
        if m:
            num = lambda s: None if s == "-" else float(s.replace(",", ""))  # noqa: E731
            out.append({"done": int(m[1]), "of": int(m[2]), "elapsed": int(m[3]), "final": bool(m[4]),
                        "ttft": num(m[5]), "tpot": num(m[7]), "tok_s": num(m[9]), "failed": int(m[10])})
    return out


def test_on_a_pipe_a_progress_line_comes_every_interval_with_the_runs_figures(sim_server, tmp_path):
    out = tmp_path / "run"
    rc, log = harness_load("--url", sim_server, "--users", "1", "--num-requests", "16", *SMALL,
                           "--progress-interval", "2", "--out", str(out), *GEN_OK, timeout=90)
    assert rc == 0, log
    lines = _lines(log)
    live, last = [ln for ln in lines if not ln["final"]], lines[-1]
    assert len(live) >= 3, log
    gaps = [b["elapsed"] - a["elapsed"] for a, b in zip(live, live[1:])]
    assert all(1 <= g <= 3 for g in gaps), (gaps, log)          # every 2 s, not every tick
    assert [ln["done"] for ln in live] == sorted(ln["done"] for ln in live)
    assert any(0 < ln["done"] < 16 and ln["ttft"] and ln["tpot"] and ln["tok_s"] for ln in live), log
    # the last line is the run's end, in the summary's own figures
    s = summary(out)
    assert last["final"] and last["done"] == last["of"] == 16 == s["requests"]["completed"]
    assert last["failed"] == 0
    assert last["ttft"] == round(s["ttft_ms"]["p50"], 1) and last["tpot"] == round(s["tpot_ms"]["p50"], 1)
    assert abs(last["tok_s"] - s["output_tokens_per_s"]) <= 0.01 * s["output_tokens_per_s"] + 0.1
    status = json.loads((out / progress.STATUS_FILE).read_text())
    assert status["final"] and status["done"] == 16


def test_a_duration_bounded_run_shows_time_of_its_duration(sim_server, tmp_path):
    rc, log = harness_load("--url", sim_server, "--users", "1", "--duration", "4", *SMALL,
                           "--progress-interval", "1", "--out", str(tmp_path / "run"), *GEN_OK)
    assert rc == 0, log
    lines = [ln for ln in log.splitlines() if ln.startswith("progress: ")]
    assert len(lines) >= 3 and all(re.match(r"progress: \d/4 s, \d+ requests", ln) for ln in lines), log
    assert re.match(r"progress: 4/4 s, [1-9]\d* requests \(end\): TTFT p50 [\d.]+ ms", lines[-1]), log


def test_with_workers_the_master_shows_the_merged_run(sim_server, tmp_path):
    out = tmp_path / "run"
    rc, log = harness_load("--url", sim_server, "--users", "4", "--workers", "2", "--num-requests", "12",
                           *SMALL, "--progress-interval", "1", "--out", str(out), *GEN_OK, timeout=90)
    assert rc == 0, log
    lines = _lines(log)
    assert lines[-1]["final"] and lines[-1]["done"] == 12, log   # both workers' requests
    assert sorted(summary(out)["generator"]["requests_by_worker"].values()) == [6, 6]
    assert len([ln for ln in log.splitlines() if ln.startswith("progress: ")]) == len(lines)  # master only


def _run_on_a_terminal(argv: list[str], timeout: float = 90) -> tuple[int, str]:
    """argv with its stdout on a pseudo-terminal of 150 columns; (exit code, what it drew)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    proc = subprocess.Popen(argv, cwd=REPO, stdout=slave, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    os.close(slave)
    data, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:   # the terminal closed: every writer is gone
                    break
                if not chunk:
                    break
                data += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(5)
    finally:
        os.close(master)
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
    return rc, data.decode(errors="replace")


def test_on_a_terminal_a_progress_bar_is_drawn(sim_server, tmp_path):
    rc, screen = _run_on_a_terminal([sys.executable, "-m", "harness.cli", "load", "--url", sim_server,
                                     "--users", "2", "--num-requests", "6", *SMALL,
                                     "--out", str(tmp_path / "run"), *GEN_OK])
    assert rc == 0, screen
    frames = [f for f in screen.split("\r") if f.startswith("requests:")]
    assert len(frames) >= 2, screen                                       # redrawn in place
    assert re.match(r"requests: 100%\|█+\| 6/6 req \[\d\d:\d\d<00:00, TTFT p50 [\d.]+ ms, "
                    r"TPOT p50 [\d.]+ ms, [\d,.]+ output tok/s, 0 failed\]", frames[-1]), frames[-1]
    assert "progress: " not in screen                                     # no plain lines there
    assert "TTFT  " in screen and "results: " in screen                   # then the summary table


def test_quiet_prints_no_progress(sim_server, tmp_path):
    out = tmp_path / "run"
    rc, log = harness_load("--url", sim_server, "--users", "2", "--num-requests", "6", *SMALL, "--quiet",
                           "--progress-interval", "1", "--out", str(out), *GEN_OK)
    assert rc == 0, log
    assert "progress" not in log and "TTFT" not in log, log
    status = json.loads((out / progress.STATUS_FILE).read_text())   # the status file still is
    assert status["final"] and status["done"] == 6


def test_locusts_own_tables_are_left_out_by_default(sim_server, tmp_path):
    out = tmp_path / "run"
    rc, log = harness_load("--url", sim_server, "--users", "1", "--num-requests", "2", *SMALL,
                           "--out", str(out), *GEN_OK)
    assert rc == 0, log
    assert LOCUST_TABLE not in log and "Aggregated" not in log, log
    stats = json.loads((out / "locust.json").read_text())     # kept, as Locust's own JSON
    assert sum(s["num_requests"] for s in stats) == 2


def test_locust_stats_prints_locusts_own_tables(sim_server, tmp_path):
    rc, log = harness_load("--url", sim_server, "--users", "1", "--num-requests", "2", *SMALL,
                           "--locust-stats", "--out", str(tmp_path / "run"), *GEN_OK)
    assert rc == 0, log
    assert LOCUST_TABLE in log and "Aggregated" in log, log


def test_plain_locust_headless_prints_progress_lines_and_keeps_its_tables(sim_server, tmp_path):
    rc, log = locust("-f", "locustfiles/chat.py", "--headless", "--host", sim_server, "-u", "2", "-r", "2",
                     "--run-time", "30s", "--llm-num-requests", "8", "--llm-input-len", "16",
                     "--llm-output-len", "16", "--llm-progress-interval", "1",
                     "--llm-out", str(tmp_path / "run"), *PLAIN_GEN_OK, timeout=90)
    assert rc == 0, log
    lines = _lines(log)
    assert len(lines) >= 2 and lines[-1]["final"] and lines[-1]["done"] == 8, log
    assert LOCUST_TABLE in log, log       # plain Locust keeps its own output


def test_a_bad_progress_interval_is_one_line(sim_server, tmp_path):
    rc, log = harness_load("--url", sim_server, "--num-requests", "2", "--progress-interval", "0",
                           "--out", str(tmp_path / "run"))
    assert rc == 2 and "--progress-interval" in log and len(log.strip().splitlines()) == 1, log


def test_harness_run_shows_a_load_stages_progress(sim_server, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
name: progress
stages:
  - name: serving
    stage: serving
    target: {{url: {sim_server}}}
    rate: 2
    num_requests: 20
    input_len: 16
    output_len: 16
    cpu_limit: 1000
    lag_limit_ms: 1000000
""")
    run = Run([sys.executable, "-m", "harness.cli", "run", str(plan), "--out", str(tmp_path / "out")])
    _rc, log = run.wait(120)
    lines = [ln.strip() for ln in log.splitlines() if ln.strip().startswith("serving/load: ")]
    assert lines, log
    m = re.match(r"serving/load: (\d+)/20 requests, \d+ s: TTFT p50 ([\d.]+) ms, TPOT p50 [\d.]+ ms, "
                 r"[\d,.]+ output tok/s, 0 failed$", lines[-1])
    assert m and 0 < int(m[1]) <= 20 and float(m[2]) > 0, lines


def test_auto_mode():
    # a web UI shows the figures itself; a terminal gets a bar unless Locust prints its tables there
    assert progress.choose_mode("auto", True, headless=False, locust_prints_tables=False) == "off"
    assert progress.choose_mode("auto", True, headless=True, locust_prints_tables=False) == "bar"
    assert progress.choose_mode("auto", True, headless=True, locust_prints_tables=True) == "lines"
    assert progress.choose_mode("auto", False, headless=True, locust_prints_tables=False) == "lines"
    assert progress.choose_mode("off", True, headless=True, locust_prints_tables=False) == "off"
