"""`harness capacity`: the highest open-loop request rate (with --users, the highest
closed-loop concurrency) at which every SLO holds.

    harness capacity --url http://127.0.0.1:8000 --slo 'ttft_p99_ms<=200' --slo 'tpot_p99_ms<=30' \\
        --input-len 512 --output-len 128 --min-rate 2 --max-rate 40 --out runs/cap
    harness capacity --profile l40s-llama-3-8b-bf16 --slo 'ttft_p99_ms<=200' ... --out runs/cap-sim
    harness capacity --users --min-users 4 --max-users 128 --url ... --out runs/cap-users

Brackets then bisects (harness/capacity.py says how and how a step is judged). With --url or
--endpoints every step is a normal `harness load` results directory under DIR/steps/; with
--profile the steps run in virtual time on the simulator's replay (seconds, no sockets), and
the answer says so, with the simulator's error band. Writes DIR/capacity.json after every
step (Ctrl-C keeps what is known) and DIR/report.html at the end.

With --users the level searched is the number of closed-loop users (whole numbers, from
--min-users to --max-users; a step ends at its request count, --duration-per-step is its
time bound): the seed's "measured at batch_size=32" question, how many users at once.

Exit codes: 0 a capacity was found; 1 even --min-rate (--min-users) breaks an SLO (or has
too few samples to pass); 2 bad input; 3 that first step's load generator was invalid; 4
the server failed at it; 130 interrupted.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from harness.errors import UsageError

EXIT_FOUND, EXIT_NONE, EXIT_INVALID, EXIT_SERVER, EXIT_INTERRUPTED = 0, 1, 3, 4, 130


def add_parser(sub: argparse._SubParsersAction) -> None:
    from harness.capacity import DEFAULT_RESOLUTION

    p = sub.add_parser("capacity", help="find the highest request rate at which every SLO holds",
                       description="Bracket then bisect the open-loop request rate until the "
                                   "highest one at which every --slo holds (with confidence) is "
                                   "known within --resolution.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="server base URL (each step is a `harness load` run)")
    target.add_argument("--endpoints", help="endpoints.json from `harness serve`")
    target.add_argument("--profile", help="simulator profile: search in virtual time on the replay, "
                                          "no server (e.g. l40s-llama-3-8b-bf16)")
    p.add_argument("--slo", action="append", default=[],
                   help="an upper bound every step must meet, e.g. 'ttft_p99_ms<=200' (repeatable)")
    p.add_argument("--min-rate", type=float, default=None, help="first rate, requests/s (default 1)")
    p.add_argument("--max-rate", type=float, default=None,
                   help="no step offers more than this, requests/s (default 100)")
    p.add_argument("--users", action="store_true",
                   help="search the closed-loop concurrency (users) instead of the request rate")
    p.add_argument("--min-users", type=int, default=None, help="with --users: first level (default 1)")
    p.add_argument("--max-users", type=int, default=None,
                   help="with --users: no step runs more users than this (default 256)")
    p.add_argument("--resolution", type=float, default=DEFAULT_RESOLUTION,
                   help="stop when the bracket is narrower than this fraction of its low end "
                        "(default 0.05)")
    p.add_argument("--duration-per-step", type=float, default=None,
                   help="seconds of arrivals a step offers (default 30); a step sends at least "
                        "the requests its SLOs' percentiles need (a p99: 500). With --users: "
                        "a step's time bound (default 300; it ends at its request count)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds a step waits for requests in flight after its last send; "
                        "what is still unfinished counts as infinitely slow (default: "
                        "--duration-per-step)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="a step passes only when each SLO holds over this block-bootstrap "
                        "interval (default 0.95)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dataset", default="", help="ShareGPT JSON or JSONL prompts (not with --profile)")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma", "constant"])
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="", help="served model name (default: the server's first)")
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    p.add_argument("--workers", type=int, default=1, help="Locust worker processes per step")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request read timeout, s")
    p.add_argument("--cpu-limit", type=float, default=None, help="as harness load's")
    p.add_argument("--lag-limit-ms", type=float, default=None, help="as harness load's")
    p.add_argument("--stamp-delay-limit-ms", type=float, default=None, help="as harness load's")
    p.add_argument("--replicas", type=int, default=1, help="with --profile: identical replicas")
    p.add_argument("--max-num-seqs", type=int, default=None, help="with --profile: default the profile's")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="with --profile: default the profile's")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="with --profile: KV capacity override")
    p.add_argument("--out", required=True, help="results directory (capacity.json, report.html, steps/)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the table")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    from harness.arrivals import MAX_RATE

    def bad(cond: bool, msg: str) -> None:
        if cond:
            raise UsageError(msg)

    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    if args.users:
        bad(args.min_rate is not None or args.max_rate is not None,
            "--min-rate and --max-rate bound the rate search; with --users give --min-users and --max-users")
        args.min_users = 1 if args.min_users is None else args.min_users
        args.max_users = 256 if args.max_users is None else args.max_users
        bad(args.min_users < 1, f"--min-users must be at least 1 user, not {args.min_users}")
        bad(args.max_users < args.min_users,
            f"--max-users {args.max_users} must be at least --min-users {args.min_users}")
        args.duration_per_step = 300.0 if args.duration_per_step is None else args.duration_per_step
    else:
        bad(args.min_users is not None or args.max_users is not None,
            "--min-users and --max-users bound a concurrency search: add --users")
        args.min_rate = 1.0 if args.min_rate is None else args.min_rate
        args.max_rate = 100.0 if args.max_rate is None else args.max_rate
        args.duration_per_step = 30.0 if args.duration_per_step is None else args.duration_per_step
        bad(not (finite(args.min_rate) and args.min_rate > 0), f"--min-rate must be > 0 requests/s, not {args.min_rate:g}")
        bad(not (finite(args.max_rate) and args.max_rate >= args.min_rate),
            f"--max-rate {args.max_rate:g} must be at least --min-rate {args.min_rate:g}")
        bad(args.max_rate > MAX_RATE, f"--max-rate {args.max_rate:g} is above the load generator's ceiling "
                                      f"of {MAX_RATE:g} requests/s")
    bad(not (finite(args.resolution) and 0 < args.resolution < 1),
        f"--resolution is a fraction of the rate, 0 < R < 1 (0.05 = 5%), not {args.resolution:g}")
    bad(not (finite(args.duration_per_step) and args.duration_per_step > 0),
        f"--duration-per-step must be > 0 seconds, not {args.duration_per_step:g}")
    bad(args.drain_timeout is not None and not (finite(args.drain_timeout) and args.drain_timeout >= 0),
        f"--drain-timeout must be >= 0 seconds, not {args.drain_timeout}")
    bad(not (finite(args.confidence) and 0.5 <= args.confidence < 1),
        f"--confidence is a probability, 0.5 <= C < 1 (0.95 = 95%), not {args.confidence:g}")
    bad(args.resamples < 100, f"--resamples must be at least 100, not {args.resamples}")
    bad(args.input_len < 1 or args.output_len < 1, "--input-len and --output-len must be at least 1 token")
    bad(not (finite(args.burstiness) and args.burstiness > 0), "--burstiness must be > 0 (1 is Poisson)")
    if args.profile:
        bad(bool(args.dataset), "--dataset needs a server (--url or --endpoints): the replay takes "
                                "lengths, not prompts; give --input-len and --output-len with --profile")
        bad(args.replicas < 1, f"--replicas must be at least 1, not {args.replicas}")
    else:
        for flag in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens"):
            bad(getattr(args, flag) is not None,
                f"--{flag.replace('_', '-')} is a simulator limit: only with --profile")
        bad(args.replicas != 1, "--replicas is only for --profile (a server's replicas: --endpoints)")


def _check_load_args(argv: list[str]) -> None:
    """Every step's `harness load` options, validated once before anything runs (a bad URL,
    dataset or limit is one line and exit 2 here, not a failed first step)."""
    import tempfile

    from harness.cli import build_parser
    from harness.commands.load import locust_command

    with tempfile.TemporaryDirectory() as tmp:
        args = build_parser().parse_args(argv[3:] + ["--out", str(Path(tmp) / "check")])
        locust_command(args)


def run(args: argparse.Namespace) -> int:
    from harness import capacity as cap
    from harness.capacity_report import render_html
    from harness.json_io import write_json

    check_args(args)
    slos = cap.parse_capacity_slos(args.slo)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a directory")
    if (out / "capacity.json").exists():
        raise UsageError(f"--out {args.out!r} already holds a capacity search (capacity.json); "
                         f"give another directory")
    drain = args.duration_per_step if args.drain_timeout is None else args.drain_timeout
    if args.users and args.drain_timeout is None:
        drain = min(drain, 60.0)    # (a users step's time bound is long; its drain need not be)
    load = "users" if args.users else "rate"
    low, high = (args.min_users, args.max_users) if args.users else (args.min_rate, args.max_rate)
    workload = {"input_len": args.input_len, "output_len": args.output_len, "dataset": args.dataset or None,
                "seed": args.seed, "drain_timeout_s": drain}
    if not args.users:
        workload.update(arrival=args.arrival, burstiness=args.burstiness)
    if args.profile:
        measure, target = _virtual(args, slos, drain)
    else:
        measure, target, interrupt = _live(args, slos, drain, out)
    result = cap.CapacityResult(
        mode="virtual" if args.profile else "live", slos=[s.text for s in slos], min_rate=float(low),
        max_rate=float(high), resolution=args.resolution, confidence=args.confidence,
        duration_per_step_s=args.duration_per_step, workload=workload, target=target,
        error_band=cap.error_band() if args.profile else None, started_at=time.time(), load=load)
    unit = cap.UNIT[load]
    out.mkdir(parents=True, exist_ok=True)

    def on_step(res: cap.CapacityResult, step: cap.Step) -> None:
        write_json(out / "capacity.json", res.to_dict())
        if not args.quiet:
            why = "" if step.passed else " - " + "; ".join(step.reasons)
            tok = f", {step.output_tokens_per_s:,.0f} out tok/s" if step.output_tokens_per_s else ""
            print(f"step {len(res.steps)}: {step.rate:.4g} {unit} {step.status.upper()}{tok} "
                  f"({step.wall_s:.1f} s){why}", flush=True)

    if not args.quiet:
        where = (f"virtual time on {args.profile} (simulator replay, no server)" if args.profile
                 else args.url or args.endpoints)
        print(f"harness capacity: {', '.join(result.slos)} on {where}; "
              f"{'users' if args.users else 'rates'} {low:g}..{high:g}{'' if args.users else ' req/s'}, resolution {args.resolution * 100:g}%", flush=True)
    previous = interrupt.install() if not args.profile else None
    try:
        cap.search(result, measure, on_step)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        if previous is not None:
            interrupt.restore(previous)
    doc = result.to_dict()
    write_json(out / "capacity.json", doc)
    (out / "report.html").write_text(render_html(doc, f"harness capacity: {where_text(args)}"))
    print(cap.format_table(doc))
    print(f"results: {out}/ (capacity.json, report.html{', steps/' if not args.profile else ''})")
    if result.interrupted:
        return EXIT_INTERRUPTED
    if doc["answer"]["found"]:
        return EXIT_FOUND
    first = result.steps[0] if result.steps else None
    if first is not None and first.status == "invalid":
        return EXIT_INVALID
    if first is not None and first.status == "error":
        return EXIT_SERVER
    return EXIT_NONE


def where_text(args: argparse.Namespace) -> str:
    return f"{args.profile} (virtual time)" if args.profile else (args.url or args.endpoints)


def _virtual(args: argparse.Namespace, slos, drain: float):
    from harness import capacity_replay
    from servers.simulator.replay import ReplayInputError, resolve_profile

    limits = {k: v for k, v in {"max_num_seqs": args.max_num_seqs,
                                "max_num_batched_tokens": args.max_num_batched_tokens}.items() if v}
    try:
        profile = resolve_profile(args.profile, **limits)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    except ReplayInputError as e:
        raise UsageError(str(e)) from None
    total = args.input_len + args.output_len
    if total > profile.max_model_len:
        raise UsageError(f"--input-len {args.input_len} + --output-len {args.output_len} is over "
                         f"{profile.name}'s max_model_len {profile.max_model_len}: every request "
                         f"would be refused")
    kv = {"kv_cache_tokens": args.kv_cache_tokens} if args.kv_cache_tokens else {}

    def measure_users(users: float):
        return capacity_replay.measure_users(
            int(users), slos, profile=profile, duration_s=args.duration_per_step, drain_s=drain,
            input_len=args.input_len, output_len=args.output_len, replicas=args.replicas,
            seed=args.seed, confidence=args.confidence, resamples=args.resamples,
            kv_cache_tokens=args.kv_cache_tokens)

    def measure(rate: float):
        return capacity_replay.measure(
            rate, slos, profile=profile, duration_s=args.duration_per_step, drain_s=drain,
            input_len=args.input_len, output_len=args.output_len, replicas=args.replicas,
            arrival=args.arrival, burstiness=args.burstiness, seed=args.seed,
            confidence=args.confidence, resamples=args.resamples, limits=kv)

    target = {"profile": profile.name, "replicas": args.replicas,
              "max_num_seqs": profile.max_num_seqs, "max_num_batched_tokens": profile.max_num_batched_tokens,
              "kv_cache_tokens": args.kv_cache_tokens}
    return (measure_users if args.users else measure), target


def _live(args: argparse.Namespace, slos, drain: float, out: Path):
    from harness import capacity_live as live
    from harness.commands.load import preflight

    opts = live.LiveOptions(url=args.url, endpoints=args.endpoints, model=args.model,
                            input_len=args.input_len, output_len=args.output_len, dataset=args.dataset,
                            arrival=args.arrival, burstiness=args.burstiness, workers=args.workers,
                            seed=args.seed, drain_s=drain, request_timeout=args.timeout,
                            endpoint=args.endpoint, cpu_limit=args.cpu_limit,
                            lag_limit_ms=args.lag_limit_ms, stamp_delay_limit_ms=args.stamp_delay_limit_ms,
                            load="users" if args.users else "rate")
    first = args.min_users if args.users else args.min_rate
    _check_load_args(live.load_argv(opts, first, 10, 10.0, out / "steps" / "check", slos))
    preflight(argparse.Namespace(url=args.url, endpoints=args.endpoints, model=args.model))
    n_endpoints = 1
    if args.endpoints:
        from servers.launcher import read_endpoints

        n_endpoints = len(read_endpoints(args.endpoints).endpoints)
        opts.workers = spread_workers(args.workers, n_endpoints, args.users)
        if opts.workers != args.workers and not args.quiet:
            print(f"--endpoints lists {n_endpoints} endpoints: each step runs {opts.workers} workers "
                  f"(an open-loop user is one endpoint's, so the rate spreads evenly only over a "
                  f"multiple of {n_endpoints} workers)", flush=True)
    interrupt = live.Interrupt()

    def measure(rate: float):
        n = len(list((out / "steps").glob("*"))) + 1 if (out / "steps").exists() else 1
        step_dir = out / "steps" / (f"{n:02d}-{int(rate)}users" if args.users else f"{n:02d}-{rate:.4g}rps")
        step = live.measure(rate, slos, options=opts, out=step_dir, duration_s=args.duration_per_step,
                            interrupt=interrupt, confidence=args.confidence, resamples=args.resamples)
        step.dir = str(step_dir.relative_to(out))
        return step

    target = {"url": args.url, "endpoints": args.endpoints, "model": args.model or None,
              "endpoint_count": n_endpoints, "workers": opts.workers}
    return measure, target, interrupt


def spread_workers(workers: int, endpoints: int, users: bool) -> int:
    """Workers for a step over `endpoints` endpoints. `harness load --endpoints` has one user
    class per endpoint, and an open-loop step runs one user per worker: with fewer workers
    than endpoints (or a count that is not a multiple) the rate would reach only some of
    them and the search would find a fraction of the fleet's capacity. A closed loop's
    users spread over the classes whatever the workers."""
    if users or endpoints <= 1:
        return workers
    return endpoints * math.ceil(workers / endpoints)
