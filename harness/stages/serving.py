"""The serving stage: the seed's latency benchmark through ``harness load`` against one server.

Defaults are the seed's "Latency Benchmark - Online Serving Mode": Poisson arrivals at 20
requests/s, 500 prompts, 512 tokens in, 128 out. The stage's ``expect:`` latency targets (the
seed's TTFT p50 < 80 ms, p99 < 200 ms, TPOT p50 < 15 ms, p99 < 30 ms) are also handed to the load
run as SLOs, so its goodput counts the requests that met them. ``sweep_rates`` adds runs at other
rates before the main one (the report plots latency percentiles against rate). When the load
generator of any of its runs was invalid (``summary.json``'s ``generator.valid`` false: CPU
saturated or schedule lag over the limit, where ``harness load`` exits 3) the stage is
``invalid`` with the generator's reasons; ``cpu_limit`` and ``lag_limit_ms`` set those limits.

This module also holds what the cluster and soak stages share: one ``harness load`` run
(:func:`run_load`, a subprocess, with a progress line as requests finish) and the flat figures of
its ``summary.json`` (:func:`flatten`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

from harness import metric_catalog as mc
from harness.load_options import harness_argv, plan_field, text
from harness.stages.base import Field, StageContext, StageResult
from harness.stages.physics import load_target_marks as target_marks  # noqa: F401  (contract hook)

# Every figure of a load summary (harness/metric_catalog.py), and what a power run adds.
METRICS = {**mc.SUMMARY_METRICS, "tokens_per_joule": ">="}

# A plan's load keys: those named as `harness load` options are declared there
# (harness.load_options: type, default, help), with the seed's own defaults where it has them.
LOAD_PARAMS: dict[str, Field] = {
    "target": Field("dict", required=True, help="url | endpoints | simulator | layout"),
    "rate": plan_field("rate", 20.0, minimum=0, help="requests/s, Poisson (0: closed loop with users)"),
    "users": Field("int", None, minimum=1, help="closed loop: concurrent users instead of a rate"),
    "num_requests": plan_field("num-requests", 500, minimum=1),
    "duration": Field("str", None, help="bound the run by time instead: 60s, 15m"),
    "input_len": plan_field("input-len", minimum=1),
    "output_len": plan_field("output-len", minimum=1),
    "workers": Field("int", 1, minimum=1),
    "max_concurrency": plan_field("max-concurrency", None, minimum=1),
    "warmup": plan_field("warmup"),
    "slo": plan_field("slo", [], help="extra SLOs, e.g. 'error_rate<=0.01'"),
    "seed": plan_field("seed"),
    "endpoint": Field("str", "chat", choices=("chat", "completions")),
    "request_timeout": plan_field("timeout", minimum=1),
    "cpu_limit": plan_field("cpu-limit", None, help="harness load --cpu-limit: generator invalid above this worker CPU %"),
    "lag_limit_ms": plan_field("lag-limit-ms", None,
                               help="harness load --lag-limit-ms: generator invalid above this lag p99"),
    "timeout_s": Field("float", 7200.0, minimum=1, help="the stage's own bound"),
    "physics": Field("dict", None, help="{gpu, model, precision, tp}; simulator targets know theirs"),
}
PARAMS: dict[str, Field] = {**LOAD_PARAMS, "sweep_rates": Field("list", [])}


def validate_params(p: dict[str, Any]) -> None:
    from harness.slo import parse_slo
    from harness.errors import UsageError
    from harness.stages import targets

    targets.validate(p.get("target") or {})
    for i, s in enumerate(p.get("slo") or []):
        try:
            parse_slo(str(s))
        except UsageError as exc:
            raise ValueError(f"slo[{i}]: {exc}") from None
    for i, r in enumerate(p.get("sweep_rates") or []):
        if not isinstance(r, (int, float)) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"sweep_rates[{i}]: a rate > 0, got {r!r}")
    if not p.get("rate") and not p.get("users"):
        raise ValueError("rate: give a rate > 0 or users:")


def slos_from_expect(expected: dict[str, Any], extra: list[str]) -> list[str]:
    """The latency targets the load run should count goodput against, as --slo strings."""
    from harness.stages.expect import parse_target

    out = [str(s) for s in extra]
    for metric, target in expected.items():
        lat = None if "." in metric else mc.split_latency(metric)
        if lat is None or lat[0].generator:
            continue
        op, value, _ = parse_target(metric, target)
        if op in ("<=", "<"):
            out.append(f"{metric}{op}{value:g}")
    return out


def flatten(summary: dict[str, Any]) -> dict[str, float | None]:
    """summary.json -> {"ttft_p50_ms": ..., "output_tokens_per_s": ..., ...}."""
    out: dict[str, float | None] = {}
    for lat in mc.LATENCIES:
        block = summary.get(lat.field) or {}
        if not block.get("count"):
            continue
        for stat in mc.STATS:
            if block.get(stat) is not None:
                out[lat.key(stat)] = block[stat]
    for scalar in mc.SCALARS:
        value = mc.summary_value(summary, scalar.name)
        if value is not None:
            out[scalar.name] = value
    return out


def load_argv(p: dict[str, Any], url: str, model: str, out: Path, slos: list[str],
              rate: float | None, extra: list[str] | None = None) -> list[str]:
    """The `harness load` command of one run of a load stage (params `p`). Its load options
    (harness.load_options) pass as the flags of those not at harness load's default."""
    # --overwrite: `out` is this stage's own folder (the runner refuses another plan's run
    # directory), and a stage run again on resume replaces what its earlier attempt left there
    argv = [sys.executable, "-m", "harness.cli", "load", "--url", url, "--out", str(out), "--overwrite", "--quiet",
            "--workers", str(p["workers"]), "--endpoint", p["endpoint"]]
    if rate:
        argv += ["--rate", text(float(rate))]
    else:
        argv += ["--users", str(p.get("users") or 8)]
    if p.get("duration"):
        argv += ["--duration", str(p["duration"])]
    bounded = {} if p.get("duration") else {"num_requests": p.get("num_requests")}
    argv += harness_argv({"model": model, "input_len": p["input_len"], "output_len": p["output_len"],
                          "seed": p["seed"], "timeout": p["request_timeout"], **bounded,
                          "max_concurrency": p.get("max_concurrency"), "warmup": p.get("warmup"),
                          "cpu_limit": p.get("cpu_limit"), "lag_limit_ms": p.get("lag_limit_ms"),
                          "slo": list(slos)})
    return argv + list(extra or [])


def generator_reasons(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Why the load generator's figures cannot be trusted: its ``summary.json`` reasons, each
    prefixed with its run's label where a stage made several runs (``label`` -> summary; a
    label of "" adds no prefix). A generator that could not keep up measured itself, not the
    server, so the stage is ``invalid`` (as ``harness load`` exits 3 for the same summary)."""
    out = []
    for label, summary in summaries.items():
        gen = summary.get("generator") or {}
        if gen.get("valid", True):
            continue
        reasons = [str(r) for r in gen.get("reasons") or []] or ["the load generator was invalid"]
        out += [f"{label}: {r}" if label else r for r in reasons]
    return out


def invalid_detail(reasons: list[str]) -> str:
    """The tail a load stage's detail gets when its generator was invalid ("" when valid)."""
    return " - load generator INVALID: " + "; ".join(reasons) if reasons else ""


PROGRESS_EVERY_S = 5.0


def progress_line(out: Path, elapsed_s: float) -> str:
    """The running load's figures, from the ``progress.json`` its Locust rewrites every 2 s
    (harness.progress), named after its stage and run (``serving/load``, ``cluster/replica-a``)."""
    from harness.progress import STATUS_FILE, format_line, read_status

    name = f"{out.parent.name}/{out.name}"
    p = read_status(out / STATUS_FILE)
    if p is None:
        return f"{name}: starting, {elapsed_s:.0f} s"
    return format_line(p, label=name)


def run_loads(jobs: list[tuple[str, list[str], Path]], timeout_s: float,
              log: Callable[[str], None], total: int | None = None) -> dict[str, dict[str, Any]]:
    """Run several ``harness load`` commands at once; label -> summary (or {"error": ...}).

    Prints each running job's progress line every ``PROGRESS_EVERY_S`` (:func:`progress_line`:
    requests done of its bound or time of its duration, TTFT and TPOT p50, tokens/s, failures).
    ``total`` is unused since the figures come from each run's own bound (kept for callers).
    """
    from harness.progress import STATUS_FILE

    procs = []
    for label, argv, out in jobs:
        out.mkdir(parents=True, exist_ok=True)
        (out / STATUS_FILE).unlink(missing_ok=True)   # an earlier attempt's figures are not this run's
        logf = open(out / "load.log", "wb")
        procs.append((label, subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                              env=dict(os.environ, PYTHONUNBUFFERED="1")), out, logf))
    t0 = time.monotonic()
    last = t0
    try:
        while any(p.poll() is None for _, p, _, _ in procs):
            time.sleep(0.2)
            now = time.monotonic()
            if now - t0 > timeout_s:
                for _, p, _, _ in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)  # Locust writes its results on SIGINT
                deadline = time.monotonic() + 30
                for _, p, _, _ in procs:
                    try:
                        p.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                log(f"load: stopped at the stage's bound of {timeout_s:.0f} s")
                break
            if now - last >= PROGRESS_EVERY_S:
                last = now
                for _, p, out, _ in procs:
                    if p.poll() is None:
                        log(progress_line(out, now - t0))
    except BaseException:
        for _, p, _, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for _, p, _, _ in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for _, _, _, logf in procs:
            logf.close()
    results: dict[str, dict[str, Any]] = {}
    for label, p, out, _ in procs:
        path = out / "summary.json"
        if path.exists():
            results[label] = json.loads(path.read_text())
            results[label]["_exit_code"] = p.returncode
        else:
            results[label] = {"error": load_failure(p.returncode, out / "load.log")}
    return results


USAGE_ERROR = "harness load: error: "


def load_failure(code: int | None, log_path: Path) -> str:
    """Why a ``harness load`` wrote no summary: its one error line where it refused to start
    (bad input, a target that failed the preflight, a taken port: exit 2), else its log's end."""
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    refused = [ln[len(USAGE_ERROR):] for ln in lines if ln.startswith(USAGE_ERROR)]
    if refused:
        return f"harness load exited with {code} before any load: {refused[-1]}"
    tail = "\n".join(lines[-5:])
    return f"harness load exited with {code} and wrote no summary; {log_path} ends:\n{tail}"


def endpoint_hardware(p: dict[str, Any], endpoint: Any, plan: dict[str, Any], replicas: int = 1):
    from harness.stages import physics

    spec = dict(p.get("physics") or {})
    if not spec and getattr(endpoint, "profile", None):
        spec = {"profile": endpoint.profile}
    if spec and all(isinstance(v, dict) for v in spec.values()):  # per role (cluster)
        spec = dict(spec.get(getattr(endpoint, "role", ""), {}) or {})
    return physics.hardware_from(spec, plan, replicas=replicas, input_len=int(p["input_len"]),
                                 output_len=int(p["output_len"]))


def run_stage(params: dict[str, Any], ctx: StageContext) -> StageResult:
    from harness.stages import expect as expect_mod
    from harness.stages import physics
    from harness.stages.power import power_sampling, tokens_per_joule
    from harness.stages.targets import open_targets, sampled_gpus

    p = {k: params.get(k, f.default) for k, f in PARAMS.items()}
    expected = dict(params.get("expect") or {})
    slos = slos_from_expect(expected, p.get("slo") or [])
    rates = [float(r) for r in p.get("sweep_rates") or []]
    main_rate = float(p["rate"]) if p.get("rate") and not p.get("users") else None
    sweep: list[dict[str, Any]] = []
    with open_targets(p["target"], ctx.out_dir, ctx.log) as endpoints:
        ep = endpoints[0]
        if len(endpoints) > 1:
            ctx.log(f"serving: the target has {len(endpoints)} endpoints; loading {ep.name} "
                    f"({ep.url}) only (a cluster stage loads them all)")
        runs = [(r, ctx.out_dir / f"rate-{r:g}") for r in rates if r != main_rate]
        runs.append((main_rate, ctx.out_dir / "load"))
        main_summary: dict[str, Any] = {}
        summaries: dict[str, dict[str, Any]] = {}
        power = None
        for r, out in runs:
            what = f"{r:g} req/s" if r else f"{p.get('users') or 8} users"
            ctx.log(f"load: {what}, {p['num_requests']} requests, {p['input_len']} in, "
                    f"{p['output_len']} out -> {ep.url}")
            argv = load_argv(p, ep.url, ep.model, out, slos, r)
            with power_sampling(gpus=sampled_gpus([ep])) as pw:
                res = run_loads([("main", argv, out)], float(p["timeout_s"]), ctx.log,
                                total=None if p.get("duration") else int(p["num_requests"]))["main"]
            if "error" in res:
                raise RuntimeError(res["error"])
            summaries["" if out.name == "load" else f"at {r:g} req/s"] = res
            flat = flatten(res)
            sweep.append({"rate": r, "dir": str(out.relative_to(ctx.run_dir)), **flat})
            if out.name == "load":
                main_summary, power = res, pw.summary()
    measured = flatten(main_summary)
    if power:
        measured["tokens_per_joule"] = tokens_per_joule(power, measured.get("output_tokens_per_s"))
    tol = float((ctx.plan or {}).get("tolerance") or 0.0)
    checks = expect_mod.check_all(expected, measured, tol)
    hw = endpoint_hardware(p, ep, ctx.plan)
    figs = [(k, physics.target_number(v), "target") for k, v in expected.items()]
    figs += [(k, v, "measured") for k, v in measured.items()
             if isinstance(v, (int, float)) and (k.startswith(("ttft_p", "tpot_p")) or k == "output_tokens_per_s")]
    phys = physics.check_all(figs, hw)
    gen = main_summary.get("generator") or {}
    invalid = generator_reasons(summaries)
    ctx.log("serving: " + ", ".join(f"{k} {measured[k]:,.1f}" for k in
                                    ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
                                     "output_tokens_per_s") if measured.get(k) is not None))
    return StageResult(
        name=ctx.name, stage="serving", status=expect_mod.status_from(checks, invalid), measured=measured,
        expected=expected, checks=checks, physics=phys, params=p, power=power,
        detail=f"{ep.url} ({ep.model}), " + (f"{main_rate:g} req/s" if main_rate else
                                             f"{p.get('users') or 8} users") + invalid_detail(invalid),
        invalid=invalid,
        data={"endpoint": ep.__dict__, "sweep": sweep, "load_dir": "load",
              "requests": main_summary.get("requests"), "generator": gen,
              "slo": main_summary.get("slo")},
    )


def report_charts(run_dir: Path, name: str, result: dict[str, Any]) -> list[str]:
    """Latency vs rate of a sweep, and TTFT/TPOT over the run (contract hook)."""
    from harness import load_charts

    return load_charts.latency_vs_rate(name, result) + load_charts.over_time(run_dir, name, result)
