"""Every request ends, and says why (#19.3, #19.7): a whole-request deadline that a trickle of
bytes cannot dodge (an endless ``: keepalive`` stream, a head sent a line at a time), a cap on
the bytes read for one response, and the classification of what is not an event stream
(``not_event_stream``) or not HTTP (``protocol``).

harness.http_stream against raw socket servers on loopback, with blocking sockets here and under
gevent (how Locust reads: the event-loop pump) in a subprocess, then `harness load` end to end.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness.http_stream import (
    DeadlineExceeded,
    NotEventStream,
    ProtocolError,
    ResponseTooLarge,
    StreamingConnection,
)
from harness.timing import ERROR_KINDS, default_request_deadline
from loadrun import harness_load, read_jsonl, summary

REPO = Path(__file__).resolve().parents[1]
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
MODELS = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(obj) -> bytes:
    return _chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")


GOOD_STREAM = (SSE_HEAD + _event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
               + _event({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
               + _event({"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "length"}]})
               + _event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
               + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def _read_request(conn: socket.socket) -> tuple[str, str] | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while m and len(body) < int(m.group(1)):
        body += conn.recv(65536)
    method, path = head.split(b" ", 2)[:2]
    return method.decode(), path.decode()


def _misbehave(conn: socket.socket, mode: str, stop: threading.Event) -> bool:
    """Answer one chat request the way ``mode`` says; False: the connection is finished."""
    if mode == "ok":
        conn.sendall(GOOD_STREAM)
        return True
    if mode == "keepalive":            # an event stream that never ends: a comment every 0.1 s
        conn.sendall(SSE_HEAD)
        while not stop.wait(0.1):
            conn.sendall(_chunk(b": keepalive\n\n"))
    elif mode == "trickle_head":       # a head that never ends: one header line every 0.1 s
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        i = 0
        while not stop.wait(0.1):
            conn.sendall(b"x-trickle-%d: 1\r\n" % i)
            i += 1
    elif mode == "html":               # a complete page, not a stream
        page = b"<html><body>Service moved</body></html>"
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(page), page))
        return True
    elif mode == "garbage":            # not HTTP at all, and the connection stays open
        conn.sendall(b"SSH-2.0-OpenSSH_9.0\r\n")
        stop.wait(3)
    elif mode == "bad_chunk":          # an event stream whose chunk framing breaks
        conn.sendall(SSE_HEAD + _event({"choices": [{"index": 0, "delta": {"content": "a"}}]})
                     + b"zz\r\nnot a chunk\r\n")
        stop.wait(3)
    elif mode == "huge":               # an endless stream of bytes, as fast as they go
        conn.sendall(SSE_HEAD)
        blob = _chunk(b": " + b"x" * 65000 + b"\n\n")
        while not stop.is_set():
            conn.sendall(blob)
    return False


class Misbehaving:
    """An OpenAI-ish server on loopback: /v1/models answers, /tokenize is 404, and the n-th chat
    request is answered as ``modes[n]`` says (the last mode repeats)."""

    def __init__(self, modes: list[str]) -> None:
        self.modes = modes
        self.chats = 0
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                while not self.stop.is_set():
                    req = _read_request(conn)
                    if req is None:
                        return
                    method, path = req
                    if method == "GET" and path.startswith("/v1/models"):
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\n\r\n%s" % (len(MODELS), MODELS))
                        continue
                    if not path.startswith("/v1/chat/completions"):
                        conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        continue
                    with self.lock:
                        n, self.chats = self.chats, self.chats + 1
                    if not _misbehave(conn, self.modes[min(n, len(self.modes) - 1)], self.stop):
                        return
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def misbehaving():
    servers: list[Misbehaving] = []

    def start(*modes: str) -> Misbehaving:
        s = Misbehaving(list(modes))
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def _conn(url: str, timeout: float = 5.0, **kw) -> StreamingConnection:
    return StreamingConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=timeout, **kw)


# -- the client, blocking sockets ---------------------------------------------------------------


def test_an_endless_keepalive_stream_hits_the_deadline(misbehaving):
    srv = misbehaving("keepalive")
    c = _conn(srv.url, deadline=0.6)
    resp = c.post_stream("/v1/chat/completions", b"{}")
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as e:
        for _ in resp:
            pass
    took = time.monotonic() - t0
    assert e.value.error_kind == "deadline"
    assert 0.3 < took < 2.0, took   # the comments kept coming: the read timeout (5 s) never fired


def test_a_head_trickled_a_line_at_a_time_hits_the_deadline(misbehaving):
    srv = misbehaving("trickle_head")
    c = _conn(srv.url, deadline=0.6)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        c.post_stream("/v1/chat/completions", b"{}")
    assert time.monotonic() - t0 < 2.0


def test_the_deadline_is_per_request(misbehaving):
    srv = misbehaving("ok")
    c = _conn(srv.url, deadline=1.0)
    for _ in range(3):   # a kept-alive connection: each request has its own deadline
        assert b"[DONE]" in b"".join(d for d, _ in c.post_stream("/v1/chat/completions", b"{}"))
        time.sleep(0.6)
    assert c.connects == 1


def test_a_response_over_the_byte_cap_is_too_large(misbehaving):
    srv = misbehaving("huge")
    c = _conn(srv.url, max_body_bytes=1_000_000, deadline=10)
    got = 0
    with pytest.raises(ResponseTooLarge) as e:
        for data, _ in c.post_stream("/v1/chat/completions", b"{}"):
            got += len(data)
    assert e.value.error_kind == "too_large" and got <= 1_000_000


def test_a_200_page_is_not_an_event_stream_and_a_garbage_status_line_is_protocol(misbehaving):
    srv = misbehaving("html", "garbage", "bad_chunk")
    c = _conn(srv.url)
    resp = c.post_stream("/v1/chat/completions", b"{}")
    assert resp.status == 200   # the caller still has the status and headers
    with pytest.raises(NotEventStream) as e:
        list(resp)
    assert e.value.error_kind == "not_event_stream" and "text/html" in str(e.value)
    t0 = time.monotonic()
    with pytest.raises(ProtocolError):   # at once: no waiting for a head that will never come
        c.post_stream("/v1/chat/completions", b"{}")
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(ProtocolError):
        list(c.post_stream("/v1/chat/completions", b"{}"))
    # a plain GET is not held to the event-stream rule
    assert c.request("GET", "/v1/models")[0] == 200


def test_no_bounds_by_default_and_the_derived_default():
    c = StreamingConnection("127.0.0.1", 9)
    assert c.deadline is None and c.max_body_bytes is None
    assert default_request_deadline(600, 128) == 728


# -- the client under gevent: the event-loop pump (what Locust runs) ------------------------------

GEVENT = textwrap.dedent('''
    from gevent import monkey; monkey.patch_all()
    import sys, time
    import gevent
    sys.path.insert(0, "tests")
    from test_hardening_stream import Misbehaving
    from harness.http_stream import (StreamingConnection, DeadlineExceeded, ResponseTooLarge,
                                     NotEventStream, ProtocolError, ReadTimeout)

    def conn(srv, **kw):
        return StreamingConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]), **kw)

    def expect(exc, fn, within):
        t0 = time.monotonic()
        try:
            fn()
        except exc as e:
            took = time.monotonic() - t0
            assert took < within, (exc, took)
            return took, e
        raise SystemExit(f"no {exc.__name__}")

    srv = Misbehaving(["keepalive", "trickle_head", "huge", "html", "bad_chunk", "ok", "keepalive"])
    # the keepalive stream, read by the pump: the deadline fires though bytes keep coming
    c = conn(srv, timeout=5.0, deadline=0.6, max_body_bytes=1_000_000)
    got = []
    took, _ = expect(DeadlineExceeded, lambda: c.post_stream("/v1/chat/completions", b"{}").pump(
        lambda d, t: got.append(d)), 2.0)
    assert took >= 0.3 and b"keepalive" in b"".join(got), (took, got[:2])
    expect(DeadlineExceeded, lambda: c.post_stream("/v1/chat/completions", b"{}"), 2.0)
    total = []
    expect(ResponseTooLarge, lambda: c.post_stream("/v1/chat/completions", b"{}").pump(
        lambda d, t: total.append(len(d))), 5.0)
    assert sum(total) <= 1_000_000
    resp = c.post_stream("/v1/chat/completions", b"{}")
    assert resp.status == 200
    expect(NotEventStream, lambda: resp.pump(lambda d, t: None), 1.0)
    expect(ProtocolError, lambda: c.post_stream("/v1/chat/completions", b"{}").pump(lambda d, t: None), 2.0)
    ok = []
    c.post_stream("/v1/chat/completions", b"{}").pump(lambda d, t: ok.append(d))
    assert b"[DONE]" in b"".join(ok)
    # a read timeout shorter than the deadline still means silence only: comments every 0.1 s
    # never trip a 0.3 s timeout, and the 1 s deadline ends the stream
    c2 = conn(srv, timeout=0.3, deadline=1.0)
    took, _ = expect(DeadlineExceeded, lambda: c2.post_stream("/v1/chat/completions", b"{}").pump(
        lambda d, t: None), 3.0)
    assert took >= 0.8, took
    # other greenlets ran meanwhile (the deadline is a timer, not a busy check)
    ticks = []
    g = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.05)) for _ in range(10)])
    c3 = conn(srv, timeout=5.0, deadline=0.5)
    expect(DeadlineExceeded, lambda: c3.post_stream("/v1/chat/completions", b"{}").pump(lambda d, t: None), 2.0)
    g.join()
    assert len(ticks) == 10
    srv.close()
    print("ok")
''')


def test_under_gevent_the_pump_keeps_the_deadline_and_the_cap():
    r = subprocess.run([sys.executable, "-c", GEVENT], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


# -- end to end ------------------------------------------------------------------------------------

LOAD = ("--model", "m", "--users", "1", "--input-len", "8", "--output-len", "2", "--quiet",
        "--cpu-limit", "1000", "--stamp-delay-limit-ms", "0")


def test_harness_load_ends_every_request_and_names_why(misbehaving, tmp_path):
    srv = misbehaving("keepalive", "trickle_head", "html", "garbage", "bad_chunk", "huge", "ok")
    out = tmp_path / "run"
    t0 = time.monotonic()
    rc, log = harness_load("--url", srv.url, "--num-requests", "7", "--timeout", "5",
                           "--request-deadline", "1.5", "--max-response-bytes", "1000000",
                           "--out", str(out), *LOAD, timeout=90)
    assert rc == 4, log   # requests failed and no error_rate SLO judged them
    kinds = [r["error_kind"] for r in read_jsonl(out / "requests.jsonl")]
    assert sorted(kinds, key=str) == sorted(["deadline", "deadline", "not_event_stream", "protocol",
                                             "protocol", "too_large", None], key=str), kinds
    recs = {r["error_kind"]: r for r in read_jsonl(out / "requests.jsonl")}
    assert recs["not_event_stream"]["status"] == 200
    s = summary(out)
    assert s["requests"]["errors_by_kind"] == {"deadline": 2, "not_event_stream": 1, "protocol": 2,
                                               "too_large": 1}
    assert time.monotonic() - t0 < 60


def test_the_default_deadline_comes_from_the_timeout_and_the_output_length(misbehaving, tmp_path):
    srv = misbehaving("keepalive")
    out = tmp_path / "run"
    rc, log = harness_load("--url", srv.url, "--num-requests", "1", "--timeout", "1",
                           "--out", str(out), *LOAD, timeout=60)
    [rec] = read_jsonl(out / "requests.jsonl")
    assert rec["error_kind"] == "deadline", (rec, log)
    took = rec["finished_at"] - rec["sent_at"]
    expected = default_request_deadline(1.0, 2)   # --timeout 1 + 1 s per output token = 3 s
    assert expected - 0.1 <= took < expected + 2.0, took


# -- the README says what the code does ------------------------------------------------------------


def test_readme_error_kinds_are_the_codes():
    text = (REPO / "README.md").read_text()
    bullet = text[text.index("- **Errors** are never retried"):]
    bullet = bullet[:bullet.index("The **results directory**")]
    listed = re.findall(r"^\s*\| `([a-z_<>]+)` \|", bullet, re.M)
    assert listed[0] == "http_<status>"
    assert sorted(listed[1:]) == sorted(ERROR_KINDS), listed
