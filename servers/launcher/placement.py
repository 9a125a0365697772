"""Placement: which GPUs (and CPU cores) each replica of a layout gets.

Tensor-parallel groups are formed first, largest first, with
:meth:`servers.topology.Topology.best_groups` (the worst group as good as possible, by link
quality NV# > PIX > PXB > PHB > NODE > SYS; SYS is the cross-NUMA link, so NUMA is part of the
ranking); single-GPU replicas take what is left, lowest indices first.

A TP group whose GPUs do not share a PCIe switch or NVLink (link PHB, NODE or SYS) is refused
with "same PCIe switch required" (the seed: P2P drops below 10 GB/s across NUMA), unless the
layout or the command line allows cross-switch groups; then it is a loud warning.

CPU affinity: a replica is pinned to the cores its GPUs share (nvidia-smi's "CPU Affinity"),
where the topology says.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from servers.launcher.errors import LayoutError
from servers.launcher.layouts import FILL, Layout, ServerSpec
from servers.topology import Topology, is_same_switch, link_score, parse_cpu_list


@dataclass(frozen=True)
class Assignment:
    """One replica: a role's ``index``-th server on ``gpus`` (empty for CPU servers)."""

    spec: ServerSpec
    index: int
    gpus: tuple[int, ...] = ()
    link: str | None = None        # the group's weakest link (None: one GPU, or unknown)
    numa: int | None = None        # the NUMA node all its GPUs share, where known
    cpus: tuple[int, ...] = ()     # cores to pin it to; empty: no pinning

    @property
    def name(self) -> str:
        return f"{self.spec.role}-{self.index}"

    @property
    def role(self) -> str:
        return self.spec.role


@dataclass
class Placement:
    assignments: list[Assignment]
    gpus_present: list[int]
    gpus_used: list[int]
    warnings: list[str] = field(default_factory=list)


def visible_gpus(topology: Topology | None, restrict: Sequence[int] | None = None) -> list[int]:
    """The GPUs the layout may use: the topology's, narrowed by ``restrict`` (``--gpus``) or, where
    that is not given, by this process's own ``CUDA_VISIBLE_DEVICES`` when it lists indices."""
    present = sorted(topology.gpus) if topology is not None else []
    if restrict is not None:
        missing = [g for g in restrict if g not in present]
        if missing:
            have = ",".join(map(str, present)) or "none"
            raise LayoutError(f"GPU {missing[0]} was asked for but is not present (GPUs: {have})")
        return sorted(set(restrict))
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip():
        try:
            listed = [int(x) for x in cvd.split(",") if x.strip()]
        except ValueError:
            return present  # UUIDs or MIG names: leave the choice to CUDA
        return [g for g in present if g in listed]
    return present


def place(layout: Layout, topology: Topology | None, gpus: Sequence[int] | None = None,
          *, allow_cross_switch: bool | None = None) -> Placement:
    """Assign GPUs to every replica of ``layout``; raises :class:`LayoutError` when it cannot."""
    allow = layout.allow_cross_switch if allow_cross_switch is None else allow_cross_switch
    pool = list(gpus) if gpus is not None else visible_gpus(topology)
    warnings: list[str] = []
    cuda = [s for s in layout.servers if s.device == "cuda"]

    fixed_need = sum(int(s.replicas) * s.tensor_parallel_size for s in cuda if s.replicas != FILL)
    counts: dict[str, int] = {s.role: int(s.replicas) for s in cuda if s.replicas != FILL}
    where = _where(topology, pool)
    if cuda and not pool:
        raise LayoutError(
            f"layout {layout.name!r} needs GPUs but {where}: plan for another machine with "
            "--dry-run --topology FILE (its `nvidia-smi topo -m` text), or use --layout cpu")
    if fixed_need > len(pool):
        parts = ", ".join(f"{s.replicas} x {s.role} (TP={s.tensor_parallel_size})"
                          for s in cuda if s.replicas != FILL)
        raise LayoutError(f"layout {layout.name!r} needs {fixed_need} GPUs ({parts}) but {where}")
    for s in cuda:
        if s.replicas == FILL:
            left = len(pool) - fixed_need
            tp = s.tensor_parallel_size
            if left < tp:
                raise LayoutError(
                    f"layout {layout.name!r}, role {s.role!r} needs at least {tp} GPU(s) "
                    f"for one TP={tp} replica but only {left} are left ({where})")
            if left % tp:
                raise LayoutError(
                    f"layout {layout.name!r}, role {s.role!r}: tensor parallel size {tp} does not "
                    f"divide the {left} GPUs left for it ({left % tp} would sit idle): "
                    "narrow the GPUs with --gpus, or give replicas in a layout file")
            counts[s.role] = left // tp

    free = sorted(pool)
    out: list[Assignment] = []
    # Largest TP groups first (they are the hardest to place well), layout order among equals.
    for s in sorted(cuda, key=lambda s: -s.tensor_parallel_size):
        n, tp = counts[s.role], s.tensor_parallel_size
        groups: list[tuple[int, ...]]
        if tp == 1:
            groups = [(g,) for g in free[:n]]
        elif topology is not None:
            groups = topology.best_groups(tp, free)[:n]
        else:
            groups = [tuple(free[k * tp:(k + 1) * tp]) for k in range(n)]
        if len(groups) < n:  # cannot happen after the counts above; kept as a guard
            raise LayoutError(f"layout {layout.name!r}: only {len(groups)} TP={tp} groups fit, "
                              f"role {s.role!r} asks for {n}")
        for k, grp in enumerate(sorted(groups)):
            a = _assignment(s, k, grp, topology)
            if tp > 1:
                msg = _check_link(layout, a, topology)
                if msg and allow:
                    warnings.append("WARNING: " + msg + " (allowed by --allow-cross-switch: "
                                    "expect P2P < 10 GB/s and poor TP throughput)")
                elif msg:
                    raise LayoutError(msg + ": no better group is free; use NVLink/same-switch "
                                      "GPUs, or pass --allow-cross-switch to run it anyway")
            out.append(a)
        used = {g for grp in groups for g in grp}
        free = [g for g in free if g not in used]

    for s in layout.servers:
        if s.device == "cpu":
            for k in range(int(s.replicas) if s.replicas != FILL else 1):
                out.append(Assignment(spec=s, index=k))

    order = {s.role: i for i, s in enumerate(layout.servers)}
    out.sort(key=lambda a: (order[a.role], a.index))
    if topology is None and any(a.spec.tensor_parallel_size > 1 for a in out):
        warnings.append("WARNING: topology unknown: TP groups are consecutive GPUs and nobody "
                        "checked they share a PCIe switch (same PCIe switch required)")
    idle = [g for g in pool if g in free]
    if idle and cuda:
        warnings.append(f"note: GPUs {','.join(map(str, idle))} are left idle by layout "
                        f"{layout.name!r}")
    gpus_used = sorted(g for a in out for g in a.gpus)
    return Placement(assignments=out, gpus_present=sorted(topology.gpus) if topology else [],
                     gpus_used=gpus_used, warnings=warnings)


def _where(topology: Topology | None, pool: Sequence[int]) -> str:
    if topology is None:
        return "no GPU was found (no NVML, no nvidia-smi)"
    if not pool:
        return f"none of this machine's {len(topology.gpus)} GPUs is selected"
    if len(pool) == len(topology.gpus):
        return f"only {len(pool)} are present (GPUs {','.join(map(str, pool))})"
    return f"only {len(pool)} are selected (GPUs {','.join(map(str, pool))})"


def _assignment(spec: ServerSpec, index: int, grp: tuple[int, ...],
                topology: Topology | None) -> Assignment:
    if topology is None:
        return Assignment(spec=spec, index=index, gpus=tuple(grp))
    link = None
    if len(grp) > 1:
        link = min((topology.link(a, b) for i, a in enumerate(grp) for b in grp[i + 1:]),
                   key=link_score)
    numas = {topology.numa(g) for g in grp}
    numa = numas.pop() if len(numas) == 1 else None
    return Assignment(spec=spec, index=index, gpus=tuple(grp), link=link, numa=numa,
                      cpus=tuple(_shared_cpus(topology, grp)))


def _shared_cpus(topology: Topology, grp: Sequence[int]) -> list[int]:
    sets = [set(topology.cpu_affinity(g)) for g in grp]
    sets = [s for s in sets if s]
    if not sets:
        return []
    common = set.intersection(*sets)
    return sorted(common if common else set.union(*sets))


def _check_link(layout: Layout, a: Assignment, topology: Topology | None) -> str | None:
    if topology is None or a.link is None or is_same_switch(a.link):
        return None
    tp = a.spec.tensor_parallel_size
    return (f"layout {layout.name!r}, replica {a.name} (TP={tp}) would run on GPUs "
            f"{','.join(map(str, a.gpus))}, linked by {a.link}: same PCIe switch required "
            f"for TP={tp}")


def pinnable(cpus: Sequence[int]) -> list[int]:
    """The cores of ``cpus`` this process may run on (an affinity naming none is skipped)."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return []
    return sorted(set(cpus) & allowed)


__all__ = ["Assignment", "Placement", "place", "visible_gpus", "pinnable", "parse_cpu_list"]
