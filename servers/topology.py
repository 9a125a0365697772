"""GPU interconnect topology: which GPUs are linked how, and which CPUs/NUMA node each sits near.

Two sources give the same picture:

- the text of ``nvidia-smi topo -m`` (:func:`nvidia_smi_topo_text`, :func:`parse_topo_matrix`);
- NVML through nvidia-ml-py (:func:`from_nvml`): ``nvmlDeviceGetTopologyCommonAncestor`` for the
  PCIe path, NVLink state and ``nvmlDeviceGetP2PStatus`` for NVLink, ``nvmlDeviceGetCpuAffinity``
  and sysfs for CPUs and NUMA.

Link labels are nvidia-smi's: ``X`` (self), ``NV#`` (a bonded set of # NVLinks), ``PIX`` (at most
one PCIe bridge), ``PXB`` (several PCIe bridges, no host bridge), ``PHB`` (through a PCIe host
bridge, typically the CPU), ``NODE`` (between host bridges of one NUMA node), ``SYS`` (across the
SMP interconnect between NUMA nodes, e.g. QPI/UPI). Quality ranks
``NV#`` (more links better) > ``PIX`` > ``PXB`` > ``PHB`` > ``NODE`` > ``SYS``.

GPU indices here are the ones ``nvidia-smi``/NVML use (PCI bus order). CUDA numbers devices the
same way only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and no ``CUDA_VISIBLE_DEVICES`` remapping;
match by UUID (:attr:`Topology.uuids`) where it matters.

Pure functions and plain data; nothing here imports torch, and NVML is imported only inside
:func:`from_nvml`.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

SELF = "X"
PCIE_LABELS = ("PIX", "PXB", "PHB", "NODE", "SYS")
# Older drivers print SOC where newer ones print SYS.
_ALIASES = {"SOC": "SYS"}
_BASE_SCORE = {"SYS": 10, "NODE": 20, "PHB": 30, "PXB": 40, "PIX": 50}
_NV_BASE = 100
_SELF_SCORE = 10_000
_NV_RE = re.compile(r"^NV(\d+)$")
_DEV_RE = re.compile(r"^(GPU|NIC)(\d+)$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def normalize_label(label: str) -> str:
    """Canonical spelling of one matrix cell (``' X '`` -> ``'X'``, ``'SOC'`` -> ``'SYS'``)."""
    s = label.strip().upper()
    s = _ALIASES.get(s, s)
    if s == SELF or s in _BASE_SCORE or _NV_RE.match(s):
        return s
    raise ValueError(f"unknown topology link label {label!r}")


def _is_label(cell: str) -> bool:
    try:
        normalize_label(cell)
    except ValueError:
        return False
    return True


def nvlink_count(label: str) -> int:
    """Number of bonded NVLinks a label says (``'NV18'`` -> 18); 0 for PCIe-only links."""
    m = _NV_RE.match(label.strip().upper())
    return int(m.group(1)) if m else 0


def link_score(label: str) -> int:
    """A number that orders link quality: higher is better.

    ``SYS`` 10 < ``NODE`` 20 < ``PHB`` 30 < ``PXB`` 40 < ``PIX`` 50 < ``NV1`` 101 < ``NV18`` 118;
    ``X`` (self) is above everything.
    """
    s = normalize_label(label)
    if s == SELF:
        return _SELF_SCORE
    n = nvlink_count(s)
    if n:
        return _NV_BASE + n
    return _BASE_SCORE[s]


def is_nvlink(label: str) -> bool:
    return nvlink_count(label) > 0


def is_same_switch(label: str) -> bool:
    """NVLink, or PCIe under a switch without crossing a host bridge (PIX/PXB)."""
    s = normalize_label(label)
    return is_nvlink(s) or s in ("PIX", "PXB")


def parse_cpu_list(text: str | None) -> list[int]:
    """``'0-3,8,10-11'`` -> ``[0, 1, 2, 3, 8, 10, 11]``; ``None``/``'N/A'``/empty -> ``[]``."""
    if not text:
        return []
    text = text.strip()
    if not text or text.upper() == "N/A":
        return []
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Inverse of :func:`parse_cpu_list`: ``[0,1,2,3,8]`` -> ``'0-3,8'``."""
    xs = sorted(set(cpus))
    if not xs:
        return ""
    out: list[str] = []
    start = prev = xs[0]
    for c in [*xs[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if c is not None:
            start = prev = c
    return ",".join(out)


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return None


@dataclass
class Topology:
    """A GPU x GPU link matrix with per-GPU CPU affinity and NUMA node.

    ``gpus`` are device indices (nvidia-smi/NVML numbering); ``matrix[a][b]`` is the label between
    ``gpus[a]`` and ``gpus[b]``. Use the accessor methods, which take device indices.
    """

    gpus: list[int]
    matrix: list[list[str]]
    cpu_affinities: dict[int, str] = field(default_factory=dict)
    numa_nodes: dict[int, int | None] = field(default_factory=dict)
    gpu_numa_ids: dict[int, int | None] = field(default_factory=dict)
    uuids: dict[int, str] = field(default_factory=dict)
    nics: dict[str, str] = field(default_factory=dict)  # "NIC0" -> "mlx5_0" where the legend says
    nic_links: dict[tuple[int, str], str] = field(default_factory=dict)  # (gpu, "NIC0") -> label
    source: str = "unknown"  # "nvidia-smi", "nvml", "constructed"

    def __post_init__(self) -> None:
        n = len(self.gpus)
        if len(self.matrix) != n or any(len(row) != n for row in self.matrix):
            raise ValueError(f"topology matrix must be {n}x{n}")
        self.matrix = [[normalize_label(c) for c in row] for row in self.matrix]
        self._pos = {g: k for k, g in enumerate(self.gpus)}

    # -- accessors ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.gpus)

    def _p(self, gpu: int) -> int:
        try:
            return self._pos[gpu]
        except KeyError:
            raise KeyError(f"GPU {gpu} is not in this topology (GPUs: {self.gpus})") from None

    def link(self, i: int, j: int) -> str:
        """The label between GPUs ``i`` and ``j`` (``'X'`` when ``i == j``)."""
        return self.matrix[self._p(i)][self._p(j)]

    def score(self, i: int, j: int) -> int:
        """Link quality between ``i`` and ``j`` (see :func:`link_score`); higher is better."""
        return link_score(self.link(i, j))

    def nvlinks(self, i: int, j: int) -> int:
        return 0 if i == j else nvlink_count(self.link(i, j))

    def numa(self, i: int) -> int | None:
        """The NUMA node GPU ``i`` is attached to, ``None`` where unknown (``N/A``)."""
        self._p(i)
        return self.numa_nodes.get(i)

    def cpu_affinity(self, i: int) -> list[int]:
        """CPU cores near GPU ``i`` (to pin its server process with ``taskset``/``numactl``)."""
        self._p(i)
        return parse_cpu_list(self.cpu_affinities.get(i))

    def cpu_affinity_text(self, i: int) -> str | None:
        self._p(i)
        return self.cpu_affinities.get(i)

    def same_numa(self, i: int, j: int) -> bool | None:
        a, b = self.numa(i), self.numa(j)
        if a is None or b is None:
            return None
        return a == b

    def peers(self, i: int) -> list[int]:
        """Other GPUs ordered best link first (ties by index)."""
        return sorted((g for g in self.gpus if g != i), key=lambda g: (-self.score(i, g), g))

    def pairs_ranked(self) -> list[tuple[int, int, str]]:
        """Every unordered pair ``(i, j, label)``, best link first (ties by index)."""
        pairs = [(i, j, self.link(i, j)) for i, j in itertools.combinations(self.gpus, 2)]
        return sorted(pairs, key=lambda p: (-link_score(p[2]), p[0], p[1]))

    def group_score(self, group: Sequence[int]) -> int:
        """A group is as good as its worst link."""
        if len(group) < 2:
            return _SELF_SCORE
        return min(self.score(a, b) for a, b in itertools.combinations(group, 2))

    def best_groups(self, size: int, gpus: Sequence[int] | None = None) -> list[tuple[int, ...]]:
        """Split ``gpus`` (default all) into disjoint groups of ``size`` (e.g. tensor-parallel sets).

        Groups are chosen so the worst group is as good as possible, then the next worst, and so
        on (leximin over each group's weakest link). Exact for up to 16 GPUs; greedy beyond.
        Leftover GPUs (``len(gpus) % size``) are left out, the worst-connected ones first.
        Returns groups sorted best first.
        """
        pool = sorted(self.gpus if gpus is None else gpus)
        for g in pool:
            self._p(g)
        if size < 1:
            raise ValueError("group size must be >= 1")
        if size == 1:
            return [(g,) for g in pool]
        if len(pool) < size:
            return []
        if len(pool) <= 16:
            groups = self._best_groups_exact(tuple(pool), size)
        else:
            groups = self._best_groups_greedy(pool, size)
        return sorted(groups, key=lambda grp: (-self.group_score(grp), grp))

    def best_pairs(self, gpus: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """Disjoint GPU pairs for TP=2, best links first (see :meth:`best_groups`)."""
        return [(a, b) for a, b in self.best_groups(2, gpus)]

    def _best_groups_exact(self, pool: tuple[int, ...], size: int) -> list[tuple[int, ...]]:
        n_groups = len(pool) // size

        @cache
        def solve(rest: tuple[int, ...], need: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
            # Returns (ascending group scores, groups); maximise the score vector lexicographically.
            if need == 0:
                return (), ()
            best: tuple[tuple[int, ...], tuple[tuple[int, ...], ...]] | None = None
            # Either the first GPU is in a group, or it is one of the leftovers (if any may be left).
            first, others = rest[0], rest[1:]
            options: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
            for combo in itertools.combinations(others, size - 1):
                grp = (first,) + combo
                remaining = tuple(g for g in others if g not in combo)
                options.append((grp, remaining))
            if len(rest) - size * need > 0:
                options.append(((), others))  # leave `first` out
            for grp, remaining in options:
                if len(remaining) < size * (need - (1 if grp else 0)):
                    continue
                sub_scores, sub_groups = solve(remaining, need - (1 if grp else 0))
                if grp:
                    scores = tuple(sorted(sub_scores + (self.group_score(grp),)))
                    groups = (grp,) + sub_groups
                else:
                    scores, groups = sub_scores, sub_groups
                if best is None or scores > best[0]:
                    best = (scores, groups)
            assert best is not None
            return best

        return list(solve(pool, n_groups)[1])

    def _best_groups_greedy(self, pool: list[int], size: int) -> list[tuple[int, ...]]:
        left = list(pool)
        groups: list[tuple[int, ...]] = []
        while len(left) >= size:
            # Seed with the best remaining pair, then add whoever keeps the group's worst link best.
            best_pair = max(
                itertools.combinations(left, 2), key=lambda p: (self.score(*p), -p[0], -p[1])
            )
            grp = list(best_pair)
            while len(grp) < size:
                cand = max(
                    (g for g in left if g not in grp),
                    key=lambda g: (min(self.score(g, h) for h in grp), -g),
                )
                grp.append(cand)
            groups.append(tuple(sorted(grp)))
            left = [g for g in left if g not in grp]
        return groups

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "gpus": list(self.gpus),
            "matrix": [list(r) for r in self.matrix],
            "cpu_affinity": {str(g): self.cpu_affinities.get(g) for g in self.gpus},
            "numa": {str(g): self.numa_nodes.get(g) for g in self.gpus},
            "uuids": {str(g): u for g, u in self.uuids.items()},
            "best_pairs": [list(p) for p in self.best_pairs()],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Topology:
        gpus = [int(g) for g in d["gpus"]]
        return cls(
            gpus=gpus,
            matrix=d["matrix"],
            cpu_affinities={int(k): v for k, v in (d.get("cpu_affinity") or {}).items() if v},
            numa_nodes={int(k): v for k, v in (d.get("numa") or {}).items()},
            uuids={int(k): v for k, v in (d.get("uuids") or {}).items()},
            source=d.get("source", "unknown"),
        )

    def render(self) -> str:
        """A compact text matrix in nvidia-smi's layout (for logs and reports)."""
        head = ["", *[f"GPU{g}" for g in self.gpus], "CPU Affinity", "NUMA"]
        rows = [head]
        for g in self.gpus:
            numa = self.numa_nodes.get(g)
            rows.append(
                [f"GPU{g}", *[self.link(g, h) for h in self.gpus],
                 self.cpu_affinities.get(g) or "N/A", "N/A" if numa is None else str(numa)]
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


# -- nvidia-smi topo -m ------------------------------------------------------------------------


def parse_topo_matrix(text: str) -> Topology:
    """Parse the text of ``nvidia-smi topo -m``.

    Handles NIC rows/columns (kept apart in ``nic_links``), the ``NIC Legend`` section, the
    optional ``GPU NUMA ID`` column, empty cells (nvidia-smi pads with extra tabs) and ``N/A``.
    """
    text = _ANSI_RE.sub("", text)
    lines = text.splitlines()
    header_idx = None
    for k, ln in enumerate(lines):
        cells = [c.strip() for c in ln.split("\t") if c.strip()]
        if not cells or cells[0] != "GPU0":
            continue
        # The header's second cell is a column name (GPU1, NIC0, CPU Affinity); a row's is a label.
        if len(cells) == 1 or not _is_label(cells[1]):
            header_idx = k
            break
    if header_idx is None:
        raise ValueError("no `nvidia-smi topo -m` header line (GPU0 GPU1 ... CPU Affinity) found")
    header = [c.strip() for c in lines[header_idx].split("\t") if c.strip()]
    dev_cols = [c for c in header if _DEV_RE.match(c)]
    info_cols = [c for c in header if not _DEV_RE.match(c)]
    if not dev_cols or not dev_cols[0].startswith("GPU"):
        raise ValueError("`nvidia-smi topo -m` header lists no GPU columns")

    rows: dict[str, tuple[list[str], dict[str, str | None]]] = {}
    nics: dict[str, str] = {}
    in_nic_legend = False
    for ln in lines[header_idx + 1:]:
        stripped = ln.strip()
        if not stripped:
            continue
        if stripped.startswith("Legend"):
            in_nic_legend = False
            continue
        if stripped.startswith("NIC Legend"):
            in_nic_legend = True
            continue
        if in_nic_legend:
            m = re.match(r"^(NIC\d+)\s*:\s*(\S+)", stripped)
            if m:
                nics[m.group(1)] = m.group(2)
            continue
        toks = stripped.split()
        if not toks or not _DEV_RE.match(toks[0]):
            continue
        name = toks[0]
        if name in rows:
            continue
        cells = toks[1:1 + len(dev_cols)]
        if len(cells) < len(dev_cols):
            raise ValueError(f"row {name} has {len(cells)} link cells, header has {len(dev_cols)}")
        rest = toks[1 + len(dev_cols):]
        info = {col: (rest[k] if k < len(rest) else None) for k, col in enumerate(info_cols)}
        rows[name] = (cells, info)

    gpu_names = [c for c in dev_cols if c.startswith("GPU")]
    gpus = [int(c[3:]) for c in gpu_names]
    missing = [g for g in gpu_names if g not in rows]
    if missing:
        raise ValueError(f"`nvidia-smi topo -m` text has no row for {', '.join(missing)}")
    col_pos = {c: k for k, c in enumerate(dev_cols)}
    matrix = [[rows[a][0][col_pos[b]] for b in gpu_names] for a in gpu_names]

    def info_value(info: dict[str, str | None], *names: str) -> str | None:
        for nm in names:
            for col, val in info.items():
                if col.lower() == nm.lower():
                    return val
        return None

    cpu, numa, gpu_numa = {}, {}, {}
    for g, nm in zip(gpus, gpu_names):
        info = rows[nm][1]
        aff = info_value(info, "CPU Affinity")
        if aff and aff.upper() != "N/A":
            cpu[g] = aff
        numa[g] = _int_or_none(info_value(info, "NUMA Affinity"))
        gpu_numa[g] = _int_or_none(info_value(info, "GPU NUMA ID"))
    nic_links: dict[tuple[int, str], str] = {}
    for g, nm in zip(gpus, gpu_names):
        for c in dev_cols:
            if c.startswith("NIC"):
                nic_links[(g, c)] = normalize_label(rows[nm][0][col_pos[c]])
    return Topology(
        gpus=gpus, matrix=matrix, cpu_affinities=cpu, numa_nodes=numa, gpu_numa_ids=gpu_numa,
        nics=nics, nic_links=nic_links, source="nvidia-smi",
    )


def nvidia_smi_topo_text(timeout: float = 20.0) -> str | None:
    """The text of ``nvidia-smi topo -m``; ``None`` when nvidia-smi is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        proc = subprocess.run([exe, "topo", "-m"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


# -- NVML ----------------------------------------------------------------------------------------

# nvmlGpuTopologyLevel_t -> nvidia-smi label
_NVML_LEVEL_LABEL = {
    0: "PIX",    # NVML_TOPOLOGY_INTERNAL: same board (multi-GPU card)
    10: "PIX",   # NVML_TOPOLOGY_SINGLE
    20: "PXB",   # NVML_TOPOLOGY_MULTIPLE
    30: "PHB",   # NVML_TOPOLOGY_HOSTBRIDGE
    40: "NODE",  # NVML_TOPOLOGY_NODE (was CPU)
    50: "SYS",   # NVML_TOPOLOGY_SYSTEM
}


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def sysfs_pci_id(nvml_bus_id: str) -> str:
    """NVML's ``'00000000:18:00.0'`` -> sysfs's ``'0000:18:00.0'`` (lower case)."""
    bus = nvml_bus_id.strip().lower()
    dom, _, rest = bus.partition(":")
    return f"{dom[-4:]}:{rest}" if rest else bus


def _sysfs_numa(bus_id: str) -> int | None:
    try:
        with open(f"/sys/bus/pci/devices/{sysfs_pci_id(bus_id)}/numa_node") as f:
            v = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return v if v >= 0 else None


def _mask_to_cpus(words: Sequence[int], bits: int = 64) -> list[int]:
    cpus = []
    for w, word in enumerate(words):
        word = int(word)
        for b in range(bits):
            if word >> b & 1:
                cpus.append(w * bits + b)
    return cpus


def from_nvml(nvml: Any = None, indices: Sequence[int] | None = None) -> Topology | None:
    """Build the topology through NVML (nvidia-ml-py); ``None`` if NVML is unavailable.

    ``nvml`` is the ``pynvml`` module (injectable for tests). NVLink counts come from the links
    whose state is enabled and whose far end is the peer's PCI bus id, or an NVSwitch (then every
    GPU on the switch fabric reaches every other over ``min`` of their switch links, the way
    nvidia-smi prints NV18 on HGX H100); ``nvmlDeviceGetP2PStatus(..., NVLINK)`` confirms.
    """
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except Exception:
        return None
    try:
        count = nvml.nvmlDeviceGetCount()
        idx = list(range(count)) if indices is None else [i for i in indices if 0 <= i < count]
        handles = {i: nvml.nvmlDeviceGetHandleByIndex(i) for i in idx}
        bus = {}
        uuids = {}
        for i, h in handles.items():
            try:
                bus[i] = _s(nvml.nvmlDeviceGetPciInfo(h).busId).lower()
            except Exception:
                bus[i] = ""
            try:
                uuids[i] = _s(nvml.nvmlDeviceGetUUID(h))
            except Exception:
                pass

        max_links = int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))
        enabled = int(getattr(nvml, "NVML_FEATURE_ENABLED", 1))
        switch_type = int(getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2))
        direct: dict[tuple[int, int], int] = {}
        to_switch: dict[int, int] = {i: 0 for i in idx}
        by_bus = {b: i for i, b in bus.items() if b}
        for i, h in handles.items():
            for link in range(max_links):
                try:
                    if int(nvml.nvmlDeviceGetNvLinkState(h, link)) != enabled:
                        continue
                except Exception:
                    continue  # link absent / not supported
                remote_is_switch = False
                try:
                    rtype = nvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, link)
                    remote_is_switch = int(rtype) == switch_type
                except Exception:
                    pass
                remote_bus = ""
                try:
                    info = (nvml.nvmlDeviceGetNvLinkRemotePciInfo_v2(h, link)
                            if hasattr(nvml, "nvmlDeviceGetNvLinkRemotePciInfo_v2")
                            else nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link))
                    remote_bus = _s(info.busId).lower()
                except Exception:
                    pass
                if remote_bus in by_bus and by_bus[remote_bus] != i and not remote_is_switch:
                    key = (i, by_bus[remote_bus])
                    direct[key] = direct.get(key, 0) + 1
                else:
                    to_switch[i] += 1

        def p2p_nvlink(h1: Any, h2: Any) -> bool | None:
            cap = getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", None)
            ok = getattr(nvml, "NVML_P2P_STATUS_OK", 0)
            if cap is None:
                return None
            try:
                return int(nvml.nvmlDeviceGetP2PStatus(h1, h2, cap)) == int(ok)
            except Exception:
                return None

        matrix: list[list[str]] = []
        for i in idx:
            row = []
            for j in idx:
                if i == j:
                    row.append(SELF)
                    continue
                n = direct.get((i, j), 0) or direct.get((j, i), 0)
                p2p = p2p_nvlink(handles[i], handles[j])
                if not n and to_switch[i] and to_switch[j] and p2p is not False:
                    n = min(to_switch[i], to_switch[j])
                if n and p2p is not False:
                    row.append(f"NV{n}")
                    continue
                if p2p and not n:
                    row.append("NV1")  # NVLink reported usable but link count unknown
                    continue
                try:
                    level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j]))
                    row.append(_NVML_LEVEL_LABEL.get(level, "SYS"))
                except Exception:
                    row.append("SYS")
            matrix.append(row)

        cpus: dict[int, str] = {}
        numa: dict[int, int | None] = {}
        ncpu = os.cpu_count() or 64
        words = max(1, (ncpu + 63) // 64)
        for i, h in handles.items():
            try:
                mask = nvml.nvmlDeviceGetCpuAffinity(h, words)
                text = format_cpu_list(_mask_to_cpus(list(mask)))
                if text:
                    cpus[i] = text
            except Exception:
                pass
            node = None
            if hasattr(nvml, "nvmlDeviceGetNumaNodeId"):
                try:
                    node = int(nvml.nvmlDeviceGetNumaNodeId(h))
                    node = node if node >= 0 else None
                except Exception:
                    node = None
            numa[i] = node if node is not None else _sysfs_numa(bus.get(i, ""))
        return Topology(gpus=idx, matrix=matrix, cpu_affinities=cpus, numa_nodes=numa,
                        uuids=uuids, source="nvml")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def detect() -> Topology | None:
    """The machine's topology: NVML first, then ``nvidia-smi topo -m``; ``None`` with neither.

    The same merge ``harness hw`` records (:func:`reconcile`), so the launcher places replicas on
    the topology the hardware stage reported; disagreements between the two are ``harness hw``'s
    to report, not the launcher's.
    """
    topo, _ = reconcile(from_nvml(), nvidia_smi_topo_text())
    return topo


def reconcile(nvml_topo: Topology | None, smi_text: str | None) -> tuple[Topology | None, list[str]]:
    """NVML's topology checked against ``nvidia-smi topo -m``'s text, and where they disagree.

    Without NVML's, nvidia-smi's parsed alone (``None`` when unparseable); with both, NVML's
    with nvidia-smi's NUMA and CPU-affinity columns filling what NVML left unknown (NVML's view
    lacks them on some hosts), and one line per link cell the two read differently
    (``harness hw`` records them as errors).
    """
    if not smi_text:
        return nvml_topo, []
    try:
        smi = parse_topo_matrix(smi_text)
    except ValueError:
        return nvml_topo, []
    if nvml_topo is None:
        return smi, []
    for g in nvml_topo.gpus:
        if g not in smi.gpus:
            continue
        if nvml_topo.numa_nodes.get(g) is None:
            nvml_topo.numa_nodes[g] = smi.numa(g)
        if not nvml_topo.cpu_affinities.get(g) and smi.cpu_affinities.get(g):
            nvml_topo.cpu_affinities[g] = smi.cpu_affinities[g]
    return nvml_topo, compare(nvml_topo, smi)


def mapped_link(topo: Topology | None, index_map: dict[int, int], i: int, j: int) -> str | None:
    """The link between ``i`` and ``j`` in another numbering (CUDA's), through ``index_map``
    (that index -> ``topo``'s NVML index); ``None`` where either is unknown to ``topo``."""
    if topo is None:
        return None
    a, b = index_map.get(i), index_map.get(j)
    if a is None or b is None or a not in topo.gpus or b not in topo.gpus:
        return None
    return topo.link(a, b)


def renumbered(topo: Topology, index_map: dict[int, int | None], gpus: Sequence[int]) -> Topology | None:
    """``topo`` over ``gpus`` in another numbering (CUDA's: ``CUDA_VISIBLE_DEVICES`` and
    ``CUDA_DEVICE_ORDER`` reorder devices), through ``index_map`` (that index -> NVML's);
    ``None`` unless every one of ``gpus`` maps onto a GPU ``topo`` knows."""
    mapped = [index_map.get(g) for g in gpus]
    nvml = [m for m in mapped if m is not None and m in topo.gpus]
    if len(nvml) != len(mapped):
        return None
    return Topology(gpus=list(gpus),
                    matrix=[[topo.link(a, b) for b in nvml] for a in nvml],
                    source=topo.source)


def compare(a: Topology, b: Topology) -> list[str]:
    """Cells where two topologies of the same GPUs disagree (e.g. NVML vs nvidia-smi)."""
    diffs = []
    if a.gpus != b.gpus:
        return [f"GPU lists differ: {a.gpus} vs {b.gpus}"]
    for i in a.gpus:
        for j in a.gpus:
            if a.link(i, j) != b.link(i, j):
                diffs.append(f"GPU{i}-GPU{j}: {a.source} {a.link(i, j)} vs {b.source} {b.link(i, j)}")
    return diffs
