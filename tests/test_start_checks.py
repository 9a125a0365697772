"""Plain Locust with the plugin (`locust -f locustfiles/chat.py`) checks before any load, as
`harness load` does: a dead URL, a model the server does not serve, a count out of range and
a port already taken are each one line naming the thing, exit 2, nothing sent, nothing written.
In the web UI the same checks refuse a test's start (the form is told why) and the UI stays up.
"""
from __future__ import annotations

import json
import socket
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import free_port_block
from loadrun import Run, http_get, locust, wait_for, whole_lines

HEADLESS = ("-f", "locustfiles/chat.py", "--headless", "-u", "1", "-r", "1", "--run-time", "20s",
            "--llm-input-len", "16", "--llm-output-len", "4")
SERVED = "meta-llama/Meta-Llama-3-8B-Instruct"   # the default simulator profile's model


def _error_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "error" in ln.lower()]


@pytest.fixture
def held_port():
    """A loopback port another process (this test) is listening on."""
    s = socket.socket()
    s.bind(("127.0.0.1", free_port_block(1)))
    s.listen()
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def sim_with_truth(start_sim, tmp_path):
    """A simulator whose truth log has a line for every request it was sent."""
    truth = tmp_path / "truth.jsonl"
    url, _proc = start_sim("--truth-log", str(truth))
    return url, truth


def test_a_dead_url_is_one_line_naming_it_and_exit_2(tmp_path):
    port = free_port_block(1)
    out = tmp_path / "run"
    rc, log = locust(*HEADLESS, "--host", f"http://127.0.0.1:{port}", "--llm-out", str(out), timeout=60)
    assert rc == 2, log
    lines = _error_lines(log)
    assert len(lines) == 1, log
    assert lines[0].startswith(f"locust: error: --host http://127.0.0.1:{port}: no server answers")
    assert "ConnectionRefusedError" in lines[0]
    assert not out.exists()


def test_a_model_the_server_does_not_serve_names_the_ones_it_does(sim_with_truth, tmp_path):
    url, truth = sim_with_truth
    out = tmp_path / "run"
    rc, log = locust(*HEADLESS, "--host", url, "--llm-model", "no-such-model", "--llm-out", str(out),
                     timeout=60)
    assert rc == 2, log
    assert _error_lines(log) == [f"locust: error: --llm-model 'no-such-model' is not served by {url}; "
                                 f"it serves: {SERVED}"]
    assert not out.exists() and whole_lines(truth) == 0


@pytest.mark.parametrize("option, value, line", [
    ("--llm-num-requests", "-3", "--llm-num-requests must be >= 0 requests (0: no limit), not -3"),
    ("--llm-max-concurrency", "-1", "--llm-max-concurrency must be >= 0 requests in flight (0: no cap), not -1"),
    ("--llm-input-len", "0", "--llm-input-len must be at least 1 token, not 0"),
    ("--llm-output-len", "-4", "--llm-output-len must be at least 1 token, not -4"),
    ("--llm-shared-prefix-len", "-1", "--llm-shared-prefix-len must be >= 0 tokens, not -1"),
    ("--llm-timeout", "0", "--llm-timeout must be > 0 seconds (the longest silence a request may have), not 0"),
    ("--llm-window", "-5", "--llm-window must be > 0 seconds (one timeseries line each), not -5"),
    ("-u", "0", "-u/--users must be at least 1 concurrent user, not 0"),
])
def test_a_count_out_of_range_is_one_line_naming_the_option(sim_with_truth, tmp_path, option, value, line):
    url, truth = sim_with_truth
    out = tmp_path / "run"
    rc, log = locust(*HEADLESS, "--host", url, option, value, "--llm-out", str(out), timeout=60)
    assert rc == 2, log
    assert _error_lines(log) == [f"locust: error: {line}"], log
    assert not out.exists() and whole_lines(truth) == 0


def test_a_taken_metrics_port_is_one_line_naming_the_option_that_moves_it(sim_with_truth, held_port, tmp_path):
    url, truth = sim_with_truth
    out = tmp_path / "run"
    rc, log = locust(*HEADLESS, "--host", url, "--llm-metrics-port", str(held_port), "--llm-out", str(out),
                     timeout=60)
    assert rc == 2, log
    assert _error_lines(log) == [f"locust: error: --llm-metrics-port {held_port}: 127.0.0.1:{held_port} is "
                                 f"already in use by another process; stop it or pick another port with "
                                 f"--llm-metrics-port PORT"], log
    assert "Traceback" not in log and not out.exists() and whole_lines(truth) == 0


def test_a_taken_web_port_is_one_line_naming_the_option_that_moves_it(sim_server, held_port, tmp_path):
    rc, log = locust("-f", "locustfiles/chat.py", "--host", sim_server, "--web-port", str(held_port),
                     "--llm-out", str(tmp_path / "run"), timeout=60)
    assert rc == 2, log
    assert _error_lines(log) == [f"locust: error: --web-port {held_port}: 127.0.0.1:{held_port} is already "
                                 f"in use by another process; stop it or pick another port with "
                                 f"--web-port PORT"], log
    assert "Traceback" not in log


def _start(web: str, form: dict) -> dict:
    req = urllib.request.Request(web + "/swarm", data=urllib.parse.urlencode(form).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=15) as r:
        return json.loads(r.read())


def _state(web: str) -> str | None:
    body = http_get(web + "/stats/requests")
    return json.loads(body)["state"] if body else None


def test_the_web_ui_refuses_a_start_at_a_dead_url_and_stays_up_for_the_next(sim_with_truth, tmp_path):
    url, truth = sim_with_truth
    web_port, dead = free_port_block(1), free_port_block(1)
    out = tmp_path / "run"
    run = Run([sys.executable, "-m", "locust", "-f", "locustfiles/chat.py", "--host", url,
               "--web-port", str(web_port), "--llm-out", str(out), "--llm-cpu-limit", "1000",
               "--llm-lag-limit-ms", "1000000", "--llm-stamp-delay-limit-ms", "0"])
    web = f"http://127.0.0.1:{web_port}"
    try:
        assert wait_for(lambda: http_get(web + "/") is not None, 30), run.output()
        form = {"user_count": 1, "spawn_rate": 1, "llm_input_len": 16, "llm_output_len": 4}
        answer = _start(web, {**form, "host": f"http://127.0.0.1:{dead}", "run_time": "1s"})
        assert answer["success"] is False, answer
        assert answer["message"].startswith(f"test not started: --host http://127.0.0.1:{dead}: "
                                            f"no server answers"), answer
        assert f"test not started: --host http://127.0.0.1:{dead}" in run.output()
        time.sleep(1.5)   # past the run time it asked for: no stop came for the test that never ran
        assert _state(web) == "ready" and not out.exists()

        answer = _start(web, {**form, "host": url, "llm_model": "no-such-model"})
        assert answer["success"] is False and answer["message"].endswith(f"it serves: {SERVED}"), answer
        assert _state(web) == "ready" and not out.exists() and whole_lines(truth) == 0

        answer = _start(web, {**form, "host": url, "llm_model": ""})
        assert answer["success"] is True, answer
        assert wait_for(lambda: whole_lines(out / "requests.jsonl") >= 2, 30), run.output()[-3000:]
        assert "Traceback" not in run.output()
    finally:
        run.kill()
        run.cleanup()


def test_a_web_host_that_is_not_this_machines_is_one_line_naming_the_address(sim_server, tmp_path):
    port = free_port_block(1)
    rc, log = locust("-f", "locustfiles/chat.py", "--host", sim_server, "--web-host", "192.0.2.1",
                     "--web-port", str(port), "--llm-out", str(tmp_path / "run"), timeout=60)
    assert rc == 2, log
    lines = _error_lines(log)
    assert len(lines) == 1 and lines[0].startswith(f"locust: error: --web-port {port}: cannot listen on "
                                                   f"192.0.2.1:{port} ("), log
    assert "Traceback" not in log
