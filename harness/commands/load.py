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

from harness import load_options
from harness.errors import UsageError
from harness.parsing import parse_duration
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
    p = sub.add_parser("load", help="one headless load run through Locust",
                       description="Stream chat/completions at a server with Locust users and "
                                   "write summary.json, requests.jsonl, timeseries.jsonl.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000")
    target.add_argument("--endpoints", help="endpoints.json from `harness serve`: users spread "
                                            "evenly over every replica, reported per replica")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--users", type=int, help="closed loop: concurrent users (default 8)")
    p.add_argument("--duration", help="run time: 60, 60s, 15m, 2h")
    p.add_argument("--soak", action="store_true",
                   help="soak run: drift analysis after the run (implies --soak-mix unless a workload is given)")
    p.add_argument("--endpoint", default="chat", choices=["chat", "completions"])
    p.add_argument("--locustfile", default=None, help="your own locustfile (its user classes run)")
    p.add_argument("--workers", type=int, default=1, help="Locust worker processes")
    load_options.add_load_options(p, groups={"rate": mode})
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a directory that holds "
                        "one is refused: its results are not lost by a repeated command)")
    p.add_argument("--quiet", action="store_true",
                   help="print neither the live progress nor the summary table")
    p.add_argument("--locust-stats", action="store_true",
                   help="also print Locust's own tables at the end (end-to-end request time in "
                        "Locust's approximated buckets; by default they go to locust.json only)")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the check that the server answers /v1/models and serves --model "
                        "(e.g. for a server that comes up during the run)")
    p.set_defaults(func=run)


def locust_command(args: argparse.Namespace) -> list[str]:
    """The Locust command line of this run, after every check that needs no server: the run's
    LoadSpec crosses to the plugin as its `--llm-*` flags (harness.load_options)."""
    import math

    from harness.arrivals import check_rate
    from harness.preflight import check_url
    from harness.progress import MIN_INTERVAL_S
    from harness.slo import parse_slo

    spec = load_options.from_args(args)
    if args.endpoints:
        args.url = _first_endpoint_url(args.endpoints)
    url_opt = "--endpoints" if args.endpoints else "--url"
    parts = check_url(args.url, url_opt)
    load_options.check_ranges(spec, "--")
    if args.request_deadline is not None and not 0 < args.request_deadline < math.inf:
        raise UsageError(f"--request-deadline must be > 0 seconds (a whole request, from its send), "
                         f"not {args.request_deadline:g}")
    if args.locustfile:
        for f in args.locustfile.split(","):
            if "://" not in f and not pathlib.Path(f).exists():
                raise UsageError(f"--locustfile {f!r} not found")
    for s in spec.slo:
        parse_slo(s)
    spec.workload().validate()
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1 process, not {args.workers}")
    if args.rate is not None:
        if not args.rate > 0:
            raise UsageError(f"--rate must be > 0 requests/s (a closed loop: --users), not {args.rate:g}")
        try:
            check_rate(args.rate)
        except ValueError as e:
            raise UsageError(f"--rate {e}") from None
    if not args.duration and not spec.num_requests:
        raise UsageError("give --duration or --num-requests: every run is bounded")
    run_time = 3600
    if args.duration:
        try:
            run_time = parse_duration(args.duration)
        except (UsageError, OverflowError):
            run_time = 0
        if not 1 <= run_time <= 10**8:
            raise UsageError(f"--duration {args.duration!r}: give at least 1 second, as 90, 90s, "
                             f"15m or 2h")
        if spec.warmup + spec.cooldown >= run_time:
            also = f" plus --cooldown {spec.cooldown:g} s" if spec.cooldown else ""
            raise UsageError(f"--warmup {spec.warmup:g} s{also} leaves nothing of --duration "
                             f"{args.duration} to measure")
    from harness import soak
    spec = soak.apply_defaults(spec, args, run_time if args.duration else None)
    if spec.cooldown and not args.duration:
        raise UsageError("--cooldown needs --duration (the end must be known in advance)")
    if args.users is not None and args.users < 1:   # (0 used to run the default 8 users)
        raise UsageError(f"--users must be at least 1 concurrent user, not {args.users}")
    if args.progress_interval is not None and not MIN_INTERVAL_S <= args.progress_interval < math.inf:
        raise UsageError(f"--progress-interval must be at least {MIN_INTERVAL_S:g} seconds, "
                         f"not {args.progress_interval:g}")
    # Open loop: one arrival dispatcher per worker, or with --endpoints one per replica on
    # every worker (the user classes are the replicas: with fewer users than classes Locust
    # spawns only the first ones, and the other replicas would get no traffic).
    replicas = len(_endpoint_list(args.endpoints)) if args.endpoints else 1
    users = args.workers * replicas if spec.rate else (args.users or 8)
    out = pathlib.Path(args.out)
    _check_out(args, out)
    if spec.metrics_port:   # Locust would answer a taken port with a traceback and exit 4
        require_free("127.0.0.1", spec.metrics_port, "--metrics-port")
    # What the options of this command do not say, the plugin's options do: its results go to
    # --out; --quiet silences the progress; the preflight was made here already (`preflight`)
    # or is not to be, but a locustfile of the user's own may name other models per class,
    # which the plugin's own check (harness.start_checks) sees.
    spec = spec.replace(out=str(out), progress="off" if args.quiet else spec.progress,
                        no_preflight=args.no_preflight or not args.locustfile,
                        expected_workers=args.workers if args.workers > 1 else 0,
                        drift=soak.wants_drift(args))
    cmd = [sys.executable, "-m", "locust", "-f", args.locustfile or str(LOCUSTFILE), "--headless",
           "-u", str(users), "-r", str(users),
           "--run-time", f"{run_time}s", "--only-summary",
           "--csv", str(out / "locust"), "--html", str(out / "locust.html"), "--loglevel", "WARNING",
           *load_options.locust_argv(spec)]
    if args.workers > 1:
        # Locust's master would listen on every interface at port 5557: a second run on the
        # same machine then fails to start, and the port is open to the network. Loopback and a
        # free port instead (the workers are this run's own forks).
        port = str(free_port_block(1))
        cmd += ["--processes", str(args.workers),
                "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
                "--master-host", "127.0.0.1", "--master-port", port]
    if not args.locust_stats:   # Locust's tables (E2E under latency-like names) go to a file
        cmd += ["--json-file", str(out / "locust")]   # (Locust adds .json)
    if not args.endpoints:   # Locust's --host would override every replica's own host
        cmd += ["--host", f"http://{parts.hostname}:{parts.port or 80}"]
    if not args.locustfile and not args.endpoints:
        cmd.append("Chat" if args.endpoint == "chat" else "Completions")
    return cmd


def _check_out(args: argparse.Namespace, out: pathlib.Path) -> None:
    """--out is a directory this run can write, and holds no earlier run unless --overwrite."""
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
    summary_path = out / "summary.json"   # (written whole by the plugin: harness.run_summary)
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
