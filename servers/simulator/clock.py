"""Waking the event loop at an exact `time.perf_counter()` instant, without blocking it.

asyncio's timers (and uvloop's) have millisecond resolution, and `time.sleep` for the rest
blocks the whole loop: with several replicas in one process, one replica's sleep made every
other replica's step end late. On Linux a timerfd on CLOCK_MONOTONIC (the clock
`perf_counter` reads) armed with an absolute expiry wakes epoll at the instant itself, and
the loop serves sockets and other replicas until then. Elsewhere the fallback is the old
way: a loop timer to about a millisecond before, then `time.sleep` for the remainder.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import sys
import time
from collections.abc import Callable

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_TFD_NONBLOCK = os.O_NONBLOCK if hasattr(os, "O_NONBLOCK") else 0
_TFD_CLOEXEC = os.O_CLOEXEC if hasattr(os, "O_CLOEXEC") else 0


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _load_timerfd() -> tuple[Callable[..., int], Callable[..., int]] | None:
    if not sys.platform.startswith("linux"):
        return None
    if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    create.restype = ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return create, settime


_TIMERFD = _load_timerfd()


class StepTimer:
    """A one-shot timer: `arm(t)` calls `callback()` once perf_counter() >= t."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]):
        self._loop = loop
        self._callback = callback
        self._fd = -1
        self._handle: asyncio.TimerHandle | None = None
        self._target = 0.0
        if _TIMERFD is not None:
            fd = _TIMERFD[0](_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self._spec = _Itimerspec()
                self._spec_ref = ctypes.byref(self._spec)
                loop.add_reader(fd, self._fired)

    @property
    def precise(self) -> bool:
        return self._fd >= 0

    def arm(self, t: float) -> None:
        if self._fd >= 0:
            ns = int(t * 1e9)
            if ns <= 0:
                ns = 1  # zero would disarm
            value = self._spec.it_value
            value.tv_sec, value.tv_nsec = divmod(ns, 1_000_000_000)
            assert _TIMERFD is not None  # a timer fd exists only where timerfd loaded
            if _TIMERFD[1](self._fd, _TFD_TIMER_ABSTIME, self._spec_ref, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return
        self._target = t
        delay = t - time.perf_counter() - 0.001
        self._handle = self._loop.call_later(max(0.0, delay), self._fallback)

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        self._callback()

    def _fallback(self) -> None:
        remaining = self._target - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        self._callback()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._handle is not None:
            self._handle.cancel()
