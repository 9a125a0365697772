"""servers.topology: parsing `nvidia-smi topo -m`, ranking links, choosing TP groups, NVML."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from servers import topology as T

DATA = Path(__file__).parent / "data"

LEGEND = """
Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node
  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)
  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)
  PIX  = Connection traversing at most a single PCIe bridge
  NV#  = Connection traversing a bonded set of # NVLinks
"""


def make_text(n, link, cpus, numa, ansi=True, gpu_numa_col=True):
    """nvidia-smi's layout: header with ANSI underline, tab cells, ' X ', an empty padding cell."""
    cols = [f"GPU{i}" for i in range(n)] + ["CPU Affinity", "NUMA Affinity"]
    if gpu_numa_col:
        cols.append("GPU NUMA ID")
    head = "\t".join(cols)
    lines = ["\t" + (f"\x1b[4m{head}\x1b[0m" if ansi else head)]
    for i in range(n):
        cells = [" X " if i == j else link(i, j) for j in range(n)]
        tail = [cpus(i), str(numa(i))] + (["", "N/A"] if gpu_numa_col else [])
        lines.append("\t".join([f"GPU{i}", *cells, *tail]))
    return "\n".join(lines) + "\n" + LEGEND


def pcie_layout(per_switch, per_node, cores_per_node=32):
    """GPUs fill switches of `per_switch`, switches fill NUMA nodes of `per_node` GPUs."""

    def link(i, j):
        if i // per_switch == j // per_switch:
            return "PIX"
        if i // per_node == j // per_node:
            return "NODE"
        return "SYS"

    def numa(i):
        return i // per_node

    def cpus(i):
        node = numa(i)
        return f"{node * cores_per_node}-{node * cores_per_node + cores_per_node - 1}"

    return link, cpus, numa


# -- the real samples -----------------------------------------------------------------------


def test_real_h100x2_sample():
    t = T.parse_topo_matrix((DATA / "nvidia-smi-topo-h100x2.txt").read_text())
    assert t.gpus == [0, 1]
    assert t.link(0, 1) == "NV18" and t.link(1, 0) == "NV18" and t.link(0, 0) == "X"
    assert t.nvlinks(0, 1) == 18
    assert t.numa(0) == 0 and t.numa(1) == 0
    assert t.cpu_affinity(0) == list(range(32))
    assert t.cpu_affinity_text(1) == "0-31"
    assert t.gpu_numa_ids == {0: None, 1: None}
    assert t.best_pairs() == [(0, 1)]
    assert t.source == "nvidia-smi"


def test_recorded_runs_with_ansi_header():
    # Captured by this project on the lent machines (H100 x1, x2, x4; H200 x2), 2026-11-26.
    one = T.parse_topo_matrix((DATA / "nvidia-smi-topo-h100x1.txt").read_text())
    assert one.gpus == [0] and one.link(0, 0) == "X" and one.cpu_affinity_text(0) == "0-15"
    assert one.best_pairs() == []
    for name in ("nvidia-smi-topo-h100x2-run.txt", "nvidia-smi-topo-h200x2.txt"):
        two = T.parse_topo_matrix((DATA / name).read_text())
        assert two.matrix == [["X", "NV18"], ["NV18", "X"]] and two.numa(1) == 0
    four = T.parse_topo_matrix((DATA / "nvidia-smi-topo-h100x4.txt").read_text())
    assert four.gpus == [0, 1, 2, 3]
    assert all(four.link(i, j) == "NV18" for i in range(4) for j in range(4) if i != j)
    assert all(four.numa(i) == 0 and four.cpu_affinity(i) == list(range(64)) for i in range(4))
    assert four.best_pairs() == [(0, 1), (2, 3)]
    assert four.best_groups(4) == [(0, 1, 2, 3)]


# -- labels and ranking ---------------------------------------------------------------------


def test_link_ranking_order():
    order = ["SYS", "NODE", "PHB", "PXB", "PIX", "NV1", "NV4", "NV12", "NV18", "X"]
    scores = [T.link_score(x) for x in order]
    assert scores == sorted(scores) and len(set(scores)) == len(scores)
    assert T.link_score("SOC") == T.link_score("SYS")  # old drivers' spelling
    assert T.normalize_label(" X ") == "X"
    with pytest.raises(ValueError):
        T.normalize_label("PCIE")
    assert T.is_same_switch("PXB") and T.is_same_switch("NV2") and not T.is_same_switch("PHB")


def test_cpu_lists_round_trip():
    assert T.parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert T.parse_cpu_list("N/A") == [] and T.parse_cpu_list(None) == []
    assert T.format_cpu_list([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert T.format_cpu_list([]) == ""


# -- constructed layouts --------------------------------------------------------------------


def test_four_gpus_one_switch():
    t = T.parse_topo_matrix(make_text(4, lambda i, j: "PIX", lambda i: "0-15", lambda i: 0))
    assert {t.link(i, j) for i in range(4) for j in range(4) if i != j} == {"PIX"}
    assert t.best_pairs() == [(0, 1), (2, 3)]
    assert all(t.same_numa(0, j) for j in range(4))


def test_four_gpus_two_numa_nodes():
    link, cpus, numa = pcie_layout(per_switch=2, per_node=2)
    t = T.parse_topo_matrix(make_text(4, link, cpus, numa, ansi=False, gpu_numa_col=False))
    assert t.link(0, 1) == "PIX" and t.link(0, 2) == "SYS" and t.link(3, 1) == "SYS"
    assert t.numa(0) == 0 and t.numa(3) == 1 and t.same_numa(0, 3) is False
    assert t.cpu_affinity(2)[0] == 32
    assert t.best_pairs() == [(0, 1), (2, 3)]
    assert t.peers(0) == [1, 2, 3]


def test_eight_gpus_two_switches_one_node():
    def link(i, j):
        return "PXB" if i // 4 == j // 4 else "NODE"

    t = T.parse_topo_matrix(make_text(8, link, lambda i: "0-63", lambda i: 0))
    assert t.best_pairs() == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert t.best_groups(4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert t.group_score((0, 1, 2, 4)) == T.link_score("NODE")


def test_twelve_gpus_two_numa_nodes_three_switches_each():
    # The seed's L40S x12 box: 2 sockets, 3 PCIe switches per socket, 2 GPUs per switch.
    link, cpus, numa = pcie_layout(per_switch=2, per_node=6)
    t = T.parse_topo_matrix(make_text(12, link, cpus, numa))
    assert len(t) == 12
    assert t.link(0, 1) == "PIX" and t.link(0, 2) == "NODE" and t.link(0, 6) == "SYS"
    assert [t.numa(i) for i in range(12)] == [0] * 6 + [1] * 6
    assert t.best_pairs() == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]
    # TP=4 cannot stay on one switch; the best keeps each group inside one NUMA node.
    groups = t.best_groups(4)
    assert len(groups) == 3
    assert sum(1 for g in groups if t.group_score(g) >= T.link_score("NODE")) == 2
    # TP=6: one group per socket.
    assert t.best_groups(6) == [(0, 1, 2, 3, 4, 5), (6, 7, 8, 9, 10, 11)]


def test_twelve_gpus_switch_mates_not_adjacent():
    # GPU i shares its switch with GPU i+6 (BIOS enumerates one slot per switch first).
    def link(i, j):
        if i % 6 == j % 6:
            return "PIX"
        return "NODE" if (i % 6) // 3 == (j % 6) // 3 else "SYS"

    t = T.parse_topo_matrix(make_text(12, link, lambda i: "0-95", lambda i: (i % 6) // 3))
    assert t.best_pairs() == [(0, 6), (1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]


def test_best_pairs_maximises_the_worst_pair_not_the_first():
    # Greedy would take 0+1 (NV4) and leave 2+3 on SYS; the best split is 0+2 and 1+3 (NV2 each).
    labels = {(0, 1): "NV4", (0, 2): "NV2", (1, 3): "NV2", (2, 3): "SYS", (0, 3): "SYS",
              (1, 2): "SYS"}

    def link(i, j):
        return labels[(min(i, j), max(i, j))]

    t = T.parse_topo_matrix(make_text(4, link, lambda i: "0-7", lambda i: 0))
    assert sorted(t.best_pairs()) == [(0, 2), (1, 3)]


def test_odd_count_leaves_worst_gpu_out_and_subset():
    def link(i, j):
        return "SYS" if 2 in (i, j) else "PIX"

    t = T.parse_topo_matrix(make_text(3, link, lambda i: "0-7", lambda i: 0))
    assert t.best_pairs() == [(0, 1)]
    assert t.best_pairs([1, 2]) == [(1, 2)]
    with pytest.raises(KeyError):
        t.link(0, 5)


def test_greedy_fallback_beyond_sixteen():
    n = 20
    t = T.Topology(gpus=list(range(n)),
                   matrix=[["X" if i == j else ("NV8" if i // 2 == j // 2 else "SYS")
                            for j in range(n)] for i in range(n)], source="constructed")
    assert t.best_pairs() == [(2 * k, 2 * k + 1) for k in range(10)]


def test_nic_columns_and_legend():
    text = (
        "\t\x1b[4mGPU0\tGPU1\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
        "GPU0\t X \tNV12\tPXB\tSYS\t0-23\t0\t\tN/A\n"
        "GPU1\tNV12\t X \tSYS\tPXB\t24-47\t1\t\tN/A\n"
        "NIC0\tPXB\tSYS\t X \tSYS\t\t\t\t\n"
        "NIC1\tSYS\tPXB\tSYS\t X \t\t\t\t\n"
        + LEGEND
        + "\nNIC Legend:\n\n  NIC0: mlx5_0\n  NIC1: mlx5_1\n"
    )
    t = T.parse_topo_matrix(text)
    assert t.gpus == [0, 1] and t.link(0, 1) == "NV12"
    assert t.numa(1) == 1 and t.cpu_affinity_text(1) == "24-47"
    assert t.nics == {"NIC0": "mlx5_0", "NIC1": "mlx5_1"}
    assert t.nic_links[(0, "NIC0")] == "PXB" and t.nic_links[(1, "NIC0")] == "SYS"


def test_bad_text_is_rejected():
    with pytest.raises(ValueError):
        T.parse_topo_matrix("No devices were found\n")


def test_dict_round_trip_and_render():
    link, cpus, numa = pcie_layout(per_switch=2, per_node=2)
    t = T.parse_topo_matrix(make_text(4, link, cpus, numa))
    d = t.to_dict()
    assert d["best_pairs"] == [[0, 1], [2, 3]]
    back = T.Topology.from_dict(d)
    assert back.matrix == t.matrix and back.numa(3) == 1 and back.cpu_affinity(0) == t.cpu_affinity(0)
    assert T.compare(t, back) == []
    assert "GPU3" in t.render().splitlines()[0]


# -- NVML (a fake pynvml: the calls and constants nvidia-ml-py has) --------------------------


class FakeNvml:
    NVML_NVLINK_MAX_LINKS = 18
    NVML_FEATURE_ENABLED = 1
    NVML_NVLINK_DEVICE_TYPE_GPU = 0
    NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
    NVML_P2P_CAPS_INDEX_NVLINK = 2
    NVML_P2P_STATUS_OK = 0
    NVML_P2P_STATUS_NOT_SUPPORTED = 5

    def __init__(self, n, ancestor, nvlinks=None, switch_links=0):
        self.n, self.ancestor = n, ancestor
        self.nvlinks = nvlinks or {}  # (i, j) -> direct link count
        self.switch_links = switch_links
        self.inited = 0

    def nvmlInit(self):
        self.inited += 1

    def nvmlShutdown(self):
        self.inited -= 1

    def nvmlDeviceGetCount(self):
        return self.n

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=f"00000000:{0x10 + h:02X}:00.0".encode())

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h:08d}"

    def _links(self, h):
        out = []
        for (a, b), k in self.nvlinks.items():
            if a == h:
                out += [("gpu", b)] * k
            elif b == h:
                out += [("gpu", a)] * k
        out += [("switch", None)] * self.switch_links
        return out

    def nvmlDeviceGetNvLinkState(self, h, link):
        if link >= len(self._links(h)):
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 1

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h, link):
        kind, _ = self._links(h)[link]
        return 2 if kind == "switch" else 0

    def nvmlDeviceGetNvLinkRemotePciInfo_v2(self, h, link):
        kind, peer = self._links(h)[link]
        bus = "00000000:FF:00.0" if kind == "switch" else f"00000000:{0x10 + peer:02X}:00.0"
        return SimpleNamespace(busId=bus)

    def nvmlDeviceGetP2PStatus(self, a, b, cap):
        linked = self.switch_links or self.nvlinks.get((min(a, b), max(a, b)))
        return 0 if linked else 5

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return self.ancestor(a, b)

    def nvmlDeviceGetCpuAffinity(self, h, words):
        return [0xFFFF if h < self.n // 2 else 0xFFFF0000]

    def nvmlDeviceGetNumaNodeId(self, h):
        return 0 if h < self.n // 2 else 1


def test_nvml_pcie_levels():
    # 4 GPUs: 0,1 on one switch (SINGLE), 2,3 on another (MULTIPLE), across sockets SYSTEM.
    def anc(a, b):
        if {a, b} == {0, 1}:
            return 10
        if {a, b} == {2, 3}:
            return 20
        return 50

    nv = FakeNvml(4, anc)
    t = T.from_nvml(nv)
    assert nv.inited == 0  # init and shutdown paired
    assert t.source == "nvml"
    assert t.link(0, 1) == "PIX" and t.link(2, 3) == "PXB" and t.link(0, 3) == "SYS"
    assert t.cpu_affinity_text(0) == "0-15" and t.cpu_affinity_text(3) == "16-31"
    assert t.numa(0) == 0 and t.numa(2) == 1
    assert t.uuids[2] == "GPU-00000002"
    assert t.best_pairs() == [(0, 1), (2, 3)]


def test_nvml_direct_nvlinks_and_nvswitch():
    direct = FakeNvml(4, lambda a, b: 50, nvlinks={(0, 1): 4, (2, 3): 4, (0, 2): 2})
    t = T.from_nvml(direct)
    assert t.link(0, 1) == "NV4" and t.link(0, 2) == "NV2" and t.link(1, 3) == "SYS"
    hgx = FakeNvml(4, lambda a, b: 50, switch_links=18)  # HGX H100: all links to NVSwitches
    t2 = T.from_nvml(hgx)
    assert all(t2.link(i, j) == "NV18" for i in range(4) for j in range(4) if i != j)
    assert T.compare(t2, T.parse_topo_matrix((DATA / "nvidia-smi-topo-h100x4.txt").read_text())) == []


def test_nvml_absent_returns_none():
    class Broken:
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    assert T.from_nvml(Broken()) is None


def test_reconcile_fills_numa_and_cpus_and_lists_disagreements_then_renumbers_for_cuda():
    smi_text = make_text(2, lambda i, j: "NV18", lambda i: "0-7", lambda i: 1)
    nvml = T.Topology(gpus=[0, 1], matrix=[["X", "PIX"], ["PIX", "X"]], source="nvml")
    topo, diffs = T.reconcile(nvml, smi_text)
    assert topo is nvml and topo.numa(0) == 1 and topo.numa(1) == 1
    assert topo.cpu_affinity(0) == list(range(8))
    assert diffs == ["GPU0-GPU1: nvml PIX vs nvidia-smi NV18", "GPU1-GPU0: nvml PIX vs nvidia-smi NV18"]
    alone, none = T.reconcile(None, smi_text)
    assert alone.link(0, 1) == "NV18" and none == []
    assert T.reconcile(nvml, "not a matrix") == (nvml, []) and T.reconcile(None, None) == (None, [])
    # CUDA 0 is NVML 1 (CUDA_VISIBLE_DEVICES=1,0): links read through the map
    three = T.Topology(gpus=[0, 1, 2], matrix=[["X", "SYS", "PIX"], ["SYS", "X", "NV4"], ["PIX", "NV4", "X"]])
    cuda_to_nvml = {0: 1, 1: 2}
    assert T.mapped_link(three, cuda_to_nvml, 0, 1) == "NV4" and T.mapped_link(three, cuda_to_nvml, 0, 5) is None
    cuda = T.renumbered(three, cuda_to_nvml, [0, 1])
    assert cuda.gpus == [0, 1] and cuda.link(0, 1) == "NV4"
    assert T.renumbered(three, {0: 1, 1: None}, [0, 1]) is None


def test_detect_is_nvml_reconciled_with_nvidia_smi(monkeypatch):
    """The launcher's topology is the one harness hw records: NVML's links, with nvidia-smi's
    NUMA and CPU-affinity columns where NVML has none."""
    nvml = T.Topology(gpus=[0, 1], matrix=[["X", "NV18"], ["NV18", "X"]], source="nvml")
    smi_text = make_text(2, lambda i, j: "NV18", lambda i: "0-7" if i == 0 else "8-15", lambda i: i)
    monkeypatch.setattr(T, "from_nvml", lambda *a, **k: nvml)
    monkeypatch.setattr(T, "nvidia_smi_topo_text", lambda *a, **k: smi_text)
    topo = T.detect()
    assert topo.source == "nvml" and topo.link(0, 1) == "NV18"
    assert [topo.numa(g) for g in (0, 1)] == [0, 1]
    assert topo.cpu_affinity(1) == list(range(8, 16))
    monkeypatch.setattr(T, "from_nvml", lambda *a, **k: None)
    assert T.detect().source == "nvidia-smi"
    monkeypatch.setattr(T, "nvidia_smi_topo_text", lambda *a, **k: None)
    assert T.detect() is None
