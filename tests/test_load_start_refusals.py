"""`harness load` refuses what cannot run before any load -- a zero or negative count, a port
it was told to listen on that is taken -- in one line naming the option (exit 2, nothing
written), and a plan's load stage shows that line as the stage's error, not a log tail."""
from __future__ import annotations

import json
import socket
import sys

import pytest

from conftest import free_port_block
from harness import cli
from loadrun import Run

BASE = ["load", "--url", "http://127.0.0.1:9", "--duration", "5"]


def _refusal(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, line", [
    (["--workers", "0"], "--workers must be at least 1 process, not 0"),
    (["--workers", "-2"], "--workers must be at least 1 process, not -2"),
    (["--input-len", "0"], "--input-len must be at least 1 token, not 0"),
    (["--output-len", "-1"], "--output-len must be at least 1 token, not -1"),
    (["--shared-prefix-len", "-8"], "--shared-prefix-len must be >= 0 tokens, not -8"),
    (["--num-requests", "-3"], "--num-requests must be >= 0 requests (0: no limit), not -3"),
    (["--window", "0"], "--window must be > 0 seconds (one timeseries line each), not 0"),
    (["--drain-timeout", "-1"], "--drain-timeout must be >= 0 seconds (0: no wait for requests in flight), not -1"),
    (["--metrics-port", "70000"], "--metrics-port must be a port in 1..65535 (0: off), not 70000"),
])
def test_a_count_out_of_range_is_one_line_naming_it(extra, line, tmp_path, capsys):
    out = tmp_path / "run"
    assert _refusal(BASE + ["--out", str(out)] + extra, capsys) == f"harness load: error: {line}"
    assert not out.exists()


def test_a_taken_metrics_port_is_one_line_naming_the_option_that_moves_it(tmp_path, capsys):
    held = socket.socket()
    held.bind(("127.0.0.1", free_port_block(1)))
    held.listen()
    port = held.getsockname()[1]
    out = tmp_path / "run"
    try:
        err = _refusal(BASE + ["--out", str(out), "--metrics-port", str(port)], capsys)
    finally:
        held.close()
    assert err == (f"harness load: error: --metrics-port {port}: 127.0.0.1:{port} is already in use by "
                   f"another process; stop it or pick another port with --metrics-port PORT")
    assert not out.exists()


def test_a_load_stage_that_cannot_start_shows_harness_loads_one_line(sim_server, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
name: refused
stages:
  - name: serving
    stage: serving
    target: {{url: {sim_server}, model: no-such-model}}
    users: 1
    num_requests: 2
    input_len: 16
    output_len: 4
""")
    out = tmp_path / "out"
    rc, log = Run([sys.executable, "-m", "harness.cli", "run", str(plan), "--out", str(out)]).wait(120)
    assert rc != 0, log
    line = (f"harness load exited with 2 before any load: --model 'no-such-model' is not served by "
            f"{sim_server}; it serves: meta-llama/Meta-Llama-3-8B-Instruct")
    detail = json.loads((out / "serving" / "error.json").read_text())["detail"]
    assert detail == f"RuntimeError: {line}", detail
    assert line in log
    assert not (out / "serving" / "load" / "requests.jsonl").exists()
