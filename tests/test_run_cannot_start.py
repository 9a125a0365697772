"""A run that cannot do anything says why at once and exits 2, instead of idling until its
time is up with dead users: a key-protected server without the key, a broken dataset, users
that all died."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port_block
from loadrun import harness_load, locust

KEY = "the-right-key"


@pytest.fixture
def protected_server():
    """Answers 401 to anything without `Authorization: Bearer KEY` (as vLLM with --api-key)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_a):
            pass

        def _reply(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            ok = self.headers.get("Authorization") == f"Bearer {KEY}"
            body = json.dumps({"data": [{"id": "m"}]} if ok else {"error": "Unauthorized"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _reply

    server = ThreadingHTTPServer(("127.0.0.1", free_port_block(1)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_refused_key_is_one_line_before_a_plain_locust_run(protected_server, tmp_path):
    rc, log = locust("-f", "locustfiles/chat.py", "--headless", "--host", protected_server,
                     "-u", "2", "-r", "2", "--run-time", "120s", "--llm-out", str(tmp_path / "run"),
                     env={"OPENAI_API_KEY": ""}, timeout=60)
    assert rc == 2, log
    lines = [ln for ln in log.splitlines() if "error" in ln]
    assert lines == [f"locust: error: --host {protected_server}: GET /v1/models answered 401: no API key "
                     f"was sent: set $OPENAI_API_KEY"], log
    assert not (tmp_path / "run").exists()


def test_a_refused_key_ends_a_plain_locust_run_at_once_with_exit_2(protected_server, tmp_path):
    t0 = time.monotonic()
    rc, log = locust("-f", "locustfiles/chat.py", "--headless", "--host", protected_server,
                     "-u", "2", "-r", "2", "--run-time", "120s", "--llm-out", str(tmp_path / "run"),
                     "--llm-no-preflight",   # about the run's own stop, past the check before it
                     env={"OPENAI_API_KEY": ""}, timeout=60)
    assert rc == 2, log
    assert time.monotonic() - t0 < 30, "the run idled instead of stopping"
    assert "/v1/models answered 401" in log and "OPENAI_API_KEY" in log
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "401" in s["error"]


def test_a_refused_key_ends_harness_load_with_exit_2(protected_server, tmp_path):
    rc, log = harness_load("--url", protected_server, "--users", "2", "--duration", "120", "--out",
                           str(tmp_path / "run"), "--quiet", env={"OPENAI_API_KEY": "wrong"}, timeout=60)
    assert rc == 2, log
    assert "was refused" in log


def test_the_key_is_sent_when_listing_models(protected_server, tmp_path):
    """With the right key, /v1/models answers (and the run goes on to send requests)."""
    rc, log = harness_load("--url", protected_server, "--users", "1", "--num-requests", "2", "--out",
                           str(tmp_path / "run"), "--quiet", "--cpu-limit", "1000",
                           "--stamp-delay-limit-ms", "0", env={"OPENAI_API_KEY": KEY}, timeout=60)
    assert "/v1/models answered" not in log, log


@pytest.mark.parametrize("content, where", [
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",, }\n', ":3: not a JSON line"),
    ('{"prompt": "a"}\n["not", "an", "object"]\n', ":2: expected an object"),
    ('{"prompt": 5}\n', ":1: expected an object"),
])
def test_a_bad_dataset_line_is_named_before_any_load(sim_server, tmp_path, content, where):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(content)
    t0 = time.monotonic()
    rc, log = harness_load("--url", sim_server, "--users", "1", "--duration", "60", "--dataset", str(bad),
                           "--out", str(tmp_path / "run"), timeout=30)
    assert rc == 2 and where in log, log
    assert len(log.strip().splitlines()) == 1 and time.monotonic() - t0 < 15
    rc, log = locust("-f", "locustfiles/chat.py", "--headless", "--host", sim_server, "-u", "1", "-r", "1",
                     "--run-time", "60s", "--llm-dataset", str(bad), timeout=30)
    assert rc == 2 and where in log, log


def test_a_json_dataset_error_names_line_and_column(sim_server, tmp_path):
    bad = tmp_path / "sharegpt.json"
    bad.write_text('[\n  {"conversations": []},\n  {"conversations": [}\n]\n')
    rc, log = harness_load("--url", sim_server, "--users", "1", "--duration", "60", "--dataset", str(bad),
                           "--out", str(tmp_path / "run"), timeout=30)
    assert rc == 2 and "sharegpt.json:3: not valid JSON" in log and "column" in log, log


DYING = '''
import harness.plugin  # noqa: F401
from harness.llm_user import ChatUser


class Dies(ChatUser):
    def on_start(self):
        raise ValueError("this user cannot start")
'''


def test_a_run_whose_users_all_died_stops_with_exit_2(sim_server, tmp_path):
    lf = tmp_path / "dying.py"
    lf.write_text(DYING)
    t0 = time.monotonic()
    rc, log = locust("-f", str(lf), "--headless", "--host", sim_server, "-u", "2", "-r", "2",
                     "--run-time", "120s", "--llm-window", "1", "--llm-out", str(tmp_path / "run"),
                     timeout=60)
    assert rc == 2, log
    assert time.monotonic() - t0 < 30 and "every Locust user has stopped" in log


def test_a_dead_url_is_one_line_and_exit_2_before_any_load(tmp_path):
    port = free_port_block(1)
    rc, log = harness_load("--url", f"http://127.0.0.1:{port}", "--users", "2", "--duration", "60",
                           "--out", str(tmp_path / "run"), timeout=30)
    assert rc == 2, log
    assert log.strip().splitlines() == [log.strip()] and f"127.0.0.1:{port}: no server answers" in log
    assert not (tmp_path / "run" / "requests.jsonl").exists()


def test_a_model_the_server_does_not_serve_names_the_ones_it_does(sim_server, tmp_path):
    rc, log = harness_load("--url", sim_server, "--model", "no-such-model", "--users", "1",
                           "--duration", "60", "--out", str(tmp_path / "run"), timeout=30)
    assert rc == 2, log
    assert "'no-such-model' is not served" in log and "meta-llama/Meta-Llama-3-8B-Instruct" in log
