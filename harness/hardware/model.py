"""What a hardware run records: plain dataclasses, written as ``hardware.json`` (``"schema": 1``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = 1


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

