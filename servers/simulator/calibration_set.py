"""The published calibration set (docs/data/calibration-points.json) replayed through the
simulator: per point the simulated figure next to the published one, and the error band per
regime. This is how a reader learns how far a simulated number may be from a real engine's.

Each point runs the way its source ran it, through `replay` or the closed loop below, so
every metric comes from the same per-request records (`vllm bench serve`'s definitions):
`max_throughput` is every request queued at t=0 into the engine with the offline limits
(or the published static batch, `max_batch_size`) and no HTTP front end (trtllm-bench,
TensorRT-LLM's gptSessionBenchmark, vLLM's offline benchmarks and `vllm bench latency`);
`concurrency` C is a closed loop of C clients; `request_rate` R is Poisson arrivals at R/s
(seeded). Requests per point are capped at MAX_REQUESTS (a published static batch is run
whole) so the whole set replays in about half a minute and its staleness test stays
bearable; the cap costs accuracy only where the offline batch could hold more than
MAX_REQUESTS sequences. The cap is printed with the table. A point the simulator cannot
express is kept and reported as "not simulated: <reason>", never dropped.
"""
from __future__ import annotations

import json
import math
import pathlib
import random
import statistics
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from servers.simulator.engine import Engine, Sequence
from servers.simulator.profiles import Profile, make_profile, with_options
from servers.simulator.replay import ReplayResult, RequestRecord, replay

ROOT = pathlib.Path(__file__).resolve().parents[2]
POINTS_PATH = ROOT / "docs" / "data" / "calibration-points.json"
MAX_REQUESTS = 512


@dataclass
class PointResult:
    point: dict[str, Any]
    simulated: float | None
    reason: str = ""          # why it was not simulated, when simulated is None

    @property
    def ratio(self) -> float | None:
        return None if self.simulated is None else self.simulated / float(self.point["value"])


def load_points(path: pathlib.Path = POINTS_PATH) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text())
    if doc.get("schema_version") != 1:
        raise ValueError(f"{path}: schema_version {doc.get('schema_version')!r}, expected 1")
    points: list[dict[str, Any]] = doc["points"]
    return points


def profile_for(point: dict[str, Any]) -> Profile:
    prof = make_profile(point["gpu"], point["model"], point["weights_dtype"], int(point["tp"]))
    return with_options(prof, engine=point.get("engine"), kv_cache_dtype=point.get("kv_cache_dtype"))


def closed_loop(prof: Profile, concurrency: int, n: int, input_len: int,
                output_len: int) -> ReplayResult:
    """`vllm bench serve --max-concurrency C` / genai-perf's concurrency mode: C clients, each
    sending its next request when its last one ends; each request enters the engine after
    the API server's per-request cost (Efficiency.request_overhead_s), as in `replay`."""
    dep = prof.deployment
    delay = dep.efficiency.request_overhead_s
    engine = Engine(dep, max_num_seqs=prof.max_num_seqs,
                    max_num_batched_tokens=prof.max_num_batched_tokens)
    arriving: deque[tuple[float, Sequence]] = deque()
    records: list[RequestRecord] = []

    def send(now: float) -> None:
        rec = RequestRecord(str(len(records)), 0, now, input_len, output_len)
        records.append(rec)
        arriving.append((now + delay, Sequence(rec.id, input_len, output_len, now,
                                               payload=rec.token_times_s)))

    for _ in range(min(concurrency, n)):
        send(0.0)
    now = 0.0
    while True:
        while arriving and arriving[0][0] <= now:
            engine.add(arriving.popleft()[1])
        step = engine.schedule(now)
        if step is None:
            if arriving:
                now = max(now, arriving[0][0])
                continue
            if not engine.has_work():
                break
            raise RuntimeError("engine stalled: a request can never fit the KV cache")
        now += step.duration
        res = engine.complete(step, now)
        for seq in res.emitted:
            seq.payload.append(now)
        for _seq in res.finished:
            if len(records) < n:
                send(now)
    return ReplayResult(prof.name, 1, records, steps=engine.stats.steps,
                        preemptions=engine.stats.preemptions)


def _offline(prof: Profile, w: dict[str, Any], isl: int, osl: int) -> ReplayResult:
    """Every request queued at t=0 into the engine itself: the offline limits (or the
    published static batch size, `max_batch_size`), no HTTP front end, and a model length
    that admits the point's lengths (trtllm-bench and the `LLM` class size it to the data)."""
    batch = int(w.get("max_batch_size") or prof.offline_max_num_seqs)
    n = int(w.get("num_requests") or MAX_REQUESTS)
    n = min(n, max(MAX_REQUESTS, batch)) if w.get("max_batch_size") else min(n, MAX_REQUESTS)
    eff = replace(prof.deployment.efficiency, request_overhead_s=0.0)
    prof = replace(prof, deployment=replace(prof.deployment, efficiency=eff),
                   max_num_seqs=batch, max_num_batched_tokens=prof.offline_max_num_batched_tokens,
                   max_model_len=max(prof.max_model_len, isl + osl))
    return replay(prof, [(0.0, isl, osl)] * n)


# The metrics a point may name: each is computed by `figures`.
METRICS = ("output_tokens_per_s", "total_tokens_per_s", "output_tokens_per_s_per_gpu",
           "batch_latency_ms", "ttft_ms_p50", "ttft_ms_mean", "tpot_ms_p50", "tpot_ms_mean",
           "itl_ms_p50", "itl_ms_mean", "e2e_ms_p50", "e2e_ms_mean")


def figures(summary: dict[str, Any], gpu_count: int) -> dict[str, float | None]:
    """Every metric of METRICS from a replay summary. batch_latency_ms is one offline batch's
    time, first request in to last token out (`vllm bench latency`'s figure)."""
    out: dict[str, float | None] = {
        "output_tokens_per_s": summary["output_tokens_per_s"],
        "total_tokens_per_s": summary.get("total_tokens_per_s"),
        "output_tokens_per_s_per_gpu": summary["output_tokens_per_s"] / gpu_count,
        "batch_latency_ms": summary["duration_s"] * 1e3,
    }
    for k in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("p50", "mean"):
            out[f"{k}_ms_{stat}"] = summary[f"{k}_ms"][stat]
    return out


def simulate(point: dict[str, Any], profile: Profile | None = None) -> PointResult:
    """`point` run the way its source ran it (module docstring); `profile` overrides the
    point's own (benchmarks/fit_simulator.py passes trial constants this way)."""
    try:
        prof = profile_for(point) if profile is None else profile
    except KeyError as e:
        return PointResult(point, None, f"not simulated: {e}")
    w, metric = point["workload"], point["metric"]
    isl, osl = int(w["input_len"]), int(w["output_len"])
    n = min(MAX_REQUESTS, int(w.get("num_requests") or MAX_REQUESTS))
    if not prof.deployment.fits:
        return PointResult(point, None, f"not simulated: {prof.name} does not fit its GPUs")
    try:
        if w.get("max_throughput"):
            result = _offline(prof, w, isl, osl)
        elif "concurrency" in w:
            c = int(w["concurrency"])
            result = closed_loop(prof, c, min(n, max(5 * c, 100)), isl, osl)
        elif "request_rate" in w:
            rng, t, arrivals = random.Random(0), 0.0, []
            for _ in range(n):
                t += rng.expovariate(float(w["request_rate"]))
                arrivals.append((t, isl, osl))
            result = replay(replace(prof, max_model_len=max(prof.max_model_len, isl + osl)), arrivals)
        else:
            return PointResult(point, None, "not simulated: workload has no load kind")
    except (ValueError, RuntimeError) as e:
        return PointResult(point, None, f"not simulated: {e}")
    values = figures(result.summary(), int(point.get("gpu_count") or prof.deployment.tp))
    value = values.get(metric)
    if value is None:
        return PointResult(point, None, f"not simulated: metric {metric} not produced for this workload")
    return PointResult(point, float(value))


def replay_all(points: list[dict[str, Any]] | None = None) -> list[PointResult]:
    return [simulate(p) for p in (load_points() if points is None else points)]


def band_of(point: dict[str, Any]) -> str:
    """The regime a point's error band is stated for: saturated throughput, light-load TTFT,
    light-load decode speed (TPOT, ITL, a batch's latency), or the knee. TTFT and decode
    are apart because different parts of the model make them (prefill and front end vs
    the weight and KV reads of a decode step)."""
    regime = point["regime"]
    if regime == "light":
        return "light TTFT" if point["metric"].startswith("ttft") else "light TPOT/ITL/latency"
    return "saturated throughput" if regime == "saturated" else regime


def regime_of_metric(metric: str) -> str | None:
    """The band (band_of's names) a simulated figure of `metric` is held to: a throughput to
    the saturated band, a TTFT to light TTFT, a TPOT/ITL/E2E/latency to the light decode band;
    None for what the calibration says nothing about (error rates, counts). Metric names as
    harness results and replay summaries spell them (ttft_ms_p50, tpot_p50_ms,
    output_tokens_per_s, small.output_tokens_per_s, ...)."""
    m = metric.lower()
    if "ttft" in m:
        return "light TTFT"
    if any(k in m for k in ("tpot", "itl", "e2e", "latency")):
        return "light TPOT/ITL/latency"
    if any(k in m for k in ("tokens_per_s", "tok_s", "throughput", "requests_per_s")):
        return "saturated throughput"
    return None


def regime_bands(results: list[PointResult]) -> dict[str, dict[str, Any]]:
    """Per band (band_of): median and worst ratio simulated/published (worst = farthest
    from 1 in log), the range, the share within +-20%, and the central 80% of
    published/simulated (real_lo, real_hi: where a real engine's figure typically falls
    relative to the simulated one)."""
    out: dict[str, dict[str, Any]] = {}
    for band in sorted({band_of(r.point) for r in results}):
        ratios = [r.ratio for r in results if band_of(r.point) == band and r.ratio is not None]
        if not ratios:
            out[band] = {"points": 0}
            continue
        out[band] = {"points": len(ratios), "median": statistics.median(ratios),
                     "worst": max(ratios, key=lambda x: abs(math.log(x))),
                     "min": min(ratios), "max": max(ratios),
                     "within_20pct": sum(0.8 <= x <= 1.2 for x in ratios) / len(ratios),
                     "real_lo": float(np.percentile([1 / x for x in ratios], 10)),
                     "real_hi": float(np.percentile([1 / x for x in ratios], 90))}
    return out
