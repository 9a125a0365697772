"""`harness run PLAN.yaml --out DIR`: every stage of a plan, in order, and one report.

Resumes a half-finished DIR (stages with a result.json are not run again). Exit codes: 0 every
stage passed or was skipped, 1 one failed or errored, 2 a bad plan (one line naming the field),
3 one was invalid (its figures cannot be trusted) and none failed; harness/runner.py says more.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a plan's stages in order and write one report",
                       description="Run the stages a plan lists (hardware, throughput, perplexity, "
                                   "serving, cluster, soak, command), resume a half-finished run "
                                   "directory, and write report.html and report.md.")
    p.add_argument("plan", metavar="PLAN.yaml")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory (default runs/PLAN-TIMESTAMP); an existing one is resumed")
    p.add_argument("--stages", default=None, metavar="A,B",
                   help="run only these stages (the others keep their earlier results)")
    p.add_argument("--validate", action="store_true", help="check the plan and exit")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite DIR's report from its results; run nothing")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from harness import plan as plan_mod
    from harness import runner

    try:
        plan = plan_mod.load(args.plan)
    except plan_mod.PlanError as exc:
        raise UsageError(str(exc)) from None
    if args.validate:
        from harness.stages.physics import plan_marks

        print(f"{args.plan}: plan {plan['name']} is valid ({len(plan['stages'])} stages: "
              f"{', '.join(s['name'] for s in plan['stages'])})")
        bad = [(n, m) for n, marks in plan_marks(plan).items() for m in marks if m["mark"] != "ok"]
        for n, m in bad:
            print(f"physics: {n}: target {m['metric']} {m['value']:g} is {m['mark']}: {m['detail']}")
        if bad:
            print(f"physics: {len(bad)} target(s) no hardware can meet (they stay in the plan, marked)")
        from harness.stages.cost import compute

        for c in compute(plan, {}):
            if c.get("cost_per_million_tokens") is not None:
                print(f"cost: {c['layout']}: {c['cost_per_million_tokens']:.4f} {c['currency']} per million "
                      f"output tokens at the expected {c['output_tokens_per_s']:,.0f} tok/s ({c['basis']})")
        return 0
    out = Path(args.out or f"runs/{plan['name']}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.report_only:
        from harness import report

        if not (out / runner.RUN).exists():
            raise UsageError(f"{out} holds no run.json: nothing to report")
        for path in report.write(out):
            print(path)
        return 0
    only = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        return runner.run_plan(plan, out, log=log, only=only)
    except plan_mod.PlanError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"interrupted: rerun `harness run {args.plan} --out {out}` to resume", file=sys.stderr)
        return 130
