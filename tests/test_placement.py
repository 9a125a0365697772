"""Placement of layouts on GPU topologies: constructed ones (2, 4, 8, 12 GPUs on one or two PCIe
switches / NUMA nodes, NVLink bridges) and real `nvidia-smi topo -m` text."""
from __future__ import annotations

from pathlib import Path

import pytest

from servers.launcher import LayoutError, layout_from_dict, load_layout, make_plan, place
from servers.topology import Topology, format_cpu_list, parse_topo_matrix

REPO = Path(__file__).resolve().parents[1]
CORES_PER_NUMA = 16


def build_topology(switches: list[list[int]], numa_of_switch: list[int],
                   nvlink: dict[tuple[int, int], int] | None = None) -> Topology:
    """GPUs under PCIe switches (PIX within a switch), switches under NUMA nodes (NODE between
    switches of a node, SYS across nodes), optional NVLink pairs. CPU affinity: 16 cores per
    NUMA node."""
    where = {g: (k, numa_of_switch[k]) for k, sw in enumerate(switches) for g in sw}
    gpus = sorted(where)
    nvlink = {tuple(sorted(p)): n for p, n in (nvlink or {}).items()}

    def label(a: int, b: int) -> str:
        if a == b:
            return "X"
        if (min(a, b), max(a, b)) in nvlink:
            return f"NV{nvlink[(min(a, b), max(a, b))]}"
        (sa, na), (sb, nb) = where[a], where[b]
        if sa == sb:
            return "PIX"
        return "NODE" if na == nb else "SYS"

    numa = {g: where[g][1] for g in gpus}
    cpus = {g: format_cpu_list(range(numa[g] * CORES_PER_NUMA, (numa[g] + 1) * CORES_PER_NUMA))
            for g in gpus}
    return Topology(gpus=gpus, matrix=[[label(a, b) for b in gpus] for a in gpus],
                    cpu_affinities=cpus, numa_nodes=numa, source="constructed")


def to_nvidia_smi_text(t: Topology) -> str:
    """Render a topology the way `nvidia-smi topo -m` prints it (tabs, legend)."""
    head = "\t" + "\t".join(f"GPU{g}" for g in t.gpus) + "\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID"
    rows = [head]
    for g in t.gpus:
        cells = [" X " if g == h else t.link(g, h) for h in t.gpus]
        rows.append(f"GPU{g}\t" + "\t".join(cells)
                    + f"\t{t.cpu_affinities[g]}\t{t.numa_nodes[g]}\t\tN/A")
    rows += ["", "Legend:", "", "  X    = Self", "  PIX  = Connection traversing at most a "
             "single PCIe bridge"]
    return "\n".join(rows) + "\n"


def groups(plan, role=None):
    return [s.assignment.gpus for s in plan.servers if role is None or s.spec.role == role]


def links(plan, role=None):
    return [s.assignment.link for s in plan.servers if role is None or s.spec.role == role]


# -- 2 GPUs ------------------------------------------------------------------------------------


def test_2_gpus_one_switch():
    plan = make_plan(load_layout("tp2"), build_topology([[0, 1]], [0]), python="py")
    assert groups(plan) == [(0, 1)] and links(plan) == ["PIX"]
    assert plan.warnings == []
    assert plan.servers[0].assignment.cpus == tuple(range(16))
    assert plan.servers[0].assignment.numa == 0


def test_2_gpus_across_numa_is_refused_or_loudly_warned():
    topo = build_topology([[0], [1]], [0, 1])
    with pytest.raises(LayoutError, match="same PCIe switch required") as info:
        make_plan(load_layout("tp2"), topo, python="py")
    assert "GPUs 0,1, linked by SYS" in str(info.value)
    assert "--allow-cross-switch" in str(info.value)
    plan = make_plan(load_layout("tp2"), topo, python="py", allow_cross_switch=True)
    assert groups(plan) == [(0, 1)]
    (warning,) = plan.warnings
    assert warning.startswith("WARNING:") and "same PCIe switch required" in warning
    assert "SYS" in warning and "WARNING" in plan.render()
    # no common NUMA node, so no common cores: pin to both nodes' cores
    assert plan.servers[0].assignment.numa is None
    assert plan.servers[0].assignment.cpus == tuple(range(32))
    # single-GPU replicas need no switch
    plan = make_plan(load_layout("single"), topo, python="py")
    assert groups(plan) == [(0,), (1,)] and plan.warnings == []
    assert plan.servers[1].assignment.cpus == tuple(range(16, 32))


def test_layout_file_can_allow_cross_switch():
    layout = layout_from_dict({"allow_cross_switch": True,
                               "servers": [{"model": "m", "tp": 2, "replicas": 1}]})
    plan = make_plan(layout, build_topology([[0], [1]], [0, 1]), python="py")
    assert "same PCIe switch required" in plan.warnings[0]


# -- 4 GPUs ------------------------------------------------------------------------------------


def test_4_gpus_two_switches_interleaved_indices():
    # GPUs 0 and 2 share switch A, 1 and 3 switch B (index order is not topology order).
    topo = build_topology([[0, 2], [1, 3]], [0, 0])
    plan = make_plan(load_layout("tp2"), topo, python="py")
    assert sorted(groups(plan)) == [(0, 2), (1, 3)]
    assert links(plan) == ["PIX", "PIX"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in plan.servers] == ["0,2", "1,3"]


def test_4_gpus_nvlink_bridges_beat_pcie():
    topo = build_topology([[0, 1, 2, 3]], [0], nvlink={(0, 3): 4, (1, 2): 4})
    plan = make_plan(load_layout("tp2"), topo, python="py")
    assert sorted(groups(plan)) == [(0, 3), (1, 2)]
    assert links(plan) == ["NV4", "NV4"]


def test_4_gpus_two_numa_nodes_tp4_refused_then_warned():
    topo = build_topology([[0, 1], [2, 3]], [0, 1])
    layout = layout_from_dict({"servers": [{"model": "m", "tp": 4, "replicas": 1}]})
    with pytest.raises(LayoutError, match="linked by SYS: same PCIe switch required for TP=4"):
        make_plan(layout, topo, python="py")
    plan = make_plan(layout, topo, python="py", allow_cross_switch=True)
    assert groups(plan) == [(0, 1, 2, 3)] and links(plan) == ["SYS"]


# -- 8 GPUs ------------------------------------------------------------------------------------


def eight():
    # 2 NUMA nodes x 2 switches x 2 GPUs
    return build_topology([[0, 1], [2, 3], [4, 5], [6, 7]], [0, 0, 1, 1])


def test_8_gpus_tp2_pairs_share_switches():
    plan = make_plan(load_layout("tp2"), eight(), python="py")
    assert sorted(groups(plan)) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert set(links(plan)) == {"PIX"}
    assert [s.assignment.numa for s in plan.servers] == [0, 0, 1, 1]


def test_8_gpus_tp4_stays_inside_a_numa_node():
    layout = layout_from_dict({"allow_cross_switch": True,
                               "servers": [{"model": "m", "tp": 4, "replicas": "fill"}]})
    plan = make_plan(layout, eight(), python="py")
    assert sorted(groups(plan)) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert links(plan) == ["NODE", "NODE"]  # never SYS
    assert [s.assignment.cpus for s in plan.servers] == [tuple(range(16)), tuple(range(16, 32))]


def test_8_gpus_mixed_tp2_first_then_singles():
    # switches of 3 and 1 GPUs: a TP pair can only come from the 3-GPU switches
    topo = build_topology([[0, 1, 2], [3], [4, 5, 6], [7]], [0, 0, 1, 1])
    layout = layout_from_dict({"servers": [
        {"role": "one", "model": "a", "replicas": 4},
        {"role": "two", "model": "b", "tp": 2, "replicas": 2},
    ]})
    plan = make_plan(layout, topo, python="py")
    assert [s.spec.role for s in plan.servers] == ["one"] * 4 + ["two"] * 2  # layout order
    pairs = groups(plan, "two")
    assert all(set(p) <= {0, 1, 2} or set(p) <= {4, 5, 6} for p in pairs), pairs
    assert set(links(plan, "two")) == {"PIX"}
    used = sorted(g for grp in groups(plan) for g in grp)
    assert used == list(range(8))


# -- 12 GPUs (the seed's L40S x12) ----------------------------------------------------------------


def twelve_pairs():
    # 2 NUMA nodes x 3 switches x 2 GPUs
    return build_topology([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]], [0, 0, 0, 1, 1, 1])


def twelve_triples():
    # 2 NUMA nodes x 2 switches x 3 GPUs: only 4 same-switch pairs exist
    return build_topology([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]], [0, 0, 1, 1])


def test_12_gpus_single_tp2_mixed12():
    topo = twelve_pairs()
    assert groups(make_plan(load_layout("single"), topo, python="py")) == [(g,) for g in range(12)]
    tp2 = make_plan(load_layout("tp2"), topo, python="py")
    assert sorted(groups(tp2)) == [(k, k + 1) for k in range(0, 12, 2)]
    assert set(links(tp2)) == {"PIX"}
    mixed = make_plan(load_layout("mixed12"), topo, python="py")
    assert len(groups(mixed, "large")) == 4 and len(groups(mixed, "small")) == 4
    assert set(links(mixed, "large")) == {"PIX"}
    assert sorted(g for grp in groups(mixed) for g in grp) == list(range(12))
    ports = [s.port for s in mixed.servers]
    assert ports == list(range(8000, 8008))


def test_12_gpus_three_per_switch():
    topo = twelve_triples()
    # mixed12 needs 4 TP pairs: one per switch, the leftover GPU of each switch serves a single
    mixed = make_plan(load_layout("mixed12"), topo, python="py")
    assert set(links(mixed, "large")) == {"PIX"}
    switch_of = {g: g // 3 for g in range(12)}
    assert sorted(switch_of[p[0]] for p in groups(mixed, "large")) == [0, 1, 2, 3]
    assert mixed.warnings == []
    # tp2 needs 6 pairs: two must cross switches, so it is refused ...
    with pytest.raises(LayoutError, match="linked by NODE: same PCIe switch required"):
        make_plan(load_layout("tp2"), topo, python="py")
    # ... or, allowed, the two crossing pairs stay inside a NUMA node (NODE, never SYS)
    tp2 = make_plan(load_layout("tp2"), topo, python="py", allow_cross_switch=True)
    assert sorted(links(tp2)) == ["NODE", "NODE", "PIX", "PIX", "PIX", "PIX"]
    assert len(tp2.warnings) == 2
    assert all("same PCIe switch required" in w for w in tp2.warnings)


def test_12_gpus_mixed_on_one_numa_node_per_6():
    # one big switch per NUMA node (6 GPUs each): all PIX pairs
    topo = build_topology([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]], [0, 1])
    mixed = make_plan(load_layout("mixed12"), topo, python="py")
    assert set(links(mixed, "large")) == {"PIX"}


# -- from text ---------------------------------------------------------------------------------


@pytest.mark.parametrize("topo", [twelve_triples(), eight(), build_topology([[0, 1]], [0])],
                         ids=["12", "8", "2"])
def test_constructed_topology_through_nvidia_smi_text(topo):
    parsed = parse_topo_matrix(to_nvidia_smi_text(topo))
    assert parsed.gpus == topo.gpus
    layout = load_layout("single")
    a = make_plan(layout, topo, python="py")
    b = make_plan(layout, parsed, python="py")
    assert [(s.assignment.gpus, s.assignment.cpus, s.assignment.numa) for s in a.servers] == \
           [(s.assignment.gpus, s.assignment.cpus, s.assignment.numa) for s in b.servers]


def real_topo_text(name: str) -> str:
    for d in (REPO / "tests" / "data", REPO.parent / "shared" / "data"):
        if (d / name).exists():
            return (d / name).read_text()
    pytest.skip(f"{name} not found")


def test_real_h100x2_topology():
    topo = parse_topo_matrix(real_topo_text("nvidia-smi-topo-h100x2.txt"))
    plan = make_plan(load_layout("tp2"), topo, python="py")
    (s,) = plan.servers
    assert s.assignment.gpus == (0, 1) and s.assignment.link == "NV18"
    assert s.assignment.numa == 0 and s.assignment.cpus == tuple(range(32))
    assert plan.warnings == []
    single = make_plan(load_layout("single"), topo, python="py")
    assert groups(single) == [(0,), (1,)]
    with pytest.raises(LayoutError, match="needs 12 GPUs"):
        make_plan(load_layout("mixed12"), topo, python="py")


def test_real_h100x1_topology():
    topo = parse_topo_matrix(real_topo_text("nvidia-smi-topo-h100x1.txt"))
    plan = make_plan(load_layout("single"), topo, python="py")
    assert groups(plan) == [(0,)]
    with pytest.raises(LayoutError, match="needs at least 2 GPU"):
        make_plan(load_layout("tp2"), topo, python="py")


# -- other inputs ------------------------------------------------------------------------------


def test_unknown_topology_warns_for_tp():
    from servers.launcher.layouts import validate

    layout = layout_from_dict({"servers": [{"model": "m", "tp": 2, "replicas": 1}]})
    validate(layout)
    placement = place(layout, None, gpus=[0, 1])
    assert placement.assignments[0].gpus == (0, 1)
    assert any("topology unknown" in w for w in placement.warnings)


def test_cuda_visible_devices_narrows_the_pool(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    plan = make_plan(load_layout("tp2"), eight(), python="py")
    assert sorted(groups(plan)) == [(4, 5), (6, 7)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")  # UUIDs: leave to CUDA
    assert len(make_plan(load_layout("single"), eight(), python="py").servers) == 8


def test_idle_gpus_are_noted():
    layout = layout_from_dict({"servers": [{"model": "m", "replicas": 2}]})
    plan = make_plan(layout, eight(), python="py")
    assert groups(plan) == [(0,), (1,)]
    assert any("GPUs 2,3,4,5,6,7 are left idle" in w for w in plan.warnings)
