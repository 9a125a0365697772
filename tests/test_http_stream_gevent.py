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

SCRIPT = textwrap.dedent('''
    from gevent import monkey; monkey.patch_all()
    import gevent, socket, time
    from gevent.server import StreamServer
    from harness.http_stream import StreamingConnection, ReadTimeout, Disconnected

    def head(conn):
        buf = b""
        while b"\\r\\n\\r\\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return None
            buf += data
        return buf.split(b" ", 2)[1]

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


def test_cooperative_reads_and_read_timeout_under_gevent():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok"
