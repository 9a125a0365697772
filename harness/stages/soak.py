"""The soak stage: the seed's continuous load test (50 requests/s, 60 s, any duration).

One ``harness load --soak`` bounded by time (its drift analysis: TTFT/TPOT drift per hour), with
the seed's three-prompt mix (``--soak-mix``) unless ``input_len`` is given. Figures are the
serving stage's plus the drift keys; the report plots TTFT/TPOT over time from its ``timeseries.jsonl``. An invalid load
generator makes the stage ``invalid``, as in the serving stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.load_options import default
from harness.stages.base import Field, StageContext, StageResult
from harness.stages.physics import load_target_marks as target_marks  # noqa: F401  (contract hook)
from harness.stages.serving import LOAD_PARAMS, METRICS  # noqa: F401  (METRICS: same figures)

PARAMS: dict[str, Field] = {
    **LOAD_PARAMS,
    "rate": Field("float", 50.0, minimum=0),
    "duration": Field("str", "60s"),
    "num_requests": Field("int", None, minimum=1, help="optional second bound"),
    "input_len": Field("int", None, minimum=1, help="default: the seed's three-prompt mix"),
}


def validate_params(p: dict[str, Any]) -> None:
    from harness.errors import UsageError
    from harness.parsing import parse_duration
    from harness.stages import targets

    targets.validate(p.get("target") or {})
    try:
        parse_duration(str(p.get("duration") or "60s"))
    except UsageError as exc:
        raise ValueError(f"duration: {exc}") from None


def run_stage(params: dict[str, Any], ctx: StageContext) -> StageResult:
    from harness.stages import expect as expect_mod
    from harness.stages.power import power_sampling, tokens_per_joule
    from harness.stages.serving import (
        flatten, generator_reasons, invalid_detail, load_argv, run_loads, slos_from_expect,
    )
    from harness.stages.targets import open_targets, sampled_gpus
    from harness.parsing import parse_duration

    p = {k: params.get(k, f.default) for k, f in PARAMS.items()}
    expected = dict(params.get("expect") or {})
    slos = slos_from_expect(expected, p.get("slo") or [])
    mix = p.get("input_len") is None
    lp = dict(p, input_len=p.get("input_len") or default("input-len"))
    extra = ["--soak", "--soak-mix"] if mix else ["--soak"]
    if p.get("num_requests"):
        extra += ["--num-requests", str(p["num_requests"])]
    seconds = parse_duration(str(p["duration"]))
    with open_targets(p["target"], ctx.out_dir, ctx.log) as endpoints:
        ep = endpoints[0]
        ctx.log(f"soak: {p['rate']:g} req/s for {p['duration']} -> {ep.url}"
                + (" (the seed's three-prompt mix)" if mix else ""))
        argv = load_argv(lp, ep.url, ep.model, ctx.out_dir / "load", slos, p["rate"] or None, extra)
        with power_sampling(gpus=sampled_gpus([ep])) as pw:
            res = run_loads([("main", argv, ctx.out_dir / "load")],
                            min(float(p["timeout_s"]), seconds * 3 + 120), ctx.log)["main"]
    if "error" in res:
        raise RuntimeError(res["error"])
    measured = flatten(res)
    power = pw.summary()
    if power:
        measured["tokens_per_joule"] = tokens_per_joule(power, measured.get("output_tokens_per_s"))
    tol = float((ctx.plan or {}).get("tolerance") or 0.0)
    checks = expect_mod.check_all(expected, measured, tol)
    invalid = generator_reasons({"": res})
    ctx.log("soak: " + ", ".join(f"{k} {measured[k]:,.2f}" for k in
                                 ("requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "error_rate",
                                  "ttft_drift_ms_per_h") if measured.get(k) is not None))
    return StageResult(
        name=ctx.name, stage="soak", status=expect_mod.status_from(checks, invalid),
        measured=measured, expected=expected, checks=checks, params=p, power=power,
        detail=f"{p['rate']:g} req/s for {p['duration']} against {ep.url}" + invalid_detail(invalid),
        invalid=invalid,
        data={"load_dir": "load", "drift": res.get("drift"), "requests": res.get("requests"),
              "generator": res.get("generator")},
    )


def report_charts(run_dir: Path, name: str, result: dict[str, Any]) -> list[str]:
    """TTFT/TPOT over the whole soak (contract hook)."""
    from harness.load_charts import over_time

    return over_time(run_dir, name, result)
