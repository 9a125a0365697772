"""The web UI cannot be used to steal a secret or move the results: a forged start form is
refused, the API key goes only to the target given at start, and the UI listens on loopback.

Real Locust (plain `locust -f locustfiles/chat.py` with its web UI) against two capture servers
on loopback that record every request's Authorization header: the configured target and an
"elsewhere" an attacker would point the test at.
"""
from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port_block
from harness.credentials import ApiKey, origin
from harness.webui import forbidden_form_keys
from loadrun import Run, http_get, wait_for

TARGET_KEY = "key-for-the-target-0123"
STOLEN = "stolen-secret-4567"


def _sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


STREAM = _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
              {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
              {"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "length"}]},
              {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})


class Capture:
    """A minimal OpenAI-compatible server that records (method, path, Authorization)."""

    def __init__(self, port: int) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a):
                pass

            def _answer(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                seen.append(("GET", self.path, self.headers.get("Authorization")))
                self._answer(200, "application/json", json.dumps({"data": [{"id": "m"}]}).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen.append(("POST", self.path, self.headers.get("Authorization")))
                if self.path.startswith("/v1/chat/completions"):
                    self._answer(200, "text/event-stream", STREAM)
                else:
                    self._answer(404, "application/json", b'{"detail": "Not Found"}')

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def chats(self) -> list:
        return [s for s in self.seen if s[1].startswith("/v1/chat/completions")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ui(tmp_path):
    """Locust's web UI (plain `locust -f locustfiles/chat.py`) aimed at a capture target, with a
    second capture server elsewhere; the API key in OPENAI_API_KEY and another secret beside it."""
    base = free_port_block(3)
    target, elsewhere = Capture(base), Capture(base + 1)
    web = f"http://127.0.0.1:{base + 2}"
    run = Run([sys.executable, "-m", "locust", "-f", "locustfiles/chat.py", "--host", target.url,
               "--web-port", str(base + 2), "--llm-rate", "4", "--llm-out", str(tmp_path / "run"),
               "--llm-cpu-limit", "1000"],
              env={"OPENAI_API_KEY": TARGET_KEY, "OTHER_SECRET": STOLEN})
    try:
        assert wait_for(lambda: http_get(web + "/") is not None, 30), run.output()
        yield web, target, elsewhere, run, tmp_path
    finally:
        run.kill()
        run.cleanup()
        target.close()
        elsewhere.close()


def _post(url: str, form: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_forged_start_form_with_hidden_options_is_refused(ui):
    web, target, elsewhere, run, tmp = ui
    evil_out = tmp / "evil"
    status, body = _post(web + "/swarm", {"user_count": 1, "spawn_rate": 1, "host": elsewhere.url,
                                          "llm_api_key_env": "OTHER_SECRET", "llm_out": str(evil_out),
                                          "csv_prefix": str(tmp / "evil-csv")})
    assert status == 400 and body["success"] is False
    for name in ("llm_api_key_env", "llm_out", "csv_prefix"):
        assert name in body["message"]
    wait_for(lambda: elsewhere.seen, 2)
    assert elsewhere.seen == [] and not evil_out.exists()


def test_key_goes_only_to_the_target_given_at_start(ui):
    web, target, elsewhere, run, tmp = ui
    status, body = _post(web + "/swarm", {"user_count": 1, "spawn_rate": 1, "host": elsewhere.url})
    assert status == 200 and body["success"], body
    assert wait_for(lambda: len(elsewhere.chats()) >= 2, 20), run.output()[-3000:]
    assert all(auth is None for _m, _p, auth in elsewhere.seen), elsewhere.seen
    assert _post(web + "/stop", {})[0] == 200
    assert wait_for(lambda: json.loads(http_get(web + "/stats/requests") or "{}").get("state") == "stopped", 20)
    status, body = _post(web + "/swarm", {"user_count": 1, "spawn_rate": 1, "host": target.url})
    assert status == 200 and body["success"], body
    assert wait_for(lambda: len(target.chats()) >= 2, 20), run.output()[-3000:]
    # every request to the target carries the key: the model list and the streams alike
    assert {auth for _m, _p, auth in target.seen} == {f"Bearer {TARGET_KEY}"}
    assert ("GET", "/v1/models", f"Bearer {TARGET_KEY}") in target.seen
    out = run.output()
    assert STOLEN not in out and TARGET_KEY not in out
    for f in (p for p in (tmp / "run").rglob("*") if p.is_file()):   # the first test's in test-1/
        assert TARGET_KEY not in f.read_text(errors="replace"), f


def test_web_ui_and_master_listen_on_loopback_by_default(ui):
    web, *_rest, run, _tmp = ui
    assert "Starting web interface at http://127.0.0.1:" in run.output()
    import psutil
    addrs = {c.laddr.ip for p in [psutil.Process(run.proc.pid)] for c in p.net_connections("tcp")
             if c.status == psutil.CONN_LISTEN}
    assert addrs == {"127.0.0.1"}, addrs


def test_only_fields_the_form_shows_may_be_posted():
    options = {"num_users": 1, "host": "", "llm_rate": 0.0, "llm_out": "", "llm_api_key_env": "K",
               "csv_prefix": None}
    posted = ["user_count", "spawn_rate", "host", "llm_rate", "llm_out", "llm_api_key_env",
              "csv_prefix", "not_an_option"]
    assert forbidden_form_keys(posted, options, shown={"llm_rate"}) == ["csv_prefix", "llm_api_key_env",
                                                                         "llm_out"]


def test_api_key_is_sent_to_configured_origins_only(monkeypatch):
    monkeypatch.setenv("THE_KEY", "abc")
    key = ApiKey("THE_KEY", ["http://127.0.0.1:8000", None, "http://LocalHost"])
    assert key.headers_for("http://127.0.0.1:8000/v1/x") == {"Authorization": "Bearer abc"}
    assert key.headers_for("http://localhost:80") == {"Authorization": "Bearer abc"}
    assert key.headers_for("http://127.0.0.1:8001") == {}
    assert key.headers_for("http://evil.example:8000") == {}
    monkeypatch.setenv("THE_KEY", "changed later")
    assert key.headers_for("http://127.0.0.1:8000") == {"Authorization": "Bearer abc"}   # read once
    assert "abc" not in repr(key)
    assert origin("no scheme") is None


def test_a_remote_worker_takes_the_key_source_and_origins_from_its_master(tmp_path):
    """A worker started with no --llm-* options (compose, another host) sends the key its
    master names, to the master's start-time target only, and writes where the master says."""
    base = free_port_block(2)
    target = Capture(base)
    out = tmp_path / "run"
    env = {"MY_KEY": TARGET_KEY}
    master = Run([sys.executable, "-m", "locust", "-f", "locustfiles/chat.py", "--master", "--headless",
                  "--expect-workers", "1", "--master-bind-port", str(base + 1), "--host", target.url,
                  "-u", "1", "-r", "1", "--run-time", "4s", "--llm-rate", "4", "--llm-api-key-env", "MY_KEY",
                  "--llm-out", str(out), "--llm-cpu-limit", "1000", "--llm-stamp-delay-limit-ms", "0"], env=env)
    worker = Run([sys.executable, "-m", "locust", "-f", "locustfiles/chat.py", "--worker",
                  "--master-port", str(base + 1)], env=env)
    try:
        rc, log = master.wait(60)
        worker.wait(20)
    finally:
        master.cleanup()
        worker.cleanup()
        target.close()
    assert target.chats(), log
    assert {auth for _m, _p, auth in target.seen} == {f"Bearer {TARGET_KEY}"}, [x for x in target.seen if x[2] is None]
    assert (out / "requests.jsonl").read_text().count("\n") == len(target.chats())
