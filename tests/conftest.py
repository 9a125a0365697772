"""Shared fixtures.

`start_sim` starts the real `harness sim` command as a subprocess on free loopback ports,
waits until every replica answers `/health`, and terminates it (by PID) at teardown:

    def test_x(start_sim):
        base_url, proc = start_sim("--profile", "h100-llama-3-8b-bf16", "--replicas", "2")

`sim_server` is the same with no extra arguments (default profile) and gives the base URL,
e.g. "http://127.0.0.1:43121" (no trailing slash, no /v1).
"""
from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.ports import free_port_block  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 15.0


def _healthy(host: str, port: int) -> bool:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=0.5)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 5 s; only this PID."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def launch_sim(*extra_args: str) -> tuple[str, subprocess.Popen]:
    """Start `harness sim` with `extra_args`; returns (base_url, proc) once /health answers.

    The caller owns the process (see `stop_process`). `--port` and `--replicas` in
    `extra_args` are honoured; otherwise a free block of ports is chosen.
    """
    args = list(extra_args)
    replicas = int(args[args.index("--replicas") + 1]) if "--replicas" in args else 1
    if "--port" in args:
        port = int(args[args.index("--port") + 1])
    else:
        port = free_port_block(replicas)
        args = ["--port", str(port)] + args
    host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
    log = tempfile.TemporaryFile()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sim", *args], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    pending = list(range(port, port + replicas))
    while pending:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"harness sim exited with {proc.returncode}: "
                               f"{log.read().decode(errors='replace').strip()}")
        if time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"harness sim did not answer /health on {pending} "
                               f"within {STARTUP_TIMEOUT_S} s")
        if _healthy(host, pending[0]):
            pending.pop(0)
        else:
            time.sleep(0.05)
    proc.log = log  # type: ignore[attr-defined]  # the server's stdout+stderr
    return f"http://{host}:{port}", proc


@pytest.fixture
def start_sim():
    """Factory: start_sim(*extra_args) -> (base_url, proc); every process stopped at teardown."""
    procs: list[subprocess.Popen] = []

    def _start(*extra_args: str) -> tuple[str, subprocess.Popen]:
        base_url, proc = launch_sim(*extra_args)
        procs.append(proc)
        return base_url, proc

    yield _start
    for proc in procs:
        stop_process(proc)
        proc.log.close()  # type: ignore[attr-defined]


@pytest.fixture
def sim_server(start_sim) -> str:
    """A default `harness sim` (l40s-llama-3-8b-bf16) on a free port; its base URL."""
    base_url, _proc = start_sim()
    return base_url
