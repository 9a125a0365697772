"""The cluster stage: load every endpoint of a layout at once and add up what it serves.

The seed's "12x L40S Cluster - Aggregate Throughput" table (12 x 8B, 6 x TP=2 70B AWQ, 4 + 4
mixed). One ``harness load`` per endpoint runs at the same time (its own rate or users, its own
results directory ``NAME/ENDPOINT/``); the stage reports the sum of output tokens/s over all
endpoints (``output_tokens_per_s``) and per role (``ROLE.output_tokens_per_s``, e.g.
``small.output_tokens_per_s`` for the mixed layout's 8B replicas), with the request and error
counts. Targets may name either. The aggregate is held against the sum of the replicas'
hardware ceilings. The stage is ``invalid`` when any endpoint's load generator was (each reason
names its endpoint).

Aggregate throughput means saturating the replicas: the default is a closed loop of 64 users
per endpoint (``users``); ``rate`` sets an open-loop rate per endpoint instead.
"""
from __future__ import annotations

from typing import Any

from harness.stages.base import Field, StageContext, StageResult
from harness.stages.serving import LOAD_PARAMS

PARAMS: dict[str, Field] = {**LOAD_PARAMS,
                            "rate": Field("float", 0.0, minimum=0, help="requests/s per endpoint"),
                            "users": Field("int", 64, minimum=1, help="closed-loop users per endpoint"),
                            "num_requests": Field("int", 500, minimum=1, help="per endpoint")}
METRICS = {"output_tokens_per_s": ">=", "total_tokens_per_s": ">=", "requests_per_s": ">=",
           "error_rate": "<=", "replicas": ">=", "tokens_per_joule": ">=",
           "ttft_p50_ms": "<=", "tpot_p50_ms": "<="}


def validate_params(p: dict[str, Any]) -> None:
    from harness.stages import targets

    targets.validate(p.get("target") or {})


def aggregate(per_endpoint: dict[str, dict[str, Any]], roles: dict[str, str]) -> dict[str, Any]:
    """Sum the endpoints' rates; per role too. Latency p50s: the worst endpoint's."""
    out: dict[str, Any] = {"replicas": len(per_endpoint)}
    completed = failed = 0
    for key in ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s"):
        out[key] = sum(float(s.get(key) or 0.0) for s in per_endpoint.values())
    for name, s in per_endpoint.items():
        req = s.get("requests") or {}
        completed += int(req.get("completed") or 0)
        failed += int(req.get("failed") or 0)
        role = roles.get(name, "server")
        k = f"{role}.output_tokens_per_s"
        out[k] = out.get(k, 0.0) + float(s.get("output_tokens_per_s") or 0.0)
        out[f"{role}.replicas"] = out.get(f"{role}.replicas", 0) + 1
    out["error_rate"] = failed / (completed + failed) if completed + failed else 0.0
    for lat in ("ttft", "tpot"):
        vals = [(s.get(f"{lat}_ms") or {}).get("p50") for s in per_endpoint.values()]
        vals = [v for v in vals if v is not None]
        if vals:
            out[f"{lat}_p50_ms"] = max(vals)
    return out


def run_stage(params: dict[str, Any], ctx: StageContext) -> StageResult:
    from harness.stages import expect as expect_mod
    from harness.stages import physics
    from harness.stages.power import power_sampling, tokens_per_joule
    from harness.stages.serving import (
        endpoint_hardware, generator_reasons, invalid_detail, load_argv, run_loads, slos_from_expect,
    )
    from harness.stages.targets import open_targets, sampled_gpus

    p = {k: params.get(k, f.default) for k, f in PARAMS.items()}
    expected = dict(params.get("expect") or {})
    slos = slos_from_expect(expected, p.get("slo") or [])
    rate = float(p["rate"]) if p.get("rate") else None
    with open_targets(p["target"], ctx.out_dir, ctx.log) as endpoints:
        jobs = [(e.name, load_argv(p, e.url, e.model, ctx.out_dir / e.name, slos, rate), ctx.out_dir / e.name)
                for e in endpoints]
        what = f"{rate:g} req/s" if rate else f"{p['users']} users"
        ctx.log(f"cluster: {len(endpoints)} endpoint(s), {what} and {p['num_requests']} requests each")
        total = None if p.get("duration") else int(p["num_requests"]) * len(endpoints)
        with power_sampling(gpus=sampled_gpus(endpoints)) as pw:
            summaries = run_loads(jobs, float(p["timeout_s"]), ctx.log, total=total)
        errors = {k: v["error"] for k, v in summaries.items() if "error" in v}
        if errors:
            raise RuntimeError("; ".join(f"{k}: {v}" for k, v in errors.items()))
        roles = {e.name: e.role for e in endpoints}
        measured = aggregate(summaries, roles)
        power = pw.summary()
        if power:
            measured["tokens_per_joule"] = tokens_per_joule(power, measured["output_tokens_per_s"])
        # physics: the sum of each endpoint's hardware ceiling, per role and in total
        ceilings: dict[str, float] = {}
        known = True
        for e in endpoints:
            hw = endpoint_hardware(p, e, ctx.plan)
            b = physics.bounds(hw) if hw else {}
            if "output_tokens_per_s" not in b:
                known = False
                continue
            ceilings[e.role] = ceilings.get(e.role, 0.0) + b["output_tokens_per_s"][1]
        per_endpoint = {
            e.name: {"role": e.role, "url": e.url, "model": e.model, "profile": e.profile,
                     "dir": e.name, **{k: summaries[e.name].get(k) for k in
                                       ("output_tokens_per_s", "requests_per_s", "requests")},
                     "ttft_p50_ms": (summaries[e.name].get("ttft_ms") or {}).get("p50"),
                     "tpot_p50_ms": (summaries[e.name].get("tpot_ms") or {}).get("p50")}
            for e in endpoints}
    tol = float((ctx.plan or {}).get("tolerance") or 0.0)
    checks = expect_mod.check_all(expected, measured, tol)
    invalid = generator_reasons(summaries)
    phys = []
    if ceilings:
        bounds = {f"{r}.output_tokens_per_s": c for r, c in ceilings.items()}
        if known:
            bounds["output_tokens_per_s"] = sum(ceilings.values())
        figs = [(k, physics.target_number(v), "target") for k, v in expected.items()]
        figs += [(k, measured.get(k), "measured") for k in bounds]
        for metric, value, source in figs:
            if metric not in bounds or value is None:
                continue
            bound = bounds[metric]
            bad = physics.IMPOSSIBLE if source == "target" else physics.MEASUREMENT_ERROR
            mark = bad if value > bound else physics.OK
            phys.append({"metric": metric, "value": value, "source": source, "bound": round(bound, 1),
                         "bound_name": "sum of the replicas' hardware ceilings", "mark": mark,
                         "detail": (f"{value:,.0f} above the replicas' summed hardware ceiling "
                                    f"{bound:,.0f} tok/s") if mark != physics.OK else
                                   f"summed hardware ceiling {bound:,.0f} tok/s"})
    ctx.log(f"cluster: {measured['output_tokens_per_s']:,.1f} output tok/s over "
            f"{measured['replicas']} replicas" + "".join(
                f"; {k.split('.')[0]} {v:,.1f}" for k, v in measured.items()
                if k.endswith(".output_tokens_per_s")))
    return StageResult(
        name=ctx.name, stage="cluster", status=expect_mod.status_from(checks, invalid),
        measured=measured, expected=expected, checks=checks, physics=phys, params=p, power=power,
        detail=f"{len(endpoints)} endpoints, {what} each" + invalid_detail(invalid), invalid=invalid,
        data={"endpoints": per_endpoint, "ceilings": ceilings},
    )


# --- the physics of a cluster's targets, from the plan alone -------------------------------------

def _cluster_groups(stage: dict[str, Any], plan: dict[str, Any]) -> list[tuple[str, dict[str, Any], int]]:
    """(role, physics spec, replicas) of a cluster stage's target, from the plan alone."""
    target = stage.get("target") or {}
    spec = dict(stage.get("physics") or {})
    per_role = bool(spec) and all(isinstance(v, dict) for v in spec.values())
    sim = target.get("simulator")
    groups: list[tuple[str, dict[str, Any], int]] = []
    if isinstance(sim, str):
        groups.append(("sim", {"profile": sim}, int(target.get("replicas") or 1)))
    elif isinstance(sim, list):
        for g in sim:
            role = str(g.get("role") or g["profile"])
            groups.append((role, {"profile": g["profile"]}, int(g.get("replicas") or 1)))
    elif target.get("layout"):
        from servers.launcher import layout_from_dict, load_layout

        lay = target["layout"]
        try:
            layout = layout_from_dict(lay, source="plan") if isinstance(lay, dict) else load_layout(str(lay))
        except Exception:
            return []
        total = int(plan.get("gpu_count") or 0)
        fixed = sum(s.replicas * s.tensor_parallel_size for s in layout.servers if isinstance(s.replicas, int))
        for s in layout.servers:
            n = s.replicas if isinstance(s.replicas, int) else max(0, total - fixed) // max(1, s.tensor_parallel_size)
            role_spec = dict(spec.get(s.role) or {}) if per_role else dict(spec)
            groups.append((s.role, role_spec, n))
    return groups


def target_marks(stage: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets (``output_tokens_per_s``, ``ROLE.output_tokens_per_s``) against the sum of the
    replicas' hardware ceilings: a target above it is impossible (source 'target')."""
    from harness.stages.physics import IMPOSSIBLE, OK, bounds, hardware_from, stage_value, target_number

    in_len, out_len = int(stage_value(stage, "input_len") or 512), int(stage_value(stage, "output_len") or 128)
    bounds_by: dict[str, float] = {}
    complete = True
    for role, spec, n in _cluster_groups(stage, plan):
        hw = hardware_from(spec, plan, replicas=n, input_len=in_len, output_len=out_len)
        b = bounds(hw) if hw else {}
        if "output_tokens_per_s" not in b:
            complete = False
            continue
        bounds_by[f"{role}.output_tokens_per_s"] = bounds_by.get(f"{role}.output_tokens_per_s", 0.0) + \
            b["output_tokens_per_s"][1]
    if bounds_by and complete:
        bounds_by["output_tokens_per_s"] = sum(bounds_by.values())
    out = []
    for k, v in (stage.get("expect") or {}).items():
        value = target_number(v)
        if k not in bounds_by or value is None:
            continue
        bound = bounds_by[k]
        mark = IMPOSSIBLE if value > bound else OK
        out.append({"metric": k, "value": value, "source": "target", "bound": round(bound, 1),
                    "bound_name": "sum of the replicas' hardware ceilings", "mark": mark,
                    "detail": (f"{value:,.0f} above the replicas' summed hardware ceiling {bound:,.0f} tok/s"
                               if mark != OK else f"summed hardware ceiling {bound:,.0f} tok/s")})
    return out
