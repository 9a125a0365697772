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

    def reads(every_s, for_s):
        # a burst of body reads: the event loop is idle between two of them
        end = time.perf_counter() + for_s
        while time.perf_counter() < end:
            http_stream._last_read[0] = time.perf_counter_ns()
            gevent.sleep(every_s)

    # Reads every 0.1 ms for 30 ms: the wait ends only after the last of them.
    g = gevent.spawn(reads, 0.0001, 0.03)
    gevent.sleep(0.001)
    wait_for_quiet(max_wait_s=1.0, quiet_ns=2_000_000)
    returned = time.perf_counter_ns()
    assert g.dead, "returned in the middle of the burst"
    assert returned - http_stream._last_read[0] >= 2_000_000

    # Reads that never pause: the wait is bounded.
    g = gevent.spawn(reads, 0.0001, 5.0)
    gevent.sleep(0.001)
    t0 = time.perf_counter()
    wait_for_quiet(max_wait_s=0.05, quiet_ns=2_000_000)
    waited = time.perf_counter() - t0
    assert not g.dead and 0.05 <= waited < 1.0, waited
    g.kill()

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
