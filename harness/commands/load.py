"""`harness load`: one headless Locust run (master + workers) with the LLM users,
writing the results directory. Locust does the load; this only builds its
command line, so everything here is also reachable with plain `locust -f`."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys

from harness.errors import UsageError
from harness.parsing import parse_duration as _duration
from harness.ports import free_port_block, require_free
from harness.progress import STATUS_FILE
from harness.results import RUN_FILES

LOCUSTFILE = pathlib.Path(__file__).resolve().parent.parent / "default_locustfile.py"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What a run writes into its results directory besides results.RUN_FILES (any of which
# means the directory holds a run: refused as --out unless --overwrite). --overwrite removes
# all of them once the new run has passed its checks, so that nothing of the earlier run
# passes for this one's (a run that ends before its summary would otherwise sit beside the
# earlier summary.json); other files are left alone.
LOCUST_FILES = (STATUS_FILE, "locust.html", "locust.json", "locust_stats.csv", "locust_stats_history.csv",
                "locust_failures.csv", "locust_exceptions.csv")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from harness.arrivals import MAX_RATE

    p = sub.add_parser("load", help="one headless load run through Locust",
                       description="Stream chat/completions at a server with Locust users and "
                                   "write summary.json, requests.jsonl, timeseries.jsonl.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000")
    target.add_argument("--endpoints", help="endpoints.json from `harness serve`: users spread "
                                            "evenly over every replica, reported per replica")
    p.add_argument("--model", default="", help="served model name (default: the server's first)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float,
                      help=f"open loop: requests/s over all workers (Poisson unless --arrival; "
                           f"at most {MAX_RATE:g})")
    mode.add_argument("--users", type=int, help="closed loop: concurrent users (default 8)")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma", "constant"])
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=0, help="open-loop in-flight cap")
    p.add_argument("--duration", help="run time: 60, 60s, 15m, 2h")
    p.add_argument("--num-requests", type=int, default=0)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--input-len-range", type=float, default=0.0)
    p.add_argument("--output-len-range", type=float, default=0.0)
    p.add_argument("--shared-prefix-len", type=int, default=0)
    p.add_argument("--dataset", default="", help="ShareGPT JSON or JSONL prompts")
    p.add_argument("--soak-mix", action="store_true", help="the seed plan's three prompts")
    p.add_argument("--soak", action="store_true",
                   help="soak run: drift analysis after the run (implies --soak-mix unless a workload is given)")
    p.add_argument("--window", type=float, default=None, help="timeseries window, s (default 5)")
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    p.add_argument("--locustfile", default=None, help="your own locustfile (its user classes run)")
    p.add_argument("--workers", type=int, default=1, help="Locust worker processes")
    p.add_argument("--slo", action="append", default=[], help="e.g. 'ttft_p99_ms<=200' (repeatable)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds excluded at the start")
    p.add_argument("--cooldown", type=float, default=0.0, help="seconds excluded at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0,
                   help="per-request read timeout: the longest silence, s")
    p.add_argument("--request-deadline", type=float, default=None,
                   help="whole-request deadline, s from the send, however the bytes trickle "
                        "(default: --timeout plus 1 s per output token)")
    p.add_argument("--max-response-bytes", type=int, default=None,
                   help="cap on the bytes read for one response (default 32 MiB; 0 = no cap)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="at the end, wait up to this many seconds for requests in flight (default: "
                        "--timeout); what is still unfinished is recorded as incomplete")
    p.add_argument("--cpu-limit", type=float, default=None,
                   help="generator invalid when a worker's median CPU %% exceeds this (default 90)")
    p.add_argument("--lag-limit-ms", type=float, default=None,
                   help="generator invalid when open-loop schedule lag p99 exceeds this (default 10)")
    p.add_argument("--stamp-delay-limit-ms", type=float, default=None,
                   help="generator invalid when the p99 of its read-to-stamp delay exceeds this "
                        "(default 10; 0 = not judged)")
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a directory that holds "
                        "one is refused: its results are not lost by a repeated command)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus /metrics on 127.0.0.1:PORT during the run (0 = off)")
    p.add_argument("--metrics-linger", type=float, default=0.0,
                   help="keep /metrics up this many seconds after the run (>= the scrape interval)")
    p.add_argument("--quiet", action="store_true",
                   help="print neither the live progress nor the summary table")
    p.add_argument("--progress-interval", type=float, default=None,
                   help="seconds between plain progress lines when stdout is not a terminal "
                        "(default 5; a terminal gets a bar)")
    p.add_argument("--locust-stats", action="store_true",
                   help="also print Locust's own tables at the end (end-to-end request time in "
                        "Locust's approximated buckets; by default they go to locust.json only)")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the check that the server answers /v1/models and serves --model "
                        "(e.g. for a server that comes up during the run)")
    p.set_defaults(func=run)


def locust_command(args: argparse.Namespace) -> list[str]:
    import math

    from harness.arrivals import check_rate
    from harness.option_ranges import check_ranges
    from harness.preflight import check_url
    from harness.slo import parse_slo
    from harness.workload import WorkloadSpec

    if args.endpoints:
        args.url = _first_endpoint_url(args.endpoints)
    url_opt = "--endpoints" if args.endpoints else "--url"
    parts = check_url(args.url, url_opt)
    check_ranges(lambda name: getattr(args, name.replace("-", "_"), None), "--")
    if args.request_deadline is not None and not 0 < args.request_deadline < math.inf:
        raise UsageError(f"--request-deadline must be > 0 seconds (a whole request, from its send), "
                         f"not {args.request_deadline:g}")
    if args.locustfile:
        for f in args.locustfile.split(","):
            if "://" not in f and not pathlib.Path(f).exists():
                raise UsageError(f"--locustfile {f!r} not found")
    for s in args.slo:
        parse_slo(s)
    WorkloadSpec(input_len=args.input_len, output_len=args.output_len,
                 dataset=args.dataset or None, input_len_range=args.input_len_range,
                 output_len_range=args.output_len_range, shared_prefix_len=args.shared_prefix_len,
                 soak_mix=args.soak_mix).validate()
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1 process, not {args.workers}")
    if args.rate is not None:
        if not args.rate > 0:
            raise UsageError(f"--rate must be > 0 requests/s (a closed loop: --users), not {args.rate:g}")
        try:
            check_rate(args.rate)
        except ValueError as e:
            raise UsageError(f"--rate {e}") from None
    if not args.duration and not args.num_requests:
        raise UsageError("give --duration or --num-requests: every run is bounded")
    run_time = 3600
    if args.duration:
        try:
            run_time = _duration(args.duration)
        except (UsageError, OverflowError):
            run_time = 0
        if not 1 <= run_time <= 10**8:
            raise UsageError(f"--duration {args.duration!r}: give at least 1 second, as 90, 90s, "
                             f"15m or 2h")
        if args.warmup + args.cooldown >= run_time:
            also = f" plus --cooldown {args.cooldown:g} s" if args.cooldown else ""
            raise UsageError(f"--warmup {args.warmup:g} s{also} leaves nothing of --duration "
                             f"{args.duration} to measure")
    from harness.soak import apply_defaults
    apply_defaults(args, _duration(args.duration) if args.duration else None)
    if args.cooldown and not args.duration:
        raise UsageError("--cooldown needs --duration (the end must be known in advance)")
    if args.users is not None and args.users < 1:   # (0 used to run the default 8 users)
        raise UsageError(f"--users must be at least 1 concurrent user, not {args.users}")
    # Open loop: one arrival dispatcher per worker, or with --endpoints one per replica on
    # every worker (the user classes are the replicas: with fewer users than classes Locust
    # spawns only the first ones, and the other replicas would get no traffic).
    replicas = len(_endpoint_list(args.endpoints)) if args.endpoints else 1
    users = args.workers * replicas if args.rate else (args.users or 8)
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a directory for the results")
    missing = [d for d in (out, *out.parents) if not d.exists()]   # (the deepest first)
    try:   # made and removed again: an unwritable path is one line here, before anything runs
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as e:
        raise UsageError(f"--out {args.out!r} cannot be written ({e.strerror or e})") from None
    finally:
        for d in missing:
            try:
                d.rmdir()
            except OSError:
                break
    held = [name for name in RUN_FILES if (out / name).is_file()]
    if held and not getattr(args, "overwrite", False):   # a repeated command loses nothing
        raise UsageError(f"--out {args.out!r} already holds a run ({held[0]}); give another --out, "
                         f"or add --overwrite to replace it")
    if args.metrics_port:   # Locust would answer a taken port with a traceback and exit 4
        require_free("127.0.0.1", args.metrics_port, "--metrics-port")
    cmd = [sys.executable, "-m", "locust", "-f", args.locustfile or str(LOCUSTFILE), "--headless",
           "-u", str(users), "-r", str(users),
           "--run-time", f"{run_time}s", "--only-summary",
           "--csv", str(out / "locust"), "--html", str(out / "locust.html"), "--loglevel", "WARNING",
           "--llm-out", str(out), "--llm-input-len", str(args.input_len),
           "--llm-output-len", str(args.output_len), "--llm-seed", str(args.seed),
           "--llm-timeout", str(args.timeout), "--llm-arrival", args.arrival,
           "--llm-burstiness", str(args.burstiness), "--llm-warmup", str(args.warmup),
           "--llm-cooldown", str(args.cooldown)]
    if args.model:
        cmd += ["--llm-model", args.model]
    if args.rate:
        cmd += ["--llm-rate", str(args.rate)]
    if args.request_deadline:
        cmd += ["--llm-request-deadline", str(args.request_deadline)]
    if args.max_response_bytes is not None:
        cmd += ["--llm-max-response-bytes", str(args.max_response_bytes)]
    if args.max_concurrency:
        cmd += ["--llm-max-concurrency", str(args.max_concurrency)]
    if args.num_requests:
        cmd += ["--llm-num-requests", str(args.num_requests)]
    for flag, value in (("--llm-input-len-range", args.input_len_range),
                        ("--llm-output-len-range", args.output_len_range),
                        ("--llm-shared-prefix-len", args.shared_prefix_len)):
        if value:
            cmd += [flag, str(value)]
    if args.dataset:
        cmd += ["--llm-dataset", args.dataset]
    if args.soak_mix:
        cmd += ["--llm-soak-mix"]
    if args.drain_timeout is not None:
        cmd += ["--llm-drain-timeout", str(args.drain_timeout)]
    if getattr(args, "window", None):
        cmd += ["--llm-window", str(args.window)]
    if args.slo:
        cmd += ["--llm-slo", ",".join(args.slo)]
    if getattr(args, "cpu_limit", None) is not None:
        cmd += ["--llm-cpu-limit", str(args.cpu_limit)]
    if getattr(args, "lag_limit_ms", None) is not None:
        cmd += ["--llm-lag-limit-ms", str(args.lag_limit_ms)]
    if getattr(args, "stamp_delay_limit_ms", None) is not None:
        cmd += ["--llm-stamp-delay-limit-ms", str(args.stamp_delay_limit_ms)]
    if args.workers > 1:
        # Locust's master would listen on every interface at port 5557: a second run on the
        # same machine then fails to start, and the port is open to the network. Loopback and a
        # free port instead (the workers are this run's own forks).
        port = str(free_port_block(1))
        cmd += ["--processes", str(args.workers), "--llm-expected-workers", str(args.workers),
                "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
                "--master-host", "127.0.0.1", "--master-port", port]
    if args.metrics_port:
        cmd += ["--llm-metrics-port", str(args.metrics_port),
                "--llm-metrics-linger", str(args.metrics_linger)]
    if args.quiet:
        cmd += ["--llm-progress", "off"]
    if args.no_preflight or not args.locustfile:
        # checked here already (`preflight`), or not to be; a locustfile of the user's own may
        # name other models per class, which the plugin's own check (harness.start_checks) sees
        cmd += ["--llm-no-preflight"]
    if args.progress_interval is not None:
        from harness.progress import MIN_INTERVAL_S
        if not MIN_INTERVAL_S <= args.progress_interval < math.inf:
            raise UsageError(f"--progress-interval must be at least {MIN_INTERVAL_S:g} seconds, "
                             f"not {args.progress_interval:g}")
        cmd += ["--llm-progress-interval", str(args.progress_interval)]
    if not args.locust_stats:   # Locust's tables (E2E under latency-like names) go to a file
        cmd += ["--json-file", str(out / "locust")]   # (Locust adds .json)
    if not args.endpoints:   # Locust's --host would override every replica's own host
        cmd += ["--host", f"http://{parts.hostname}:{parts.port or 80}"]
    if not args.locustfile and not args.endpoints:
        cmd.append("Chat" if args.endpoint == "chat" else "Completions")
    return cmd


def _first_endpoint_url(path: str) -> str:
    return _endpoint_list(path)[0].url


def _endpoint_list(path: str) -> list:
    """The endpoints of `harness serve`'s list, or a UsageError naming what is wrong."""
    from servers.launcher import read_endpoints

    try:
        eps = read_endpoints(path).endpoints
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--endpoints {path!r} is not a readable endpoint list ({e}); "
                         f"write one with `harness serve --out DIR`") from None
    if not eps:
        raise UsageError(f"--endpoints {path!r} lists no endpoints")
    return eps


def _die_with_parent() -> None:
    """In the Locust child: SIGTERM it (a clean shutdown, results written) if `harness load`
    dies, even by SIGKILL. Linux only."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run(args: argparse.Namespace) -> int:
    from harness.results import format_table

    cmd = locust_command(args)
    if not args.no_preflight:
        preflight(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        for name in (*RUN_FILES, *LOCUST_FILES):
            (out / name).unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.endpoints:
        env["HARNESS_ENDPOINTS"] = str(pathlib.Path(args.endpoints).resolve())
        env["HARNESS_ENDPOINT_KIND"] = args.endpoint
    # Locust runs in a session of its own: a terminal's Ctrl-C (the foreground group), a
    # SIGINT to this PID alone, and SIGTERM all come here, and Locust gets each exactly once
    # (a second SIGINT landing in its shutdown would cut the summary short).
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent, start_new_session=True,
                            stdin=subprocess.DEVNULL)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:   # Locust itself was killed by a signal
        code = 128 - code
    summary_path = out / "summary.json"
    if summary_path.exists() and (out / "requests.jsonl").exists():
        add_breakdowns(out)
    from harness import soak
    if summary_path.exists() and soak.wants_drift(args):
        code = soak.finish_run(out, code)
    if summary_path.exists() and not args.quiet:
        summary = json.loads(summary_path.read_text())
        print(format_table(summary))
        if summary.get("drift"):
            from harness.drift import describe
            print(describe(summary["drift"]))
        print(f"results: {out}/")
    elif not summary_path.exists() and code != 2:   # (2: Locust's one line said why)
        print(f"harness load: no summary was written (locust exited with {code}); "
              f"see the output above", file=sys.stderr)
    if received:   # interrupted: the shell's convention, whatever the partial run's verdict
        return 128 + received[0]
    return code


def preflight(args: argparse.Namespace) -> None:
    """Every target answers /v1/models, takes the key and serves the model, before any load."""
    from harness.credentials import DEFAULT_ENV_VAR, ApiKey
    from harness.preflight import check_target

    if args.endpoints:
        from servers.launcher import read_endpoints
        targets = [(e.url, e.model, "--endpoints") for e in read_endpoints(args.endpoints).endpoints]
    else:
        targets = [(args.url, args.model or None, "--url")]
    key = ApiKey(DEFAULT_ENV_VAR, [url for url, _m, _o in targets])
    for url, model, option in targets:
        check_target(url, model, key, option)


def add_breakdowns(out: pathlib.Path) -> None:
    """Per-endpoint and per-model figures (the seed's cluster table), recomputed from
    requests.jsonl so they add up to the aggregate by construction."""
    from harness.json_io import read_jsonl, write_json
    from harness.results import endpoint_breakdown

    summary = json.loads((out / "summary.json").read_text())
    by_endpoint, by_model = endpoint_breakdown(read_jsonl(out / "requests.jsonl"),
                                               summary.get("duration_s") or 0.0)
    summary["by_endpoint"], summary["by_model"] = by_endpoint, by_model
    write_json(out / "summary.json", summary)
