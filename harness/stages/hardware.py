"""The hardware stage as a plan step: runs ``harness hw`` (:mod:`harness.hardware`) or
reuses a ``hardware.json`` it wrote (``result: PATH``, judged again by this code), and adds the
plan's targets.

Figures (the worst GPU or pair, since a plan's target must hold for every card):
``hbm_tbs`` (device copy, read + write), ``gemm_tflops`` (dense BF16), ``p2p_gbs`` (the slowest
measured directed pair) and ``p2p_best_pairs_gbs`` (the slowest pair the launcher would use for
TP=2). ``hardware.json`` is copied into the stage's folder (the report draws its P2P heat map).
Without a GPU the stage is ``skipped``, as ``harness hw`` is. It is ``invalid`` (with the
reason) when ``harness hw`` was (a check it could not make: P2P with one GPU), or when it found
fewer GPUs than the stage's ``gpu_count`` (default: the plan's): a plan for 12 cards judged on
one has not validated the 12. A failed check outranks both, as in ``harness hw``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.stages.base import Field, StageContext, StageResult, StageSkipped

PARAMS: dict[str, Field] = {
    "quick": Field("bool", False),
    "gpus": Field("str", None, help="CUDA indices, e.g. 0-3"),
    "target": Field("str", None, help="judge against this GPU model's targets"),
    "checks": Field("list", ["hbm", "gemm", "p2p"]),
    "result": Field("str", None, help="reuse this hardware.json instead of measuring"),
    "gpu_count": Field("int", None, minimum=1, help="GPUs the machine must have (default: the plan's)"),
}
METRICS = {"hbm_tbs": ">=", "gemm_tflops": ">=", "p2p_gbs": ">=", "p2p_best_pairs_gbs": ">="}
# which of ``harness hw``'s checks measures each figure: where a figure is missing, that check's
# detail says why (the report shows "not measured: p2p needs at least 2 GPUs; this machine has 1")
_SOURCE_CHECK = {"hbm_tbs": "hbm_bandwidth", "gemm_tflops": "gemm_bf16", "p2p_gbs": "p2p",
                 "p2p_best_pairs_gbs": "p2p"}


def figures(hw: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    hbm = [r["tbs"] for r in hw.get("hbm") or [] if r.get("tbs") is not None]
    gemm = [r["tflops"] for r in hw.get("gemm") or [] if r.get("tflops") is not None]
    if hbm:
        out["hbm_tbs"] = min(hbm)
    if gemm:
        out["gemm_tflops"] = min(gemm)
    p2p = hw.get("p2p") or {}
    vals = [v for row in p2p.get("gbs") or [] for v in row if v is not None]
    if vals:
        out["p2p_gbs"] = min(vals)
        topo = hw.get("topology")
        try:
            from servers import topology as topo_mod

            if topo:
                t = topo_mod.Topology.from_dict(topo)
                gpus = p2p["gpus"]
                best = []
                for a, b in t.best_pairs():
                    if a in gpus and b in gpus:
                        i, j = gpus.index(a), gpus.index(b)
                        best += [v for v in (p2p["gbs"][i][j], p2p["gbs"][j][i]) if v is not None]
                if best:
                    out["p2p_best_pairs_gbs"] = min(best)
        except Exception:
            pass
    return out


def gpu_key(hw: dict[str, Any], plan: dict[str, Any]) -> str | None:
    """The datasheet key (``'h100'``) the physics checks use: the plan's ``gpu:``, else the
    first GPU's family by name (any H100, not only the SXM the hardware targets match)."""
    from servers.gpu_datasheets import DATASHEETS

    if plan.get("gpu"):
        return str(plan["gpu"]).lower()
    names = [g.get("name", "") for g in hw.get("gpus") or []]
    return next((key for key in DATASHEETS if names and key.upper() in names[0].upper()), None)


def why_not_measured(metric: str, hw: dict[str, Any]) -> str | None:
    """Why ``hardware.json`` holds no figure for ``metric``: the detail of the check that would
    have measured it, or that the stage's ``checks:`` did not ask for it."""
    name = _SOURCE_CHECK.get(metric)
    if name is None:
        return None
    details = [c.get("detail") for c in hw.get("checks") or []
               if c.get("name") == name and c.get("status") != "pass" and c.get("detail")]
    if details:
        return details[0]
    if not any(c.get("name") == name for c in hw.get("checks") or []):
        return f"the {name} check did not run (checks:)"
    if metric == "p2p_best_pairs_gbs":
        return "no topology recorded to find the launcher's TP=2 pairs"
    return None


def run_power(hw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """str(gpu) -> its power over the run from ``hardware.json``: the average, the highest
    single sample (labelled so: an instantaneous sample above the card's limit is a spike, not
    a sustained draw), how it was read, and the card's limit, with the text the report shows."""
    from harness.hardware import report_io, summary

    report = report_io.report_from_dict(hw)
    return {str(g): {"avg_w": st.avg_w, "peak_sample_w": st.peak_w, "power_reading": st.power_reading,
                     "limit_w": st.limit_w, "samples": st.samples, "text": summary.power_figures(st)}
            for g, st in summary.run_power(report).items()}


def invalid_reasons(hw: dict[str, Any], want_gpus: int | None) -> list[str]:
    """Why this hardware run has not validated what the plan asked: ``harness hw``'s invalid
    checks, and fewer GPUs found than ``want_gpus``."""
    out = [c.get("detail") or c.get("name", "?") for c in hw.get("checks") or [] if c.get("status") == "invalid"]
    found = len(hw.get("gpus") or [])
    if want_gpus and found < want_gpus:
        out.append(f"the plan expects {want_gpus} GPUs (gpu_count) and this run found {found}")
    return out


def target_marks(stage: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's hardware targets (``hbm_tbs``, ``gemm_tflops``, ...) against the plan's GPU's
    datasheet peaks: a target above a peak is impossible (contract hook)."""
    from harness.stages import physics

    try:
        gpu = physics.gpu_spec(str(plan["gpu"]), plan.get("gpu_overrides")) if plan.get("gpu") else None
    except KeyError:
        gpu = None
    return [r for r in (physics.check_hardware_value(k, physics.target_number(v), "target", gpu)
                        for k, v in (stage.get("expect") or {}).items()) if r]


def run_environment(result: dict[str, Any], env: dict[str, Any]) -> None:
    """The GPUs, driver and torch this stage found, for ``run.json`` (contract hook)."""
    data = result.get("data") or {}
    if data.get("gpus"):
        env["gpus"] = data["gpus"]
        env["driver"] = data.get("driver")
        env["torch_cuda"] = data.get("torch")


def run_stage(params: dict[str, Any], ctx: StageContext) -> StageResult:
    from harness.hardware import judge, report_io, summary
    from harness.hardware.run import run
    from harness.stages import expect as expect_mod
    from harness.stages import physics

    p = {k: params.get(k, f.default) for k, f in PARAMS.items()}
    expected = dict(params.get("expect") or {})
    dest = ctx.out_dir / "hardware.json"
    if p.get("result"):
        src = Path(p["result"])
        if not src.is_file():
            raise FileNotFoundError(f"result: {src} does not exist")
        # judged again by this code's rules (targets, what makes a run invalid), not its writer's
        report_io.write_report(judge.rejudge(report_io.load_report(src), p.get("target")), ctx.out_dir)
        ctx.log(f"hardware: reusing {src}")
    else:
        from harness.parsing import parse_gpus

        report = run(str(ctx.out_dir), gpus=parse_gpus(p.get("gpus")), quick=bool(p["quick"]),
                     target=p.get("target"), checks=list(p["checks"]), log=ctx.log)
        if report.status != "skipped":
            ctx.log(summary.format_summary(report))
    hw = json.loads(dest.read_text())
    if hw.get("status") == "skipped":
        raise StageSkipped(f"hardware: {hw.get('skipped_reason')}")
    measured = figures(hw)
    power = run_power(hw)
    for g, doc in power.items():
        ctx.log(f"hardware: GPU{g} power over the run: {doc['text']}")
    invalid = invalid_reasons(hw, p.get("gpu_count") or (ctx.plan or {}).get("gpu_count"))
    for reason in invalid:
        ctx.log(f"hardware: WARNING: {reason}")
    tol = float((ctx.plan or {}).get("tolerance") or 0.0)
    checks = expect_mod.check_all(expected, measured, tol)
    for c in checks:
        if c["measured"] is None:
            c["why"] = why_not_measured(c["metric"], hw)
    for c in hw.get("checks") or []:
        if c.get("name") in ("hbm_bandwidth", "gemm_bf16", "p2p") and c.get("status") in ("fail", "error"):
            checks.append({"metric": f"hw.{c['name']}" + (f".gpu{c['gpu']}" if c.get("gpu") is not None else ""),
                           "op": "pass", "target": None, "upper": None, "target_text": "datasheet target",
                           "measured": c.get("value"), "passed": False, "remedy": c.get("remedy"),
                           "tolerance": 0.0})
    key = gpu_key(hw, ctx.plan or {})
    spec = None
    if key:
        try:
            spec = physics.gpu_spec(key, (ctx.plan or {}).get("gpu_overrides"))
        except KeyError:
            spec = None
    phys = []
    for metric, value, source in ([(k, physics.target_number(v), "target") for k, v in expected.items()]
                                  + [(k, v, "measured") for k, v in measured.items()]):
        r = physics.check_hardware_value(metric, value, source, spec)
        if r:
            phys.append(r)
    host = hw.get("host") or {}
    status = expect_mod.status_from(checks) if checks else hw.get("status", "pass")
    if status != "fail" and invalid:  # a measured failure stands; else the stage is unjudged
        status = "invalid"
    return StageResult(
        name=ctx.name, stage="hardware", status=status,
        measured=measured, expected=expected, checks=checks, physics=phys, params=p,
        detail=f"{len(hw.get('gpus') or [])} GPU(s) {', '.join(sorted({g.get('name', '?') for g in hw.get('gpus') or []}))}; "
               f"driver {host.get('driver')}; hw status {hw.get('status')}"
               + (" - INVALID: " + "; ".join(invalid) if invalid else ""),
        invalid=invalid,
        data={"hardware_json": "hardware.json", "gpus": [g.get("name") for g in hw.get("gpus") or []],
              "driver": host.get("driver"), "torch": host.get("torch"), "power": power},
    )


# --- the report's power section and P2P heat map (contract hooks) -------------------------------

POWER_HEAD = ["stage", "GPU", "power over the run (average, highest single sample, how read, the card's limit)",
              "samples"]


def report_tables(name: str, result: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """Board power per GPU: the average beside the peak *sample*, labelled with how it was read
    and the card's limit (an instantaneous sample above it is a spike) (contract hook)."""
    from harness.report import fmt

    rows = [[name, f"GPU{g}", p.get("text") or "", fmt(p.get("samples"))]
            for g, p in ((result.get("data") or {}).get("power") or {}).items()]
    return [("hardware-power", "Hardware power", POWER_HEAD, rows)]


def report_charts(run_dir: Path, name: str, result: dict[str, Any]) -> list[str]:
    """The P2P bandwidth matrix of the ``hardware.json`` this stage wrote (contract hook)."""
    from harness import svg

    path = run_dir / name / "hardware.json"
    if not path.exists():
        return []
    p2p = json.loads(path.read_text()).get("p2p") or {}
    if not p2p.get("gbs"):
        return []
    labels = [f"GPU{g}" for g in p2p["gpus"]]
    return [svg.heatmap(f"{name}: P2P bandwidth (GB/s, median of repeats)", labels, p2p["gbs"],
                        cls="p2p-heatmap")]
