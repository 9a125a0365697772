"""The driver's connection to a Ray cluster and its node agents.

:func:`connect` joins an existing cluster (``auto``, ``HOST:PORT`` of the head's GCS, or
``ray://HOST:10001`` through Ray Client); it never starts one. :meth:`RaySession.probe` puts one
:class:`servers.cluster.agent.NodeAgent` on every alive node that has GPUs (or on every node, for
a CPU layout), each holding that node's GPUs, and returns the nodes as the agents saw them.

The agents are ordinary (not detached) actors, so their owner is this driver: when it exits, by
any path including SIGKILL, Ray kills them, and each agent's servers follow (see the agent).

Ray is imported here only, inside :func:`connect`: single-host use never needs it.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

from servers.cluster.node_placement import Node
from servers.launcher.errors import LayoutError

EXTRA_HINT = "pip install '.[cluster]' (or pip install 'ray[client]') on this machine and every node"
AGENT_START_TIMEOUT_S = 120.0


def import_ray() -> Any:
    """The ``ray`` module, or a one-line :class:`LayoutError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise LayoutError(f"--ray needs Ray, which is not installed: {EXTRA_HINT}") from None
    return ray


def connect(address: str) -> RaySession:
    """Join the running Ray cluster at ``address``; one-line :class:`LayoutError` if it cannot."""
    ray = import_ray()
    if not address:
        raise LayoutError("--ray needs an address: auto, HOST:PORT (the head's GCS port, 6379 by "
                          "default) or ray://HOST:10001")
    if address.startswith("ray://"):
        _require_ray_client(address)
    target = _check_reachable(address)
    if _is_loopback(target):
        _keep_loopback(ray)
    try:
        ray.init(address=address if address.startswith("ray://") else target, logging_level=logging.ERROR, log_to_driver=False,
                 namespace="harness", configure_logging=True)
    except Exception as exc:  # ConnectionError, TimeoutError, grpc errors: all say "unreachable"
        raise _unreachable(address, (str(exc).strip().splitlines()
                                     or [type(exc).__name__])[0][:200]) from None
    return RaySession(ray, address)


def _require_ray_client(address: str) -> None:
    """A ``ray://`` address goes through Ray Client, which needs gRPC beside Ray (Ray's own
    ``client`` extra); without it ``ray.init`` fails with an import error that reads like an
    unreachable cluster."""
    try:
        importlib.import_module("grpc")
    except ImportError:
        raise LayoutError(f"--ray {address} goes through Ray Client, which is not installed: "
                          f"{EXTRA_HINT}") from None


def _unreachable(address: str, why: str) -> LayoutError:
    return LayoutError(
        f"cannot reach the Ray cluster at {address} ({why}): start the head with "
        "`ray start --head` and pass its address (HOST:6379, or ray://HOST:10001)")


def _is_loopback(target: str) -> bool:
    host = target.removeprefix("ray://").rpartition(":")[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _keep_loopback(ray: Any) -> None:
    """A head on a loopback address (``ray start --head --node-ip-address 127.0.0.1``: a cluster
    of one machine, as the tests run) is joined there: Ray would otherwise rewrite 127.0.0.1 to
    this machine's network address, where such a head does not listen, and retry for minutes."""
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False   # get_node_ip_address() then answers loopback
    except (ImportError, AttributeError):
        pass


def _check_reachable(address: str, timeout: float = 5.0) -> str:
    """A TCP connect to the head first: ``ray.init`` waits minutes on an address nobody answers.
    Returns the ``HOST:PORT`` it reached."""
    import socket

    target = address
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment

            target = get_ray_address_from_environment("auto", None) or ""  # as written: no rewrite
        except Exception as exc:
            raise _unreachable(address, str(exc).splitlines()[0][:200] if str(exc)
                               else type(exc).__name__) from None
        if not target or target == "auto":
            raise _unreachable(address, "no running Ray instance found here")
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise LayoutError(f"--ray {address}: give auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise _unreachable(address, f"{host}:{port}: {exc.strerror or exc}") from None
    return target


class RaySession:
    def __init__(self, ray: Any, address: str) -> None:
        self.ray = ray
        self.address = address
        self.agents: dict[str, Any] = {}     # node id -> actor handle
        self.nodes: list[Node] = []

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def probe(self, *, need_gpus: bool, health_timeout: float = 900.0,
              stop_timeout: float = 30.0) -> list[Node]:
        """One agent per node (holding its GPUs); the nodes as the agents report them."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from servers.cluster.agent import CONCURRENCY, NodeAgent
        from servers.topology import Topology

        raw = self.alive_nodes()
        candidates = [n for n in raw if int(n.get("Resources", {}).get("GPU", 0)) > 0] \
            if need_gpus else raw
        if not candidates:
            cpus = ", ".join(f"{n.get('NodeManagerAddress')}: 0 GPUs" for n in raw)
            raise LayoutError(f"the layout needs GPUs but no node of the Ray cluster at "
                              f"{self.address} has any ({cpus or 'no alive nodes'})")
        actor = self.ray.remote(NodeAgent)
        pending = {}
        for n in candidates:
            gpus = int(n.get("Resources", {}).get("GPU", 0))
            handle = actor.options(
                num_cpus=0, num_gpus=gpus, max_restarts=0, max_concurrency=CONCURRENCY,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(health_timeout=health_timeout, stop_timeout=stop_timeout)
            self.agents[n["NodeID"]] = handle
            pending[n["NodeID"]] = (n, handle.info.remote())
        nodes = []
        for node_id, (n, ref) in pending.items():
            try:
                info = self.ray.get(ref, timeout=AGENT_START_TIMEOUT_S)
            except Exception as exc:  # GetTimeoutError: its GPUs are held by other Ray work
                self.close()
                gpus = int(n.get("Resources", {}).get("GPU", 0))
                raise LayoutError(
                    f"no agent could start on node {n.get('NodeManagerAddress')} "
                    f"({node_id[:8]}) within {AGENT_START_TIMEOUT_S:g} s: are its {gpus} GPUs "
                    f"held by other Ray work? ({type(exc).__name__})") from None
            if info["error"]:
                self.close()
                raise LayoutError(f"node {info['address']} ({node_id[:8]}): {info['error']}")
            topo = Topology.from_dict(info["topology"]) if info["topology"] else None
            usable = tuple(g for g in info["gpus"] if topo is None or g in topo.gpus)
            nodes.append(Node(node_id=node_id, address=info["address"], gpus=usable, topology=topo,
                              topology_source=info["topology_source"], hostname=info["hostname"],
                              agent_pid=int(info["pid"])))
        self.nodes = nodes
        return nodes

    def release(self, keep: set[str]) -> None:
        """Kill the agents of nodes the placement left free (their GPUs go back to Ray)."""
        for node_id in list(self.agents):
            if node_id not in keep:
                self.ray.kill(self.agents.pop(node_id))

    def close(self) -> None:
        for handle in self.agents.values():
            try:
                self.ray.kill(handle)
            except Exception:
                pass
        self.agents.clear()
        try:
            self.ray.shutdown()
        except Exception:
            pass
