"""harness.http_stream under gevent (how Locust runs it): cooperative reads and the read timeout.

Under gevent each connection waits on its own io watcher and the read timeout is one timer per
request (not a gevent.Timeout per read); these tests pin down that it means exactly what a
socket timeout means: the longest single wait for bytes. They run in a subprocess, because
monkey-patching must happen before anything imports `socket`.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# A gevent test server's start: monkey-patching, and reading one request head (its path).
SERVER = '''
from gevent import monkey; monkey.patch_all()
import gevent, socket, time
from gevent.server import StreamServer
from harness.http_stream import StreamingConnection, ReadTimeout, Disconnected, ProtocolError

def head(conn):
    buf = b""
    while b"\\r\\n\\r\\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    return buf.split(b" ", 2)[1]
'''

SCRIPT = SERVER + textwrap.dedent('''

    def handle(conn, addr):
        while True:
            path = head(conn)
            if path is None:
                return
            if path == b"/silent":            # never answers
                gevent.sleep(5)
                return
            conn.sendall(b"HTTP/1.1 200 OK\\r\\ntransfer-encoding: chunked\\r\\n\\r\\n")
            if path == b"/gaps":               # 8 chunks 0.15 s apart: 1.2 s in all
                for i in range(8):
                    gevent.sleep(0.15)
                    conn.sendall(b"1\\r\\n%d\\r\\n" % i)
            elif path == b"/stall":            # 2 chunks, then silence
                for i in range(2):
                    conn.sendall(b"1\\r\\n%d\\r\\n" % i)
                gevent.sleep(5)
                return
            elif path == b"/burst":            # everything at once
                conn.sendall(b"".join(b"1\\r\\n%d\\r\\n" % i for i in range(8)))
            elif path == b"/cut":
                conn.sendall(b"1\\r\\na\\r\\n")
                conn.close()
                return
            conn.sendall(b"0\\r\\n\\r\\n")

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    port = server.server_port

    # Gaps shorter than the timeout, total longer: no timeout, stamps follow the gaps.
    c = StreamingConnection("127.0.0.1", port, timeout=0.4)
    resp = c.post_stream("/gaps", b"{}")
    chunks = list(resp)
    assert b"".join(d for d, _ in chunks) == b"01234567", chunks
    gaps = [(b - a) / 1e6 for (_, a), (_, b) in zip(chunks, chunks[1:])]
    assert all(100 < g < 400 for g in gaps), gaps

    # A slow consumer (longer than the timeout between reads) is not a silent server.
    resp = c.post_stream("/burst", b"{}")
    got = []
    for data, _ in resp:
        got.append(data)
        gevent.sleep(0.5)
    assert b"".join(got) == b"01234567"
    assert c.connects == 1                                  # kept alive and reused

    # Silence before the head, and in the middle of a stream: ReadTimeout after ~timeout.
    t0 = time.monotonic()
    try:
        c.post_stream("/silent", b"{}")
        raise SystemExit("no timeout before the head")
    except ReadTimeout as e:
        assert e.error_kind == "timeout"
    waited = time.monotonic() - t0
    assert 0.38 <= waited < 1.0, waited
    resp = c.post_stream("/stall", b"{}")
    t0 = time.monotonic()
    got = []
    try:
        for data, _ in resp:
            got.append(data)
        raise SystemExit("no timeout mid-stream")
    except ReadTimeout:
        pass
    assert b"".join(got) == b"01" and 0.38 <= time.monotonic() - t0 < 1.0

    # After a timeout the next request reconnects and works; disconnects stay disconnects.
    assert list(c.post_stream("/burst", b"{}"))
    try:
        list(c.post_stream("/cut", b"{}"))
        raise SystemExit("no disconnect")
    except Disconnected:
        pass

    # Many greenlets, one connection each, all streaming at once.
    def one(i):
        conn = StreamingConnection("127.0.0.1", port, timeout=2)
        out = [b"".join(d for d, _ in conn.post_stream("/gaps", b"{}")) for _ in range(2)]
        conn.close()
        return out
    results = [g.get() for g in [gevent.spawn(one, i) for i in range(50)]]
    assert all(r == [b"01234567"] * 2 for r in results)

    # A connection with no read timeout waits as long as it takes.
    c2 = StreamingConnection("127.0.0.1", port, timeout=None)
    assert b"".join(d for d, _ in c2.post_stream("/gaps", b"{}")) == b"01234567"
    c.close()
    c2.close()
    server.stop()
    print("ok")
''')


def run_script(script: str) -> None:
    """Monkey-patching must come before anything imports `socket`: a fresh interpreter."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok"


def test_cooperative_reads_and_read_timeout_under_gevent():
    run_script(SCRIPT)


PUMP_SCRIPT = SERVER + textwrap.dedent('''

    def handle(conn, addr):
        while True:
            path = head(conn)
            if path is None:
                return
            conn.sendall(b"HTTP/1.1 200 OK\\r\\ntransfer-encoding: chunked\\r\\n\\r\\n")
            if path == b"/gaps":               # 8 chunks 0.05 s apart
                for i in range(8):
                    gevent.sleep(0.05)
                    conn.sendall(b"1\\r\\n%d\\r\\n" % i)
            elif path == b"/stall":
                conn.sendall(b"1\\r\\na\\r\\n")
                gevent.sleep(5)
                return
            elif path == b"/cut":
                conn.sendall(b"1\\r\\na\\r\\n")
                conn.close()
                return
            elif path == b"/bad":
                conn.sendall(b"zz\\r\\n")
                gevent.sleep(5)
                return
            elif path == b"/close-after":      # a whole response, then the idle connection closes
                conn.sendall(b"1\\r\\nx\\r\\n0\\r\\n\\r\\n")
                gevent.sleep(0.05)
                conn.close()
                return
            conn.sendall(b"0\\r\\n\\r\\n")

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    port = server.server_port

    # pump delivers what iterating delivers, stamped at each read, and keeps the connection.
    c = StreamingConnection("127.0.0.1", port, timeout=0.4)
    got = []
    c.post_stream("/gaps", b"{}").pump(lambda data, t: got.append((data, t)))
    assert b"".join(d for d, _ in got) == b"01234567", got
    gaps = [(b - a) / 1e6 for (_, a), (_, b) in zip(got, got[1:])]
    assert all(30 < g < 300 for g in gaps), gaps
    it = list(c.post_stream("/gaps", b"{}"))
    assert b"".join(d for d, _ in it) == b"01234567"
    assert c.connects == 1

    # The read timeout is the longest silence; then the next request reconnects.
    got = []
    t0 = time.monotonic()
    try:
        c.post_stream("/stall", b"{}").pump(lambda data, t: got.append(data))
        raise SystemExit("no timeout")
    except ReadTimeout:
        pass
    assert got == [b"a"] and 0.38 <= time.monotonic() - t0 < 1.0
    c.post_stream("/gaps", b"{}").pump(lambda data, t: None)
    assert c.connects == 2

    # A peer that closes mid-body, and bad framing, end the body with their own failures.
    for path, exc in ((b"/cut", Disconnected), (b"/bad", ProtocolError)):
        try:
            c.post_stream(path.decode(), b"{}").pump(lambda data, t: None)
            raise SystemExit(f"no {exc.__name__}")
        except exc:
            pass

    # An exception raised by the sink reaches the caller; the half-read connection is dropped.
    c.post_stream("/gaps", b"{}").pump(lambda data, t: None)   # a fresh, clean connection
    before = c.connects
    class Stop(Exception):
        pass
    def boom(data, t):
        raise Stop()
    try:
        c.post_stream("/gaps", b"{}").pump(boom)
        raise SystemExit("sink exception lost")
    except Stop:
        pass
    c.post_stream("/gaps", b"{}").pump(lambda data, t: None)
    assert c.connects == before + 1

    # A greenlet killed while pumping stops its watcher: nothing more is delivered.
    got = []
    g = gevent.spawn(lambda: c.post_stream("/gaps", b"{}").pump(lambda d, t: got.append(d)))
    deadline = time.monotonic() + 5       # kill once something came (not after a fixed 0.12 s,
    while not got and time.monotonic() < deadline:   # which a slow start could outlast)
        gevent.sleep(0.005)
    g.kill()
    n = len(got)
    gevent.sleep(0.4)
    assert 0 < n < 8 and len(got) == n, got

    # A kept-alive connection the server closed while idle is replaced before the next request.
    c3 = StreamingConnection("127.0.0.1", port, timeout=1)
    c3.post_stream("/close-after", b"{}").pump(lambda d, t: None)
    gevent.sleep(0.2)
    got = []
    c3.post_stream("/gaps", b"{}").pump(lambda d, t: got.append(d))
    assert b"".join(got) == b"01234567" and c3.connects == 2

    # Many greenlets pumping at once.
    def one(i):
        conn = StreamingConnection("127.0.0.1", port, timeout=2)
        out = []
        for _ in range(2):
            parts = []
            conn.post_stream("/gaps", b"{}").pump(lambda d, t: parts.append(d))
            out.append(b"".join(parts))
        conn.close()
        return out
    results = [g.get() for g in [gevent.spawn(one, i) for i in range(50)]]
    assert all(r == [b"01234567"] * 2 for r in results)
    c.close(); c3.close()
    server.stop()
    print("ok")
''')


def test_pump_reads_the_body_in_event_loop_callbacks_with_the_same_results_and_failures():
    run_script(PUMP_SCRIPT)
