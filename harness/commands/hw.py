"""`harness hw`: validate GPU hardware (memory bandwidth, BF16 GEMM, P2P matrix, inventory).

Writes ``hardware.json`` (``"schema": 1``) to ``--out``. Exit code 0 when every check passed or
the stage was skipped (no torch / no CUDA GPU), 1 when a check failed, 2 on bad input, 3 when
the run was invalid: it could not measure what it was asked for (``--checks p2p`` with fewer
than two GPUs), so ``overall: invalid`` with the reason rather than a pass.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from harness.errors import UsageError
from harness.parsing import parse_gpus

EXIT_OK = 0
EXIT_FAILED = 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from harness.hardware.targets import TARGETS  # light: no torch at import

    p = subparsers.add_parser(
        "hw",
        help="validate GPUs: memory bandwidth, BF16 GEMM, P2P matrix, NVML inventory",
        description=(
            "Measure each GPU's device-copy memory bandwidth (read + write) and dense BF16 GEMM "
            "TFLOPS, the P2P bandwidth of every ordered GPU pair, and take an NVML inventory "
            "and topology; judge each against the GPU model's datasheet target. Without torch "
            "or a CUDA GPU it says so and skips (exit 0); a check it cannot make (P2P with one "
            "GPU) makes the run invalid (exit 3)."
        ),
    )
    p.add_argument("--out", default="results/hw", metavar="DIR",
                   help="directory for hardware.json (default: results/hw)")
    p.add_argument("--gpus", default=None, metavar="LIST",
                   help="CUDA device indices, e.g. 0,1 or 0-3 (default: all visible)")
    p.add_argument("--quick", action="store_true",
                   help="smaller buffers (1 GiB copy, 256 MiB P2P) and fewer repeats")
    p.add_argument("--target", default=None, metavar="MODEL",
                   help=f"judge against this model's targets instead of matching the device "
                        f"name ({', '.join(TARGETS)})")
    p.add_argument("--checks", default="hbm,gemm,p2p", metavar="LIST",
                   help="which measurements to run (default: hbm,gemm,p2p)")
    p.add_argument("--json", action="store_true", help="print hardware.json to stdout as well")
    p.set_defaults(func=handle)
    return p


def handle(args: argparse.Namespace) -> int:
    from harness.hardware import judge, summary, targets
    from harness.hardware.run import run

    gpus = parse_gpus(args.gpus)
    checks = [c.strip() for c in (args.checks or "").split(",") if c.strip()]
    unknown = [c for c in checks if c not in ("hbm", "gemm", "p2p")]
    if unknown or not checks:
        raise UsageError(f"--checks {args.checks!r}: choose from hbm, gemm, p2p")
    if args.target:
        try:
            targets.find_target(args.target)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        report = run(args.out, gpus=gpus, quick=args.quick, target=args.target,
                     checks=checks, log=log)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if report.status == "skipped":
        print(f"harness hw: skipped: {report.skipped_reason}", file=sys.stderr)
    else:
        print(summary.format_summary(report))
    if args.json:
        import json

        print(json.dumps(report.to_dict(), indent=2, default=str))
    print(f"wrote {args.out.rstrip('/')}/hardware.json", file=sys.stderr)
    return judge.exit_code(report)


def main(argv: list[str] | None = None) -> int:
    """Run `hw` without the rest of the CLI (for machines where other commands' deps are absent)."""
    parser = argparse.ArgumentParser(prog="harness")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser(sub)
    args = parser.parse_args(["hw", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"harness hw: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
