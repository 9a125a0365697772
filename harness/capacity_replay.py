"""One capacity step in virtual time: open-loop arrivals through the simulator's replay,
or a closed loop of users on the simulator's engine.

The arrivals are what `harness load --rate R --duration S` would offer: the same arrival
process (harness/arrivals.py, seeded), sent for S seconds; each request's fixed input and
output length. `servers.simulator.replay.replay` (its public API only) runs them on the
profile's engine and step-time model on a virtual clock. A request that would still be in
flight S + drain seconds after the first send is marked incomplete, as a live step's drain
timeout would record it; one the server would refuse (too long) is a failure. The records
come back in the requests.jsonl shape, so the step is judged exactly as a live one is.

A closed-loop step (`measure_users`) cannot be a list of arrivals: each send time is the
previous request's finish. `closed_loop` drives the simulator's Engine the way the replay
and the live server do (a request enters the engine after the front end's per-request
cost, the engine steps in virtual time), starting every user at once (as `harness load
--users N` does: measured, its N first requests leave within a millisecond), each sending
its next request the moment its last one finishes, until the step's request count is sent or its time bound passes; the first
`users` sent are its warm-up, not judged (capacity.users_warmup), as in a live step. With
replicas, users are spread over them in turn and each replica runs its own users.
"""
from __future__ import annotations

import time
from typing import Any

from harness.arrivals import ArrivalSchedule
from harness.capacity import Step, judge_step, step_plan, users_step_plan, users_warmup
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
    """ReplayResult (or a list of its RequestRecords) -> requests.jsonl-shaped dicts (times
    in virtual seconds)."""
    cutoff = duration_s + drain_s
    out = []
    for r in (result if isinstance(result, list) else result.records):
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


def closed_loop(profile, users: int, count: int, time_bound_s: float, cutoff_s: float,
                input_len: int, output_len: int, *, replicas: int = 1,
                kv_cache_tokens: int | None = None) -> list:
    """`users` closed-loop users on `replicas` engines of `profile` (a resolved Profile) in
    virtual time: RequestRecords (servers.simulator.replay's) in send order. A user sends
    no new request once `count` are sent (over all users) or `time_bound_s` has passed;
    the engines stop at `cutoff_s`, what is unfinished then stays unfinished."""
    import heapq

    from servers.simulator.engine import Engine, Sequence
    from servers.simulator.replay import MAX_STALLED_RETRIES, RETRY_S, RequestRecord

    out: list = []
    pinned = [[u for u in range(users) if u % replicas == r] for r in range(replicas)]
    quotas = [count * len(p) // users + (1 if r < count * len(p) % users else 0)
              for r, p in enumerate(pinned)]
    for replica, (mine, quota) in enumerate(zip(pinned, quotas)):
        engine = Engine(profile.deployment, max_num_seqs=profile.max_num_seqs,
                        max_num_batched_tokens=profile.max_num_batched_tokens,
                        kv_capacity_tokens=kv_cache_tokens)
        delay = profile.deployment.efficiency.request_overhead_s
        too_long = input_len + output_len > min(profile.max_model_len, engine.max_prompt_tokens())
        pending: list = []          # (time it enters the engine, order, sequence)
        user_of: dict = {}
        sent = 0

        def send(t: float, user: int) -> None:
            nonlocal sent
            if sent >= quota or t >= time_bound_s:
                return
            rec = RequestRecord(f"{replica}-{sent}", replica, t, input_len, output_len)
            out.append(rec)
            sent += 1
            if too_long:       # answered 400 at once; the user's next request is as refused
                rec.rejected = (f"input + output {input_len + output_len} > the server's limit")
                send(t, user)
                return
            seq = Sequence(rec.id, input_len, output_len, t, payload=rec.token_times_s)
            user_of[seq] = (user, rec)
            heapq.heappush(pending, (t + delay, sent, seq))

        for user in mine:
            send(0.0, user)
        now = pending[0][0] if pending else 0.0
        stalled = 0
        while now <= cutoff_s:
            while pending and pending[0][0] <= now:
                engine.add(heapq.heappop(pending)[2])
            if not engine.has_work():
                if not pending:
                    break
                now = pending[0][0]
                continue
            step = engine.schedule(now)
            if step is None:
                stalled += 1
                if stalled > MAX_STALLED_RETRIES:
                    raise RuntimeError("engine stalled: waiting requests never fit the KV cache")
                now += RETRY_S
                continue
            stalled = 0
            now += step.duration
            done = engine.complete(step, now)
            for seq in done.emitted:
                seq.payload.append(now)
            for seq in done.finished:
                user, rec = user_of.pop(seq)
                rec.first_scheduled_s = seq.first_scheduled
                send(now, user)
    out.sort(key=lambda r: r.arrival_s)
    return out


def measure_users(users: int, slos: list[Slo], *, profile, duration_s: float, drain_s: float,
                  input_len: int, output_len: int, replicas: int = 1, seed: int = 0,
                  confidence: float = 0.95, resamples: int = 1000,
                  kv_cache_tokens: int | None = None) -> Step:
    """One closed-loop step of `users` (capacity.users_step_plan bounds it), judged as a
    live one is. `profile` is a resolved Profile."""
    t0 = time.monotonic()
    users = int(users)
    time_bound, count = users_step_plan(users, duration_s, slos)
    recs = closed_loop(profile, users, count, time_bound, time_bound + drain_s, input_len, output_len,
                       replicas=replicas, kv_cache_tokens=kv_cache_tokens)
    judged = users_warmup(records(recs, time_bound, drain_s), users)
    step = judge_step(float(users), judged, slos, confidence=confidence, resamples=resamples, seed=seed)
    step.wall_s = round(time.monotonic() - t0, 3)
    return step
