"""`harness sim replay`: a request list through the simulator's engine in virtual time.

    harness sim replay --profile h200-llama-3-70b-bf16-tp8 --requests results/last-night/
    harness sim replay --profile l40s-llama-3-8b-bf16 --requests arrivals.jsonl --json

No server, no sockets: the engine the live `harness sim` runs is stepped on a virtual
clock (servers/simulator/replay.py says how, and what is and is not modelled), so
thousands of requests take seconds. --requests is a JSONL of
{"arrival_s", "input_len", "output_len"} lines, or a `harness load` results directory
(or its requests.jsonl): its completed requests are replayed at their send times, failed
and incomplete ones are left out and counted (see `load_arrivals`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from harness.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay a request list in virtual time (no server)",
                       description="Replay requests (arrival time, input and output length) "
                                   "through the simulator's engine in virtual time and print "
                                   "vllm-bench-serve metrics.")
    p.add_argument("--profile", required=True,
                   help="GPU-MODEL-PRECISION[-tpN], e.g. h200-llama-3-70b-bf16-tp8 "
                        "(`harness sim --list-profiles`)")
    p.add_argument("--requests", required=True, metavar="FILE",
                   help="JSONL of {arrival_s, input_len, output_len}, or a `harness load` "
                        "results directory (or its requests.jsonl)")
    p.add_argument("--replicas", type=int, default=1,
                   help="identical replicas of the profile, requests routed round-robin in "
                        "arrival order (default 1)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the profile's")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the profile's")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of each card vLLM may use (default 0.90): sets the KV cache")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="override the KV-cache capacity (tokens), as `harness sim` takes it")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the profile's")
    add_engine_options(p)
    p.add_argument("--out", default=None, metavar="OUT.jsonl",
                   help="write one line per request (times, TTFT/TPOT/E2E, ITLs)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--engine and --kv-cache-dtype, shared with `harness sim` (servers/simulator/profiles.py)."""
    p.add_argument("--engine", default=None,
                   help="which engine's efficiency and overheads: vllm (default) or trtllm")
    p.add_argument("--kv-cache-dtype", default=None,
                   help="KV cache dtype as vLLM spells it: auto (the model's, default) or fp8 "
                        "(half the bytes per token: twice the tokens fit, half read per step)")


def _positive(args: argparse.Namespace) -> None:
    for flag in ("replicas", "max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens",
                 "max_model_len"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, not {v}")
    f = args.gpu_memory_utilization
    if f is not None and not 0 < f <= 1:
        raise UsageError(f"--gpu-memory-utilization is a fraction of the card, 0 < F <= 1, not {f}")


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def format_table(summary: dict, skipped: dict, wall_s: float) -> str:
    s = summary
    lines = [f"harness sim replay: {s['requests']} requests on {s['profile']} x{s['replicas']}, "
             f"{_fmt(s['duration_s'], 2)} s virtual in {wall_s:.2f} s",
             f"  output {_fmt(s['output_tokens_per_s'], 0)} tok/s, {_fmt(s['requests_per_s'], 2)} req/s, "
             f"{s['preemptions']} preemptions"
             + (f", {s['rejected']} rejected (too long for the replica)" if s["rejected"] else "")
             + (", left out: " + ", ".join(f"{v} {k}" for k, v in skipped.items()) if skipped else ""),
             f"  {'':8}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}"]
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("itl_ms", "ITL ms"),
                       ("e2e_ms", "E2E ms")):
        d = s[key]
        lines.append(f"  {label:8}" + "".join(f"{_fmt(d[q]):>10}" for q in ("p50", "p90", "p99", "mean")))
    lines.append("  simulated, not measured; the calibration's error band (docs/simulator-calibration.md):")
    for band in dict.fromkeys(s.get("error_band", {}).values()):
        lines.append(f"    {band}")
    return "\n".join(lines)


def error_bands() -> dict[str, str]:
    """Each reported figure's error band (harness.sim_band), by summary key."""
    from harness.sim_band import short_band
    return {k: short_band(k) for k in ("output_tokens_per_s", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}


def run(args: argparse.Namespace) -> int:
    from servers.simulator.replay import ReplayInputError, load_arrivals, replay, resolve_profile

    _positive(args)
    try:
        profile = resolve_profile(args.profile, max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  gpu_memory_utilization=args.gpu_memory_utilization,
                                  max_model_len=args.max_model_len, engine=args.engine,
                                  kv_cache_dtype=args.kv_cache_dtype)
        arrivals, skipped = load_arrivals(args.requests)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    except ReplayInputError as e:
        raise UsageError(str(e)) from None
    started = time.perf_counter()
    result = replay(profile, arrivals, replicas=args.replicas, kv_cache_tokens=args.kv_cache_tokens)
    wall = time.perf_counter() - started
    summary = result.summary()
    summary["skipped"] = skipped
    summary["error_band"] = error_bands()
    if args.out:
        try:
            with open(args.out, "w") as f:
                for rec in result.records:
                    f.write(json.dumps(rec.to_dict()) + "\n")
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot write ({e.strerror})") from None
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(summary, skipped, wall))
    return 0
