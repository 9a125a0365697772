"""Fit the simulator's few engine constants against published measurements, and report.

    .venv/bin/python benchmarks/fit_simulator.py              # the current constants, per point
    .venv/bin/python benchmarks/fit_simulator.py --fit        # coordinate descent, prints the fit
    .venv/bin/python benchmarks/fit_simulator.py --before REV # the same report for the
                                                              # simulator as of git REV

Points: docs/data/calibration-points.json (see its own header for sources; each point names
its engine, GPU, TP, model, weight and KV dtypes, workload, metric and regime). Every point
is run through its profile in virtual time, the way the published benchmark ran:

* workload.concurrency C: a closed loop of C clients (`vllm bench serve --max-concurrency`),
  num_requests requests (default 5 C, at least 100; capped at 2,000 for speed);
* workload.request_rate R: Poisson arrivals at R/s (seeded), num_requests requests (default
  500); R = "inf" is every request at t=0 through the API server;
* workload.max_throughput: every request at t=0 with the offline limits and no HTTP front
  end (vLLM's `benchmark_throughput` / `LLM` class, TensorRT-LLM's `trtllm-bench`).

The fitted constants are each a physical quantity with a plausible range, per engine:
memory (fraction of peak DRAM bandwidth the decode kernels reach), compute (fraction of the
tensor-core peak a whole step reaches), step_overhead_s and per_seq_overhead_s (host work
per step and per scheduled sequence), request_overhead_s (the API server's per-request
work); plus one interconnect constant shared by all engines, the NVLink ring-step latency.
The loss is the mean squared log ratio simulated/published, each regime weighted equally,
so that 30 throughput points cannot outvote 8 TTFT points. Constants no point constrains
(a regime with no data for an engine) stay at their prior.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import subprocess
import sys
import tempfile
from collections import defaultdict, deque
from dataclasses import replace
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
POINTS = ROOT / "docs" / "data" / "calibration-points.json"

# Search ranges: what each constant can physically be.
BOUNDS = {
    "memory": (0.55, 0.95),
    "compute": (0.30, 0.90),
    "step_overhead_s": (0.0, 0.006),
    "per_seq_overhead_s": (0.0, 80e-6),
    "request_overhead_s": (0.0, 0.040),
    "idle_launch_s_per_layer": (0.0, 400e-6),
}
NVLINK_BOUNDS = (0.5, 20.0)
MAX_REQUESTS = 2000
# The priors: physically reasoned values the fit starts from (see roofline.ENGINES' history).
PRIORS: dict[str, Any] = {"engines": {}, "nvlink": 3.0}


# -- reading points ------------------------------------------------------------------------------

def load_points(path: pathlib.Path = POINTS) -> list[dict]:
    doc = json.loads(path.read_text())
    pts = doc["points"] if isinstance(doc, dict) else doc
    return [p for p in pts if isinstance(p, dict) and "value" in p]


def _gpu_key(gpu: str) -> str:
    from servers.simulator.gpus import GPUS
    if gpu in GPUS:
        return gpu
    g = gpu.lower().replace("nvidia", "").strip()
    for key in ("h200", "h100", "a100", "l40s"):
        if key in g.replace(" ", "").replace("-", ""):
            return key
    raise KeyError(f"unknown GPU {gpu!r}")


def _model_key(model: str) -> str:
    from servers.simulator.models import MODELS
    if model in MODELS:
        return model
    m = model.lower()
    if "70b" in m:
        return "llama-3-70b"
    if "13b" in m:
        return "llama-2-13b"
    if "mistral" in m:
        return "mistral-7b"
    if "8b" in m:
        return "llama-3-8b"
    raise KeyError(f"unknown model {model!r}")


def _weights_key(dtype: str | None) -> str:
    d = (dtype or "bf16").lower()
    if "fp8" in d:
        return "fp8"
    if "awq" in d or "int4" in d or "w4" in d:
        return "awq"
    if "gptq" in d:
        return "gptq"
    if "int8" in d or "w8a8" in d:
        return "w8a8"
    return "bf16"


def _kv_key(dtype: str | None) -> str:
    return "fp8" if dtype and "fp8" in dtype.lower() else "auto"


def metric_of(name: str) -> tuple[str, str]:
    """('ttft'|'tpot'|'itl'|'e2e'|'output_tps'|'total_tps'|'rps', stat)."""
    n = name.lower()
    stat = "p50"
    for key, s in (("p99", "p99"), ("p90", "p90"), ("p95", "p95"), ("mean", "mean"),
                   ("avg", "mean"), ("median", "p50"), ("p50", "p50")):
        if key in n:
            stat = s
            break
    for key, kind in (("ttft", "ttft"), ("time_to_first", "ttft"), ("tpot", "tpot"),
                      ("time_per_output", "tpot"), ("itl", "itl"), ("inter_token", "itl"),
                      ("e2e", "e2e"), ("latency", "e2e")):
        if key in n:
            return kind, stat
    if "request" in n or "req" in n:
        return "rps", "value"
    if "total" in n:
        return "total_tps", "value"
    if "throughput" in n or "tok" in n:
        return "output_tps", "value"
    raise KeyError(f"unknown metric {name!r}")


# -- simulating a point ----------------------------------------------------------------------------

def profile_for(point: dict, engines: dict | None = None, nvlink_hop_us: float | None = None):
    from servers.simulator import profiles as P
    gpu, model = _gpu_key(point["gpu"]), _model_key(point["model"])
    tp = int(point.get("tp") or 1)
    precision = _weights_key(point.get("weights_dtype"))
    engine = str(point.get("engine") or "vllm").lower().replace("tensorrt-llm", "trtllm").replace("-", "")
    try:
        from servers.simulator.models import PRECISIONS
        if precision not in PRECISIONS:
            precision = "bf16"        # the old simulator had no FP8: the nearest it had
        prof = P.make_profile(gpu, model, precision, tp)
    except Exception:
        prof = P.make_profile(gpu, model, "bf16", tp)
    if hasattr(P, "with_options"):
        prof = P.with_options(prof, engine=engine if engine in ("vllm", "trtllm") else "vllm",
                              kv_cache_dtype=_kv_key(point.get("kv_cache_dtype")))
    dep = prof.deployment
    if engines is not None and prof.engine in engines:
        dep = replace(dep, efficiency=engines[prof.engine])   # trial constants, same policy
    if nvlink_hop_us is not None and "NVLink" in dep.gpu.interconnect:
        dep = replace(dep, gpu=replace(dep.gpu, p2p_latency_us=nvlink_hop_us))
    max_model_len = max(prof.max_model_len, _lens(point)[0] + _lens(point)[1])
    return replace(prof, deployment=dep, max_model_len=max_model_len)


def _lens(point: dict) -> tuple[int, int]:
    w = point["workload"]
    return int(w["input_len"]), int(w["output_len"])


def _closed_loop(prof, concurrency: int, n: int, input_len: int, output_len: int):
    """`vllm bench serve --max-concurrency C`: C clients, the next request when one ends."""

    from servers.simulator.engine import Engine, Sequence
    from servers.simulator.replay import ReplayResult, RequestRecord
    dep = prof.deployment
    delay = getattr(dep.efficiency, "request_overhead_s", 0.0)
    engine = Engine(dep, max_num_seqs=prof.max_num_seqs,
                    max_num_batched_tokens=prof.max_num_batched_tokens)
    arriving: deque = deque()
    records: list = []

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
            raise RuntimeError("engine stalled")
        now += step.duration
        res = engine.complete(step, now)
        for seq in res.emitted:
            seq.payload.append(now)
        for _seq in res.finished:
            if len(records) < n:
                send(now)
    return ReplayResult(prof.name, 1, records)


def simulate(point: dict, prof) -> float | None:
    """The point through `prof`: servers.simulator.calibration_set.simulate (the one driver the
    published table uses), or, for a simulator tree older than it (--before), the legacy
    driver below."""
    try:
        from servers.simulator import calibration_set as cs
        if "profile" in cs.simulate.__code__.co_varnames:
            return cs.simulate(point, profile=prof).simulated
    except ImportError:
        pass
    return _simulate_legacy(point, prof)


def _simulate_legacy(point: dict, prof) -> float:
    from servers.simulator.replay import replay
    w = point["workload"]
    input_len, output_len = _lens(point)
    kind, stat = metric_of(point["metric"])
    if w.get("concurrency") is not None:
        c = int(w["concurrency"])
        n = min(MAX_REQUESTS, int(w.get("num_requests") or max(5 * c, 100)))
        result = _closed_loop(prof, c, n, input_len, output_len)
    elif w.get("request_rate") not in (None, "inf", float("inf")):
        rate = float(w["request_rate"])
        n = min(MAX_REQUESTS, int(w.get("num_requests") or 500))
        rng = random.Random(0)
        t, arrivals = 0.0, []
        for _ in range(n):
            t += rng.expovariate(rate)
            arrivals.append((t, input_len, output_len))
        result = replay(prof, arrivals)
    else:
        n = min(MAX_REQUESTS, int(w.get("num_requests") or 1000))
        if w.get("max_throughput") or w.get("request_rate") is None:
            # Offline: the LLM class / trtllm-bench; no HTTP front end, offline limits.
            eff = prof.deployment.efficiency
            if hasattr(eff, "request_overhead_s"):
                eff = replace(eff, request_overhead_s=0.0)
            prof = replace(prof, deployment=replace(prof.deployment, efficiency=eff),
                           max_num_seqs=int(w.get("max_batch_size") or prof.offline_max_num_seqs),
                           max_num_batched_tokens=prof.offline_max_num_batched_tokens)
        result = replay(prof, [(0.0, input_len, output_len)] * n)
    s = result.summary()
    if point["metric"] == "batch_latency_ms":
        return s["duration_s"] * 1e3
    if point["metric"].endswith("_per_gpu"):
        return s["output_tokens_per_s"] / int(point.get("gpu_count") or point.get("tp") or 1)
    if kind == "output_tps":
        return s["output_tokens_per_s"]
    if kind == "total_tps":
        return s["total_tokens_per_s"]
    if kind == "rps":
        return s["requests_per_s"]
    d = s[f"{kind}_ms"]
    if stat == "p95":
        stat = "p90"
    return d[stat]


# -- loss, fit, report ----------------------------------------------------------------------------

_CACHE: dict = {}


def evaluate(points: list[dict], engines=None, nvlink=None) -> list[tuple[dict, float | None]]:
    """Each point through its profile with these constants; a point whose constants did not
    change since it last ran (its engine's, and the NVLink hop where it crosses NVLink) is not
    run again (coordinate descent asks for the same ones often)."""
    out = []
    for p in points:
        try:
            prof = profile_for(p, engines, nvlink)
            key = (p.get("id") or json.dumps(p, sort_keys=True), prof.deployment.efficiency,
                   prof.deployment.gpu.p2p_latency_us if int(p.get("tp") or 1) > 1 else None)
            if key not in _CACHE:
                _CACHE[key] = simulate(p, prof)
            out.append((p, _CACHE[key]))
        except (KeyError, ValueError, RuntimeError) as e:
            print(f"skip {p.get('id', p.get('source', '?'))}: {e}", file=sys.stderr)
            out.append((p, None))
    return out


PRIOR_WEIGHT = 0.02   # pull toward the prior, per constant, in units of its range squared


def band(point: dict) -> str:
    """The error-band regime of a point, as the published table groups them."""
    try:
        from servers.simulator.calibration_set import band_of
        return band_of(point)
    except ImportError:
        return point.get("regime", "?")


def loss(results, engines=None, nvlink=None) -> float:
    """Mean squared log ratio, regimes weighted equally; plus a small pull of each constant
    toward its prior (the pre-fit value in roofline.ENGINES / gpus.NVLINK_HOP_US), so a
    constant few points constrain does not run to the edge of its range to shave a point."""
    by_regime: dict[str, list[float]] = defaultdict(list)
    for p, sim in results:
        if sim and sim > 0:
            by_regime[band(p)].append(math.log(sim / float(p["value"])) ** 2)
    total = sum(sum(v) / len(v) for v in by_regime.values()) / max(1, len(by_regime))
    if engines is not None:
        for name, eff in engines.items():
            prior = PRIORS["engines"].get(name)
            if prior is None:
                continue
            for key, (lo, hi) in BOUNDS.items():
                if not hasattr(eff, key):
                    continue
                total += PRIOR_WEIGHT * ((getattr(eff, key) - getattr(prior, key)) / (hi - lo)) ** 2
    if nvlink is not None:
        lo, hi = NVLINK_BOUNDS
        total += PRIOR_WEIGHT * ((nvlink - PRIORS["nvlink"]) / (hi - lo)) ** 2
    return total


def fit(points: list[dict], passes: int = 3, hold: frozenset = frozenset()) -> tuple[dict, float]:
    """Coordinate descent over every constant except those in `hold` ("engine.name" or
    "nvlink"), which stay at their prior: a constant the points cannot tell apart from
    another (vLLM's memory efficiency from batch-8 decodes alone, with only two saturated
    vLLM points, both of the host-bound pre-0.6 engine, to pin it) is held rather than fitted to the noise."""
    from servers.simulator.gpus import NVLINK_HOP_US
    from servers.simulator.roofline import ENGINES
    engines = dict(ENGINES)
    nvlink = NVLINK_HOP_US
    PRIORS["engines"], PRIORS["nvlink"] = dict(ENGINES), NVLINK_HOP_US
    used = {str(p.get("engine", "vllm")).lower().replace("tensorrt-llm", "trtllm").replace("-", "")
            for p in points}
    knobs = [(e, k) for e in engines if e in used for k in BOUNDS
             if hasattr(engines[e], k) and f"{e}.{k}" not in hold]
    knobs += [] if "nvlink" in hold else [(None, "nvlink")]
    best = loss(evaluate(points, engines, nvlink), engines, nvlink)
    print(f"start loss {best:.4f}", flush=True)
    for rnd in range(passes):
        for eng, key in knobs:
            lo, hi = NVLINK_BOUNDS if eng is None else BOUNDS[key]
            cur = nvlink if eng is None else getattr(engines[eng], key)
            span = (hi - lo) / (4 * (rnd + 1))
            subset = points if eng is None else [
                p for p in points
                if str(p.get("engine", "vllm")).lower().replace("tensorrt-llm", "trtllm").replace("-", "") == eng]
            if eng is None:
                subset = [p for p in points if int(p.get("tp") or 1) > 1] or points
            base = loss(evaluate(subset, engines, nvlink), engines, nvlink)
            for cand in sorted({min(hi, max(lo, cur + d * span)) for d in (-2, -1, -0.5, 0.5, 1, 2)}):
                if cand == cur:
                    continue
                trial_e = dict(engines)
                trial_n = nvlink
                if eng is None:
                    trial_n = cand
                else:
                    trial_e[eng] = replace(engines[eng], **{key: cand})
                val = loss(evaluate(subset, trial_e, trial_n), trial_e, trial_n)
                if val < base - 1e-6:
                    base, engines, nvlink, cur = val, trial_e, trial_n, cand
            print(f"pass {rnd + 1} {eng or 'nvlink'}.{key} = {cur:.6g} (subset loss {base:.4f})",
                  flush=True)
        best = loss(evaluate(points, engines, nvlink), engines, nvlink)
        print(f"pass {rnd + 1}: loss {best:.4f}", flush=True)
    return {"engines": engines, "nvlink_hop_us": nvlink}, best


def regime_table(results) -> dict[str, dict[str, Any]]:
    by: dict[str, list[float]] = defaultdict(list)
    for p, sim in results:
        if sim:
            by[band(p)].append(sim / float(p["value"]))
    out = {}
    for regime, r in sorted(by.items()):
        r.sort()
        med = r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) / 2
        worst = max(r, key=lambda x: abs(math.log(x)))
        out[regime] = {"n": len(r), "median": med, "worst": worst,
                       "within_20pct": sum(0.8 <= x <= 1.2 for x in r) / len(r)}
    return out


def print_report(results, label: str) -> dict:
    table = regime_table(results)
    print(f"\n{label}")
    print(f"{'regime':28}{'n':>4}{'median':>9}{'worst':>9}{'±20%':>7}")
    for regime, d in table.items():
        print(f"{regime:28}{d['n']:>4}{d['median']:>9.3f}{d['worst']:>9.3f}{d['within_20pct']:>7.0%}")
    return table


def _before(rev: str, points_path: pathlib.Path) -> dict:
    """The report for the simulator as of `rev`: its servers/simulator in a scratch tree."""
    with tempfile.TemporaryDirectory() as tmp:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "servers/simulator"],
                             check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
        pathlib.Path(tmp, "servers", "__init__.py").touch()
        env = dict(os.environ, PYTHONPATH=tmp)
        proc = subprocess.run([sys.executable, __file__, "--points", str(points_path), "--json",
                               "--no-root"], env=env, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default=str(POINTS))
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--before", metavar="REV", help="also report the simulator as of this git rev")
    ap.add_argument("--json", action="store_true", help="print per-point results as JSON")
    ap.add_argument("--passes", type=int, default=3, help="coordinate-descent passes (--fit)")
    ap.add_argument("--hold", default="", help="comma-separated constants kept at their prior "
                    "(--fit), e.g. vllm.memory,vllm.compute")
    ap.add_argument("--max-requests", type=int, default=None,
                    help="requests per point while fitting (calibration_set.MAX_REQUESTS; "
                         "smaller is faster and a little less exact for big offline batches)")
    ap.add_argument("--no-root", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.no_root:
        sys.path.insert(0, str(ROOT))
    points = load_points(pathlib.Path(args.points))
    if args.max_requests:
        from servers.simulator import calibration_set as cs
        cs.MAX_REQUESTS = args.max_requests
    if args.json:
        res = evaluate(points)
        json.dump({"points": [{"point": p, "sim": s} for p, s in res],
                   "regimes": regime_table(res)}, sys.stdout)
        return
    if args.before:
        before = _before(args.before, pathlib.Path(args.points))
        print(f"\nbefore ({args.before})")
        for regime, d in before["regimes"].items():
            print(f"{regime:28}{d['n']:>4}{d['median']:>9.3f}{d['worst']:>9.3f}{d['within_20pct']:>7.0%}")
    if args.fit:
        fitted, best = fit(points, passes=args.passes,
                           hold=frozenset(h.strip() for h in args.hold.split(",") if h.strip()))
        print("\nfitted constants:")
        for name, eff in fitted["engines"].items():
            print(f"  {name}: " + ", ".join(f"{k}={getattr(eff, k):.6g}" for k in BOUNDS))
        print(f"  NVLINK_HOP_US={fitted['nvlink_hop_us']:.4g}   loss {best:.4f}")
        print_report(evaluate(points, fitted["engines"], fitted["nvlink_hop_us"]), "after the fit")
    res = evaluate(points)
    print_report(res, "current constants")
    print("\nper point (simulated / published):")
    for p, sim in res:
        ratio = f"{sim / float(p['value']):.3f}" if sim else "n/a"
        w = p["workload"]
        load = next((f"{k}={w[k]}" for k in ("concurrency", "request_rate", "max_throughput") if k in w), "")
        print(f"  {ratio:>6}  {p.get('engine')} {p['gpu']} tp{p.get('tp', 1)} {p['model']} "
              f"{p.get('weights_dtype')} {w['input_len']}/{w['output_len']} {load} {p['metric']} "
              f"pub {p['value']} sim {sim and round(sim, 2)}  [{p.get('regime')}]")


if __name__ == "__main__":
    main()
