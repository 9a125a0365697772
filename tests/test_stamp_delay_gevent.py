"""harness.stamp_delay on the read path (harness.http_stream under gevent, as Locust runs it):
sampled reads bring the kernel's receive stamp and measure how long the bytes waited for the
event loop, the loop-lag probe sees a blocked loop, and sampling changes nothing that is read.

A finished request's bookkeeping (harness.llm_user.wait_for_quiet) waits for a pause that the
loop has actually polled for: several requests finishing together are recorded one per loop
turn, with the reads that came meanwhile in between, not back to back.

Subprocesses: gevent's monkey-patching must come before anything imports `socket`, and the
sampling rate is read from the environment at import.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A plain server in its own process (the client's loop is blocked on purpose: a server in the
# same loop would stop writing too): 10 chunks, 2 ms apart (/fast) or 40 ms apart (/slow).
SERVER = textwrap.dedent('''
    import socket, sys, threading, time

    def handle(conn):
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                buf = b""
                while b"\\r\\n\\r\\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                gap = 0.04 if buf.split(b" ", 2)[1] == b"/slow" else 0.002
                conn.sendall(b"HTTP/1.1 200 OK\\r\\ntransfer-encoding: chunked\\r\\n\\r\\n")
                for i in range(10):
                    time.sleep(gap)
                    conn.sendall(b"1\\r\\n%d\\r\\n" % i)
                conn.sendall(b"0\\r\\n\\r\\n")

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()
''')

READS = textwrap.dedent('''
    from gevent import monkey; monkey.patch_all()
    import sys, time
    from harness import stamp_delay
    from harness.http_stream import StreamingConnection
    block = monkey.get_original("time", "sleep")
    assert stamp_delay.SAMPLE_EVERY == 1, stamp_delay.SAMPLE_EVERY
    port = int(sys.argv[1])

    mon = stamp_delay.monitor()
    c = StreamingConnection("127.0.0.1", port, timeout=5.0)
    if not c._connect() or c._coop._recvmsg is None:
        print("NO-KERNEL-STAMPS")
    c.close()

    # Every read sampled: the same bytes, stamps in order; one delay per read with data.
    mon.take()
    got = []
    c.post_stream("/fast", b"{}").pump(lambda d, t: got.append((d, t)))
    assert b"".join(d for d, _ in got) == b"0123456789", got
    assert [t for _, t in got] == sorted(t for _, t in got)
    s = stamp_delay.stats(mon.take())
    kernel = s["count"] + s["unstamped"]
    assert kernel >= len(got) - 1, (s, len(got))   # (the head's read may carry the first chunk)
    assert mon.active == 0

    # The loop blocked for 60 ms after each read while the server writes every 40 ms: chunks
    # wait in the kernel before they are read (the newest of those a read brings is 0-40 ms
    # old, by the phase), and the probe sees the loop up to 60 ms late.
    def slow_sink(d, t):
        block(0.06)
    c.post_stream("/slow", b"{}").pump(slow_sink)
    s = stamp_delay.stats(mon.take())
    if s["count"]:
        assert 10.0 <= s["max"] < 1000.0, s
    lag = s["loop_lag"]
    assert lag["count"] >= 5 and lag["max"] >= 30.0, lag
    assert mon.active == 0
    print("OK", s["count"], s["unstamped"], s["p50"], lag["max"])
''')


def test_sampled_reads_measure_the_wait_and_the_probe_sees_a_blocked_loop():
    env = dict(os.environ, HARNESS_STAMP_DELAY_SAMPLE="1", HARNESS_STAMP_DELAY_PROBE_S="0.005")
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        proc = subprocess.run([sys.executable, "-c", READS, port], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env=env)
    finally:
        server.kill()
        server.wait()
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    if sys.platform.startswith("linux"):
        assert "NO-KERNEL-STAMPS" not in proc.stdout
        count, unstamped = proc.stdout.split("OK")[-1].split()[:2]
        assert int(count) > 0 and int(unstamped) == 0, proc.stdout


QUIET = textwrap.dedent('''
    from gevent import monkey; monkey.patch_all()
    import os, time
    import gevent
    from harness import http_stream
    from harness.llm_user import wait_for_quiet

    QUIET_NS = 2_000_000
    log = []
    r, w = os.pipe()
    os.set_blocking(r, False)
    watcher = gevent.get_hub().loop.io(r, 1)

    def on_read():                  # a body read, as StreamResponse.pump does it
        os.read(r, 100)
        http_stream._last_read[0] = t = time.perf_counter_ns()
        log.append(("read", t))
    watcher.start(on_read)

    def finished(i):                # a request that ended in the same burst as the others
        wait_for_quiet(max_wait_s=1.0, quiet_ns=QUIET_NS)
        t = time.perf_counter_ns()
        log.append(("book", t))
        if sum(1 for k, _ in log if k == "book") == 1:
            os.write(w, b"x")       # another server's token arrives during this bookkeeping
        while time.perf_counter_ns() - t < 5_000_000:   # 5 ms of bookkeeping
            pass

    http_stream._last_read[0] = 0
    gevent.joinall([gevent.spawn(finished, i) for i in range(4)])
    gevent.sleep(0.01)
    kinds = [k for k, _ in log]
    # Before: book, book, book, book, read (the token waited 20 ms). Now the loop polls after
    # each bookkeeping: the token is read before the next one, which waits for a new pause.
    assert kinds == ["book", "read", "book", "book", "book"], kinds
    read_at = log[1][1]
    assert log[2][1] - read_at >= QUIET_NS, (log[2][1] - read_at)

    # An event loop that is never idle promptly (a greenlet busy in 1 ms slices, 0.2 ms
    # apart): the wait still ends, by twice its bound.
    def busy():
        while True:
            t = time.perf_counter_ns()
            while time.perf_counter_ns() - t < 1_000_000:
                pass
            gevent.sleep(0.0002)
    g = gevent.spawn(busy)
    gevent.sleep(0.01)
    t0 = time.perf_counter()
    wait_for_quiet(max_wait_s=0.05, quiet_ns=QUIET_NS)
    waited = time.perf_counter() - t0
    g.kill()
    assert waited < 1.0, waited
    print("OK")
''')


def test_bookkeeping_of_requests_that_end_together_is_one_per_loop_turn():
    proc = subprocess.run([sys.executable, "-c", QUIET], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
