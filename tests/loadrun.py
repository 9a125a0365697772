"""Helpers for the load-run tests (tests/test_load_*.py): run `harness load` or plain
`locust` as a subprocess in its own process group, bounded in time, and read results.

Every process a helper starts is in a new session whose id is the PID of the process we
started; at the end the whole group (Locust master and its forked workers included) is
killed by that id, so nothing outlives a test.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Run:
    """A started process group; `wait()` returns (rc, output)."""

    def __init__(self, argv: list[str], env: dict | None = None):
        self.log = tempfile.TemporaryFile()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=full_env, start_new_session=True)
        self.pgid = self.proc.pid

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.proc.args[:4]}... still running after {timeout} s:\n"
                                 + self.output()[-4000:]) from None
        finally:
            self.cleanup()
        return rc, self.output()

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def cleanup(self) -> None:
        """Whatever is left of the group (e.g. workers of a killed master) goes."""
        self.signal_group(signal.SIGKILL)


def start_load(*args: str, env: dict | None = None) -> Run:
    return Run([sys.executable, "-m", "harness.cli", "load", *args], env)


def harness_load(*args: str, timeout: float = 60.0, env: dict | None = None) -> tuple[int, str]:
    """Run `harness load ARGS` to the end; (exit code, stdout+stderr)."""
    return start_load(*args, env=env).wait(timeout)


def locust(*args: str, timeout: float = 60.0, env: dict | None = None) -> tuple[int, str]:
    """Run plain `locust ARGS` to the end; (exit code, stdout+stderr)."""
    return Run([sys.executable, "-m", "locust", *args], env).wait(timeout)


def read_jsonl(path: Path) -> list[dict]:
    """Every line must be a whole JSON object (the contract after any kill)."""
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            assert line.endswith(b"\n"), f"{path}:{n} is a torn line: {line[:80]!r}"
            out.append(json.loads(line))
    return out


def whole_lines(path: Path) -> int:
    """Newline-ended lines in a file another process is still appending to (0 before it
    exists); polls count these, so a torn last line is never parsed."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def locust_aggregated(out: Path) -> dict:
    """The Aggregated row of Locust's own locust_stats.csv."""
    import csv
    with open(out / "locust_stats.csv") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                return row
    raise AssertionError("no Aggregated row in locust_stats.csv")


def http_get(url: str, timeout: float = 2.0) -> str | None:
    """The body of a GET, or None when nothing answers it (for polls)."""
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
