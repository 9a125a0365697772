"""The node agent: one small Ray actor per node that reads the node's topology and runs its servers.

It holds the node's GPUs in Ray's books (the driver creates it with ``num_gpus`` = the node's
GPUs), so no other Ray work is scheduled onto GPUs the layout uses. The servers themselves are
ordinary processes started by :class:`servers.launcher.lifecycle.ServerGroup`, exactly as on one
host: each in its own session with its own ``CUDA_VISIBLE_DEVICES``, port and log, waited on
until ``/health`` answers, stopped by process group, with ``PR_SET_PDEATHSIG`` so that when the
actor goes (its driver died and Ray killed it, or ``ray.kill``), its servers go too.

This module imports no Ray at import time; the driver wraps :class:`NodeAgent` with
``ray.remote`` (:mod:`servers.cluster.ray_session`). Methods return plain data, never raise for
what the driver must report (a failed start comes back as a dict), because Ray's re-raised
exceptions lose the launcher's own types.

Topology, first found wins: ``$HARNESS_TOPOLOGY_FILE`` in the node's environment (a path on
that node to a recorded ``nvidia-smi topo -m`` text, set where the node's ``ray start`` runs:
``HARNESS_TOPOLOGY_FILE=/etc/topo.txt ray start --address HEAD:6379``; Ray's workers inherit
the raylet's environment), then NVML / ``nvidia-smi topo -m`` as :func:`servers.topology.detect`
reads them on one host. (Not a Ray node label: label values cannot hold a path's slashes.)
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from servers.launcher.lifecycle import ProcessSpec, ServerGroup
from servers.launcher.placement import pinnable

TOPOLOGY_ENV = "HARNESS_TOPOLOGY_FILE"
CONCURRENCY = 4      # start, poll, stop (and info) may run at once
LOG_CHUNK = 1 << 20   # at most this many bytes of one log per poll go back to the driver


def read_topology(environ: Mapping[str, str] | None = None) -> tuple[Any, str]:
    """``(Topology | None, source)`` of this node: a recorded text named by the node's
    environment, else what NVML / nvidia-smi say."""
    from servers import topology

    environ = os.environ if environ is None else environ
    path = environ.get(TOPOLOGY_ENV)
    if path:
        with open(path) as f:
            return topology.parse_topo_matrix(f.read()), os.path.basename(path)
    topo = topology.detect()
    return topo, (topo.source if topo is not None else "")


class NodeAgent:
    """Runs on one node; created by the driver, one per node, owned by (and dying with) it.

    Created with ``max_concurrency`` > 1 (:data:`CONCURRENCY`) so that ``stop`` runs while
    ``start`` still waits for /health: a driver stopped during a long vLLM start-up stops the
    servers at once instead of queueing behind the start."""

    def __init__(self, health_timeout: float = 900.0, stop_timeout: float = 30.0) -> None:
        self.health_timeout = health_timeout
        self.stop_timeout = stop_timeout
        self.group: ServerGroup | None = None
        self.log_dir = tempfile.mkdtemp(prefix="harness-ray-logs-")

    def info(self) -> dict[str, Any]:
        """What placement needs to know about this node."""
        import ray

        ctx = ray.get_runtime_context()
        try:
            topo, source = read_topology()
            error = ""
        except (OSError, ValueError) as exc:
            topo, source, error = None, "", f"cannot read this node's topology: {exc}"
        gpus = sorted(int(g) for g in ray.get_gpu_ids())
        return {
            "node_id": ctx.get_node_id(),
            "address": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "gpus": gpus,
            "topology": topo.to_dict() if topo is not None else None,
            "topology_source": source,
            "error": error,
            "pid": os.getpid(),
        }

    def start(self, specs: Sequence[ProcessSpec]) -> dict[str, Any]:
        """Start this node's servers and wait until each answers /health.

        ``{"ok": True, "pids": {name: pid}}``, or ``{"ok": False, "error": one message with the
        log tail, "name": server}`` after every server here was stopped again."""
        from servers.launcher.errors import LauncherError, LayoutError

        local = [replace(s, log_path=os.path.join(self.log_dir, os.path.basename(s.log_path)),
                         cpus=tuple(pinnable(s.cpus))) for s in specs]
        self.group = ServerGroup(local, health_timeout=self.health_timeout,
                                 stop_timeout=self.stop_timeout, handle_signals=False)
        try:
            self.group.start()
        except LauncherError as exc:
            self.group.stop()
            return {"ok": False, "error": str(exc), "name": getattr(exc, "name", ""),
                    "usage": isinstance(exc, LayoutError)}   # e.g. a port taken on this node
        return {"ok": True, "pids": {s.name: s.pid for s in self.group.servers}}

    def poll(self, offsets: dict[str, int]) -> dict[str, Any]:
        """Servers that exited (name, pid, code, log tail) and each log's bytes past ``offsets``."""
        dead: list[dict[str, Any]] = []
        logs: dict[str, bytes] = {}
        if self.group is None:
            return {"dead": dead, "logs": logs}
        for srv in self.group.servers:
            code = srv.exited()
            if code is not None and not self.group._stopping:
                dead.append({"name": srv.name, "pid": srv.pid, "code": code,
                             "tail": srv.log_tail()})
            logs[srv.name] = _read_from(srv.spec.log_path, offsets.get(srv.name, 0))
        return {"dead": dead, "logs": logs}

    def stop(self) -> list[str]:
        """Stop every server here (SIGTERM to each group, SIGKILL after the stop timeout)."""
        return self.group.stop() if self.group is not None else []

    def pids(self) -> list[int]:
        return self.group.all_pids() if self.group is not None else []

    def cleanup(self) -> None:
        shutil.rmtree(self.log_dir, ignore_errors=True)


def _read_from(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(LOG_CHUNK)
    except OSError:
        return b""
