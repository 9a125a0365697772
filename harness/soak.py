"""`harness load --soak`: the soak defaults, and whether a run wants its drift analysed.

The drift itself (harness/drift.py) is computed by the plugin at the end of the run, from
the run's timeseries, into summary.json (harness.run_summary) together with the scalar keys
drift SLOs read (`ttft_drift_ms_per_h`, `tpot_drift_ms_per_h`), before the SLOs are judged
and the exit code set. `harness load` asks for it with `--llm-drift`; without it (plain
Locust) a drift SLO reads as "not measured".
"""
from __future__ import annotations

import argparse

from harness import load_options
from harness.load_options import LoadSpec
from harness.metric_catalog import SCALARS
from harness.slo import parse_slo

DRIFT_METRICS = tuple(s.name for s in SCALARS if s.unit == "ms/h")


def wants_drift(args: argparse.Namespace) -> bool:
    """Drift analysis runs with --soak, or whenever an SLO asks for a drift metric."""
    return bool(getattr(args, "soak", False)) or any(
        parse_slo(s).metric in DRIFT_METRICS for s in (getattr(args, "slo", None) or []))


def apply_defaults(spec: LoadSpec, args: argparse.Namespace, run_time_s: int | None) -> LoadSpec:
    """--soak implies the seed's three-prompt mix unless a workload was given (--dataset,
    --locustfile or an --input-len of its own), and about 120 windows over the run unless
    --window was given (at least 5 s)."""
    if not getattr(args, "soak", False):
        return spec
    if not (spec.dataset or args.locustfile or spec.input_len != load_options.default("input-len")):
        spec = spec.replace(soak_mix=True)
    if not load_options.given(args, "window") and run_time_s:
        spec = spec.replace(window=max(5.0, run_time_s / 120.0))
    return spec
