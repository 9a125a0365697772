"""Specification of harness.http_stream against a real socket server on 127.0.0.1.

The server runs in a thread, writes with known delays, and is always shut down by the fixture.
Timing assertions use the delays as hard lower bounds (the client cannot see bytes before they
are written) and generous upper bounds (this machine is shared and noisy).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness.http_stream import (
    ConnectError,
    ConnectTimeout,
    Disconnected,
    ReadTimeout,
    StreamingConnection,
    _ChunkedDecoder,
)
from harness.sse import SSEParser

MS = 1_000_000
SLACK_MS = 150  # upper-bound slack for scheduling noise on a shared machine

ROLE = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        b'"finish_reason":null}]}\n\n')


def token_event(text: str, finish: str | None = None) -> bytes:
    fr = "null" if finish is None else f'"{finish}"'
    return (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"},"logprobs":null,'
            b'"finish_reason":' + fr.encode() + b'}]}\n\n')


USAGE = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[],"usage":{"prompt_tokens":10,"total_tokens":14,"completion_tokens":4}}\n\n')
DONE = b"data: [DONE]\n\n"

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def read_request(conn: socket.socket) -> bytes | None:
    """Read one HTTP request (head + Content-Length body); None when the client closed."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


class Server:
    """Accepts connections and runs ``handler(conn, index)`` for each, in one thread."""

    def __init__(self, handler, max_conns: int = 4) -> None:
        self.handler = handler
        self.max_conns = max_conns
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and self.accepted < self.max_conns:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            index = self.accepted
            self.accepted += 1
            conn.settimeout(5)
            try:
                with conn:
                    self.handler(conn, index)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except BaseException as e:  # surfaced by the fixture
                self.errors.append(e)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(handler, max_conns: int = 4) -> Server:
        s = Server(handler, max_conns)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()
        assert not s.errors, s.errors


def collect(resp) -> list[tuple[bytes, int]]:
    return list(resp)


def sse_events(chunks: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
    p = SSEParser()
    out: list[tuple[bytes, int]] = []
    for data, t in chunks:
        out += p.feed(data, t)
    return out


# -- timing ----------------------------------------------------------------------------------


def test_first_chunk_time_reflects_the_servers_delay_before_the_first_token(serve):
    def handler(conn, _):
        read_request(conn)
        conn.sendall(SSE_HEAD)
        time.sleep(0.15)
        conn.sendall(chunk(token_event("Hi")))
        conn.sendall(chunk(DONE) + LAST_CHUNK)

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        resp = c.post_stream("/v1/chat/completions", b'{"stream":true}')
        assert resp.status == 200
        events = sse_events(collect(resp))
    first_ms = (events[0][1] - resp.sent_ns) / MS
    assert 150 <= first_ms < 150 + SLACK_MS


def test_gaps_between_chunks_match_the_servers_write_delays(serve):
    delays = [0.05, 0.1, 0.03]

    def handler(conn, _):
        read_request(conn)
        conn.sendall(SSE_HEAD + chunk(ROLE))
        for i, d in enumerate(delays):
            time.sleep(d)
            conn.sendall(chunk(token_event(f"w{i}")))
        conn.sendall(chunk(USAGE + DONE) + LAST_CHUNK)

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        resp = c.post_stream("/v1/chat/completions", b"{}")
        events = sse_events(collect(resp))
    assert len(events) == 6
    times = [t for _, t in events[:4]]
    # A token cannot arrive before the server's cumulative delay; a single gap can look a little
    # short when the previous read was late, so gaps get a tolerance both ways.
    for i, t in enumerate(times[1:]):
        assert (t - resp.sent_ns) / MS >= sum(delays[:i + 1]) * 1000
    gaps_ms = [(b - a) / MS for a, b in zip(times, times[1:])]
    for gap, d in zip(gaps_ms, delays):
        assert d * 1000 - 30 <= gap < d * 1000 + SLACK_MS


def test_event_split_across_writes_is_stamped_when_its_last_piece_arrives(serve):
    event = token_event("split")
    pieces = [event[:20], event[20:60], event[60:]]

    def handler(conn, _):
        read_request(conn)
        conn.sendall(SSE_HEAD)
        for piece in pieces:
            conn.sendall(chunk(piece))
            time.sleep(0.04)
        conn.sendall(LAST_CHUNK)

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        resp = c.post_stream("/v1/chat/completions", b"{}")
        chunks = collect(resp)
    events = sse_events(chunks)
    assert events == [(event[6:-2], events[0][1])]
    assert events[0][1] == chunks[-1][1]
    assert (events[0][1] - resp.sent_ns) / MS >= 80


def test_several_events_in_one_write_arrive_as_one_chunk_with_one_time(serve):
    body = ROLE + token_event("a") + token_event("b", "length") + USAGE + DONE

    def handler(conn, _):
        read_request(conn)
        conn.sendall(SSE_HEAD + chunk(body) + LAST_CHUNK)

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        chunks = collect(c.post_stream("/v1/chat/completions", b"{}"))
    assert b"".join(d for d, _ in chunks) == body
    events = sse_events(chunks)
    assert len(events) == 5
    assert len({t for _, t in events}) == 1


# -- body framing ----------------------------------------------------------------------------


def test_chunked_decoder_gives_the_same_body_for_every_split_point():
    body = ROLE + token_event("x")
    wire = chunk(body[:50]) + chunk(body[50:]) + b"0\r\nX-Trailer: 1\r\n\r\n"
    for cut in range(1, len(wire)):
        d = _ChunkedDecoder()
        out = d.feed(wire[:cut]) + d.feed(wire[cut:])
        assert out == body and d.done, cut


def test_content_length_body_is_read_exactly_and_connection_kept(serve):
    def handler(conn, _):
        for _ in range(2):
            read_request(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
            time.sleep(0.02)
            conn.sendall(b'{"ok":true}')

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        assert c.request("GET", "/v1/models") == (200, {"content-length": "11"}, b'{"ok":true}')
        assert c.request("POST", "/tokenize", b'{"prompt":"a"}')[2] == b'{"ok":true}'
        assert c.connects == 1


def test_body_without_framing_is_read_until_the_server_closes(serve):
    def handler(conn, _):
        read_request(conn)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\npart one, ")
        time.sleep(0.02)
        conn.sendall(b"part two")

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        assert c.request("GET", "/") == (200, {}, b"part one, part two")


def test_error_status_is_returned_not_raised(serve):
    def handler(conn, _):
        read_request(conn)
        msg = b'{"object":"error","message":"too long","code":400}'
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(msg), msg))

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        resp = c.post_stream("/v1/chat/completions", b"{}")
        assert (resp.status, resp.reason) == (400, "Bad Request")
        assert b"too long" in resp.read()


def test_interim_100_continue_is_skipped(serve):
    def handler(conn, _):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        assert c.request("POST", "/x", b"{}")[::2] == (200, b"ok")


def test_request_bytes_carry_host_length_and_json_defaults(serve):
    seen: list[bytes] = []

    def handler(conn, _):
        seen.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        c.request("POST", "/v1/completions", b'{"a":1}', {"Authorization": "Bearer k"})
    head = seen[0].lower()
    assert head.startswith(b"post /v1/completions http/1.1\r\n")
    for line in (b"host: 127.0.0.1:%d" % srv.port, b"content-length: 7",
                 b"content-type: application/json", b"authorization: bearer k"):
        assert line in head
    assert seen[0].endswith(b'\r\n\r\n{"a":1}')


# -- failures --------------------------------------------------------------------------------


def test_connection_closed_mid_stream_raises_disconnect_after_the_chunks_received(serve):
    def handler(conn, _):
        read_request(conn)
        conn.sendall(SSE_HEAD + chunk(ROLE))
        time.sleep(0.02)
        conn.sendall(chunk(token_event("a")))
        time.sleep(0.02)
        # close without the terminating zero-size chunk

    srv = serve(handler)
    got: list[bytes] = []
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        resp = c.post_stream("/v1/chat/completions", b"{}")
        with pytest.raises(Disconnected) as exc:
            for data, _ in resp:
                got.append(data)
    assert exc.value.error_kind == "disconnect"
    assert b"".join(got) == ROLE + token_event("a")


def test_server_that_never_answers_raises_read_timeout(serve):
    release = threading.Event()

    def handler(conn, _):
        read_request(conn)
        release.wait(5)

    srv = serve(handler)
    t0 = time.monotonic()
    with StreamingConnection("127.0.0.1", srv.port, timeout=0.3) as c:
        with pytest.raises(ReadTimeout) as exc:
            c.post_stream("/v1/chat/completions", b"{}")
    release.set()
    assert exc.value.error_kind == "timeout"
    assert 0.3 <= time.monotonic() - t0 < 3


def test_silence_in_the_middle_of_a_stream_raises_read_timeout(serve):
    release = threading.Event()

    def handler(conn, _):
        read_request(conn)
        conn.sendall(SSE_HEAD + chunk(ROLE))
        release.wait(5)

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=0.3) as c:
        resp = c.post_stream("/v1/chat/completions", b"{}")
        it = iter(resp)
        assert next(it)[0] == ROLE
        with pytest.raises(ReadTimeout):
            next(it)
    release.set()


def test_refused_connection_raises_connect_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ConnectError) as exc:
        StreamingConnection("127.0.0.1", port, timeout=2).request("GET", "/")
    assert exc.value.error_kind == "connect"


def test_connect_that_hangs_raises_connect_timeout():
    # A listener whose accept queue is full drops further SYNs, so connecting hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            f = socket.socket()
            f.settimeout(0.2)
            fillers.append(f)
            try:
                f.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("kernel accepted every connection; cannot make connect hang")
        t0 = time.monotonic()
        with pytest.raises(ConnectTimeout) as exc:
            StreamingConnection("127.0.0.1", port, timeout=5, connect_timeout=0.3).request("GET", "/")
        assert exc.value.error_kind == "connect"
        assert 0.3 <= time.monotonic() - t0 < 3
    finally:
        for f in fillers:
            f.close()
        listener.close()


# -- keep-alive and retries --------------------------------------------------------------------


def test_stale_keep_alive_connection_is_replaced_before_sending(serve):
    closed = threading.Event()
    per_conn_requests: list[int] = []

    def handler(conn, index):
        read_request(conn)
        per_conn_requests.append(1)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if index == 0:
            conn.close()  # idle keep-alive timeout on the server side
            closed.set()

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        assert c.request("GET", "/a")[2] == b"ok"
        assert closed.wait(5)
        time.sleep(0.05)  # let the FIN reach the client
        resp = c.post_stream("/v1/chat/completions", b"{}")
        assert resp.read() == b"ok"
        assert not resp.reused
        assert c.connects == 2
    assert per_conn_requests == [1, 1]


def test_request_the_server_may_have_seen_is_never_retried(serve):
    requests_seen: list[int] = []

    def handler(conn, index):
        read_request(conn)
        requests_seen.append(index)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if read_request(conn) is not None:
            requests_seen.append(index)
            # read the request, then drop the connection without answering

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        assert c.request("GET", "/a")[2] == b"ok"
        with pytest.raises(Disconnected):
            c.post_stream("/v1/chat/completions", b"{}")
        assert c.connects == 1
    time.sleep(0.3)
    assert requests_seen == [0, 0]
    assert srv.accepted == 1


def test_unfinished_body_closes_the_connection_so_the_next_request_starts_clean(serve):
    def handler(conn, index):
        read_request(conn)
        if index == 0:
            conn.sendall(SSE_HEAD + chunk(ROLE))
            time.sleep(0.2)
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    srv = serve(handler)
    with StreamingConnection("127.0.0.1", srv.port, timeout=5) as c:
        resp = c.post_stream("/v1/chat/completions", b"{}")
        next(iter(resp))
        resp.close()
        assert c.request("GET", "/b")[2] == b"ok"
        assert c.connects == 2


GEVENT_SCRIPT = textwrap.dedent('''
    from gevent import monkey; monkey.patch_all()
    import gevent, socket, time
    from gevent.server import StreamServer
    from harness.http_stream import StreamingConnection

    def handle(conn, addr):
        buf = b""
        while b"\\r\\n\\r\\n" not in buf:
            buf += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\ntransfer-encoding: chunked\\r\\n\\r\\n")
        for i in range(3):
            gevent.sleep(0.05)
            conn.sendall(b"6\\r\\ndata-%d\\r\\n" % i)
        conn.sendall(b"0\\r\\n\\r\\n")
        conn.close()  # keep-alive ends after one request

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    c = StreamingConnection("127.0.0.1", server.server_port, timeout=5)
    for _ in range(2):
        resp = c.post_stream("/x", b"{}")
        chunks = list(resp)
        arrivals = [(t - resp.sent_ns) / 1e6 for _, t in chunks]
        assert b"".join(d for d, _ in chunks) == b"data-0data-1data-2", chunks
        assert arrivals[0] >= 50 and arrivals[-1] >= 150, arrivals
        gevent.sleep(0.05)
    assert c.connects == 2
    print("ok")
''')


def test_works_under_gevent_monkey_patching():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
