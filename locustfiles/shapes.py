"""Load shapes for LLM runs: ramp, step and spike, over users or over request rate.

Combine with a user locustfile (Locust takes several files, comma-separated):

    LLM_SHAPE=step LLM_SHAPE_LEVELS=4,8,16 LLM_SHAPE_STEP_SECONDS=60 \\
        locust -f locustfiles/chat.py,locustfiles/shapes.py --headless --host http://127.0.0.1:8000

    # open loop: the shape sets the request rate (requests/s over all workers)
    LLM_SHAPE=spike LLM_SHAPE_UNIT=rate LLM_SHAPE_BASE=5 LLM_SHAPE_PEAK=40 \\
        locust -f locustfiles/chat.py,locustfiles/shapes.py --headless --processes 2 ...

Environment variables (seconds and levels may be fractional):

    LLM_SHAPE           ramp | step | spike (default step)
    LLM_SHAPE_UNIT      users (closed loop, default) | rate (open loop, requests/s)
    ramp:  LLM_SHAPE_START (1), LLM_SHAPE_END (10), LLM_SHAPE_DURATION (60 s),
           LLM_SHAPE_HOLD (0 s at the end level)
    step:  LLM_SHAPE_LEVELS (comma-separated, "1,2,4,8"), LLM_SHAPE_STEP_SECONDS (30)
    spike: LLM_SHAPE_BASE (2), LLM_SHAPE_PEAK (20), LLM_SHAPE_SPIKE_AT (20 s),
           LLM_SHAPE_SPIKE_SECONDS (10), LLM_SHAPE_DURATION (60 s in all)
    LLM_SHAPE_USERS     rate unit only: dispatcher users (default: one per worker)
    LLM_SHAPE_SPAWN_RATE users started or stopped per second on a change (default: at once)

The test stops when the shape ends. In rate unit the users are open-loop dispatchers
and each change of level calls `harness.run_state.set_rate`, which the master passes to
every worker; timeseries.jsonl's `target_rate` shows the level of each window.
Locust calls `tick()` about once a second, so levels change on whole seconds.
"""
from __future__ import annotations

import math
import os

from locust import LoadTestShape

import harness.plugin  # noqa: F401  (the LLM options and results)
from harness.run_state import set_rate


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


class LLMShapeBase(LoadTestShape):
    """Shared tick(): `level_at(t)` gives users or requests/s at run time t (None: stop)."""

    abstract = True
    unit = "users"

    def __init__(self) -> None:
        super().__init__()
        self.unit = os.environ.get("LLM_SHAPE_UNIT", self.unit).strip().lower() or "users"
        if self.unit not in ("users", "rate"):
            raise ValueError(f"LLM_SHAPE_UNIT must be 'users' or 'rate', not {self.unit!r}")
        self.spawn_rate = _env_float("LLM_SHAPE_SPAWN_RATE", 0.0)
        self.dispatchers = int(_env_float("LLM_SHAPE_USERS", 0))
        self._last_rate: float | None = None

    def level_at(self, t: float) -> float | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _workers(self) -> int:
        clients = getattr(self.runner, "clients", None)
        if clients is None:
            return 1
        return max(1, len(clients.ready) + len(clients.running) + len(clients.spawning))

    def tick(self):
        level = self.level_at(self.get_run_time())
        if level is None:
            return None
        if self.unit == "rate":
            rate = max(0.0, float(level))
            if rate != self._last_rate:
                set_rate(self.runner.environment, rate)
                self._last_rate = rate
            users = self.dispatchers or self._workers()
        else:
            users = max(0, int(round(level)))
        spawn = self.spawn_rate or max(1.0, float(users))
        return users, spawn


class RampShape(LLMShapeBase):
    """Linear ramp from LLM_SHAPE_START to LLM_SHAPE_END over LLM_SHAPE_DURATION, then hold."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.start = _env_float("LLM_SHAPE_START", 1.0)
        self.end = _env_float("LLM_SHAPE_END", 10.0)
        self.duration = _env_float("LLM_SHAPE_DURATION", 60.0)
        self.hold = _env_float("LLM_SHAPE_HOLD", 0.0)

    def level_at(self, t: float) -> float | None:
        if t >= self.duration + self.hold:
            return None
        if t >= self.duration or self.duration <= 0:
            return self.end
        level = self.start + (self.end - self.start) * t / self.duration
        # users step by whole users; rates are quantized to 0.1 req/s (Locust ticks each second)
        return math.floor(level * 10 + 1e-9) / 10 if self.unit == "rate" else math.floor(level + 1e-9)


class StepShape(LLMShapeBase):
    """LLM_SHAPE_LEVELS one after another, LLM_SHAPE_STEP_SECONDS each."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        raw = os.environ.get("LLM_SHAPE_LEVELS", "1,2,4,8")
        try:
            self.levels = [float(x) for x in raw.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"LLM_SHAPE_LEVELS={raw!r}: give comma-separated numbers") from None
        if not self.levels:
            raise ValueError("LLM_SHAPE_LEVELS is empty")
        self.step_seconds = _env_float("LLM_SHAPE_STEP_SECONDS", 30.0)
        if self.step_seconds <= 0:
            raise ValueError("LLM_SHAPE_STEP_SECONDS must be > 0")

    def level_at(self, t: float) -> float | None:
        i = int(t // self.step_seconds)
        return self.levels[i] if i < len(self.levels) else None


class SpikeShape(LLMShapeBase):
    """LLM_SHAPE_BASE, jumping to LLM_SHAPE_PEAK for LLM_SHAPE_SPIKE_SECONDS at LLM_SHAPE_SPIKE_AT."""

    abstract = True

    def __init__(self) -> None:
        super().__init__()
        self.base = _env_float("LLM_SHAPE_BASE", 2.0)
        self.peak = _env_float("LLM_SHAPE_PEAK", 20.0)
        self.spike_at = _env_float("LLM_SHAPE_SPIKE_AT", 20.0)
        self.spike_seconds = _env_float("LLM_SHAPE_SPIKE_SECONDS", 10.0)
        self.duration = _env_float("LLM_SHAPE_DURATION", 60.0)

    def level_at(self, t: float) -> float | None:
        if t >= self.duration:
            return None
        if self.spike_at <= t < self.spike_at + self.spike_seconds:
            return self.peak
        return self.base


SHAPES = {"ramp": RampShape, "step": StepShape, "spike": SpikeShape}


def make_shape(name: str | None = None) -> LLMShapeBase:
    """The shape named by `name` or LLM_SHAPE, configured from the environment."""
    name = (name or os.environ.get("LLM_SHAPE") or "step").strip().lower()
    if name not in SHAPES:
        raise ValueError(f"LLM_SHAPE must be one of {', '.join(SHAPES)}, not {name!r}")
    return SHAPES[name]()


class LLMShape(LoadTestShape):
    """The one shape Locust picks up from this file: LLM_SHAPE chooses ramp, step or spike."""

    def __init__(self) -> None:
        super().__init__()
        self._shape = make_shape()

    def reset_time(self) -> None:
        super().reset_time()
        self._shape.reset_time()

    def tick(self):
        self._shape.runner = self.runner
        self._shape.start_time = self.start_time
        return self._shape.tick()
