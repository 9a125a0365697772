"""A server that sends no `usage`: output tokens are counted with a tokenizer (the
server's /tokenize when it has one, else a local estimate) and marked as estimated."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness.workload import regex_token_count
from loadrun import harness_load, read_jsonl, summary

PIECES = ["Hello", " world,", " this", " is", " fine."]
TEXT = "".join(PIECES)


def _server(with_tokenize: bool):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/v1/models":
                return self._json(200, {"object": "list", "data": [{"id": "no-usage"}]})
            self._json(404, {"error": "no route"})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize" and with_tokenize:
                text = req.get("prompt") or " ".join(m["content"] for m in req.get("messages", []))
                return self._json(200, {"count": len(text.split())})
            if self.path != "/v1/chat/completions":
                return self._json(404, {"error": "no route"})
            # No usage even though stream_options.include_usage was asked for (old servers).
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()       # HTTP/1.0: the body ends when the connection closes
            events = [{"delta": {"role": "assistant"}, "finish_reason": None}]
            events += [{"delta": {"content": p}, "finish_reason": None} for p in PIECES]
            events[-1]["finish_reason"] = "length"
            for e in events:
                chunk = {"id": "x", "object": "chat.completion.chunk", "model": "no-usage",
                         "choices": [{"index": 0, **e}]}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return srv


@pytest.mark.parametrize("with_tokenize,expected", [(True, len(TEXT.split())),
                                                     (False, regex_token_count(TEXT))])
def test_output_tokens_without_usage_are_counted_and_marked_estimated(tmp_path, with_tokenize, expected):
    assert len(TEXT.split()) != regex_token_count(TEXT)   # the two paths are told apart
    srv = _server(with_tokenize)
    try:
        out = tmp_path / "run"
        rc, log = harness_load("--url", f"http://127.0.0.1:{srv.server_port}", "--users", "2",
                               "--num-requests", "4", "--input-len", "8", "--output-len", "5",
                               "--out", str(out), "--quiet",
                               # about token counting, not generator health: a busy shared
                               # machine's CPU samples must not turn the exit code into 3
                               "--cpu-limit", "1000", timeout=40)
    finally:
        srv.shutdown()
        srv.server_close()
    assert rc == 0, log
    records = read_jsonl(out / "requests.jsonl")
    assert len(records) == 4
    for r in records:
        assert r["ok"] and r["tokens_estimated"] is True
        assert r["output_tokens"] == expected
        assert len(r["itl_ms"]) == len(PIECES) - 1     # ITL is per event when counts are unknown
        assert r["tpot_ms"] is not None
    s = summary(out)
    assert s["requests"]["tokens_estimated"] == 4
    assert s["output_tokens"] == 4 * expected
