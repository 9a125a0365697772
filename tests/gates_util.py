"""Helpers for the CI-gate tests (SLO exit codes, soak, compare): run `harness ...` as a
subprocess in its own session, bounded in time, and kill exactly that process group
(the Locust master and the workers it forked) if it overruns."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def harness(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`python -m harness.cli ARGS`; (returncode, stdout, stderr) once it exits."""
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        raise AssertionError(f"harness {' '.join(args)} ran over {timeout} s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def load(url: str, out: Path, *extra: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """A short closed-loop `harness load` against `url` writing to `out`."""
    return harness("load", "--url", url, "--out", str(out), "--quiet", *extra, timeout=timeout)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())
