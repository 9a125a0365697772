"""Node-aware placement: which node, and on it which GPUs, each replica of a layout gets.

The rules of one host stay the rules of each node: :func:`servers.launcher.placement.place` runs
on every node with that node's topology, so a TP group is formed from one node's GPUs only (a TP
group never spans nodes: NCCL over the network is another league) and the "same PCIe switch
required" check applies per node as it does on one host.

Which node: replicas go largest TP first, each to the node with the *fewest* free GPUs that can
still take it (best fit), nodes in a fixed order among equals. That fills nodes one by one and
leaves whole nodes free for other work, which is what a shared cluster wants; a replica is only
sent to a node where the one-host placement accepts it (a node whose free GPUs share no switch
does not get a TP=2 replica while another node can take it).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from servers.launcher.errors import LayoutError
from servers.launcher.layouts import FILL, Layout, ServerSpec
from servers.launcher.placement import Assignment, Placement, place
from servers.topology import Topology

STRATEGY = ("best fit: largest TP groups first, each replica on the node with the fewest free "
            "GPUs that can take it, so nodes fill one by one and whole nodes stay free")


@dataclass(frozen=True)
class Node:
    """One node of the cluster as its agent reported it."""

    node_id: str
    address: str                       # the address its servers listen on and clients reach
    gpus: tuple[int, ...] = ()         # GPU indices the agent holds there
    topology: Topology | None = None
    topology_source: str = ""          # "nvml", "nvidia-smi", a file name; "" when none
    hostname: str = ""
    agent_pid: int = 0                 # the node agent's process there (it dies with the driver)

    @property
    def label(self) -> str:
        """How messages name it: the address and the start of Ray's node id."""
        return f"{self.address} ({self.node_id[:8]})"


@dataclass(frozen=True)
class NodeAssignment:
    node: Node
    assignment: Assignment

    @property
    def name(self) -> str:
        return self.assignment.name


@dataclass
class NodePlacement:
    assignments: list[NodeAssignment]
    nodes: list[Node]
    warnings: list[str] = field(default_factory=list)
    strategy: str = STRATEGY

    @property
    def used_nodes(self) -> list[Node]:
        used = {a.node.node_id for a in self.assignments}
        return [n for n in self.nodes if n.node_id in used]

    @property
    def free_nodes(self) -> list[Node]:
        used = {n.node_id for n in self.used_nodes}
        return [n for n in self.nodes if n.node_id not in used]


def node_order(nodes: Sequence[Node]) -> list[Node]:
    """The fixed order placement breaks ties in: most GPUs first, then address, then id."""
    return sorted(nodes, key=lambda n: (-len(n.gpus), n.address, n.node_id))


def describe_nodes(nodes: Sequence[Node]) -> str:
    """``node 10.0.0.1 (ab12cd34): 4 GPUs, node ...``: the per-node counts errors quote."""
    return ", ".join(f"node {n.label}: {len(n.gpus)} GPU{'s' if len(n.gpus) != 1 else ''}"
                     for n in nodes) or "no nodes"


def place_on_nodes(layout: Layout, nodes: Sequence[Node], *,
                   allow_cross_switch: bool | None = None) -> NodePlacement:
    """Assign every replica of ``layout`` a node and GPUs there; :class:`LayoutError` if it cannot."""
    if not nodes:
        raise LayoutError("the Ray cluster has no alive nodes")
    order = node_order(nodes)
    cuda = [s for s in layout.servers if s.device == "cuda"]
    total = sum(len(n.gpus) for n in order)
    largest = max(len(n.gpus) for n in order)
    for s in cuda:
        tp = s.tensor_parallel_size
        if tp > largest:
            raise LayoutError(
                f"layout {layout.name!r}, role {s.role!r}: a TP={tp} group must sit on one node "
                f"(a TP group never spans nodes) but the largest node has {largest} GPU(s) "
                f"({describe_nodes(order)})")
    fixed = [s for s in cuda if s.replicas != FILL]
    need = sum(int(s.replicas) * s.tensor_parallel_size for s in fixed)
    if need > total:
        parts = ", ".join(f"{s.replicas} x {s.role} (TP={s.tensor_parallel_size})" for s in fixed)
        raise LayoutError(f"layout {layout.name!r} needs {need} GPUs ({parts}) but the Ray "
                          f"cluster has {total} ({describe_nodes(order)})")

    counts: dict[str, dict[str, int]] = {n.node_id: {} for n in order}  # node -> role -> n
    for s in sorted(fixed, key=lambda s: -s.tensor_parallel_size):
        for k in range(int(s.replicas)):
            if _add(layout, s, order, counts, allow_cross_switch) is None:
                raise LayoutError(
                    f"layout {layout.name!r}: replica {s.role}-{k} (TP={s.tensor_parallel_size}) "
                    f"fits on no node: {_why(layout, s, order, counts, allow_cross_switch)} "
                    f"({describe_nodes(order)})")
    for s in cuda:
        if s.replicas == FILL:
            added = 0
            while _add(layout, s, order, counts, allow_cross_switch) is not None:
                added += 1
            if not added:
                raise LayoutError(
                    f"layout {layout.name!r}, role {s.role!r}: no node has {s.tensor_parallel_size} "
                    f"free GPU(s) for one replica left ({describe_nodes(order)})")

    cpu_specs = [s for s in layout.servers if s.device == "cpu"]
    per_node: dict[str, Placement] = {}
    for n in order:
        if counts[n.node_id]:
            per_node[n.node_id] = _place_node(layout, n, counts[n.node_id], allow_cross_switch)
    if cpu_specs:  # CPU servers go with the GPU ones (or to the first node): whole nodes stay free
        host = next((n for n in order if n.node_id in per_node), order[0])
        per_node[host.node_id] = _place_node(layout, host, counts[host.node_id],
                                             allow_cross_switch, cpu_specs=cpu_specs)

    out: list[NodeAssignment] = []
    next_index: dict[str, int] = {}
    warnings: list[str] = []
    for n in order:
        p = per_node.get(n.node_id)
        if p is None:
            continue
        for a in p.assignments:
            k = next_index.get(a.role, 0)
            next_index[a.role] = k + 1
            out.append(NodeAssignment(node=n, assignment=replace(a, index=k)))
        warnings += [f"{w} on node {n.label}" if w.startswith("note:") else f"node {n.label}: {w}"
                     for w in p.warnings]
    role_order = {s.role: i for i, s in enumerate(layout.servers)}
    out.sort(key=lambda na: (role_order[na.assignment.role], na.assignment.index))
    return NodePlacement(assignments=out, nodes=order, warnings=warnings)


def _sub_layout(layout: Layout, roles: dict[str, int],
                cpu_specs: Sequence[ServerSpec] = ()) -> Layout:
    """The layout as one node serves its share: the roles it got, with their counts there."""
    servers = [replace(s, replicas=roles[s.role]) for s in layout.servers if roles.get(s.role)]
    servers += [replace(s, replicas=1 if s.replicas == FILL else s.replicas) for s in cpu_specs]
    return replace(layout, servers=tuple(servers))


def _place_node(layout: Layout, node: Node, roles: dict[str, int],
                allow_cross_switch: bool | None, cpu_specs: Sequence[ServerSpec] = ()) -> Placement:
    return place(_sub_layout(layout, roles, cpu_specs), node.topology, list(node.gpus),
                 allow_cross_switch=allow_cross_switch)


def _free(node: Node, roles: dict[str, int], layout: Layout) -> int:
    tp = {s.role: s.tensor_parallel_size for s in layout.servers}
    return len(node.gpus) - sum(tp[r] * c for r, c in roles.items())


def _add(layout: Layout, spec: ServerSpec, order: list[Node],
         counts: dict[str, dict[str, int]], allow: bool | None) -> Node | None:
    """Put one more replica of ``spec`` on the best-fitting node that accepts it."""
    tp = spec.tensor_parallel_size
    fits = [n for n in order if _free(n, counts[n.node_id], layout) >= tp]
    fits.sort(key=lambda n: _free(n, counts[n.node_id], layout))  # stable: ties keep node order
    for n in fits:
        trial = dict(counts[n.node_id])
        trial[spec.role] = trial.get(spec.role, 0) + 1
        try:
            _place_node(layout, n, trial, allow)
        except LayoutError:
            continue
        counts[n.node_id] = trial
        return n
    return None


def _why(layout: Layout, spec: ServerSpec, order: list[Node],
         counts: dict[str, dict[str, int]], allow: bool | None) -> str:
    """The one-host placement's reason on the first node with room, or that none has room."""
    tp = spec.tensor_parallel_size
    for n in order:
        if _free(n, counts[n.node_id], layout) >= tp:
            trial = dict(counts[n.node_id])
            trial[spec.role] = trial.get(spec.role, 0) + 1
            try:
                _place_node(layout, n, trial, allow)
            except LayoutError as exc:
                return f"on node {n.label}: {exc}"
    return f"no node has {tp} free GPU(s) left"
