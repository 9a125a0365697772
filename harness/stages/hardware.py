"""The hardware stage (``harness hw``): the seed's three checks, done right, plus an inventory.

1. **Memory bandwidth**: a device-to-device copy of a buffer sized from the card's free memory
   (1/8 of free memory per buffer, capped at 8 GiB, 1 GiB with ``quick``), counting read + write
   (``2 * bytes / time``). The seed's 2 x 40 GB buffers do not fit an 80 GB card.
2. **Dense BF16 GEMM**: 8192^3 ``torch.mm`` on random data, ``2*M*N*K / time``.
3. **P2P bandwidth**: every ordered pair ``i -> j`` of the chosen GPUs (a matrix, both
   directions), with ``torch.cuda.can_device_access_peer`` and the link label between them.

All timing is with CUDA events after warm-up: several repeats of a fixed number of iterations,
the median repeat reported (min and max kept). An NVML inventory (name, memory, clocks, PCIe
generation and width, power limit, topology) is taken, and GPU power, SM clock and temperature
are sampled through NVML during each timed check.

Pass/fail per check comes from a per-model target table (:data:`TARGETS`) whose peaks are the
vendor datasheets', each named; thresholds are fractions of those peaks (see the constants
below), except the L40S's, which are the seed's own absolute targets. A failing check carries
the known remedy.

A run that cannot measure what it was asked for (P2P with one GPU) is ``invalid``, not a pass:
its ``invalid`` check says why, and ``harness hw`` exits 3 (a failed check outranks it: exit 1).

torch and NVML are imported lazily: without torch or a CUDA GPU the stage says so in one line
and writes a result with ``"status": "skipped"``. Everything that decides pass/fail is a pure
function of recorded numbers (:func:`evaluate`) so it is tested without a GPU.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from harness.json_io import write_json
from servers import topology as topo_mod

SCHEMA = 1

# --- thresholds (fractions of datasheet peak) ------------------------------------------------
# Memory bandwidth: 83% of peak, the seed's ratio (0.72 of the L40S's 0.864 TB/s).
BW_FRACTION = 0.83
# Dense BF16 GEMM: 60% of the datasheet's dense peak. The seed's 82% (150 of 183) would fail
# healthy Hopper cards. Measured here (docs/hardware.md), 8192^3 BF16 on random data, timed
# with CUDA events: a cold H100 SXM or H200 runs 770-800 TFLOPS (78-81% of 989) for the first
# few hundred milliseconds, then its power cap (700 W, "sw_power_cap") pulls the SM clock from
# 1980 to ~1400-1700 MHz and the sustained median settles at 676-760 (68-77%), single repeats
# down to 646 (65%). The datasheet peak assumes a boost clock the card cannot hold under
# sustained tensor load. 60% (593) passes those healthy cards with margin and still catches a
# card throttled well below them (thermal, a lowered power limit) or shared with another job.
GEMM_FRACTION = 0.60
# NVLink P2P: 70% of the pair's NVLink rate per direction (links x 25 GB/s; H100 NV18 -> 450).
NVLINK_FRACTION = 0.70
NVLINK_LINK_GBS_PER_DIR = 25.0  # NVLink 3 and 4: 50 GB/s per link, both directions together
# PCIe P2P: 79% of the link's per-direction rate: the seed's "> 25 GB/s same switch" on Gen4 x16.
PCIE_P2P_FRACTION = 0.79
# Seed: "Poor (cross NUMA): < 10 GB/s -> rearrange GPU assignments".
P2P_POOR_GBS = 10.0
# Per-lane, per-direction PCIe data rate in GB/s after line coding.
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


def pcie_gbs(gen: int | None, width: int | None) -> float | None:
    """Per-direction PCIe rate in GB/s (Gen4 x16 -> 31.5)."""
    if not gen or not width or gen not in PCIE_LANE_GBS:
        return None
    return PCIE_LANE_GBS[gen] * width


@dataclass(frozen=True)
class GpuTarget:
    """One GPU model's datasheet figures and the pass thresholds derived from them."""

    key: str
    model: str
    name_patterns: tuple[str, ...]  # regexes matched (case-insensitive) against the device name
    memory_gb: float
    memory_type: str
    mem_bw_tbs: float  # datasheet peak memory bandwidth, TB/s
    bf16_dense_tflops: float  # datasheet dense (no sparsity) BF16 tensor rate
    nvlink_gbs: float | None  # datasheet NVLink bandwidth per GPU (both directions), None: none
    pcie_gen: int
    pcie_width: int
    source: str  # the datasheet, named
    bw_pass_tbs: float
    gemm_pass_tflops: float
    p2p_pcie_pass_gbs: float | None = None  # absolute override of the PCIe P2P target
    note: str = ""

    def matches(self, name: str) -> bool:
        return any(re.search(p, name, re.IGNORECASE) for p in self.name_patterns)


def _target(key: str, model: str, patterns: tuple[str, ...], memory_gb: float, memory_type: str,
            mem_bw_tbs: float, tflops: float, nvlink: float | None, gen: int, width: int,
            source: str, **kw: Any) -> GpuTarget:
    return GpuTarget(
        key=key, model=model, name_patterns=patterns, memory_gb=memory_gb,
        memory_type=memory_type, mem_bw_tbs=mem_bw_tbs, bf16_dense_tflops=tflops,
        nvlink_gbs=nvlink, pcie_gen=gen, pcie_width=width, source=source,
        bw_pass_tbs=kw.pop("bw_pass_tbs", round(BW_FRACTION * mem_bw_tbs, 3)),
        gemm_pass_tflops=kw.pop("gemm_pass_tflops", round(GEMM_FRACTION * tflops, 1)),
        **kw,
    )


TARGETS: dict[str, GpuTarget] = {
    t.key: t
    for t in (
        _target(
            "L40S", "NVIDIA L40S", (r"\bL40S\b",), 48, "GDDR6", 0.864, 362.0, None, 4, 16,
            "NVIDIA L40S GPU datasheet (nvidia.com/l40s): 48 GB GDDR6, 864 GB/s, "
            "BF16 Tensor 362.05 TFLOPS dense (733 with sparsity), PCIe Gen4 x16, no NVLink",
            # The seed's own targets are the L40S pass thresholds.
            bw_pass_tbs=0.72, gemm_pass_tflops=150.0, p2p_pcie_pass_gbs=25.0,
            note="thresholds from the seed plan: > 0.72 TB/s (83% of 0.864), > 150 TFLOPS "
                 "(the seed's 82% of 183; sources disagree on the dense rate, 181-183 vs 362), "
                 "P2P > 25 GB/s on one PCIe switch, < 10 GB/s cross-NUMA is poor",
        ),
        _target(
            "H100-SXM5-80GB", "NVIDIA H100 SXM5 80GB", (r"H100.*(HBM3|SXM)",), 80, "HBM3",
            3.35, 989.0, 900.0, 5, 16,
            "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/h100), H100 SXM: 80 GB HBM3, "
            "3.35 TB/s, BF16 Tensor 1,979 TFLOPS with sparsity = 989 dense, NVLink 900 GB/s, "
            "PCIe Gen5 128 GB/s",
        ),
        _target(
            "H200-SXM-141GB", "NVIDIA H200 SXM 141GB", (r"H200(?!.*NVL)",), 141, "HBM3e",
            4.8, 989.0, 900.0, 5, 16,
            "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/h200), H200 SXM: 141 GB HBM3e, "
            "4.8 TB/s, BF16 Tensor 1,979 TFLOPS with sparsity = 989 dense, NVLink 900 GB/s, "
            "PCIe Gen5 128 GB/s",
        ),
        _target(
            "A100-SXM4-80GB", "NVIDIA A100 SXM4 80GB", (r"A100.*SXM.*80", r"A100-SXM4-80GB"), 80,
            "HBM2e", 2.039, 312.0, 600.0, 4, 16,
            "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/a100), A100 80GB SXM: "
            "2,039 GB/s, BF16 Tensor 312 TFLOPS dense (624 with sparsity), NVLink 600 GB/s, "
            "PCIe Gen4 64 GB/s",
        ),
    )
}


def target_for(name: str) -> GpuTarget | None:
    """The target whose name pattern matches a device name (``'NVIDIA H100 80GB HBM3'``)."""
    for t in TARGETS.values():
        if t.matches(name):
            return t
    return None


def find_target(key: str) -> GpuTarget:
    """A target by key, case-insensitive, also by prefix (``'h100'`` -> H100-SXM5-80GB)."""
    k = key.strip().lower()
    for t in TARGETS.values():
        if t.key.lower() == k:
            return t
    hits = [t for t in TARGETS.values() if t.key.lower().startswith(k)]
    if len(hits) == 1:
        return hits[0]
    raise KeyError(f"no GPU target {key!r}; known: {', '.join(TARGETS)}")


# --- results (plain dataclasses, written as JSON) ---------------------------------------------

@dataclass
class PowerStats:
    samples: int = 0
    avg_w: float | None = None
    peak_w: float | None = None
    sm_clock_avg_mhz: float | None = None
    sm_clock_min_mhz: float | None = None
    temp_max_c: float | None = None
    clock_event_reasons: list[str] = field(default_factory=list)  # why clocks were held down
    power_reading: str | None = None  # "instant" or "1s-average" (nvmlDeviceGetPowerUsage)
    limit_w: float | None = None  # the card's enforced power limit (inventory), beside the samples


# nvmlClocksEventReason* / nvmlClocksThrottleReason* bits
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
    0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting",
}


def clock_reason_names(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]


@dataclass
class Timing:
    """Seconds per iteration for each timed repeat, and the reduction reported."""

    per_iter_s: list[float]
    warmup: int
    iters: int
    repeats: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_iter_s)


@dataclass
class HbmResult:
    gpu: int
    buffer_bytes: int
    tbs: float  # median, read + write counted
    tbs_min: float
    tbs_max: float
    warmup: int
    iters: int
    repeats: int
    power: PowerStats | None = None


@dataclass
class GemmResult:
    gpu: int
    m: int
    n: int
    k: int
    dtype: str
    tflops: float  # median
    tflops_min: float
    tflops_max: float
    warmup: int
    iters: int
    repeats: int
    power: PowerStats | None = None


@dataclass
class P2PResult:
    gpus: list[int]
    buffer_bytes: int
    gbs: list[list[float | None]]  # gbs[a][b]: gpus[a] -> gpus[b], median; None on the diagonal
    gbs_min: list[list[float | None]]
    can_access_peer: list[list[bool | None]]
    links: list[list[str | None]]  # nvidia-smi label between the two, None where unknown
    warmup: int
    iters: int
    repeats: int
    power: dict[str, PowerStats] = field(default_factory=dict)  # str(gpu) -> stats, whole sweep


@dataclass
class GpuInfo:
    index: int  # CUDA device index as used by this process
    name: str
    nvml_index: int | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total_mib: float | None = None
    memory_free_mib: float | None = None
    sm_count: int | None = None
    compute_capability: str | None = None
    sm_clock_max_mhz: int | None = None
    mem_clock_max_mhz: int | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    power_limit_w: float | None = None
    pcie_gen: int | None = None  # current (may read low at idle: links train down to save power)
    pcie_width: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_max: int | None = None
    numa_node: int | None = None
    cpu_affinity: str | None = None
    target: str | None = None


@dataclass
class Check:
    name: str  # "hbm_bandwidth", "gemm_bf16", "p2p", "p2p_pair"
    status: str  # pass | fail | warn | no-target | error | skipped | invalid (asked, not measurable)
    gpu: int | None = None
    pair: list[int] | None = None  # [src, dst] for p2p_pair
    value: float | None = None
    unit: str = ""
    threshold: float | None = None
    peak: float | None = None
    fraction_of_peak: float | None = None
    detail: str = ""
    remedy: str | None = None


@dataclass
class HardwareReport:
    status: str  # pass | fail | invalid | skipped (see overall_status)
    schema: int = SCHEMA
    skipped_reason: str | None = None
    started_at: str = ""
    duration_s: float = 0.0
    quick: bool = False
    host: dict[str, Any] = field(default_factory=dict)
    gpus: list[GpuInfo] = field(default_factory=list)
    topology: dict[str, Any] | None = None
    hbm: list[HbmResult] = field(default_factory=list)
    gemm: list[GemmResult] = field(default_factory=list)
    p2p: P2PResult | None = None
    checks: list[Check] = field(default_factory=list)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # Keep "schema" first for readers that peek.
        return {"schema": d.pop("schema"), **d}


def thresholds_doc() -> dict[str, Any]:
    return {
        "bandwidth_fraction_of_peak": BW_FRACTION,
        "gemm_fraction_of_dense_peak": GEMM_FRACTION,
        "nvlink_fraction": NVLINK_FRACTION,
        "nvlink_gbs_per_link_per_direction": NVLINK_LINK_GBS_PER_DIR,
        "pcie_p2p_fraction": PCIE_P2P_FRACTION,
        "p2p_poor_gbs": P2P_POOR_GBS,
        "note": "L40S uses the seed's absolute targets (0.72 TB/s, 150 TFLOPS, 25 GB/s P2P); "
                "other models use these fractions of their datasheet peaks",
    }


# --- pass/fail logic (pure) ---------------------------------------------------------------------

REMEDY_HBM = (
    "memory bandwidth below target: look for another process on the GPU (nvidia-smi), clock or "
    "power capping (nvidia-smi -q -d PERFORMANCE,CLOCK: thermal/power slowdown), ECC or "
    "row-remapping errors (nvidia-smi -q -d ECC,ROW_REMAPPER); a card that stays low needs "
    "vendor diagnostics (dcgmi diag -r 3)"
)
REMEDY_GEMM = (
    "BF16 GEMM below target: check throttle reasons and clocks (nvidia-smi -q -d PERFORMANCE,"
    "CLOCK), the power limit (nvidia-smi -q -d POWER), temperature and airflow, application "
    "clocks not lowered, persistence mode on, and no other process on the GPU"
)
REMEDY_NVLINK = (
    "NVLink pair below target: check `nvidia-smi nvlink --status` for links down or at reduced "
    "speed and `nvidia-smi nvlink -e` for errors; on NVSwitch systems check the fabric manager "
    "(systemctl status nvidia-fabricmanager); reseat or RMA a card whose links stay down"
)
REMEDY_PCIE_SWITCH = (
    "same-switch PCIe pair below target: check each card's link generation and width "
    "(nvidia-smi -q -d PCI: a card trained below Gen4/Gen5 x16 needs reseating or a BIOS slot "
    "setting), and that ACS/IOMMU does not force P2P through the root complex (disable ACS on "
    "the switch, iommu=pt)"
)
REMEDY_REARRANGE_HOST = (
    "this pair's traffic crosses the CPU host bridge (PHB/NODE): rearrange GPU assignments so "
    "tensor-parallel pairs sit under one PCIe switch (PIX/PXB) or on NVLink"
)
REMEDY_REARRANGE_NUMA = (
    "cross-NUMA pair (SYS): rearrange GPU assignments - keep tensor-parallel groups on one NUMA "
    "node, under one PCIe switch"
)
REMEDY_NO_PEER = (
    "peer access unavailable (can_device_access_peer is false): copies are staged through host "
    "memory; enable P2P (ACS off / IOMMU passthrough in BIOS and kernel, a driver with P2P "
    "support, not a VM without P2P) or pair GPUs that have it"
)


def _frac(value: float | None, peak: float | None) -> float | None:
    if value is None or not peak:
        return None
    return round(value / peak, 4)


def judge_hbm(gpu: int, tbs: float, target: GpuTarget | None) -> Check:
    if target is None:
        return Check("hbm_bandwidth", "no-target", gpu=gpu, value=round(tbs, 4), unit="TB/s",
                     detail="no datasheet target for this GPU model: figure reported only")
    ok = tbs >= target.bw_pass_tbs
    return Check(
        "hbm_bandwidth", "pass" if ok else "fail", gpu=gpu, value=round(tbs, 4), unit="TB/s",
        threshold=target.bw_pass_tbs, peak=target.mem_bw_tbs,
        fraction_of_peak=_frac(tbs, target.mem_bw_tbs),
        detail=f"{tbs:.3f} TB/s vs > {target.bw_pass_tbs} TB/s ({target.key}, peak "
               f"{target.mem_bw_tbs} TB/s)",
        remedy=None if ok else REMEDY_HBM,
    )


def judge_gemm(gpu: int, tflops: float, target: GpuTarget | None) -> Check:
    if target is None:
        return Check("gemm_bf16", "no-target", gpu=gpu, value=round(tflops, 1), unit="TFLOPS",
                     detail="no datasheet target for this GPU model: figure reported only")
    ok = tflops >= target.gemm_pass_tflops
    return Check(
        "gemm_bf16", "pass" if ok else "fail", gpu=gpu, value=round(tflops, 1), unit="TFLOPS",
        threshold=target.gemm_pass_tflops, peak=target.bf16_dense_tflops,
        fraction_of_peak=_frac(tflops, target.bf16_dense_tflops),
        detail=f"{tflops:.0f} TFLOPS vs > {target.gemm_pass_tflops:g} ({target.key}, dense peak "
               f"{target.bf16_dense_tflops:g})",
        remedy=None if ok else REMEDY_GEMM,
    )


def link_class(label: str | None) -> str:
    """``nvlink`` | ``switch`` (PIX/PXB) | ``host`` (PHB/NODE) | ``numa`` (SYS) | ``unknown``."""
    if not label:
        return "unknown"
    try:
        s = topo_mod.normalize_label(label)
    except ValueError:
        return "unknown"
    if topo_mod.is_nvlink(s):
        return "nvlink"
    return {"PIX": "switch", "PXB": "switch", "PHB": "host", "NODE": "host", "SYS": "numa"}.get(
        s, "unknown")


def p2p_expectation(label: str | None, src: GpuInfo | None, dst: GpuInfo | None,
                    target: GpuTarget | None) -> tuple[float | None, float | None]:
    """(rate per direction in GB/s, pass threshold) for a pair, from link and PCIe facts."""
    if label and topo_mod.nvlink_count(label):
        rate = topo_mod.nvlink_count(label) * NVLINK_LINK_GBS_PER_DIR
        if target and target.nvlink_gbs:
            rate = min(rate, target.nvlink_gbs / 2)
        return rate, round(NVLINK_FRACTION * rate, 1)
    # PCIe: the slower of the two cards' maximum link, else the datasheet's.
    rates = []
    for g in (src, dst):
        if g is not None:
            r = pcie_gbs(g.pcie_gen_max, g.pcie_width_max)
            if r:
                rates.append(r)
    rate = min(rates) if rates else (pcie_gbs(target.pcie_gen, target.pcie_width)
                                     if target else None)
    if target and target.p2p_pcie_pass_gbs is not None:
        return rate, target.p2p_pcie_pass_gbs
    if rate is None:
        return None, None
    return rate, round(PCIE_P2P_FRACTION * rate, 1)


def judge_pair(src: int, dst: int, gbs: float, label: str | None, can_peer: bool | None,
               rate: float | None, threshold: float | None) -> Check:
    cls = link_class(label)
    base = dict(name="p2p_pair", pair=[src, dst], value=round(gbs, 2), unit="GB/s",
                threshold=threshold, peak=rate, fraction_of_peak=_frac(gbs, rate))
    where = f"GPU{src}->GPU{dst} over {label or 'unknown link'}"
    if threshold is None:
        return Check(status="no-target", detail=f"{where}: {gbs:.1f} GB/s, no target", **base)
    if gbs >= threshold:
        return Check(status="pass", detail=f"{where}: {gbs:.1f} GB/s > {threshold:g}", **base)
    remedies = []
    if cls == "nvlink":
        status, remedies = "fail", [REMEDY_NVLINK]
    elif cls in ("switch", "unknown"):
        status, remedies = "fail", [REMEDY_PCIE_SWITCH]
    elif cls == "host":
        status, remedies = "warn", [REMEDY_REARRANGE_HOST]
    else:
        status, remedies = "warn", [REMEDY_REARRANGE_NUMA]
    if can_peer is False:
        remedies.append(REMEDY_NO_PEER)
    poor = " (poor: < 10 GB/s)" if gbs < P2P_POOR_GBS else ""
    return Check(status=status, detail=f"{where}: {gbs:.1f} GB/s < {threshold:g}{poor}",
                 remedy="; ".join(remedies), **base)


def judge_p2p(p2p: P2PResult, infos: dict[int, GpuInfo], targets: dict[int, GpuTarget | None],
              topology: topo_mod.Topology | None = None) -> list[Check]:
    """Per ordered pair checks, then the overall ``p2p`` check.

    Pairs on NVLink or one PCIe switch (or of unknown link) must meet their target: below it they
    fail. Pairs across a host bridge or NUMA nodes below target are warnings, since a launcher
    need not pair them; but when the best possible pairing of these GPUs still needs such a
    pair, the overall check fails with "rearrange GPU assignments".
    """
    checks: list[Check] = []
    by_pair: dict[tuple[int, int], Check] = {}
    for a, src in enumerate(p2p.gpus):
        for b, dst in enumerate(p2p.gpus):
            if a == b or p2p.gbs[a][b] is None:
                continue
            label = p2p.links[a][b]
            rate, thr = p2p_expectation(label, infos.get(src), infos.get(dst),
                                        targets.get(src) or targets.get(dst))
            c = judge_pair(src, dst, float(p2p.gbs[a][b]), label, p2p.can_access_peer[a][b],
                           rate, thr)
            checks.append(c)
            by_pair[(src, dst)] = c
    if not by_pair:
        return checks
    failed = [c for c in checks if c.status == "fail"]
    # The pairing a TP=2 launcher would choose among these GPUs.
    pairing: list[tuple[int, int]] = []
    if topology is not None and all(g in topology.gpus for g in p2p.gpus) and len(p2p.gpus) >= 2:
        pairing = topology.best_pairs(p2p.gpus)
    elif len(p2p.gpus) == 2:
        pairing = [(p2p.gpus[0], p2p.gpus[1])]
    bad_best = [
        c for (i, j) in pairing for c in (by_pair.get((i, j)), by_pair.get((j, i)))
        if c is not None and c.status == "warn"
    ]
    warned = [c for c in checks if c.status == "warn"]
    values = [c.value for c in checks if c.value is not None]
    summary = (f"{len(checks)} directed pairs, {min(values):.1f}-{max(values):.1f} GB/s; "
               f"{len(failed)} failed, {len(warned)} below target on host/NUMA links")
    if pairing:
        summary += "; best pairs " + ", ".join(f"{i}+{j}" for i, j in pairing)
    if failed:
        remedy = "; ".join(dict.fromkeys(c.remedy for c in failed if c.remedy))
        checks.append(Check("p2p", "fail", detail=summary, remedy=remedy,
                            value=min(values), unit="GB/s"))
    elif bad_best:
        remedy = ("no good pairing among these GPUs: rearrange GPU assignments "
                  "(choose GPUs that share a PCIe switch or NVLink, on one NUMA node); "
                  + "; ".join(dict.fromkeys(c.remedy for c in bad_best if c.remedy)))
        checks.append(Check("p2p", "fail", detail=summary, remedy=remedy,
                            value=min(values), unit="GB/s"))
    elif all(c.status == "no-target" for c in checks):
        checks.append(Check("p2p", "no-target", detail=summary, value=min(values), unit="GB/s"))
    else:
        checks.append(Check("p2p", "warn" if warned else "pass", detail=summary,
                            value=min(values), unit="GB/s",
                            remedy="; ".join(dict.fromkeys(c.remedy for c in warned if c.remedy))
                            or None))
    return checks


def evaluate(
    gpus: Sequence[GpuInfo],
    hbm: Iterable[HbmResult] = (),
    gemm: Iterable[GemmResult] = (),
    p2p: P2PResult | None = None,
    topology: topo_mod.Topology | None = None,
    target_override: GpuTarget | None = None,
) -> tuple[list[Check], str]:
    """All checks from recorded results, and the overall status (``pass`` or ``fail``)."""
    infos = {g.index: g for g in gpus}
    targets: dict[int, GpuTarget | None] = {
        g.index: target_override or target_for(g.name) for g in gpus
    }
    checks: list[Check] = []
    for r in hbm:
        checks.append(judge_hbm(r.gpu, r.tbs, targets.get(r.gpu)))
    for r in gemm:
        checks.append(judge_gemm(r.gpu, r.tflops, targets.get(r.gpu)))
    if p2p is not None:
        checks.extend(judge_p2p(p2p, infos, targets, topology))
    return checks, overall_status(checks)


def overall_status(checks: Iterable[Check]) -> str:
    """``fail`` when a check failed or errored; else ``invalid`` when something asked for could
    not be measured (a run that measured nothing it was asked for must not read as a pass);
    else ``pass``. A failure outranks invalid: what was measured stands on its own."""
    statuses = {c.status for c in checks}
    if statuses & {"fail", "error"}:
        return "fail"
    return "invalid" if "invalid" in statuses else "pass"


def unmeasurable(asked: Sequence[str], chosen: Sequence[int], visible: int) -> list[Check]:
    """An ``invalid`` check for each measurement asked for that this machine cannot make:
    P2P with fewer than two GPUs (the one there is; or the ones ``--gpus`` chose)."""
    if "p2p" not in asked or len(chosen) >= 2:
        return []
    have = (f"this machine has {visible}" if len(chosen) == visible
            else f"{len(chosen)} of this machine's {visible} chosen (--gpus)")
    return [Check("p2p", "invalid", detail=f"p2p needs at least 2 GPUs; {have}",
                  remedy="run on a machine with two or more GPUs, or leave p2p out of --checks")]


def nothing_measured(asked: Sequence[str], report: HardwareReport) -> list[Check]:
    """One ``invalid`` check when no figure at all came out and no check says why."""
    if report.hbm or report.gemm or report.p2p is not None or report.checks:
        return []
    return [Check("measurements", "invalid", detail=f"nothing measured (asked: {', '.join(asked)})")]


def exit_code(report: HardwareReport) -> int:
    """0 when every check passed (warnings and no-target included) or the stage was skipped,
    1 when one failed, 3 (as ``harness load`` for an invalid generator) when it was invalid."""
    from harness.stages.base import EXIT_FAILED, EXIT_INVALID

    return {"fail": EXIT_FAILED, "invalid": EXIT_INVALID}.get(report.status, 0)


# --- measurement (needs torch + CUDA) ----------------------------------------------------------


def _import_torch() -> tuple[Any, str | None]:
    """(torch, None) when a CUDA GPU is usable, else (None or torch, reason)."""
    try:
        import torch  # noqa: PLC0415 - lazy on purpose
    except ImportError:
        return None, "no CUDA GPU (torch is not installed)"
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return torch, "no CUDA GPU (torch.cuda.is_available() is False)"
    except Exception as exc:  # a broken driver raises here
        return torch, f"no CUDA GPU ({exc.__class__.__name__}: {exc})"
    return torch, None


def _import_nvml() -> Any:
    try:
        import pynvml  # noqa: PLC0415
        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


class PowerSampler:
    """Samples power, SM clock and temperature of some GPUs through NVML in a thread."""

    def __init__(self, nvml: Any, handles: dict[int, Any], interval_s: float = 0.05,
                 limits: dict[int, float | None] | None = None):
        self.nvml, self.handles, self.interval = nvml, handles, interval_s
        self.limits = dict(limits or {})
        self.samples: dict[int, list[tuple[float, float | None, float | None]]] = {
            g: [] for g in handles}
        self.reasons: dict[int, int] = {g: 0 for g in handles}
        self.instant: bool | None = None  # NVML_FI_DEV_POWER_INSTANT works (None: not tried)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _watts(self, h: Any) -> float | None:
        """Instantaneous board power where the driver offers it, else NVML's averaged reading.

        ``nvmlDeviceGetPowerUsage`` is a one-second average on recent GPUs (Ampere, Hopper):
        a check shorter than that would report the previous check's draw.
        """
        n = self.nvml
        field_id = getattr(n, "NVML_FI_DEV_POWER_INSTANT", None)
        if self.instant is not False and field_id is not None:
            try:
                fv = n.nvmlDeviceGetFieldValues(h, [field_id])[0]
                if int(fv.nvmlReturn) == 0:
                    self.instant = True
                    return float(fv.value.uiVal) / 1000.0
            except Exception:
                pass
            self.instant = False
        try:
            return n.nvmlDeviceGetPowerUsage(h) / 1000.0
        except Exception:
            return None

    def _sample(self) -> None:
        n = self.nvml
        for g, h in self.handles.items():
            w = self._watts(h)
            if w is None:
                continue
            try:
                clk = float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))
            except Exception:
                clk = None
            try:
                temp = float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
            except Exception:
                temp = None
            self.samples[g].append((w, clk, temp))
            get = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                n, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
            if get is not None:
                try:
                    self.reasons[g] |= int(get(h))
                except Exception:
                    pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PowerSampler":
        if self.nvml is not None and self.handles:
            self._thread = threading.Thread(target=self._run, name="nvml-power", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self._sample()

    def stats(self, gpu: int) -> PowerStats | None:
        s = self.samples.get(gpu) or []
        if not s:
            return None
        watts = [x[0] for x in s]
        clocks = [x[1] for x in s if x[1] is not None]
        temps = [x[2] for x in s if x[2] is not None]
        return PowerStats(
            samples=len(s), avg_w=round(statistics.fmean(watts), 1), peak_w=round(max(watts), 1),
            sm_clock_avg_mhz=round(statistics.fmean(clocks), 0) if clocks else None,
            sm_clock_min_mhz=min(clocks) if clocks else None,
            temp_max_c=max(temps) if temps else None,
            clock_event_reasons=clock_reason_names(self.reasons.get(gpu, 0) & ~0x1),
            power_reading="instant" if self.instant else "1s-average",
            limit_w=self.limits.get(gpu),
        )


def time_cuda(torch: Any, fn: Callable[[], Any], device: int, warmup: int, iters: int,
              repeats: int, sampler: PowerSampler | None = None) -> Timing:
    """Seconds per ``fn()`` call, timed with CUDA events on ``device``'s current stream."""
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        per_iter: list[float] = []
        ctx = sampler if sampler is not None else _Null()
        with ctx:
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                for _ in range(iters):
                    fn()
                end.record(stream)
                end.synchronize()
                per_iter.append(start.elapsed_time(end) / 1e3 / iters)
    return Timing(per_iter, warmup, iters, repeats)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


@dataclass
class Sizes:
    hbm_cap_bytes: int
    hbm_fraction: float
    gemm_dim: int
    p2p_cap_bytes: int
    warmup: int
    iters_hbm: int
    iters_gemm: int
    iters_p2p: int
    repeats: int

    @classmethod
    def for_mode(cls, quick: bool) -> "Sizes":
        if quick:
            return cls(1 << 30, 1 / 8, 8192, 256 << 20, 3, 5, 10, 3, 3)
        return cls(8 << 30, 1 / 8, 8192, 1 << 30, 10, 10, 20, 5, 7)


def buffer_bytes(free_bytes: int, fraction: float, cap: int, floor: int = 64 << 20) -> int:
    """A buffer of ``fraction`` of free memory, capped, at least ``floor``, a multiple of 1 MiB."""
    b = min(int(free_bytes * fraction), cap)
    b = max(b, floor)
    return b // (1 << 20) * (1 << 20)


def measure_hbm(torch: Any, gpu: int, sizes: Sizes, sampler: PowerSampler | None) -> HbmResult:
    free, _total = torch.cuda.mem_get_info(gpu)
    nbytes = buffer_bytes(free, sizes.hbm_fraction, sizes.hbm_cap_bytes)
    x = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{gpu}")
    x.random_(0, 255)
    y = torch.empty_like(x)
    t = time_cuda(torch, lambda: y.copy_(x), gpu, sizes.warmup, sizes.iters_hbm, sizes.repeats,
                  sampler)
    rates = [2 * nbytes / s / 1e12 for s in t.per_iter_s]  # read + write
    del x, y
    torch.cuda.empty_cache()
    return HbmResult(gpu=gpu, buffer_bytes=nbytes, tbs=round(2 * nbytes / t.median_s / 1e12, 4),
                     tbs_min=round(min(rates), 4), tbs_max=round(max(rates), 4),
                     warmup=t.warmup, iters=t.iters, repeats=t.repeats,
                     power=sampler.stats(gpu) if sampler else None)


def measure_gemm(torch: Any, gpu: int, sizes: Sizes, sampler: PowerSampler | None) -> GemmResult:
    free, _ = torch.cuda.mem_get_info(gpu)
    dim = sizes.gemm_dim
    while dim > 1024 and 3 * dim * dim * 2 > free // 2:
        dim //= 2
    dev = f"cuda:{gpu}"
    a = torch.randn(dim, dim, device=dev, dtype=torch.bfloat16)
    b = torch.randn(dim, dim, device=dev, dtype=torch.bfloat16)
    c = torch.empty(dim, dim, device=dev, dtype=torch.bfloat16)
    t = time_cuda(torch, lambda: torch.mm(a, b, out=c), gpu, sizes.warmup, sizes.iters_gemm,
                  sizes.repeats, sampler)
    flop = 2 * dim ** 3
    rates = [flop / s / 1e12 for s in t.per_iter_s]
    del a, b, c
    torch.cuda.empty_cache()
    return GemmResult(gpu=gpu, m=dim, n=dim, k=dim, dtype="bfloat16",
                      tflops=round(flop / t.median_s / 1e12, 1), tflops_min=round(min(rates), 1),
                      tflops_max=round(max(rates), 1), warmup=t.warmup, iters=t.iters,
                      repeats=t.repeats, power=sampler.stats(gpu) if sampler else None)


def measure_p2p(torch: Any, gpus: Sequence[int], sizes: Sizes, links: Callable[[int, int], str | None],
                sampler: PowerSampler | None, log: Callable[[str], None]) -> P2PResult:
    frees = [torch.cuda.mem_get_info(g)[0] for g in gpus]
    nbytes = buffer_bytes(min(frees), 1 / 8, sizes.p2p_cap_bytes)
    src = {g: torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{g}") for g in gpus}
    dst = {g: torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{g}") for g in gpus}
    for t in src.values():
        t.random_(0, 255)
    n = len(gpus)
    gbs: list[list[float | None]] = [[None] * n for _ in range(n)]
    gbs_min: list[list[float | None]] = [[None] * n for _ in range(n)]
    peer: list[list[bool | None]] = [[None] * n for _ in range(n)]
    lab: list[list[str | None]] = [[None] * n for _ in range(n)]
    ctx = sampler if sampler is not None else _Null()
    with ctx:
        for a, i in enumerate(gpus):
            for b, j in enumerate(gpus):
                lab[a][b] = links(i, j)
                if i == j:
                    continue
                peer[a][b] = bool(torch.cuda.can_device_access_peer(i, j))
                s_buf, d_buf = src[i], dst[j]
                t = time_cuda(torch, lambda: d_buf.copy_(s_buf), i, sizes.warmup // 2 + 1,
                              sizes.iters_p2p, sizes.repeats)
                torch.cuda.synchronize(j)
                gbs[a][b] = round(nbytes / t.median_s / 1e9, 2)
                gbs_min[a][b] = round(nbytes / max(t.per_iter_s) / 1e9, 2)
                log(f"  p2p GPU{i}->GPU{j} ({lab[a][b] or '?'}, peer access "
                    f"{'yes' if peer[a][b] else 'no'}): {gbs[a][b]:.1f} GB/s")
    del src, dst
    torch.cuda.empty_cache()
    power = {}
    if sampler is not None:
        for g in gpus:
            st = sampler.stats(g)
            if st is not None:
                power[str(g)] = st
    return P2PResult(gpus=list(gpus), buffer_bytes=nbytes, gbs=gbs, gbs_min=gbs_min,
                     can_access_peer=peer, links=lab, warmup=sizes.warmup // 2 + 1,
                     iters=sizes.iters_p2p, repeats=sizes.repeats, power=power)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _nvml_try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:
        return None


def inventory(torch: Any, gpus: Sequence[int], nvml: Any) -> tuple[list[GpuInfo], dict[int, Any]]:
    """Per-GPU facts from torch and NVML; also the NVML handle for each CUDA index."""
    nvml_by_uuid: dict[str, int] = {}
    nvml_by_bus: dict[str, int] = {}
    if nvml is not None:
        for k in range(_nvml_try(nvml.nvmlDeviceGetCount) or 0):
            h = nvml.nvmlDeviceGetHandleByIndex(k)
            u = _nvml_try(lambda: _s(nvml.nvmlDeviceGetUUID(h)))
            if u:
                nvml_by_uuid[u.lower().removeprefix("gpu-")] = k
            b = _nvml_try(lambda: _s(nvml.nvmlDeviceGetPciInfo(h).busId))
            if b:
                nvml_by_bus[topo_mod.sysfs_pci_id(b)] = k
    infos: list[GpuInfo] = []
    handles: dict[int, Any] = {}
    for g in gpus:
        p = torch.cuda.get_device_properties(g)
        free, total = torch.cuda.mem_get_info(g)
        info = GpuInfo(
            index=g, name=p.name, memory_total_mib=round(total / 2**20, 1),
            memory_free_mib=round(free / 2**20, 1), sm_count=p.multi_processor_count,
            compute_capability=f"{p.major}.{p.minor}",
        )
        uuid = str(getattr(p, "uuid", "") or "").lower().removeprefix("gpu-")
        k = nvml_by_uuid.get(uuid) if uuid else None
        if k is None and hasattr(p, "pci_bus_id"):
            bus = f"{getattr(p, 'pci_domain_id', 0):04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
            k = nvml_by_bus.get(bus)
        if k is None and nvml is not None and not os.environ.get("CUDA_VISIBLE_DEVICES") \
                and len(nvml_by_uuid) == torch.cuda.device_count() \
                and os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
            k = g
        if k is not None and nvml is not None:
            h = nvml.nvmlDeviceGetHandleByIndex(k)
            handles[g] = h
            info.nvml_index = k
            info.uuid = _nvml_try(lambda: _s(nvml.nvmlDeviceGetUUID(h)))
            info.pci_bus_id = _nvml_try(lambda: _s(nvml.nvmlDeviceGetPciInfo(h).busId))
            info.name = _nvml_try(lambda: _s(nvml.nvmlDeviceGetName(h))) or info.name
            info.sm_clock_max_mhz = _nvml_try(lambda: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM))
            info.mem_clock_max_mhz = _nvml_try(lambda: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_MEM))
            info.sm_clock_mhz = _nvml_try(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
            info.mem_clock_mhz = _nvml_try(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM))
            pl = _nvml_try(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
            info.power_limit_w = round(pl / 1000, 1) if pl else None
            info.pcie_gen = _nvml_try(lambda: nvml.nvmlDeviceGetCurrPcieLinkGeneration(h))
            info.pcie_width = _nvml_try(lambda: nvml.nvmlDeviceGetCurrPcieLinkWidth(h))
            info.pcie_gen_max = _nvml_try(lambda: nvml.nvmlDeviceGetMaxPcieLinkGeneration(h))
            info.pcie_width_max = _nvml_try(lambda: nvml.nvmlDeviceGetMaxPcieLinkWidth(h))
            mem = _nvml_try(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
            if mem is not None:
                info.memory_total_mib = round(mem.total / 2**20, 1)
        t = target_for(info.name)
        info.target = t.key if t else None
        infos.append(info)
    return infos, handles


def _host_info(torch: Any, nvml: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"hostname": platform.node(), "python": platform.python_version()}
    if torch is not None:
        d["torch"] = getattr(torch, "__version__", None)
        d["torch_cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    if nvml is not None:
        d["driver"] = _nvml_try(lambda: _s(nvml.nvmlSystemGetDriverVersion()))
        v = _nvml_try(nvml.nvmlSystemGetCudaDriverVersion)
        d["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}" if v else None
    d["nvml"] = nvml is not None
    d["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return d


def write_report(report: HardwareReport, out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "hardware.json"
    write_json(path, report.to_dict(), default=_json_default)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    return str(o)


def _power_from(d: dict[str, Any] | None) -> PowerStats | None:
    return PowerStats(**d) if d else None


def report_from_dict(d: dict[str, Any]) -> HardwareReport:
    """Rebuild a :class:`HardwareReport` from ``hardware.json`` (to re-judge recorded numbers)."""
    if d.get("schema") != SCHEMA:
        raise ValueError(f"hardware.json schema {d.get('schema')!r}, expected {SCHEMA}")
    hbm = [HbmResult(**{**r, "power": _power_from(r.get("power"))}) for r in d.get("hbm") or []]
    gemm = [GemmResult(**{**r, "power": _power_from(r.get("power"))}) for r in d.get("gemm") or []]
    p2p = None
    if d.get("p2p"):
        p = dict(d["p2p"])
        p["power"] = {k: PowerStats(**v) for k, v in (p.get("power") or {}).items()}
        p2p = P2PResult(**p)
    return HardwareReport(
        status=d["status"], skipped_reason=d.get("skipped_reason"),
        started_at=d.get("started_at", ""), duration_s=d.get("duration_s", 0.0),
        quick=d.get("quick", False), host=d.get("host") or {},
        gpus=[GpuInfo(**g) for g in d.get("gpus") or []], topology=d.get("topology"),
        hbm=hbm, gemm=gemm, p2p=p2p, checks=[Check(**c) for c in d.get("checks") or []],
        targets=d.get("targets") or {}, thresholds=d.get("thresholds") or {},
        errors=d.get("errors") or [],
    )


def load_report(path: str | os.PathLike[str]) -> HardwareReport:
    return report_from_dict(json.loads(Path(path).read_text()))


def rejudge(report: HardwareReport, target: str | None = None) -> HardwareReport:
    """The same measurements judged again with this code's targets (e.g. after a table change)."""
    topo = topo_mod.Topology.from_dict(report.topology) if report.topology else None
    cuda_topo = None
    if topo is not None and report.p2p is not None:
        nv = {g.index: g.nvml_index for g in report.gpus}
        if all(nv.get(g) in topo.gpus for g in report.p2p.gpus):
            cuda_topo = topo_mod.Topology(
                gpus=list(report.p2p.gpus),
                matrix=[[topo.link(nv[i], nv[j]) for j in report.p2p.gpus] for i in report.p2p.gpus],
                source=topo.source)
    override = find_target(target) if target else None
    checks, _ = evaluate(report.gpus, report.hbm, report.gemm, report.p2p, cuda_topo, override)
    carried = [c for c in report.checks if c.status in ("skipped", "error", "invalid")]
    if report.p2p is None and any(c.name == "p2p" and c.status == "skipped" for c in carried):
        # recorded before a P2P check that could not run made the run invalid: it was asked
        gpus = [g.index for g in report.gpus]
        carried = [c for c in carried if c.name != "p2p"] + unmeasurable(
            ["p2p"], gpus, int(report.host.get("cuda_devices") or len(gpus)))
    report.checks = checks + carried
    if report.status != "skipped":
        report.status = overall_status(report.checks)
    report.thresholds = thresholds_doc()
    return report


def skipped_report(reason: str, quick: bool = False) -> HardwareReport:
    return HardwareReport(
        status="skipped", skipped_reason=reason, quick=quick,
        started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        thresholds=thresholds_doc(),
    )


def run(
    out_dir: str | os.PathLike[str],
    gpus: Sequence[int] | None = None,
    quick: bool = False,
    target: str | None = None,
    checks: Sequence[str] = ("hbm", "gemm", "p2p"),
    log: Callable[[str], None] = print,
) -> HardwareReport:
    """Run the hardware stage and write ``hardware.json`` under ``out_dir``.

    ``gpus``: CUDA device indices (default all visible). ``quick``: smaller buffers and fewer
    repeats. ``target``: force a target key (see :data:`TARGETS`) instead of matching by name.
    Raises ``ValueError`` for GPU indices that do not exist or an unknown target.
    """
    override = find_target(target) if target else None
    t0 = time.perf_counter()
    torch, reason = _import_torch()
    if reason is not None:
        report = skipped_report(reason, quick)
        report.host = _host_info(torch, None)
        write_report(report, out_dir)
        return report

    count = torch.cuda.device_count()
    chosen = list(range(count)) if gpus is None else list(gpus)
    bad = [g for g in chosen if not 0 <= g < count]
    if bad:
        raise ValueError(f"no CUDA device {bad[0]}: this machine shows {count} (0-{count - 1})")
    if len(set(chosen)) != len(chosen):
        raise ValueError("a GPU is listed twice")

    report = HardwareReport(
        status="pass", quick=quick,
        started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        thresholds=thresholds_doc(),
    )
    nvml = _import_nvml()
    report.host = _host_info(torch, nvml)
    report.host["cuda_devices"] = count
    sizes = Sizes.for_mode(quick)
    infos, handles = inventory(torch, chosen, nvml)
    report.gpus = infos

    # Topology, in NVML numbering; translated to CUDA indices through the inventory.
    topo = topo_mod.from_nvml(nvml) if nvml is not None else None
    smi_text = topo_mod.nvidia_smi_topo_text()
    if smi_text:
        (Path(out_dir)).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "nvidia-smi-topo.txt").write_text(smi_text)
        if topo is None:
            try:
                topo = topo_mod.parse_topo_matrix(smi_text)
            except ValueError:
                topo = None
        else:
            try:
                smi = topo_mod.parse_topo_matrix(smi_text)
                for g in topo.gpus:
                    if topo.numa_nodes.get(g) is None and g in smi.gpus:
                        topo.numa_nodes[g] = smi.numa(g)
                diffs = topo_mod.compare(topo, smi)
                if diffs:
                    report.errors.append("NVML and nvidia-smi topology disagree: " + "; ".join(diffs))
            except ValueError:
                pass
    cuda_to_nvml = {i.index: i.nvml_index for i in infos if i.nvml_index is not None}
    if topo is not None:
        report.topology = topo.to_dict()
        for info in infos:
            k = info.nvml_index
            if k is not None and k in topo.gpus:
                info.numa_node = topo.numa(k)
                info.cpu_affinity = topo.cpu_affinity_text(k)

    def link(i: int, j: int) -> str | None:
        if topo is None:
            return None
        a, b = cuda_to_nvml.get(i), cuda_to_nvml.get(j)
        if a is None or b is None or a not in topo.gpus or b not in topo.gpus:
            return None
        return topo.link(a, b)

    cuda_topo = None
    if topo is not None and all(cuda_to_nvml.get(g) in topo.gpus for g in chosen):
        cuda_topo = topo_mod.Topology(
            gpus=chosen, matrix=[[link(i, j) or "SYS" for j in chosen] for i in chosen],
            source=topo.source)

    for info in infos:
        log(f"GPU{info.index}: {info.name}, {info.memory_total_mib / 1024:.1f} GiB, "
            f"PCIe gen {info.pcie_gen_max or '?'} x{info.pcie_width_max or '?'}, "
            f"target {override.key if override else info.target or 'none'}")
    if topo is not None:
        log(topo.render())

    def sampler_for(gs: Sequence[int]) -> PowerSampler | None:
        hs = {g: handles[g] for g in gs if g in handles}
        limits = {i.index: i.power_limit_w for i in infos}
        return PowerSampler(nvml, hs, interval_s=0.02, limits=limits) if hs else None

    for g in chosen:
        if "hbm" in checks:
            try:
                r = measure_hbm(torch, g, sizes, sampler_for([g]))
                report.hbm.append(r)
                log(f"GPU{g} memory copy: {r.tbs:.3f} TB/s (read + write, "
                    f"{r.buffer_bytes / 2**30:.2f} GiB buffers){_power_text(r.power)}")
            except Exception as exc:  # OOM, driver error: report, go on
                report.errors.append(f"hbm GPU{g}: {exc.__class__.__name__}: {exc}")
                report.checks.append(Check("hbm_bandwidth", "error", gpu=g, detail=str(exc)))
        if "gemm" in checks:
            try:
                r2 = measure_gemm(torch, g, sizes, sampler_for([g]))
                report.gemm.append(r2)
                log(f"GPU{g} BF16 GEMM {r2.m}^3: {r2.tflops:.0f} TFLOPS (repeats "
                    f"{r2.tflops_min:.0f}-{r2.tflops_max:.0f}){_power_text(r2.power)}")
            except Exception as exc:
                report.errors.append(f"gemm GPU{g}: {exc.__class__.__name__}: {exc}")
                report.checks.append(Check("gemm_bf16", "error", gpu=g, detail=str(exc)))
    if "p2p" in checks and len(chosen) >= 2:
        try:
            report.p2p = measure_p2p(torch, chosen, sizes, link, sampler_for(chosen), log)
        except Exception as exc:
            report.errors.append(f"p2p: {exc.__class__.__name__}: {exc}")
            report.checks.append(Check("p2p", "error", detail=str(exc)))
    report.checks += unmeasurable(checks, chosen, count)
    report.checks += nothing_measured(checks, report)

    evaluated, _ = evaluate(infos, report.hbm, report.gemm, report.p2p, cuda_topo, override)
    report.checks = evaluated + report.checks
    report.status = overall_status(report.checks)
    used = {override.key} if override else {i.target for i in infos if i.target}
    report.targets = {k: asdict(TARGETS[k]) for k in sorted(used)}
    report.duration_s = round(time.perf_counter() - t0, 2)
    write_report(report, out_dir)
    if nvml is not None:
        _nvml_try(nvml.nvmlShutdown)
    return report


# --- power: what the samples are, beside the card's limit -----------------------------------

def power_figures(p: PowerStats, limit_w: float | None = None) -> str:
    """``avg 612 W, peak sample 893 W (instantaneous; limit 700 W - short spikes above the limit
    are normal)``. The peak is one sample, not a sustained draw: NVML's instantaneous field
    reads spikes of a few milliseconds that the card's power controller (which holds the
    *average* to the limit, pulling the clock down: ``sw_power_cap``) lets through, so a peak
    above the limit is no fault; the 1 s average lags a check shorter than a second."""
    limit = p.limit_w if p.limit_w is not None else limit_w
    kind = {"instant": "instantaneous", "1s-average": "NVML 1 s average"}.get(p.power_reading or "",
                                                                             "reading unknown")
    note = f"limit {limit:.0f} W" if limit else "limit unknown"
    if limit and p.peak_w is not None and p.peak_w > limit:
        note += (" - short spikes above the limit are normal" if p.power_reading == "instant"
                 else " - the average itself above the limit: check the power settings")
    return f"avg {p.avg_w:.0f} W, peak sample {p.peak_w:.0f} W ({kind}; {note})"


def run_power(report: HardwareReport) -> dict[int, PowerStats]:
    """GPU -> its power over the whole run: every check's samples together (the average
    weighted by each check's sample count, the highest single sample), with the card's limit."""
    per: dict[int, list[PowerStats]] = {}
    for r in [*report.hbm, *report.gemm]:
        if r.power is not None and r.power.samples:
            per.setdefault(r.gpu, []).append(r.power)
    if report.p2p is not None:
        for g, st in (report.p2p.power or {}).items():
            if st.samples:
                per.setdefault(int(g), []).append(st)
    limits = {g.index: g.power_limit_w for g in report.gpus}
    out: dict[int, PowerStats] = {}
    for g, stats in sorted(per.items()):
        n = sum(st.samples for st in stats)
        readings = {st.power_reading for st in stats if st.power_reading}
        out[g] = PowerStats(
            samples=n, avg_w=round(sum(st.avg_w * st.samples for st in stats) / n, 1),
            peak_w=max(st.peak_w for st in stats),
            temp_max_c=max((st.temp_max_c for st in stats if st.temp_max_c is not None), default=None),
            clock_event_reasons=sorted({r for st in stats for r in st.clock_event_reasons}),
            power_reading=readings.pop() if len(readings) == 1 else ("mixed" if readings else None),
            limit_w=next((st.limit_w for st in stats if st.limit_w is not None), limits.get(g)))
    return out


def power_lines(report: HardwareReport) -> list[str]:
    """One line per GPU sampled: its power over the run (format_summary, the stage's log)."""
    return [f"power     GPU{g} over the run: {power_figures(st)} ({st.samples} samples)"
            for g, st in run_power(report).items()]


def _power_text(p: PowerStats | None, limit_w: float | None = None) -> str:
    if p is None or not p.samples:
        return ""
    txt = f"; {power_figures(p, limit_w)}"
    if p.sm_clock_avg_mhz is not None:
        txt += f", SM {p.sm_clock_avg_mhz:.0f} MHz avg ({p.sm_clock_min_mhz:.0f} min)"
    if p.clock_event_reasons:
        txt += ", clocks held by " + "+".join(p.clock_event_reasons)
    return txt


def format_summary(report: HardwareReport) -> str:
    """Human-readable lines: one per check that is not a single P2P pair, then the P2P matrix."""
    if report.status == "skipped":
        return f"skipped: {report.skipped_reason}"
    lines = []
    for c in report.checks:
        if c.name == "p2p_pair":
            continue
        who = f"GPU{c.gpu} " if c.gpu is not None else ""
        lines.append(f"{c.status.upper():9} {who}{c.name}: {c.detail}")
        if c.remedy and c.status in ("fail", "warn", "error", "invalid"):
            lines.append(f"          remedy: {c.remedy}")
    for c in report.checks:
        if c.name == "p2p_pair" and c.status in ("fail", "warn"):
            lines.append(f"{c.status.upper():9} p2p {c.detail}")
    p = report.p2p
    if p is not None:
        lines.append("P2P GB/s (row: source, column: destination):")
        head = "      " + "".join(f"{'GPU' + str(g):>9}" for g in p.gpus)
        lines.append(head)
        for a, g in enumerate(p.gpus):
            cells = "".join(f"{'-' if v is None else f'{v:.1f}':>9}" for v in p.gbs[a])
            lines.append(f"GPU{g:<3}" + cells)
    lines += power_lines(report)
    lines.append(f"overall: {report.status}")
    return "\n".join(lines)
