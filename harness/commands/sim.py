"""`harness sim`: the simulated vLLM-compatible server (one or many replicas)."""
from __future__ import annotations

import argparse
import asyncio
import errno
import signal

from harness.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="run the simulated vLLM-compatible server",
                       description="An OpenAI-compatible server that models a continuous-batching "
                                   "vLLM engine on a given GPU and model (no GPU needed).")
    p.add_argument("--profile", default=None,
                   help="GPU-MODEL-PRECISION[-tpN], e.g. l40s-llama-3-8b-bf16 (default)")
    p.add_argument("--list-profiles", action="store_true", help="print the profiles and exit")
    p.add_argument("--host", default=None,
                   help="bind address (default 127.0.0.1; with --ray: each node's address)")
    p.add_argument("--port", type=int, default=8000, help="first port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="replicas on consecutive ports")
    p.add_argument("--layout", default=None,
                   help="serve a launcher layout (single, tp2, mixed12 or FILE.yaml) as simulated "
                        "replicas on consecutive ports; writes OUT/endpoints.json (removed on exit)")
    p.add_argument("--gpu", default="l40s", help="with --layout: the GPU the replicas simulate")
    p.add_argument("--gpus", type=int, default=12, help="with --layout: GPUs in the simulated machine")
    p.add_argument("--out", default=None, help="with --layout: where endpoints.json goes")
    from harness.commands.serve import add_ray_option
    add_ray_option(p)
    p.add_argument("--dry-run", action="store_true",
                   help="with --ray: print the placement and every node's commands; start nothing")
    p.add_argument("--health-timeout", type=float, default=120.0, metavar="S",
                   help="with --ray: seconds each replica may take to answer /health (default 120)")
    p.add_argument("--stop-timeout", type=float, default=10.0, metavar="S",
                   help="with --ray: seconds between SIGTERM and SIGKILL when stopping (default 10)")
    p.add_argument("--served-model-name", default=None, help="model name the API answers to")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="override the KV-cache capacity (tokens), e.g. to provoke preemption")
    from harness.commands.sim_replay import add_engine_options
    add_engine_options(p)
    p.add_argument("--truth-log", default=None,
                   help="append per-request server-side event times (JSONL) to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slowdown-per-hour", type=float, default=0.0,
                   help="step time grows by this fraction per hour of uptime (soak-test drift)")
    g = p.add_argument_group("fault injection (probability per request, 0..1)")
    g.add_argument("--fault-http-500", type=float, default=0.0)
    g.add_argument("--fault-http-429", type=float, default=0.0)
    g.add_argument("--fault-drop", type=float, default=0.0, help="close the connection mid-stream")
    g.add_argument("--fault-stall", type=float, default=0.0, help="stop sending mid-stream")
    g.add_argument("--stall-seconds", type=float, default=2.0)
    g.add_argument("--fault-slow-headers", type=float, default=0.0)
    g.add_argument("--slow-headers-seconds", type=float, default=2.0)
    g.add_argument("--fault-malformed", type=float, default=0.0, help="one broken JSON event")
    p.set_defaults(func=run)
    # `harness sim replay ...`: virtual-time replay (harness/commands/sim_replay.py). Optional,
    # so `harness sim --port P ...` (no word) still starts the server as before.
    from harness.commands import sim_replay
    sim_replay.add_parser(p.add_subparsers(dest="sim_command", metavar="[replay]", required=False))


def build_replicas(args: argparse.Namespace):
    from dataclasses import replace

    from servers.simulator.profiles import DEFAULT_PROFILE, get_profile, with_options
    from servers.simulator.server import Faults, Replica

    try:
        profile = with_options(get_profile(args.profile or DEFAULT_PROFILE), engine=args.engine,
                               kv_cache_dtype=args.kv_cache_dtype)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    overrides = {k: v for k, v in {
        "served_model_name": args.served_model_name, "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
    }.items() if v is not None}
    profile = replace(profile, **overrides)
    if args.replicas < 1:
        raise UsageError("--replicas must be at least 1")
    if not 0 < args.port < 65536 or args.port + args.replicas - 1 > 65535:
        raise UsageError(f"--port {args.port} with {args.replicas} replicas leaves the port range")
    faults = Faults(http_500=args.fault_http_500, http_429=args.fault_http_429, drop=args.fault_drop,
                    stall=args.fault_stall, stall_seconds=args.stall_seconds,
                    slow_headers=args.fault_slow_headers,
                    slow_headers_seconds=args.slow_headers_seconds, malformed=args.fault_malformed)
    for name in ("http_500", "http_429", "drop", "stall", "slow_headers", "malformed"):
        v = getattr(faults, name)
        if not 0.0 <= v <= 1.0:
            raise UsageError(f"--fault-{name.replace('_', '-')} is a probability; give 0..1, not {v}")
    if args.layout:
        profiles = [with_options(p, engine=args.engine, kv_cache_dtype=args.kv_cache_dtype)
                    for p in _layout_profiles(args)]
    else:
        profiles = [profile] * args.replicas
    return profile, [Replica(p, args.port + i, host=args.host, faults=faults,
                             truth_log=args.truth_log, seed=args.seed + i,
                             slowdown_per_hour=args.slowdown_per_hour,
                             kv_capacity_tokens=args.kv_cache_tokens)
                     for i, p in enumerate(profiles)]


def _layout_profiles(args: argparse.Namespace) -> list:
    from servers.launcher.errors import LayoutError
    from servers.launcher.layouts import load_layout
    from servers.simulator.gpus import GPUS
    from servers.simulator.layout import replicas_for_layout

    if args.gpu not in GPUS:
        raise UsageError(f"--gpu {args.gpu!r} is not one of {', '.join(GPUS)}")
    if not args.out:
        raise UsageError("--layout needs --out DIR (where endpoints.json is written)")
    try:
        replicas = replicas_for_layout(load_layout(args.layout), args.gpu, args.gpus)
    except (LayoutError, ValueError) as e:
        raise UsageError(str(e)) from None
    args.layout_replicas = replicas
    return [r.profile for r in replicas]


def _write_endpoints(args: argparse.Namespace) -> None:
    import os

    from servers.launcher.endpoints import Endpoint, write_endpoints

    eps = [Endpoint(name=r.name, role=r.role, url=f"http://{args.host}:{args.port + i}",
                    model=r.profile.served_model_name, gpus=r.gpus, port=args.port + i,
                    pid=os.getpid(), precision=r.profile.deployment.precision.name,
                    tensor_parallel_size=r.profile.deployment.tp)
           for i, r in enumerate(args.layout_replicas)]
    os.makedirs(args.out, exist_ok=True)
    path = write_endpoints(os.path.join(args.out, "endpoints.json"), eps, layout=args.layout,
                           layout_source="simulator", extra={"simulated_gpu": args.gpu})
    args.endpoints_written = path
    print(f"harness sim: {len(eps)} replicas of layout {args.layout}; endpoint list {path}", flush=True)


def _remove_endpoints(args: argparse.Namespace) -> None:
    """On exit: the endpoint list goes with the replicas it names (a later `harness load
    --endpoints` would get only connect errors). Left alone if another process has since
    written its own there."""
    import json
    import os

    path = getattr(args, "endpoints_written", None)
    if not path:
        return
    try:
        with open(path) as f:
            ours = json.load(f).get("launcher_pid") == os.getpid()
        if ours:
            os.remove(path)
    except (OSError, ValueError, AttributeError):
        pass


def run(args: argparse.Namespace) -> int:
    if args.list_profiles:
        from servers.simulator.profiles import all_profiles
        for name in sorted(all_profiles()):
            print(name)
        return 0
    if args.ray:
        return run_ray(args)
    if args.dry_run:
        raise UsageError("--dry-run goes with --ray (harness sim without it starts at once)")
    args.host = args.host or "127.0.0.1"
    from servers.simulator.server import serve

    profile, replicas = build_replicas(args)
    # The standard asyncio loop on purpose, not uvloop: uvloop queues a small transport.write
    # until the end of the loop iteration (MagicStack/uvloop#619, #631), so a step's events
    # left later than the truth log said and all at once; asyncio sends inside write().

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # (a clean exit: see _remove_endpoints)
            loop.add_signal_handler(sig, stop.set)
        ready = asyncio.Event()
        task = asyncio.ensure_future(serve(replicas, ready, stop))
        done, _ = await asyncio.wait({task, asyncio.ensure_future(ready.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises the bind error
        if args.layout:
            _write_endpoints(args)
            return await task
        ports = ", ".join(str(r.port) for r in replicas)
        print(f"harness sim: {profile.name} serving {profile.served_model_name!r} on "
              f"http://{args.host}:{ports}", flush=True)
        await task

    try:
        asyncio.run(main())
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port in use ({e.strerror}) in {args.port}..{args.port + args.replicas - 1} "
                             f"on {args.host}; pick free ports with --port") from None
        raise
    finally:
        _remove_endpoints(args)
    return 0


def run_ray(args: argparse.Namespace) -> int:
    """``--layout L --ray ADDRESS``: the layout's replicas as ``harness sim`` processes on the Ray
    cluster's nodes, placed, started, watched and stopped exactly as ``harness serve --ray`` does
    with vLLM (so the multi-host path runs without GPUs)."""
    import sys

    from harness.commands.serve import run_on_ray
    from servers.cluster.plan import sim_builder
    from servers.launcher.errors import LayoutError
    from servers.launcher.layouts import load_layout
    from servers.simulator.gpus import GPUS

    if not args.layout:
        raise UsageError("--ray serves a layout: give --layout single|tp2|mixed12|FILE")
    if args.gpu not in GPUS:
        raise UsageError(f"--gpu {args.gpu!r} is not one of {', '.join(GPUS)}")
    try:
        layout = load_layout(args.layout)
    except LayoutError as exc:
        raise UsageError(str(exc)) from None
    args.base_port = args.port
    return run_on_ray(args, layout, python=sys.executable, kind="sim", prog="harness sim",
                      argv_for=sim_builder(args.gpu, engine=args.engine,
                                           kv_cache_dtype=args.kv_cache_dtype, seed=args.seed))
