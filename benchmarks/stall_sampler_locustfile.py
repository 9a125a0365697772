"""Where does the load generator's event loop stall? `benchmarks/bench_locustfile.py` plus a
stall sampler, for `client_cost.py case --locustfile benchmarks/stall_sampler_locustfile.py`.

A libev timer in the event loop beats every 0.5 ms; an OS thread (not a greenlet) checks the
beat every millisecond and, while it is late by more than STALL_MS (env, default 3), records
the main thread's Python stack. At exit it appends to STALL_OUT (env, default
/tmp/stalls.txt) each stall with its length and its most frequent stacks, and the garbage
collector's pauses over 0.5 ms. `hub.py:run` on top means the loop was inside libev (usually
`epoll_wait` or a system call of the machine's own), not in Python code.

Below ~2 ms the sampler reports the loop's own timer granularity when the loop is idle (epoll
waits in whole milliseconds): use it for stalls, not for sub-millisecond lag.
"""
import atexit
import collections
import gc
import os
import sys
import time

import gevent
from gevent.monkey import get_original

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_locustfile import Chat  # noqa: E402,F401  (the benchmark's user, server-id timer)

start_new_thread, get_ident = get_original("_thread", ["start_new_thread", "get_ident"])
real_sleep = get_original("time", "sleep")
perf_ns = time.perf_counter_ns
MAIN = get_ident()
STALL_MS = float(os.environ.get("STALL_MS", "3"))
_beat = [perf_ns()]
_stalls: list[list] = []   # [beat_ns, longest lag ms, Counter of stacks]
_gc_pauses: list[tuple[int, float]] = []
_gc_start = [0]


def _on_beat() -> None:
    _beat[0] = perf_ns()


_timer = gevent.get_hub().loop.timer(0.0005, 0.0005)
_timer.start(_on_beat)


def _stack() -> str:
    frame = sys._current_frames().get(MAIN)
    out = []
    while frame is not None and len(out) < 12:
        code = frame.f_code
        out.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return ";".join(reversed(out))


def _sampler() -> None:
    current = None
    while True:
        real_sleep(0.001)
        beat = _beat[0]
        lag = (perf_ns() - beat) / 1e6
        if lag > STALL_MS:
            if current is None or current[0] != beat:
                current = [beat, 0.0, collections.Counter()]
                _stalls.append(current)
            current[1] = lag
            current[2][_stack()] += 1


start_new_thread(_sampler, ())


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_start[0] = perf_ns()
    else:
        ms = (perf_ns() - _gc_start[0]) / 1e6
        if ms > 0.5:
            _gc_pauses.append((info["generation"], round(ms, 2)))


gc.callbacks.append(_on_gc)


@atexit.register
def _report() -> None:
    with open(os.environ.get("STALL_OUT", "/tmp/stalls.txt"), "a") as f:
        f.write(f"pid {os.getpid()} stalls>{STALL_MS:g}ms: {len(_stalls)}\n")
        for beat, lag, stacks in _stalls:
            f.write(f"t={beat} stall {lag:.1f} ms\n")
            for stack, n in stacks.most_common(3):
                f.write(f"   {n} {stack}\n")
        f.write(f"gc pauses>0.5ms (generation, ms): {_gc_pauses}\n")
