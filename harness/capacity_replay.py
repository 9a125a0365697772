"""One capacity step in virtual time: open-loop arrivals through the simulator's replay.

The arrivals are what `harness load --rate R --duration S` would offer: the same arrival
process (harness/arrivals.py, seeded), sent for S seconds; each request's fixed input and
output length. `servers.simulator.replay.replay` (its public API only) runs them on the
profile's engine and step-time model on a virtual clock. A request that would still be in
flight S + drain seconds after the first send is marked incomplete, as a live step's drain
timeout would record it; one the server would refuse (too long) is a failure. The records
come back in the requests.jsonl shape, so the step is judged exactly as a live one is.
"""
from __future__ import annotations

import time
from typing import Any

from harness.arrivals import ArrivalSchedule
from harness.capacity import Step, judge_step, step_plan
from harness.slo import Slo


def arrivals(rate: float, duration_s: float, input_len: int, output_len: int, *,
             kind: str = "poisson", burstiness: float = 1.0, seed: int = 0,
             count: int | None = None) -> list[dict[str, Any]]:
    """Send times in [0, duration_s) at `rate`, at most `count` of them, as the load
    generator schedules them."""
    sched = ArrivalSchedule(rate, kind, burstiness, seed=seed, start=0.0)
    out = []
    t = 0.0
    while t < duration_s and (count is None or len(out) < count):
        out.append({"arrival_s": t, "input_len": input_len, "output_len": output_len, "id": str(len(out))})
        t = sched.advance()
    return out


def records(result, duration_s: float, drain_s: float) -> list[dict[str, Any]]:
    """ReplayResult -> requests.jsonl-shaped dicts (times in virtual seconds)."""
    cutoff = duration_s + drain_s
    out = []
    for r in result.records:
        rec: dict[str, Any] = {"id": r.id, "sent_at": r.arrival_s, "input_tokens": r.input_len}
        if r.rejected is not None:
            rec.update(ok=False, error_kind="http_400", error=r.rejected)
        elif r.ok and r.finish_s is not None and r.finish_s <= cutoff:
            rec.update(ok=True, finished_at=r.finish_s, output_tokens=r.output_len, ttft_ms=r.ttft_ms,
                       tpot_ms=r.tpot_ms, e2e_ms=r.e2e_ms, itl_ms=r.itl_ms())
        else:
            first = r.first_token_s
            rec.update(ok=False, error_kind="incomplete",
                       ttft_ms=(first - r.arrival_s) * 1e3 if first is not None and first <= cutoff else None)
        out.append(rec)
    return out


def measure(rate: float, slos: list[Slo], *, profile: str, duration_s: float, drain_s: float,
            input_len: int, output_len: int, replicas: int = 1, arrival: str = "poisson",
            burstiness: float = 1.0, seed: int = 0, confidence: float = 0.95,
            resamples: int = 1000, limits: dict[str, Any] | None = None) -> Step:
    from servers.simulator.replay import replay

    t0 = time.monotonic()
    duration_s, count = step_plan(rate, duration_s, slos)
    arr = arrivals(rate, duration_s, input_len, output_len, kind=arrival, burstiness=burstiness,
                   seed=seed, count=count)
    res = replay(profile, arr, replicas=replicas, **(limits or {}))
    step = judge_step(rate, records(res, duration_s, drain_s), slos, confidence=confidence,
                      resamples=resamples, seed=seed)
    step.wall_s = round(time.monotonic() - t0, 3)
    return step
