"""The load generator's self-check on its own timestamps: how long after the bytes reached the
machine did it stamp them?

Every latency this harness reports ends at a stamp taken when ``recv`` returns
(``harness.http_stream``). Under gevent that ``recv`` runs when the event loop gets to the
socket, which is late whenever the loop was busy (a finished request's bookkeeping, another
stream's burst, the plugin's report, a blocking call in a listener, the process being
descheduled): every TTFT and ITL then carries that lateness. Two measurements, one limit:

* **read-to-stamp delay** (precise): the connection asks the kernel to timestamp what it
  receives (``SO_TIMESTAMPNS``: taken as the bytes are queued to the socket -- on loopback inside
  the sender's ``send``, from a network card as the packet comes in), and every
  ``SAMPLE_EVERY``-th streamed body read of the process is a ``recvmsg`` that brings that stamp
  along: delay = ``time.time_ns()`` taken with our own ``perf_counter_ns`` stamp minus the
  kernel's (both CLOCK_REALTIME). It costs nothing between reads and times exactly what the
  metrics depend on, wherever the delay came from. One limit: TCP merges segments that queue up
  unread and the merged data carries the *newest* stamp, so for a read that brings several of a
  stream's events the delay is that of the newest; it is exact while delays stay under the
  stream's gap between events (the regime of sub-millisecond fidelity) and a lower bound above.
* **event-loop lag** (coarse, for what the first cannot see): a timer every ``PROBE_S``
  records how late it fired, while any stream is being read. A stall longer than the gap
  between a stream's events (a blocking call, a long GC pause) shows here in full. Its
  resolution is about a millisecond (libev's epoll waits in whole milliseconds), so it is held
  to the limit plus ``PROBE_RESOLUTION_MS``.

Delays go into log-linear bucket counts (exact microseconds below 128 us, then 64 buckets per
power of two: <= 1.6% wide), which add exactly when workers' summaries are merged. Where the
kernel gives no receive stamps (non-Linux; some sandboxes), ``unstamped`` counts the sampled
reads and only the loop lag is judged.

API, one monitor per Locust process:

* ``monitor()``: this process's :class:`StampDelay` (a new one after a fork);
  ``take()``: its summary since the last take (then emptied) -- what a worker ships in each
  report to the master;
* ``merge(a, b)``: both summaries in one (exact; ``None`` is empty);
* ``stats(summary)``: p50/p90/p99/p99.9/mean/max in ms, ``count``, ``unstamped``, and the same
  for the loop lag under ``loop_lag``;
* ``verdict(summary, limit_ms)``: ``None``, or why the run's timestamps cannot be trusted.
"""
from __future__ import annotations

import os
import socket
import struct
import sys
import time
from typing import Any

__all__ = ["StampDelay", "monitor", "take", "merge", "stats", "verdict", "enable_kernel_stamps",
           "SAMPLE_EVERY", "PROBE_S", "DEFAULT_LIMIT_MS", "MIN_SAMPLES"]

#: Every how many streamed body reads (per process) one is a timestamped ``recvmsg``; 0 turns
#: the kernel measurement off. Environment: ``HARNESS_STAMP_DELAY_SAMPLE``.
SAMPLE_EVERY = int(os.environ.get("HARNESS_STAMP_DELAY_SAMPLE", "4") or 0)

#: The loop-lag probe's period, seconds (0: off). Environment: ``HARNESS_STAMP_DELAY_PROBE_S``.
PROBE_S = float(os.environ.get("HARNESS_STAMP_DELAY_PROBE_S", "0.01") or 0)
PROBE_RESOLUTION_MS = 1.0

#: The default limit on the p99s (``--llm-stamp-delay-limit-ms``), sized for "the generator was
#: in the way" on a shared machine (the same as the schedule-lag limit); a fidelity benchmark
#: asks for 1 ms.
DEFAULT_LIMIT_MS = 10.0

#: Fewer samples than this are not judged (a p99 of a few dozen is their maximum).
MIN_SAMPLES = 200

#: ``SO_TIMESTAMPNS`` / ``SCM_TIMESTAMPNS`` (Python < 3.12 lacks the name; 35 on Linux except
#: on the few architectures that renumber socket options, where the module has the name).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform.startswith("linux") else None)
ANC_SIZE = socket.CMSG_SPACE(16) if hasattr(socket, "CMSG_SPACE") else 0
_TIMESPEC = struct.Struct("@qq" if struct.calcsize("@l") == 8 else "@ll").unpack_from

_LINEAR = 128   # exact microseconds below this; then 64 buckets per power of two
_SHIFT = 7


def _index(us: int) -> int:
    """Bucket of a delay in whole microseconds (>= 0)."""
    if us < _LINEAR:
        return us
    e = us.bit_length() - _SHIFT
    return (e << 6) + (us >> e)


def _upper_us(idx: int) -> int:
    """The largest whole microsecond in bucket ``idx``."""
    if idx < _LINEAR:
        return idx
    e = (idx >> 6) - 1
    return ((idx - (e << 6) + 1) << e) - 1


def enable_kernel_stamps(sock: socket.socket) -> bool:
    """Ask the kernel to timestamp what ``sock`` receives; False where it cannot."""
    if SO_TIMESTAMPNS is None or not SAMPLE_EVERY or not ANC_SIZE:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except (OSError, AttributeError):
        return False
    return True


class _Buckets:
    __slots__ = ("counts", "n", "sum_us", "max_us")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.sum_us = 0
        self.max_us = 0

    def record_ns(self, delay_ns: int) -> None:
        us = delay_ns // 1000 if delay_ns > 0 else 0   # a clock step back reads as 0
        idx = _index(us)
        c = self.counts
        c[idx] = c.get(idx, 0) + 1
        self.n += 1
        self.sum_us += us
        if us > self.max_us:
            self.max_us = us

    def take(self) -> dict[str, Any]:
        out = {"counts": [[k, v] for k, v in sorted(self.counts.items())], "n": self.n,
               "sum_us": self.sum_us, "max_us": self.max_us}
        self.counts = {}
        self.n = self.sum_us = self.max_us = 0
        return out


class StampDelay:
    """One process's read-to-stamp delays (``kernel``) and event-loop lag (``loop``)."""

    __slots__ = ("kernel", "loop", "unstamped", "tick", "active", "_probe")

    def __init__(self) -> None:
        self.kernel = _Buckets()
        self.loop = _Buckets()
        self.unstamped = 0
        self.tick = [SAMPLE_EVERY]   # countdown to the next sampled read (http_stream)
        self.active = 0              # streamed bodies being read now (the probe records then)
        self._probe = None

    def record_anc(self, anc: list[tuple[int, int, bytes]], wall_ns: int) -> None:
        """One sampled read: ``anc`` is its ``recvmsg`` ancillary data, ``wall_ns`` the
        ``time.time_ns()`` taken with its stamp."""
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = _TIMESPEC(data)
                self.kernel.record_ns(wall_ns - (sec * 1_000_000_000 + nsec))
                return
        self.unstamped += 1

    def start_probe(self) -> None:
        """Start the loop-lag timer in this process's gevent hub (once; it keeps no loop alive)."""
        if self._probe is not None or PROBE_S <= 0:
            return
        from gevent import get_hub

        period = int(PROBE_S * 1e9)
        perf_ns = time.perf_counter_ns
        timer = get_hub().loop.timer(PROBE_S, PROBE_S, ref=False)
        due = [perf_ns() + period]
        record = self.loop.record_ns

        def fire() -> None:
            now = perf_ns()
            if self.active > 0:
                record(now - due[0])
            nxt = due[0] + period   # libev's repeat: the last due time + the period, or now
            due[0] = nxt if nxt > now else now
        self._probe = timer
        timer.start(fire)

    def take(self) -> dict[str, Any]:
        """The summary since the last take, and start again empty."""
        out = {**self.kernel.take(), "unstamped": self.unstamped, "loop": self.loop.take()}
        self.unstamped = 0
        # (self.loop.record_ns is bound to the same object: take() empties it in place)
        return out


_monitor: list[Any] = [None, 0]   # [StampDelay, the pid it belongs to]


def monitor() -> StampDelay:
    """This process's monitor (Locust's ``--processes`` forks workers: each gets its own)."""
    m: StampDelay | None
    m, pid = _monitor
    if m is None or pid != os.getpid():
        m = StampDelay()
        _monitor[0], _monitor[1] = m, os.getpid()
    return m


def take() -> dict[str, Any]:
    """``monitor().take()``: what a worker ships to the master in each report."""
    return monitor().take()


def _merge_buckets(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    a, b = a or {}, b or {}
    counts: dict[int, int] = {}
    for src in (a, b):
        for k, v in src.get("counts") or ():
            counts[int(k)] = counts.get(int(k), 0) + int(v)
    return {"counts": [[k, v] for k, v in sorted(counts.items())],
            "n": int(a.get("n", 0)) + int(b.get("n", 0)),
            "sum_us": int(a.get("sum_us", 0)) + int(b.get("sum_us", 0)),
            "max_us": max(int(a.get("max_us", 0)), int(b.get("max_us", 0)))}


def merge(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """One summary of both (exact: counts, sums and maxima combine as one process's would)."""
    if not b:
        return a
    if not a:
        a = {}
    out = _merge_buckets(a, b)
    out["unstamped"] = int(a.get("unstamped", 0)) + int(b.get("unstamped", 0))
    out["loop"] = _merge_buckets(a.get("loop"), b.get("loop"))
    return out


PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}


def _bucket_stats(s: dict[str, Any] | None) -> dict[str, Any]:
    s = s or {}
    n = int(s.get("n", 0))
    out: dict[str, Any] = {k: None for k in PERCENTILES}
    out.update({"mean": None, "max": None, "count": n})
    if not n:
        return out
    counts = sorted((int(k), int(v)) for k, v in s.get("counts") or ())
    max_us = int(s.get("max_us", 0))
    for name, p in PERCENTILES.items():
        rank = max(1, int(p / 100.0 * n + 0.5))
        seen = 0
        for idx, c in counts:
            seen += c
            if seen >= rank:
                out[name] = min(_upper_us(idx), max_us) / 1000.0
                break
    out["mean"] = int(s.get("sum_us", 0)) / n / 1000.0
    out["max"] = max_us / 1000.0
    return out


def stats(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The read-to-stamp delays in ms: percentiles (nearest rank, reported as their bucket's
    upper edge, at most the exact max), mean, max, ``count`` (sampled reads with a kernel
    stamp), ``unstamped`` (sampled reads without one), ``sample_every``; and ``loop_lag``, the
    same figures for the event-loop lag probe."""
    s = summary or {}
    out = _bucket_stats(s)
    out["unstamped"] = int(s.get("unstamped", 0))
    out["sample_every"] = SAMPLE_EVERY
    lag = _bucket_stats(s.get("loop"))
    lag["period_ms"] = PROBE_S * 1000.0
    out["loop_lag"] = lag
    return out


def verdict(summary: dict[str, Any] | None, limit_ms: float | None,
            min_samples: int = MIN_SAMPLES) -> str | None:
    """Why the run's timestamps cannot be trusted, or None: the p99 of the read-to-stamp delay
    exceeds ``limit_ms``, or the p99 of the event-loop lag exceeds it by more than the probe's
    resolution. A measurement with fewer than ``min_samples`` samples, or a limit <= 0 (or
    None), is not judged."""
    if limit_ms is None or limit_ms <= 0:
        return None
    st = stats(summary)
    if st["count"] >= min_samples and st["p99"] is not None and st["p99"] > limit_ms:
        return (f"stamp delay p99 {st['p99']:.2f} ms > {limit_ms:g} ms: the load generator read "
                f"the servers' bytes late (kernel receive time to its timestamp, {st['count']} "
                f"sampled reads), and every TTFT/ITL carries that error; add workers (--workers) "
                f"or find what holds up its event loop")
    lag = st["loop_lag"]
    if (lag["count"] >= min_samples and lag["p99"] is not None
            and lag["p99"] > limit_ms + PROBE_RESOLUTION_MS):
        return (f"stamp delay p99 {lag['p99']:.1f} ms > {limit_ms:g} ms (event-loop lag while "
                f"streams were read, {lag['count']} probes): the load generator's event loop was "
                f"blocked, so reads waited and every TTFT/ITL carries that error; find what blocks "
                f"it (or add workers, --workers)")
    return None
