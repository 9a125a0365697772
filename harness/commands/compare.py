"""`harness compare BASELINE_DIR RUN_DIR`: the CI gate against a stored baseline
(harness/compare.py has the method). Exit 0: no regression, 1: regression,
2: bad input (a directory or its requests.jsonl missing, bad options)."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from harness.errors import UsageError

EXIT_REGRESSION = 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare a run against a baseline run (CI gate)",
                       description="Per-metric deltas between two `harness load` results directories "
                                   "with bootstrap confidence intervals; exit 1 on a regression.")
    p.add_argument("baseline", metavar="BASELINE_DIR")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="minimum relative change that counts as a regression (default 0.05 = 5%%)")
    p.add_argument("--error-rate-threshold", type=float, default=0.01,
                   help="minimum absolute error-rate increase that counts (default 0.01)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", action="append", default=[],
                   help="judge only this metric, e.g. ttft_p99_ms (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", default=None, help="where to write the JSON (default RUN_DIR/compare.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from harness.compare import compare, format_table, load_run, metric_keys

    if not args.threshold >= 0:
        raise UsageError(f"--threshold must be >= 0, not {args.threshold}")
    if not args.error_rate_threshold >= 0:
        raise UsageError(f"--error-rate-threshold must be >= 0, not {args.error_rate_threshold}")
    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence must be between 0 and 1, not {args.confidence}")
    if not 100 <= args.resamples <= 100_000:
        raise UsageError(f"--resamples must be 100..100000, not {args.resamples}")
    unknown = [m for m in args.metric if m not in metric_keys()]
    if unknown:
        raise UsageError(f"unknown --metric {', '.join(unknown)}; use one of {', '.join(metric_keys())}")
    base, cur = load_run(args.baseline), load_run(args.run)
    result = compare(base, cur, threshold=args.threshold, error_rate_threshold=args.error_rate_threshold,
                     confidence=args.confidence, resamples=args.resamples, seed=args.seed,
                     metrics=args.metric or None)
    text = json.dumps(result, indent=2)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.run) / "compare.json"
    try:
        out.write_text(text + "\n")
    except OSError as e:
        print(f"harness compare: warning: could not write {out}: {e.strerror}", file=sys.stderr)
    print(text if args.json else format_table(result))
    return EXIT_REGRESSION if result["regression"] else 0
