"""A finished request's bookkeeping waits for a pause in the reads (harness.llm_user.wait_for_quiet):
a client that keeps up with a burst of token events is idle for a moment between two of them,
and bookkeeping started there would delay the rest of the burst's timestamps."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    from gevent import monkey; monkey.patch_all()
    import time
    import gevent
    from harness import http_stream
    from harness.llm_user import wait_for_quiet

    QUIET_NS = 2_000_000

    def reads(every_s, for_s, stamps):
        # a burst of body reads: the event loop is idle between two of them
        end = time.perf_counter() + for_s
        while time.perf_counter() < end:
            http_stream._last_read[0] = t = time.perf_counter_ns()
            stamps.append(t)
            gevent.sleep(every_s)

    def real_pause_at(stamps, returned):
        """Whether the reads themselves paused for QUIET_NS around `returned`: on a busy machine
        this process (or just the reads greenlet) can be descheduled for milliseconds, which is
        a real pause in the reads, and ending the wait there is the contract."""
        before = [t for t in stamps if t <= returned]
        after = [t for t in stamps if t > returned]
        return bool(before) and (not after or after[0] - before[-1] >= QUIET_NS)

    # Reads every 0.1 ms for 30 ms: the wait ends only after the last of them (or in a real
    # pause of the reads, which only a descheduled process produces).
    stamps = []
    g = gevent.spawn(reads, 0.0001, 0.03, stamps)
    gevent.sleep(0.001)
    wait_for_quiet(max_wait_s=1.0, quiet_ns=QUIET_NS)
    returned = time.perf_counter_ns()
    assert returned - http_stream._last_read[0] >= QUIET_NS
    burst_over = g.dead
    g.join()
    assert burst_over or real_pause_at(stamps, returned), "returned in the middle of the burst"

    # Reads that never pause: the wait is bounded (and ends early only in a real pause).
    stamps = []
    g = gevent.spawn(reads, 0.0001, 5.0, stamps)
    gevent.sleep(0.001)
    t0 = time.perf_counter()
    wait_for_quiet(max_wait_s=0.05, quiet_ns=QUIET_NS)
    waited = time.perf_counter() - t0
    returned = time.perf_counter_ns()
    assert not g.dead and waited < 1.0, waited
    gevent.sleep(0.01)                       # the next read after the return, if it came soon
    g.kill()
    assert waited >= 0.05 or real_pause_at(stamps, returned), waited

    # No reads at all: at once.
    http_stream._last_read[0] = 0
    t0 = time.perf_counter()
    wait_for_quiet(max_wait_s=1.0)
    assert time.perf_counter() - t0 < 0.5
    print("ok")
''')


def test_bookkeeping_waits_for_a_pause_in_the_reads_and_no_longer_than_its_bound():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")
