"""A launch plan across nodes: every replica with its node, GPUs there, port and exact command.

Built from a :class:`servers.cluster.node_placement.NodePlacement` with the one-host plan's own
pieces (:class:`servers.launcher.plan.ServerPlan`, :func:`servers.launcher.command.vllm_argv`,
:func:`servers.launcher.command.server_env`), so a replica's command on a node is the command
``harness serve`` would run for it on one host. Ports are ``base_port + k`` across the whole
cluster, not per node: nodes that share a host (a test cluster, several Ray nodes in containers of
one machine) then never collide, and a replica's port names it.

Each server listens on its node's address (what Ray reports the node as: the address the head
and the other nodes reach it by), or on ``--host`` where given; endpoints.json lists that address.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from servers.cluster.node_placement import Node, NodePlacement, place_on_nodes
from servers.launcher.command import is_local_model, server_env, vllm_argv
from servers.launcher.endpoints import Endpoint
from servers.launcher.errors import LayoutError
from servers.launcher.layouts import Layout, ServerSpec
from servers.launcher.lifecycle import ProcessSpec
from servers.launcher.plan import ServerPlan

# (spec, python, host, port, index) -> argv
ArgvBuilder = Callable[[ServerSpec, str, str, int, int], list[str]]


def vllm_builder(spec: ServerSpec, python: str, host: str, port: int, index: int) -> list[str]:
    return vllm_argv(spec, python=python, host=host, port=port)


def sim_builder(gpu: str, engine: str | None = None, kv_cache_dtype: str | None = None,
                seed: int = 0) -> ArgvBuilder:
    """Simulated replicas: ``harness sim`` serving the role's model, precision and TP on ``gpu``."""
    from servers.simulator.layout import profile_for

    def build(spec: ServerSpec, python: str, host: str, port: int, index: int) -> list[str]:
        try:
            profile = profile_for(spec, gpu)
        except ValueError as exc:
            raise LayoutError(str(exc)) from None
        argv = [python, "-m", "harness.cli", "sim", "--profile", profile.name,
                "--served-model-name", profile.served_model_name,
                "--max-model-len", str(profile.max_model_len),
                "--host", host, "--port", str(port), "--seed", str(seed + index)]
        if engine:
            argv += ["--engine", engine]
        if kv_cache_dtype:
            argv += ["--kv-cache-dtype", kv_cache_dtype]
        return argv

    return build


@dataclass
class NodeServer:
    """One replica on one node."""

    node: Node
    server: ServerPlan

    @property
    def name(self) -> str:
        return self.server.name

    def process_spec(self, log_dir: str) -> ProcessSpec:
        """What the node's agent starts (CPU pinning is narrowed on the node itself)."""
        spec = self.server.process_spec(log_dir)
        spec.cpus = tuple(self.server.assignment.cpus)
        return spec

    def endpoint(self, pid: int | None = None, log: str = "") -> Endpoint:
        from dataclasses import replace

        return replace(self.server.endpoint(pid=pid, log=log), node=self.node.label)


@dataclass
class ClusterPlan:
    layout: Layout
    servers: list[NodeServer]
    placement: NodePlacement
    python: str
    address: str = ""                  # the Ray cluster's address as given
    kind: str = "vllm"                 # "vllm" or "sim"
    warnings: list[str] = field(default_factory=list)

    def by_node(self) -> list[tuple[Node, list[NodeServer]]]:
        out = []
        for n in self.placement.used_nodes:
            out.append((n, [s for s in self.servers if s.node.node_id == n.node_id]))
        return out

    def render(self) -> str:
        """The dry-run text: placement, the strategy chosen, and every command per node."""
        used = self.placement.used_nodes
        gpus = sum(len(s.server.assignment.gpus) for s in self.servers)
        total = sum(len(n.gpus) for n in self.placement.nodes)
        lines = [f"layout {self.layout.name} ({self.layout.source}): {len(self.servers)} "
                 f"{'simulated ' if self.kind == 'sim' else ''}server(s) on {gpus} of {total} "
                 f"GPUs, {len(used)} of {len(self.placement.nodes)} Ray node(s) at "
                 f"{self.address or 'this cluster'}",
                 f"placement: {self.placement.strategy}"]
        free = self.placement.free_nodes
        if free:
            lines.append("whole nodes left free: " + ", ".join(n.label for n in free))
        rows = [("server", "node", "model", "TP", "GPUs", "link", "url")]
        for s in self.servers:
            a = s.server.assignment
            rows.append((s.name, s.node.label, s.server.spec.served_model_name,
                         str(s.server.spec.tensor_parallel_size) if s.server.spec.device == "cuda"
                         else "-", ",".join(map(str, a.gpus)) or "cpu", a.link or "-",
                         s.server.url))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines.append("")
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for n, servers in self.by_node():
            topo = f"topology from {n.topology_source}" if n.topology_source else "no GPU topology"
            host = f" [{n.hostname}]" if n.hostname else ""
            lines += ["", f"node {n.label}{host}: {len(n.gpus)} GPU(s), {topo}; commands:"]
            for s in servers:
                lines.append(f"  # {s.name}")
                lines.append(f"  {s.server.command_line()}")
        if self.warnings:
            lines.append("")
            lines += self.warnings
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.name, "layout_source": self.layout.source,
            "ray_address": self.address, "kind": self.kind, "python": self.python,
            "placement": self.placement.strategy,
            "nodes": [node_dict(n, used=n in self.placement.used_nodes)
                      for n in self.placement.nodes],
            "warnings": list(self.warnings),
            "servers": [{**s.endpoint().to_dict(), "node_id": s.node.node_id, "argv": s.server.argv,
                         "env": s.server.env, "command": s.server.command_line()}
                        for s in self.servers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def node_dict(n: Node, used: bool) -> dict[str, Any]:
    return {"node_id": n.node_id, "address": n.address, "hostname": n.hostname,
            "gpus": list(n.gpus), "topology_source": n.topology_source, "used": used,
            "agent_pid": n.agent_pid}


def make_cluster_plan(layout: Layout, nodes: Sequence[Node], *, python: str,
                      base_port: int | None = None, host: str | None = None,
                      allow_cross_switch: bool | None = None, address: str = "",
                      argv_for: ArgvBuilder = vllm_builder, kind: str = "vllm") -> ClusterPlan:
    """Place ``layout`` on ``nodes`` and give every replica its port and command."""
    placement = place_on_nodes(layout, nodes, allow_cross_switch=allow_cross_switch)
    port = layout.base_port if base_port is None else base_port
    servers = []
    for k, na in enumerate(placement.assignments):
        p = port + k
        if p > 65535:
            raise LayoutError(f"ports run past 65535 from base port {port}: pick a lower "
                              "--base-port")
        a, bind = na.assignment, host or na.node.address
        servers.append(NodeServer(node=na.node, server=ServerPlan(
            assignment=a, port=p, host=bind, argv=argv_for(a.spec, python, bind, p, k),
            env=server_env(a.spec, a.gpus, local_model=is_local_model(a.spec.model)))))
    return ClusterPlan(layout=layout, servers=servers, placement=placement, python=python,
                       address=address, kind=kind, warnings=list(placement.warnings))


__all__ = ["ClusterPlan", "NodeServer", "make_cluster_plan", "sim_builder", "vllm_builder"]
