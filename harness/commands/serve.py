"""`harness serve`: launch vLLM servers on a GPU layout (or print the plan with --dry-run).

Starts one vLLM server per replica of the layout, each on its own GPUs, port and log file,
waits until every one answers /health, writes ``endpoints.json`` (for ``harness load`` and the
plan stages) into ``--out``, and keeps them running until Ctrl-C or SIGTERM; then, or when any
server dies, or on any error, stops them all. Exit codes: 0 after a clean stop on request,
1 when a server failed to start or died, 2 on bad input, 128+N on signal N.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from harness.errors import UsageError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="launch vLLM servers on a GPU layout (single, tp2, mixed12, cpu, FILE.yaml)",
        description=(
            "Launch vLLM servers on a layout: single (one Llama-3-8B per GPU), tp2 (Llama-3-70B "
            "AWQ on TP=2 pairs sharing a PCIe switch), mixed12 (4 x 8B + 4 x TP=2 70B), cpu (a "
            "local model on vLLM's CPU build), or a YAML layout file (see plans/layouts/). "
            "Writes OUT/endpoints.json for the load stage and stops every server on exit."
        ),
    )
    p.add_argument("--layout", required=True, metavar="NAME|FILE",
                   help="single, tp2, mixed12, cpu, or a layout YAML file")
    p.add_argument("--dry-run", action="store_true",
                   help="print the GPU assignment, ports and exact commands; start nothing")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run: print the plan as JSON")
    p.add_argument("--model", action="append", metavar="[ROLE=]MODEL",
                   help="serve MODEL (hub id or local folder) for every role, or for ROLE "
                        "(repeatable); the cpu layout needs one")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for endpoints.json and logs/ (default: runs/serve-TIMESTAMP)")
    p.add_argument("--gpus", default=None, metavar="LIST",
                   help="use only these GPUs, e.g. 0-3 or 0,2 (default: all visible)")
    p.add_argument("--topology", default=None, metavar="FILE",
                   help="plan on this `nvidia-smi topo -m` text instead of this machine's GPUs "
                        "(for --dry-run on another machine)")
    p.add_argument("--base-port", type=int, default=None, metavar="P",
                   help="first server's port; the rest follow (default: the layout's, 8000)")
    p.add_argument("--host", default=None,
                   help="address servers listen on (default: the layout's, 127.0.0.1)")
    p.add_argument("--allow-cross-switch", action="store_true",
                   help="run TP groups whose GPUs share no PCIe switch/NVLink, with a warning "
                        "(default: refuse: same PCIe switch required)")
    p.add_argument("--vllm-python", default=None, metavar="PYTHON",
                   help="the Python that has vLLM (default: $HARNESS_VLLM_PYTHON, this Python, "
                        "or .venv-vllm/bin/python)")
    p.add_argument("--health-timeout", type=float, default=900.0, metavar="S",
                   help="seconds each server may take to answer /health (default: 900)")
    p.add_argument("--stop-timeout", type=float, default=30.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL when stopping (default: 30)")
    add_ray_option(p)
    p.set_defaults(func=handle)
    return p


def add_ray_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="serve across the nodes of a running Ray cluster: auto, HOST:PORT (the "
                        "head's GCS port) or ray://HOST:10001; one agent per node runs that "
                        "node's servers, which listen on the node's address (or --host). Needs "
                        "the cluster extra: pip install '.[cluster]'")


def _topology(args: argparse.Namespace):
    from servers import topology

    if args.topology:
        try:
            with open(args.topology) as f:
                return topology.parse_topo_matrix(f.read())
        except OSError as exc:
            raise UsageError(f"--topology {args.topology}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"--topology {args.topology}: {exc}") from None
    return topology.detect()


def handle(args: argparse.Namespace) -> int:
    from harness.parsing import parse_gpus
    from servers.launcher import (
        LayoutError, find_vllm_python, launch, load_layout,
        make_plan, parse_model_overrides,
    )
    from servers.launcher.plan import dry_run_notes

    if args.json and not args.dry_run:
        raise UsageError("--json goes with --dry-run")
    if args.topology and not args.dry_run:
        raise UsageError("--topology plans for another machine: use it with --dry-run")
    if args.base_port is not None and not 1 <= args.base_port <= 65535:
        raise UsageError(f"--base-port {args.base_port} is not a TCP port")
    if args.ray:
        if args.topology or args.gpus:
            raise UsageError(f"{'--topology' if args.topology else '--gpus'} is for one host: with "
                             "--ray each node's agent reads its topology and holds its GPUs")
        try:
            layout = load_layout(args.layout, parse_model_overrides(args.model))
        except LayoutError as exc:
            raise UsageError(str(exc)) from None
        return run_on_ray(args, layout, python=find_vllm_python(args.vllm_python), kind="vllm")
    try:
        layout = load_layout(args.layout, parse_model_overrides(args.model))
        topo = _topology(args) if layout.needs_gpus else None
        plan = make_plan(
            layout, topo, gpus=parse_gpus(args.gpus),
            python=find_vllm_python(args.vllm_python), base_port=args.base_port,
            host=args.host, allow_cross_switch=True if args.allow_cross_switch else None,
        )
    except LayoutError as exc:
        raise UsageError(str(exc)) from None

    if args.dry_run:
        plan.warnings += dry_run_notes(plan)
        print(plan.to_json() if args.json else plan.render())
        return 0

    for w in plan.warnings:
        print(w, file=sys.stderr)
    out = args.out or os.path.join("runs", time.strftime("serve-%Y%m%d-%H%M%S"))

    def progress(msg: str) -> None:
        print(f"harness serve: {msg}", file=sys.stderr, flush=True)

    cluster = launch(plan, out, health_timeout=args.health_timeout,
                     stop_timeout=args.stop_timeout, on_progress=progress)
    return serve_until_stopped(
        cluster, progress, prog="harness serve",
        ready=lambda: f"{len(cluster.endpoints)} server(s) ready; endpoint list: {cluster.endpoints_path}",
        where=lambda e: "", everywhere="", stopped="every server was stopped")


def serve_until_stopped(cluster: Any, progress: Callable[[str], None], *, prog: str,
                        ready: Callable[[], str],
                        where: Callable[[Any], str], everywhere: str, stopped: str) -> int:
    """Print the endpoints of a started ``cluster`` (one host's or a Ray cluster's), serve until
    Ctrl-C, SIGTERM or a death, and say what the stop did: the exit codes and the lines users of
    both ``harness serve`` forms read are the same."""
    from servers.launcher import LayoutError, ServerDiedError, ServerStartError

    try:
        with cluster:
            progress(ready())
            for e in cluster.endpoints:
                print(f"{e.name}\t{e.url}\t{e.model}\t{where(e)}"
                      f"GPUs {','.join(map(str, e.gpus)) or 'cpu'}\tpid {e.pid}", flush=True)
            progress(f"serving; Ctrl-C or SIGTERM stops every server{everywhere}")
            try:
                cluster.wait()
            except KeyboardInterrupt:
                progress("interrupted: stopping every server")
                return 0
    except LayoutError as exc:
        raise UsageError(str(exc)) from None
    except (ServerStartError, ServerDiedError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        print(f"{prog}: {stopped}", file=sys.stderr)
        return 1
    finally:
        for line in getattr(cluster, "stop_report", None) or []:
            progress(line)
    return 0


def run_on_ray(args: argparse.Namespace, layout: Any, *, python: str, kind: str,
               argv_for: Any = None, prog: str = "harness serve") -> int:
    """``--ray``: place ``layout`` on the cluster's nodes and serve it until Ctrl-C/SIGTERM or a
    death (exit codes as without --ray). Shared by ``harness serve`` and ``harness sim``."""
    from servers.cluster.launch import RayCluster, plan_on_ray
    from servers.cluster.plan import vllm_builder
    from servers.launcher import LayoutError

    if getattr(args, "json", False) and not args.dry_run:
        raise UsageError("--json goes with --dry-run")
    if args.base_port is not None and not 1 <= args.base_port <= 65535:
        raise UsageError(f"--base-port {args.base_port} is not a TCP port")
    try:
        session, plan = plan_on_ray(
            layout, args.ray, python=python, argv_for=argv_for or vllm_builder, kind=kind,
            base_port=args.base_port, host=args.host,
            allow_cross_switch=True if getattr(args, "allow_cross_switch", False) else None,
            health_timeout=args.health_timeout, stop_timeout=args.stop_timeout)
    except LayoutError as exc:
        raise UsageError(str(exc)) from None
    if args.dry_run:
        session.close()
        print(plan.to_json() if getattr(args, "json", False) else plan.render())
        return 0

    def progress(msg: str) -> None:
        print(f"{prog}: {msg}", file=sys.stderr, flush=True)

    progress(f"placement: {plan.placement.strategy}")
    for w in plan.warnings:
        print(w, file=sys.stderr)
    out = args.out or os.path.join("runs", time.strftime("serve-%Y%m%d-%H%M%S"))
    cluster = RayCluster(plan, session, out, health_timeout=args.health_timeout,
                         stop_timeout=args.stop_timeout, on_progress=progress)
    return serve_until_stopped(
        cluster, progress, prog=prog,
        ready=lambda: (f"{len(cluster.endpoints)} server(s) ready on {len(plan.placement.used_nodes)} "
               f"node(s); endpoint list: {cluster.endpoints_path}"),
        where=lambda e: f"node {e.node}\t", everywhere=" on every node",
        stopped=f"every server on every node was stopped; logs in {cluster.log_dir}")
