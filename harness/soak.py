"""`harness load --soak`: the soak defaults, and the post-run drift step.

After Locust exits, `finish_run` reads the run's timeseries.jsonl, computes the
drift block (harness/drift.py), writes it into summary.json together with the
scalar keys drift SLOs read (`ttft_drift_ms_per_h`, `tpot_drift_ms_per_h`),
re-evaluates every SLO and returns the run's exit code. The Locust plugin knows
nothing of this: during the run a drift SLO simply reads as "not measured".
"""
from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from harness import drift
from harness.errors import UsageError
from harness.results import write_json
from harness.slo import evaluate, parse_slo, run_exit_code
from harness.workload import WorkloadSpec

DRIFT_METRICS = ("ttft_drift_ms_per_h", "tpot_drift_ms_per_h")
# Exit codes of the plugin that `finish_run` may recompute; anything else (Locust's own
# errors, a signal) is passed through untouched.
_OUR_CODES = (0, 1, 3, 4)


def wants_drift(args: argparse.Namespace) -> bool:
    """Drift analysis runs with --soak, or whenever an SLO asks for a drift metric."""
    return bool(getattr(args, "soak", False)) or any(
        parse_slo(s).metric in DRIFT_METRICS for s in (getattr(args, "slo", None) or []))


def apply_defaults(args: argparse.Namespace, run_time_s: int | None) -> None:
    """--soak implies the seed's three-prompt mix unless a workload was given (--dataset,
    --locustfile or an --input-len of its own), and about 120 windows over the run unless
    --window was given (at least the plugin's 5 s)."""
    window = getattr(args, "window", None)
    if window is not None and not window > 0:
        raise UsageError(f"--window must be > 0 seconds, not {window}")
    if not getattr(args, "soak", False):
        return
    if not (args.dataset or args.locustfile or args.input_len != WorkloadSpec.input_len):
        args.soak_mix = True
    if getattr(args, "window", None) is None and run_time_s:
        args.window = max(5.0, run_time_s / 120.0)


def read_timeseries(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every whole JSON line of a timeseries.jsonl (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    p = pathlib.Path(path)
    if not p.exists():
        return out
    with open(p, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def add_drift(summary: dict[str, Any], lines: list[dict[str, Any]],
              alpha: float = drift.DEFAULT_ALPHA) -> dict[str, Any]:
    """Put the drift block and its scalar keys into `summary` and re-check its SLOs."""
    wl = summary.get("workload") or {}
    started = summary.get("started_at")
    start = (started + float(wl.get("warmup_s") or 0.0)) if started else None
    result = drift.analyze(lines, start=start, alpha=alpha)
    summary["drift"] = result
    summary.update(drift.drift_scalars(result))
    slos = [parse_slo(c["slo"]) for c in (summary.get("slo") or {}).get("checks", [])]
    summary["slo"] = evaluate(slos, summary)
    return summary


def finish_run(out: str | pathlib.Path, locust_code: int) -> int:
    """The post-run drift step of `harness load`; returns the run's exit code."""
    out = pathlib.Path(out)
    path = out / "summary.json"
    if not path.exists():
        return locust_code
    summary = json.loads(path.read_text())
    add_drift(summary, read_timeseries(out / "timeseries.jsonl"))
    write_json(path, summary)
    if locust_code not in _OUR_CODES:
        return locust_code
    return run_exit_code(summary)
