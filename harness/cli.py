"""The `harness` command line: one argparse tree, one module per subcommand.

Each subcommand module exposes `add_parser(subparsers)` which registers its
arguments and sets `func` to a handler returning the process exit code.
Errors a user can fix are raised as `UsageError` and printed as one line.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from harness.errors import UsageError
from harness.slo import EXIT_BAD_INPUT

# Exit codes are part of the contract (documented in the README).
EXIT_OK = 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Load-testing and benchmarking harness for LLM inference clusters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from harness.commands import sim as sim_cmd
    from harness.commands import load as load_cmd
    from harness.commands import demo as demo_cmd
    from harness.commands import hw as hw_cmd
    from harness.commands import serve as serve_cmd
    from harness.commands import run as run_cmd
    from harness.commands import throughput as throughput_cmd
    from harness.commands import perplexity as perplexity_cmd
    from harness.commands import compare as compare_cmd
    from harness.commands import capacity as capacity_cmd

    sim_cmd.add_parser(sub)
    load_cmd.add_parser(sub)
    demo_cmd.add_parser(sub)
    hw_cmd.add_parser(sub)
    serve_cmd.add_parser(sub)
    run_cmd.add_parser(sub)
    throughput_cmd.add_parser(sub)
    perplexity_cmd.add_parser(sub)
    compare_cmd.add_parser(sub)
    capacity_cmd.add_parser(sub)
    return parser


def stray_words_error(command: str, stray: Sequence[str]) -> str:
    """One line for words no option took: the common case is an SLO written as three shell
    words (`--slo ttft_p99_ms <= 200`), which must be one quoted word."""
    line = f"harness {command}: error: unexpected arguments: {' '.join(stray)}"
    if any(op in w for w in stray for op in ("<", ">", "=")):
        line += "; write an SLO as one quoted word, e.g. --slo 'ttft_p99_ms<=200'"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, stray = parser.parse_known_args(argv)
    if stray:
        print(stray_words_error(args.command, stray), file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
