"""Where a load stage sends its traffic: the ``target:`` of a serving, cluster or soak stage.

One of::

    target: {url: http://10.0.0.5:8000, model: llama-3-8b}          # a server already running
    target: {endpoints: runs/serve/endpoints.json}                  # `harness serve`'s list
    target: {simulator: l40s-llama-3-8b-bf16, replicas: 12}         # simulator replicas
    target: {simulator: [{profile: l40s-llama-3-8b-bf16, replicas: 4, role: small},
                         {profile: l40s-llama-3-70b-awq-tp2, replicas: 4, role: large}]}
    target: {layout: single, gpus: "0", models: {small: DIR}, python: .venv-vllm/bin/python}
                                                                    # launched here, stopped after
    target: {layout: mixed12, ray: auto}                            # launched across a Ray
                                                                    # cluster's nodes (vLLM)
    target: {layout: mixed12, ray: HOST:6379, sim_gpu: l40s}        # the same, simulated replicas

Simulator replicas and launched layouts live only for the stage: started before the load,
every process stopped after it (by its own PID / process group). Each target endpoint carries
what the physics check needs where it is known (a simulator profile, an endpoint's precision
with a ``physics:`` given in the stage).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from harness.ports import free_port_block

KEYS = {"url", "model", "endpoints", "simulator", "replicas", "sim_args", "layout", "models",
        "gpus", "python", "health_timeout", "role", "ray", "sim_gpu"}


@dataclass
class TargetEndpoint:
    name: str
    role: str
    url: str
    model: str = ""
    profile: str | None = None          # simulator profile: the physics of this endpoint
    gpus: list[int] = field(default_factory=list)
    tensor_parallel_size: int = 1


def sampled_gpus(endpoints: list[TargetEndpoint]) -> list[int] | None:
    """Which GPUs to sample power on while loading ``endpoints``: none for simulated replicas,
    the endpoints' own where the launcher says, else every GPU (a remote URL: None)."""
    if any(e.profile for e in endpoints):
        return []
    used = sorted({g for e in endpoints for g in e.gpus})
    return used or None


def validate(spec: dict[str, Any]) -> None:
    """Raise ValueError('target.KEY: problem')."""
    for k in spec:
        if k not in KEYS:
            raise ValueError(f"target.{k}: unknown; known: {', '.join(sorted(KEYS))}")
    kinds = [k for k in ("url", "endpoints", "simulator", "layout") if spec.get(k)]
    if len(kinds) != 1:
        raise ValueError("target: give exactly one of url, endpoints, simulator, layout"
                         + (f" (got {', '.join(kinds)})" if kinds else ""))
    if spec.get("url") and not str(spec["url"]).startswith("http://"):
        raise ValueError(f"target.url: {spec['url']!r} must be http://HOST:PORT")
    sim = spec.get("simulator")
    if sim is not None and not isinstance(sim, (str, list)):
        raise ValueError("target.simulator: a profile name or a list of {profile, replicas, role}")
    if isinstance(sim, list):
        for i, g in enumerate(sim):
            if not isinstance(g, dict) or not g.get("profile"):
                raise ValueError(f"target.simulator[{i}]: needs profile:")
    if sim is not None:
        from servers.simulator.profiles import all_profiles

        names = [sim] if isinstance(sim, str) else [g["profile"] for g in sim]
        profiles = all_profiles()
        for n in names:
            if n not in profiles:
                raise ValueError(f"target.simulator: unknown profile {n!r} (see `harness sim --list-profiles`)")
    if spec.get("layout"):
        from servers.launcher import LayoutError, layout_from_dict, load_layout
        from servers.launcher.layouts import apply_models, validate as validate_layout

        lay = spec["layout"]
        models = {str(k): str(v) for k, v in (spec.get("models") or {}).items()}
        try:
            if isinstance(lay, dict):
                layout = layout_from_dict(lay, source="plan")
                validate_layout(apply_models(layout, models) if models else layout)
            elif not isinstance(lay, str):
                raise LayoutError("a built-in name (single, tp2, mixed12, cpu), a YAML file or a mapping")
            elif lay.endswith((".yaml", ".yml")) and not os.path.exists(lay):
                pass  # a file on the machine that runs the plan; checked when the stage starts
            else:
                load_layout(lay, models or None)
        except LayoutError as exc:
            raise ValueError(f"target.layout: {exc}") from None
    if spec.get("ray") is not None or spec.get("sim_gpu") is not None:
        _validate_ray(spec)
    r = spec.get("replicas")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        raise ValueError(f"target.replicas: a positive integer, got {r!r}")


def _validate_ray(spec: dict[str, Any]) -> None:
    """``ray:`` serves ``layout:`` across a Ray cluster (harness serve --ray); ``sim_gpu:`` makes
    its replicas simulated ones of that GPU (harness sim --ray)."""
    if not spec.get("layout"):
        raise ValueError("target.ray: goes with target.layout (the layout served across the "
                         "cluster's nodes)")
    ray = spec.get("ray")
    if not isinstance(ray, str) or not ray:
        raise ValueError(f"target.ray: auto, HOST:PORT or ray://HOST:PORT, got {ray!r}")
    if spec.get("gpus") is not None:
        raise ValueError("target.gpus: is for one host; with target.ray each node's agent holds "
                         "that node's GPUs")
    gpu = spec.get("sim_gpu")
    if gpu is not None:
        from servers.simulator.gpus import GPUS

        if gpu not in GPUS:
            raise ValueError(f"target.sim_gpu: {gpu!r} is not one of {', '.join(GPUS)}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def _simulators(spec: dict[str, Any], out_dir: Path, log: Callable[[str], None]) -> Iterator[list[TargetEndpoint]]:
    from servers.simulator.profiles import get_profile

    sim = spec["simulator"]
    groups = ([{"profile": sim, "replicas": spec.get("replicas") or 1, "role": spec.get("role")}]
              if isinstance(sim, str) else sim)
    procs: list[subprocess.Popen] = []
    endpoints: list[TargetEndpoint] = []
    logs_dir = out_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    try:
        for gi, g in enumerate(groups):
            n = int(g.get("replicas") or 1)
            profile = get_profile(g["profile"])
            role = str(g.get("role") or (g["profile"] if len(groups) > 1 else "sim"))
            base = free_port_block(n)
            args = [sys.executable, "-m", "harness.cli", "sim", "--profile", g["profile"],
                    "--replicas", str(n), "--port", str(base),
                    *[str(a) for a in (g.get("sim_args") or spec.get("sim_args") or [])]]
            logf = open(logs_dir / f"sim-{gi}-{role}.log", "wb")
            proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
            logf.close()
            procs.append(proc)
            for k in range(n):
                endpoints.append(TargetEndpoint(
                    name=f"{role}-{k}", role=role, url=f"http://127.0.0.1:{base + k}",
                    model=profile.served_model_name, profile=g["profile"],
                    tensor_parallel_size=profile.deployment.tp))
            log(f"simulator: {n} x {g['profile']} on ports {base}-{base + n - 1}")
        deadline = time.monotonic() + float(spec.get("health_timeout") or 60)
        pending = list(endpoints)
        while pending:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"the simulator exited with {proc.returncode}; see {logs_dir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"simulator replicas {', '.join(e.url for e in pending)} did not "
                                   f"answer /health in time")
            if healthy(pending[0].url):
                pending.pop(0)
            else:
                time.sleep(0.05)
        yield endpoints
    finally:
        for proc in procs:
            _stop(proc)


@contextlib.contextmanager
def _layout(spec: dict[str, Any], out_dir: Path, log: Callable[[str], None]) -> Iterator[list[TargetEndpoint]]:
    from harness.parsing import parse_gpus
    from servers import topology
    from servers.launcher import find_vllm_python, launch, layout_from_dict, load_layout, make_plan
    from servers.launcher.layouts import apply_models, validate as validate_layout

    lay = spec["layout"]
    models = {str(k): str(v) for k, v in (spec.get("models") or {}).items()}
    if isinstance(lay, dict):
        layout = layout_from_dict(lay, source="plan")
        if models:
            layout = apply_models(layout, models)
        validate_layout(layout)
    else:
        layout = load_layout(str(lay), models or None)
    from harness.stages.base import StageSkipped
    from servers.launcher import LayoutError
    from servers.launcher.plan import check_model, check_vllm

    if spec.get("ray"):
        with _layout_on_ray(spec, layout, out_dir, log) as eps:
            yield eps
        return

    topo = topology.detect() if layout.needs_gpus else None
    if layout.needs_gpus and topo is None:
        raise StageSkipped(f"layout {layout.name} needs GPUs and this machine shows none")
    python = find_vllm_python(spec.get("python"))
    try:  # what this machine lacks makes the stage skipped, not failed
        check_vllm(python)
        for server in layout.servers:
            check_model(server)
    except LayoutError as exc:
        raise StageSkipped(str(exc)) from None
    gpus = spec.get("gpus")
    plan = make_plan(layout, topo, gpus=parse_gpus(str(gpus)) if gpus is not None else None,
                     python=python, base_port=None if layout.needs_gpus else free_port_block(32))
    log(f"launching layout {layout.name}: {len(plan.servers)} server(s)")
    with launch(plan, str(out_dir / "serve"), health_timeout=float(spec.get("health_timeout") or 900),
                handle_signals=False, on_progress=lambda m: log(f"serve: {m}")) as cluster:
        yield [TargetEndpoint(name=e.name, role=e.role, url=e.url, model=e.model, gpus=list(e.gpus),
                              tensor_parallel_size=e.tensor_parallel_size) for e in cluster.endpoints]


@contextlib.contextmanager
def _layout_on_ray(spec: dict[str, Any], layout: Any, out_dir: Path,
                   log: Callable[[str], None]) -> Iterator[list[TargetEndpoint]]:
    """``target: {layout: L, ray: ADDRESS}``: the layout on the cluster's nodes for the stage,
    as ``harness serve --ray`` (or, with ``sim_gpu:``, ``harness sim --ray``) serves it; every
    server on every node stopped after. The cluster must be reachable: an unreachable one fails
    the stage (with its one line) rather than skipping it, since the plan named it."""
    from servers.cluster.launch import RayCluster, plan_on_ray
    from servers.cluster.plan import sim_builder, vllm_builder
    from servers.launcher import find_vllm_python

    gpu = spec.get("sim_gpu")
    if gpu:
        argv_for, python, kind = sim_builder(str(gpu)), sys.executable, "sim"
    else:
        argv_for, python, kind = vllm_builder, find_vllm_python(spec.get("python")), "vllm"
    health = float(spec.get("health_timeout") or (120 if gpu else 900))
    session, plan = plan_on_ray(layout, str(spec["ray"]), python=python, argv_for=argv_for,
                                kind=kind, base_port=free_port_block(64),  # free here; a
                                # port taken on another node fails its start with the log
                                health_timeout=health)
    log(f"launching layout {layout.name} on {len(plan.placement.used_nodes)} Ray node(s) at "
        f"{spec['ray']}: {len(plan.servers)} {'simulated ' if gpu else ''}server(s); placement: "
        f"{plan.placement.strategy}")
    profiles = {}
    if gpu:
        from servers.simulator.layout import profile_for

        profiles = {s.name: profile_for(s.server.spec, str(gpu)).name for s in plan.servers}
    with RayCluster(plan, session, str(out_dir / "serve"), health_timeout=health,
                    handle_signals=False, on_progress=lambda m: log(f"serve: {m}")) as cluster:
        yield [TargetEndpoint(name=e.name, role=e.role, url=e.url, model=e.model,
                              profile=profiles.get(e.name),
                              tensor_parallel_size=e.tensor_parallel_size)
               for e in cluster.endpoints]


@contextlib.contextmanager
def open_targets(spec: dict[str, Any], out_dir: Path,
                 log: Callable[[str], None] = print) -> Iterator[list[TargetEndpoint]]:
    """The endpoints to load, alive for the ``with`` block."""
    if spec.get("url"):
        yield [TargetEndpoint(name=str(spec.get("role") or "server"), role=str(spec.get("role") or "server"),
                              url=str(spec["url"]).rstrip("/"), model=str(spec.get("model") or ""))]
    elif spec.get("endpoints"):
        from servers.launcher import read_endpoints

        eps = read_endpoints(str(spec["endpoints"]))
        yield [TargetEndpoint(name=e.name, role=e.role, url=e.url, model=e.model, gpus=list(e.gpus),
                              tensor_parallel_size=e.tensor_parallel_size) for e in eps.endpoints]
    elif spec.get("simulator"):
        with _simulators(spec, out_dir, log) as eps:
            yield eps
    else:
        with _layout(spec, out_dir, log) as eps:
            yield eps
