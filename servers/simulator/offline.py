"""Virtual-time runs of the engine: the offline throughput benchmark and fixed
concurrency, in milliseconds of CPU instead of minutes of wall time."""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from servers.simulator.engine import Engine, Sequence
from servers.simulator.roofline import Deployment


@dataclass
class OfflineResult:
    elapsed_s: float
    num_requests: int
    output_tokens: int
    total_tokens: int
    preemptions: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def total_tokens_per_s(self) -> float:
        return self.total_tokens / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s if self.elapsed_s else 0.0


@dataclass
class LatencyResult:
    concurrency: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    output_tokens_per_s: float


def _drain(engine: Engine, now: float,
           on_finish: Callable[[Sequence, float], None] | None = None,
           max_steps: int = 10_000_000,
           arriving: deque[tuple[float, Sequence]] | None = None) -> float:
    """Step `engine` to empty. `arriving`: (admit time, sequence) in time order, requests
    still in the API server's front end (Efficiency.request_overhead_s), added once the
    clock reaches their time."""
    arriving = deque() if arriving is None else arriving
    for _ in range(max_steps):
        while arriving and arriving[0][0] <= now:
            engine.add(arriving.popleft()[1])
        step = engine.schedule(now)
        if step is None:
            if arriving:
                now = max(now, arriving[0][0])
                continue
            if not engine.has_work():
                return now
            raise RuntimeError("engine stalled: a request can never fit the KV cache")
        now += step.duration
        result = engine.complete(step, now)
        if on_finish is not None:
            for seq in result.finished:
                on_finish(seq, now)
    raise RuntimeError("engine did not finish within the step bound")


def make_engine(dep: Deployment, **engine_kwargs: Any) -> Engine:
    if not dep.fits:
        raise ValueError(f"{dep.model.name} {dep.precision.name} does not fit "
                         f"{dep.tp} x {dep.gpu.name}")
    return Engine(dep, **engine_kwargs)


def run_offline(dep: Deployment, num_prompts: int = 1000, input_len: int = 512,
                output_len: int = 256, **engine_kwargs: Any) -> OfflineResult:
    """vLLM's offline throughput benchmark: every prompt queued at t=0 (the `LLM` class
    tokenizes them all before the first step; no HTTP front end, no per-request cost)."""
    engine = make_engine(dep, **engine_kwargs)
    for i in range(num_prompts):
        engine.add(Sequence(str(i), input_len, output_len, 0.0))
    elapsed = _drain(engine, 0.0)
    return OfflineResult(elapsed, num_prompts, num_prompts * output_len,
                         num_prompts * (input_len + output_len), engine.stats.preemptions)


def run_concurrency(dep: Deployment, concurrency: int = 32, num_requests: int = 256,
                    input_len: int = 512, output_len: int = 256,
                    **engine_kwargs: Any) -> LatencyResult:
    """Closed loop: `concurrency` clients, each sending the next request when one ends.
    Each request reaches the engine after the API server's per-request cost
    (Efficiency.request_overhead_s), as in the live server; its TTFT counts from the send."""
    engine = make_engine(dep, **engine_kwargs)
    delay = dep.efficiency.request_overhead_s
    arriving: deque[tuple[float, Sequence]] = deque()
    done: list[Sequence] = []
    issued = 0

    def on_finish(seq: Sequence, now: float) -> None:
        nonlocal issued
        done.append(seq)
        if issued < num_requests:
            arriving.append((now + delay, Sequence(str(issued), input_len, output_len, now)))
            issued += 1

    for _ in range(min(concurrency, num_requests)):
        arriving.append((delay, Sequence(str(issued), input_len, output_len, 0.0)))
        issued += 1
    elapsed = _drain(engine, 0.0, on_finish, arriving=arriving)
    # Every sequence in `done` finished, so both of its times are set.
    ttft = np.array([(s.first_token_time - s.arrival) * 1e3  # type: ignore[operator]
                     for s in done])
    tpot = np.array([(s.finish_time - s.first_token_time) * 1e3  # type: ignore[operator]
                     / (s.generated - 1) for s in done if s.generated > 1])
    return LatencyResult(concurrency, float(np.percentile(ttft, 50)), float(np.percentile(ttft, 99)),
                         float(np.percentile(tpot, 50)) if tpot.size else math.nan,
                         float(np.percentile(tpot, 99)) if tpot.size else math.nan,
                         len(done) * output_len / elapsed)
