"""Virtual-time replay: a list of arrivals through the simulator's engine, no sockets.

`replay(profile, arrivals)` runs the same `Engine` (scheduler, KV cache, preemption) and
the same step-time model (`Deployment.step_time`, via `Engine.schedule`) that the live
`harness sim` server runs, but steps a virtual clock instead of waiting for it:

* the clock starts at the first arrival; a request is added to its replica's engine once
  the clock reaches its `arrival_s` plus the engine's per-request front-end cost
  (`Efficiency.request_overhead_s`, which the live server waits too before its engine
  sees the request); arrivals during a step join at the next step, as they do in the
  server, whose engine loop schedules again only when a step ends;
* each step lasts what `Engine.schedule` says, and the tokens it samples are stamped with
  the step's end time (the server's `model_ns`, the time its truth log records);
* an idle engine starts its next step at the next arrival, as the server's does;
* a step that cannot be scheduled (everything waits for KV space) is retried 10 ms later,
  as the server retries.

What the server would refuse with a 400 is refused here too and reported, not served:
input + output over the profile's `max_model_len`, or over the replica's whole KV cache.
The server's `--slowdown-per-hour` and fault injection have no counterpart here.

Replicas: `replicas=N` models N identical replicas of the profile (as `harness sim
--replicas N`), and routes requests round-robin in arrival order. That is what `harness
load` does to a list of endpoints in effect (one user class per endpoint, equal weights:
each replica gets an equal share, not the least-loaded one); there is no load balancer in
the real setup to model. Mixed layouts (different models per role) are not replayed.

Lengths are taken as given: `output_len` tokens are generated for every request (a run's
records say how many tokens each request really produced).

The metrics (`ReplayResult.summary()`) are those of `vllm bench serve`: duration is first
arrival to last completion, TPOT per request is (E2E - TTFT) / (output - 1) over requests
with more than one token, ITL pools every inter-token gap of every request, percentiles
use numpy's default (linear) interpolation.

`load_arrivals(path)` reads the two input formats the `harness sim replay` command takes
(see its docstring). Nothing here imports the harness package (servers/ stays below it);
bad input raises `ReplayInputError`, which the command turns into a one-line usage error.
"""
from __future__ import annotations

import json
import math
import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from servers.simulator.engine import Engine, Sequence
from servers.simulator.profiles import Profile, get_profile, with_options

RETRY_S = 0.01          # the server's retry when no step can be scheduled
MAX_STALLED_RETRIES = 100_000


class ReplayInputError(ValueError):
    """Input that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True)
class Arrival:
    arrival_s: float
    input_len: int
    output_len: int
    id: str | None = None


@dataclass
class RequestRecord:
    """One request's life in virtual seconds since the replay's time origin (arrival_s 0)."""

    id: str
    replica: int
    arrival_s: float
    input_len: int
    output_len: int
    rejected: str | None = None            # why the server would answer 400; None if served
    first_scheduled_s: float | None = None
    token_times_s: array[float] = field(default_factory=lambda: array("d"))   # one per output token
    preemptions: int = 0

    @property
    def ok(self) -> bool:
        return self.rejected is None and len(self.token_times_s) == self.output_len

    @property
    def first_token_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def finish_s(self) -> float | None:
        return self.token_times_s[-1] if self.ok else None

    @property
    def ttft_ms(self) -> float | None:
        return None if not self.ok else (self.token_times_s[0] - self.arrival_s) * 1e3

    @property
    def e2e_ms(self) -> float | None:
        return None if not self.ok else (self.token_times_s[-1] - self.arrival_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        if not self.ok or self.output_len < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) * 1e3 / (self.output_len - 1)

    @property
    def queue_ms(self) -> float | None:
        if self.first_scheduled_s is None:
            return None
        return (self.first_scheduled_s - self.arrival_s) * 1e3

    def itl_ms(self) -> list[float]:
        t = self.token_times_s
        return [(t[i] - t[i - 1]) * 1e3 for i in range(1, len(t))]

    def to_dict(self, itl: bool = True) -> dict[str, Any]:
        """The `--out` line: times in ms (latencies) and s (instants since the origin)."""
        def r3(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        def r6(v: float | None) -> float | None:
            return None if v is None else round(v, 6)

        d = {"id": self.id, "replica": self.replica, "ok": self.ok, "rejected": self.rejected,
             "arrival_s": r6(self.arrival_s), "input_len": self.input_len,
             "output_len": self.output_len, "first_scheduled_s": r6(self.first_scheduled_s),
             "first_token_s": r6(self.first_token_s), "finish_s": r6(self.finish_s),
             "queue_ms": r3(self.queue_ms), "ttft_ms": r3(self.ttft_ms),
             "tpot_ms": r3(self.tpot_ms), "e2e_ms": r3(self.e2e_ms),
             "preemptions": self.preemptions}
        if itl:
            d["itl_ms"] = [round(x, 3) for x in self.itl_ms()]
        return d


def _stats(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(values.mean())}


@dataclass
class ReplayResult:
    profile: str
    replicas: int
    records: list[RequestRecord]       # in arrival order
    steps: int = 0
    preemptions: int = 0
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    kv_capacity_tokens: int = 0        # per replica

    @property
    def served(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    @property
    def rejected(self) -> list[RequestRecord]:
        return [r for r in self.records if r.rejected is not None]

    @property
    def duration_s(self) -> float:
        """First arrival to last completion (served requests), as `vllm bench serve`."""
        served = self.served
        if not served:
            return 0.0
        return max(r.token_times_s[-1] for r in served) - min(r.arrival_s for r in served)

    def summary(self) -> dict[str, Any]:
        served = self.served
        duration = self.duration_s
        out_tokens = sum(r.output_len for r in served)
        in_tokens = sum(r.input_len for r in served)
        ttft = np.fromiter((r.ttft_ms for r in served), float, len(served))
        e2e = np.fromiter((r.e2e_ms for r in served), float, len(served))
        tpot = np.fromiter((r.tpot_ms for r in served if r.output_len > 1), float)
        gaps = [np.diff(np.frombuffer(r.token_times_s, dtype=np.float64)) for r in served
                if len(r.token_times_s) > 1]
        itl = np.concatenate(gaps) * 1e3 if gaps else np.empty(0)

        def rate(n: int) -> float | None:
            return n / duration if duration > 0 else None

        return {
            "profile": self.profile, "replicas": self.replicas,
            "requests": len(served), "rejected": len(self.records) - len(served),
            "duration_s": duration,
            "output_tokens": out_tokens, "input_tokens": in_tokens,
            "output_tokens_per_s": rate(out_tokens),
            "total_tokens_per_s": rate(out_tokens + in_tokens),
            "requests_per_s": rate(len(served)),
            "ttft_ms": _stats(ttft), "tpot_ms": _stats(tpot), "itl_ms": _stats(itl),
            "e2e_ms": _stats(e2e),
            "preemptions": self.preemptions, "steps": self.steps,
            "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_capacity_tokens": self.kv_capacity_tokens,
        }


def _as_arrival(a: Any, i: int) -> Arrival:
    if isinstance(a, Arrival):
        return a
    if isinstance(a, dict):
        return Arrival(a["arrival_s"], a["input_len"], a["output_len"], a.get("id"))
    return Arrival(*a)


def _check(a: Arrival, where: str) -> None:
    if not (isinstance(a.arrival_s, (int, float)) and not isinstance(a.arrival_s, bool)
            and math.isfinite(a.arrival_s) and a.arrival_s >= 0):
        raise ReplayInputError(f"{where}: arrival_s must be a number >= 0, not {a.arrival_s!r}")
    for name in ("input_len", "output_len"):
        v = getattr(a, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ReplayInputError(f"{where}: {name} must be a whole number >= 1, not {v!r}")


def _positive(name: str, v: Any, kind: type = int) -> None:
    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0
                          or (kind is int and v != int(v))):
        raise ReplayInputError(f"{name} must be {'a whole number ' if kind is int else ''}> 0, not {v!r}")


def resolve_profile(profile: Profile | str, *, max_num_seqs: int | None = None,
                    max_num_batched_tokens: int | None = None,
                    gpu_memory_utilization: float | None = None,
                    max_model_len: int | None = None, engine: str | None = None,
                    kv_cache_dtype: str | None = None) -> Profile:
    """The profile (by name or as given) with the server-side limits, the engine and the
    KV-cache dtype overridden. Unknown names raise KeyError (the message names similar
    profiles, or the known engines and dtypes)."""
    if isinstance(profile, str):
        profile = get_profile(profile)
    profile = with_options(profile, engine=engine, kv_cache_dtype=kv_cache_dtype)
    _positive("max_num_seqs", max_num_seqs)
    _positive("max_num_batched_tokens", max_num_batched_tokens)
    _positive("max_model_len", max_model_len)
    _positive("gpu_memory_utilization", gpu_memory_utilization, float)
    overrides: dict[str, Any] = {k: v for k, v in {"max_num_seqs": max_num_seqs,
                                   "max_num_batched_tokens": max_num_batched_tokens,
                                   "max_model_len": max_model_len}.items() if v is not None}
    if gpu_memory_utilization is not None:
        if gpu_memory_utilization > 1:
            raise ReplayInputError(f"gpu_memory_utilization is a fraction of the card, 0..1, "
                                   f"not {gpu_memory_utilization}")
        dep = replace(profile.deployment, gpu_memory_utilization=float(gpu_memory_utilization))
        if not dep.fits:
            raise ReplayInputError(f"{profile.name} at gpu_memory_utilization "
                                   f"{gpu_memory_utilization} leaves no room for the KV cache")
        overrides["deployment"] = dep
    return replace(profile, **overrides) if overrides else profile


def _run_replica(engine: Engine, seqs: list[Sequence]) -> None:
    """Drive one engine in virtual time over `seqs` (sorted by arrival), as the live
    server's engine loop (Replica._next_step / _step_end) drives it in real time."""
    n = len(seqs)
    i = 0
    delay = engine.deployment.efficiency.request_overhead_s
    now = seqs[0].arrival + delay if seqs else 0.0
    stalled = 0
    add = engine.add
    schedule = engine.schedule
    complete = engine.complete
    while True:
        while i < n and seqs[i].arrival + delay <= now:
            add(seqs[i])
            i += 1
        if not engine.has_work():
            if i >= n:
                return
            now = seqs[i].arrival + delay       # idle until the next request comes
            continue
        step = schedule(now)
        if step is None:
            stalled += 1
            if stalled > MAX_STALLED_RETRIES:
                raise RuntimeError("engine stalled: waiting requests never fit the KV cache")
            now += RETRY_S
            continue
        stalled = 0
        now += step.duration
        for seq in complete(step, now).emitted:
            seq.payload.append(now)


def replay(profile: Profile | str, arrivals: Iterable[Arrival | dict[str, Any] | tuple[Any, ...]], *,
           replicas: int = 1, max_num_seqs: int | None = None,
           max_num_batched_tokens: int | None = None,
           gpu_memory_utilization: float | None = None,
           kv_cache_tokens: int | None = None,
           max_model_len: int | None = None, engine: str | None = None,
           kv_cache_dtype: str | None = None) -> ReplayResult:
    """Replay `arrivals` (Arrival, dicts with arrival_s/input_len/output_len[/id], or
    (arrival_s, input_len, output_len[, id]) tuples, any order) on `replicas` replicas of
    `profile` in virtual time. The limits default to the profile's (the live server's)."""
    prof = resolve_profile(profile, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens,
                           gpu_memory_utilization=gpu_memory_utilization,
                           max_model_len=max_model_len, engine=engine,
                           kv_cache_dtype=kv_cache_dtype)
    _positive("replicas", replicas)
    _positive("kv_cache_tokens", kv_cache_tokens)
    items = [_as_arrival(a, i) for i, a in enumerate(arrivals)]
    for i, a in enumerate(items):
        _check(a, f"arrival {i}")
    order = sorted(range(len(items)), key=lambda k: items[k].arrival_s)
    engines = [Engine(prof.deployment, max_num_seqs=prof.max_num_seqs,
                      max_num_batched_tokens=prof.max_num_batched_tokens,
                      kv_capacity_tokens=kv_cache_tokens) for _ in range(replicas)]
    kv_limit = engines[0].max_prompt_tokens()
    records: list[RequestRecord] = []
    per_replica: list[list[tuple[Sequence, RequestRecord]]] = [[] for _ in range(replicas)]
    turn = 0
    for k in order:
        a = items[k]
        rid = a.id if a.id is not None else str(k)
        rec = RequestRecord(rid, turn, float(a.arrival_s), a.input_len, a.output_len)
        records.append(rec)
        total = a.input_len + a.output_len
        if total > prof.max_model_len:
            rec.rejected = f"input + output {total} > max_model_len {prof.max_model_len}"
        elif total > kv_limit:
            rec.rejected = f"input + output {total} > the replica's KV cache ({kv_limit} tokens)"
        else:
            per_replica[turn].append(
                (Sequence(rid, a.input_len, a.output_len, rec.arrival_s, payload=rec.token_times_s), rec))
        turn = (turn + 1) % replicas     # the rejected take their turn too, as a 400 would
    for eng, pairs in zip(engines, per_replica):
        _run_replica(eng, [seq for seq, _ in pairs])
        for seq, rec in pairs:
            rec.first_scheduled_s = seq.first_scheduled
            rec.preemptions = seq.preemptions
    return ReplayResult(prof.name, replicas, records,
                        steps=sum(e.stats.steps for e in engines),
                        preemptions=sum(e.stats.preemptions for e in engines),
                        max_num_seqs=prof.max_num_seqs,
                        max_num_batched_tokens=prof.max_num_batched_tokens,
                        kv_capacity_tokens=kv_limit)


# -- input files ------------------------------------------------------------------------------

def load_arrivals(path: str | os.PathLike[str]) -> tuple[list[Arrival], dict[str, int]]:
    """Read a replay input; returns (arrivals, skipped) where skipped counts the records of a
    results directory that were left out, by reason.

    Two formats, told apart by the first record:

    * JSONL of `{"arrival_s", "input_len", "output_len"}` (an optional `"id"`), one request a
      line, arrival_s in seconds from any origin; every line must be valid.
    * A `harness load` results directory, or its `requests.jsonl`: records with `sent_at`
      (epoch s), `input_tokens` and `output_tokens`. arrival_s is sent_at minus the earliest
      sent_at of the file (failed ones included, so the timeline is the run's). Replayed:
      the records with `ok` true and both token counts >= 1 (counts the tokenizer estimated
      are used as they are). Left out and counted in `skipped`: `failed` (ok false: the server
      answered an error or the connection broke, so how much work it did is unknown),
      `incomplete` (still in flight when the run stopped: its output length is unknown),
      `no_tokens` (ok but a token count missing or 0). A torn last line (a killed run) is
      ignored, as the harness's own reader does.

    Blank lines are skipped.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "requests.jsonl")
        if not os.path.exists(p):
            raise ReplayInputError(f"{os.fspath(path)} is a directory with no requests.jsonl "
                                   f"(give a `harness load` results directory or a JSONL file)")
    try:
        with open(p, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ReplayInputError(f"{p}: no such file") from None
    except OSError as e:
        raise ReplayInputError(f"{p}: cannot read ({e.strerror})") from None
    lines = raw.split(b"\n")
    torn = bool(lines) and lines[-1].strip() != b""   # no newline after the last line
    rows: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            if torn and n == len(lines) and rows and "sent_at" in rows[0][1]:
                break   # a results file cut off mid-line by a kill
            raise ReplayInputError(f"{p} line {n}: not JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        if not isinstance(obj, dict):
            raise ReplayInputError(f"{p} line {n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise ReplayInputError(f"{p}: no requests in the file")
    if "sent_at" in rows[0][1]:
        return _from_results(p, rows)
    return _from_arrivals(p, rows), {}


def _from_arrivals(p: str, rows: list[tuple[int, dict[str, Any]]]) -> list[Arrival]:
    out = []
    for n, obj in rows:
        missing = [k for k in ("arrival_s", "input_len", "output_len") if k not in obj]
        if missing:
            raise ReplayInputError(f"{p} line {n}: missing {', '.join(missing)} (each line needs "
                                   f"arrival_s, input_len, output_len)")
        rid = obj.get("id")
        a = Arrival(obj["arrival_s"], obj["input_len"], obj["output_len"],
                    None if rid is None else str(rid))
        _check(a, f"{p} line {n}")
        out.append(a)
    return out


def _from_results(p: str, rows: list[tuple[int, dict[str, Any]]]) -> tuple[list[Arrival], dict[str, int]]:
    skipped = {"failed": 0, "incomplete": 0, "no_tokens": 0}
    kept: list[tuple[float, int, int, str | None]] = []
    sent_all = []
    for n, obj in rows:
        sent = obj.get("sent_at")
        if not isinstance(sent, (int, float)) or isinstance(sent, bool) or not math.isfinite(sent):
            raise ReplayInputError(f"{p} line {n}: sent_at must be a number (epoch seconds), "
                                   f"not {sent!r}")
        sent_all.append(sent)
        if not obj.get("ok"):
            skipped["incomplete" if obj.get("error_kind") == "incomplete" else "failed"] += 1
            continue
        i: Any = obj.get("input_tokens")   # checked to be whole numbers just below
        o: Any = obj.get("output_tokens")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (i, o)):
            skipped["no_tokens"] += 1
            continue
        rid = obj.get("id")
        kept.append((sent, i, o, None if rid is None else str(rid)))
    if not kept:
        raise ReplayInputError(f"{p}: no completed request to replay ({', '.join(f'{v} {k}' for k, v in skipped.items() if v)})")
    t0 = min(sent_all)
    return ([Arrival(s - t0, i, o, rid) for s, i, o, rid in kept],
            {k: v for k, v in skipped.items() if v})
