"""The capacity stage: `harness capacity` against a plan's target, the highest request rate at
which every SLO holds (harness/capacity.py says how it is searched and judged).

    - name: capacity-llama3-8b
      stage: capacity
      table: latency benchmark (online serving, single GPU)
      row: Llama-3 8B BF16, capacity at the seed's p99 SLOs
      target: {layout: single, gpus: "0"}
      slo: ["ttft_p99_ms<=200", "tpot_p99_ms<=30"]
      min_rate: 2
      max_rate: 40
      expect: {capacity_rps: ">= 20"}      # the seed's claim: 20 req/s meets those SLOs

``users: true`` searches the closed-loop concurrency instead (``min_users``, ``max_users``;
measured ``capacity_users``, and ``requests_per_s`` at it), as `harness capacity --users`.

The search runs as a `harness capacity` subprocess into the stage's folder (capacity.json,
report.html, steps/NN-RATErps/ as `harness load` results directories). A target of several
endpoints (a layout's replicas) is searched whole, through an endpoints.json in the
stage's folder: the capacity is the layout's. ``virtual: true``
with a ``target: {simulator: PROFILE}`` searches in virtual time on the simulator's replay
instead (no server is started). Measured: ``capacity_rps``, ``output_tokens_per_s`` (at the
capacity: the cost table's tokens/s at the SLO, see harness/stages/cost.py's
``capacity_stage``) and each SLO's metric at the capacity step. The stage is ``invalid`` when
its answer is bounded by a step whose load generator was invalid (the generator, not the
server, stopped the search), and ``fail`` when a target is missed or no rate passed.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from harness import capacity
from harness.stages.base import Field, StageContext, StageResult, read_json

PARAMS: dict[str, Field] = {
    "target": Field("dict", required=True, help="url | endpoints | simulator | layout (one endpoint)"),
    "slo": Field("list", required=True, help="upper bounds, e.g. ['ttft_p99_ms<=200', 'tpot_p99_ms<=30']"),
    "virtual": Field("bool", False, help="with target.simulator: virtual time on the replay"),
    "min_rate": Field("float", None, minimum=0, help="default 1 req/s"),
    "max_rate": Field("float", None, minimum=0, help="default 100 req/s"),
    "users": Field("bool", False, help="search closed-loop users instead of the request rate"),
    "min_users": Field("int", None, minimum=1, help="with users: default 1"),
    "max_users": Field("int", None, minimum=1, help="with users: default 256"),
    "resolution": Field("float", 0.05, minimum=0),
    "duration_per_step": Field("float", None, minimum=0, help="default 30 s (users: 300 s, the bound)"),
    "drain_timeout": Field("float", None, minimum=0),
    "confidence": Field("float", 0.95, minimum=0.5),
    "input_len": Field("int", 512, minimum=1),
    "output_len": Field("int", 128, minimum=1),
    "arrival": Field("str", "poisson", choices=("poisson", "gamma", "constant")),
    "seed": Field("int", 0),
    "workers": Field("int", 1, minimum=1),
    "endpoint": Field("str", "chat", choices=("chat", "completions")),
    "request_timeout": Field("float", 600.0, minimum=1),
    "cpu_limit": Field("float", None, minimum=0),
    "lag_limit_ms": Field("float", None, minimum=0),
    "stamp_delay_limit_ms": Field("float", None, minimum=0),
    "timeout_s": Field("float", 7200.0, minimum=1, help="the stage's own bound"),
}
METRICS = {"capacity_rps": ">=", "capacity_users": ">=", "output_tokens_per_s": ">=", "requests_per_s": ">="}
METRICS.update({lat.key(p): "<=" for lat in capacity.JUDGED for p in capacity.JUDGED_STATS})
METRICS["error_rate"] = "<="


def validate_params(p: dict[str, Any]) -> None:
    from harness.capacity import parse_capacity_slos
    from harness.errors import UsageError
    from harness.stages import targets

    targets.validate(p.get("target") or {})
    try:
        parse_capacity_slos([str(s) for s in p.get("slo") or []])
    except UsageError as exc:
        raise ValueError(f"slo: {exc}") from None
    if p.get("virtual") and not isinstance((p.get("target") or {}).get("simulator"), str):
        raise ValueError("virtual: needs target: {simulator: PROFILE} (one profile) to replay")
    if p.get("max_rate") is not None and p.get("min_rate") is not None and p["max_rate"] < p["min_rate"]:
        raise ValueError(f"max_rate: {p['max_rate']:g} is below min_rate {p['min_rate']:g}")
    if p.get("users"):
        if p.get("min_rate") is not None or p.get("max_rate") is not None:
            raise ValueError("min_rate: a users search is bounded by min_users and max_users")
        if int(p["max_users"] if p.get("max_users") is not None else 256) < int(p.get("min_users") or 1):
            raise ValueError(f"max_users: {p['max_users']} is below min_users {p.get('min_users') or 1}")
    elif p.get("min_users") is not None or p.get("max_users") is not None:
        raise ValueError("min_users: bounds a concurrency search; add users: true")


def capacity_argv(p: dict[str, Any], out: Path, *, url: str | None = None, model: str = "",
                  profile: str | None = None, replicas: int = 1, endpoints: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "harness.cli", "capacity", "--out", str(out), "--quiet"]
    if profile:
        argv += ["--profile", profile, "--replicas", str(replicas)]
    else:
        argv += ["--endpoints", str(endpoints)] if endpoints else ["--url", str(url)]
    if model and not profile and not endpoints:
        argv += ["--model", model]
    for s in p["slo"]:
        argv += ["--slo", str(s)]
    bounds = ("min_users", "max_users") if p.get("users") else ("min_rate", "max_rate", "arrival")
    if p.get("users"):
        argv += ["--users"]
    for key in (*bounds, "resolution", "duration_per_step", "drain_timeout", "confidence",
                "input_len", "output_len", "seed"):
        if p.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", f"{p[key]:g}" if isinstance(p[key], float) else str(p[key])]
    if not profile:
        argv += ["--workers", str(p["workers"]), "--endpoint", p["endpoint"],
                 "--timeout", f"{p['request_timeout']:g}"]
        for key in ("cpu_limit", "lag_limit_ms", "stamp_delay_limit_ms"):
            if p.get(key) is not None:
                argv += [f"--{key.replace('_', '-')}", f"{p[key]:g}"]
    return argv


def _run(argv: list[str], out: Path, timeout_s: float, log) -> int:
    import os
    import signal
    import subprocess

    with open(out / "capacity.log", "wb") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log(f"capacity: stopped at the stage's bound of {timeout_s:.0f} s (finished steps kept)")
            proc.send_signal(signal.SIGINT)    # capacity.json is written with what is known
            try:
                return proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(10)
        except BaseException:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise


def write_endpoint_list(endpoints: list, out: Path) -> Path:
    """A target of several endpoints (a layout's replicas) as out/endpoints.json, so the
    search loads the whole layout (`harness capacity --endpoints`) and its capacity is the
    layout's, as the cost table needs, not one replica's."""
    from servers.launcher.endpoints import Endpoint, write_endpoints

    path = out / "endpoints.json"
    write_endpoints(str(path), [Endpoint(name=e.name, role=e.role, url=e.url, model=e.model,
                                         gpus=tuple(e.gpus), tensor_parallel_size=e.tensor_parallel_size)
                                for e in endpoints], layout="capacity stage")
    return path


def measured_from(doc: dict[str, Any]) -> dict[str, float | None]:
    """capacity.json -> the stage's flat figures: the capacity and its step's SLO values."""
    ans = doc.get("answer") or {}
    level = "capacity_users" if doc.get("load") == "users" else "capacity_rps"
    out: dict[str, float | None] = {level: ans.get("rate"),
                                    "output_tokens_per_s": ans.get("output_tokens_per_s"),
                                    "requests_per_s": ans.get("requests_per_s")}
    if ans.get("step") is not None:
        for c in doc["steps"][ans["step"]]["checks"]:
            out[c["metric"]] = c["value"]
    return out


def invalid_reasons(doc: dict[str, Any]) -> list[str]:
    """Why the answer is the generator's, not the server's: the step that bounds it (or, with
    no capacity, the first step) was invalid."""
    ans = doc.get("answer") or {}
    steps = doc.get("steps") or []
    bound = steps[ans["broke_at"]["step"]] if ans.get("broke_at") else (steps[0] if steps and not ans.get("found") else None)
    if bound is None or bound.get("status") != "invalid":
        return []
    unit = doc.get("unit") or "req/s"
    return [f"at {bound['rate']:g} {unit}: {r}" for r in bound.get("reasons") or []]


def run_stage(params: dict[str, Any], ctx: StageContext) -> StageResult:
    from harness.stages import expect as expect_mod
    from harness.stages.targets import open_targets

    p = {k: params.get(k, f.default) for k, f in PARAMS.items()}
    expected = dict(params.get("expect") or {})
    out = ctx.out_dir
    for stale in ("capacity.json", "report.html"):   # a rerun (resume after an error) starts over
        if (out / stale).exists():
            (out / stale).unlink()
    if (out / "steps").exists():
        shutil.rmtree(out / "steps")
    target = p["target"]
    if p.get("virtual"):
        argv = capacity_argv(p, out, profile=str(target["simulator"]), replicas=int(target.get("replicas") or 1))
        where = f"{target['simulator']} (virtual time)"
        ctx.log(f"capacity: {', '.join(map(str, p['slo']))} on {where}")
        code = _run(argv, out, float(p["timeout_s"]), ctx.log)
    else:
        with open_targets(target, out, ctx.log) as endpoints:
            ep = endpoints[0]
            listed = write_endpoint_list(endpoints, out) if len(endpoints) > 1 else None
            where = (f"{len(endpoints)} endpoints ({', '.join(e.name for e in endpoints)})" if listed
                     else f"{ep.url} ({ep.model})" if ep.model else ep.url)
            span = (f"{p['min_users'] or 1}..{p['max_users'] or 256} users" if p["users"]
                    else f"{p['min_rate'] or 1:g}..{p['max_rate'] or 100:g} req/s")
            ctx.log(f"capacity: {', '.join(map(str, p['slo']))} on {where}, {span}")
            code = _run(capacity_argv(p, out, url=ep.url, model=ep.model, endpoints=listed), out,
                        float(p["timeout_s"]), ctx.log)
    if not (out / "capacity.json").exists():
        tail = "\n".join((out / "capacity.log").read_text(errors="replace").strip().splitlines()[-5:])
        raise RuntimeError(f"harness capacity exited with {code} and wrote no capacity.json; "
                           f"{out}/capacity.log ends:\n{tail}")
    doc = read_json(out / "capacity.json")
    measured = measured_from(doc)
    tol = float((ctx.plan or {}).get("tolerance") or 0.0)
    checks = expect_mod.check_all(expected, measured, tol)
    invalid = invalid_reasons(doc)
    status = expect_mod.status_from(checks, invalid)
    if status == "pass" and not doc["answer"]["found"]:
        status = "fail"
    ctx.log(f"capacity: {doc['answer']['text']}")
    return StageResult(name=ctx.name, stage="capacity", status=status, measured=measured, expected=expected,
                       checks=checks, params=p, detail=f"{where}: {doc['answer']['text']}", invalid=invalid,
                       data={"capacity": "capacity.json", "answer": doc["answer"], "bracket": doc["bracket"],
                             "mode": doc["mode"], "error_band": doc.get("error_band"), "exit_code": code})


def report_charts(run_dir: Path, name: str, result: dict[str, Any]) -> list[str]:
    """SLO values vs offered rate (or users) at each step, the thresholds and the capacity found (contract hook)."""
    from harness.capacity_report import chart

    path = run_dir / name / "capacity.json"
    if not path.exists():
        return []
    try:
        svg_text = chart(read_json(path), f"{name}: ")
    except (ValueError, KeyError):
        return []
    return [svg_text] if svg_text else []
