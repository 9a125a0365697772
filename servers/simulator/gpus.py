"""GPU specifications for the roofline: the datasheet's peaks plus what the simulator fits.

The peaks come from :mod:`servers.gpu_datasheets` (the one table the hardware stage judges
against too); what is not on a datasheet, the achievable GPU-GPU bandwidth and a ring step's
latency, is set here. A plan overrides any field (``gpu_overrides``).
"""
from __future__ import annotations

from dataclasses import dataclass

from servers.gpu_datasheets import DATASHEETS


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gb: float          # usable device memory, GB (1e9 bytes)
    mem_bandwidth_gbs: float  # peak DRAM/HBM bandwidth, GB/s
    bf16_tflops: float        # dense BF16 tensor-core peak
    int8_tops: float          # dense INT8 tensor-core peak
    interconnect: str         # what GPU-GPU traffic crosses in a TP group
    p2p_bandwidth_gbs: float  # achievable one-direction GPU-GPU bandwidth
    # One step of a ring all-reduce over that link: the time a chunk takes to be handed
    # to the next GPU, reduced and made visible (launch, flag/barrier, link latency),
    # before the bytes themselves. See roofline.Deployment.allreduce_time.
    p2p_latency_us: float
    tdp_watts: float
    source: str
    # Dense FP8 (E4M3) tensor-core peak; None where the card has no FP8 tensor cores
    # (A100): FP8 weights then run as weight-only FP8 (vLLM's FP8 Marlin kernel),
    # dequantized into BF16 GEMMs.
    fp8_tflops: float | None = None


# One ring step over NVLink (see GpuSpec.p2p_latency_us): NCCL's low-latency protocol
# hands a chunk to the next GPU in ~1-2 us of link time, plus the flag polling and the
# kernel's share of the launch; prior 3 us, i.e. ~18 us per all-reduce at TP=4, ~42 at
# TP=8. Fitted value and date: benchmarks/fit_simulator.py, recorded next to ENGINES
# in roofline.py.
NVLINK_HOP_US = 6.656   # fitted 2026-12-06, benchmarks/fit_simulator.py (prior 3.0)


def _spec(key: str, p2p_bandwidth_gbs: float, p2p_latency_us: float) -> GpuSpec:
    """The datasheet's figures for ``key`` with the two the simulator sets itself."""
    d = DATASHEETS[key]
    return GpuSpec(
        name=d.name, memory_gb=d.memory_gb, mem_bandwidth_gbs=d.mem_bandwidth_gbs,
        bf16_tflops=d.bf16_tflops, int8_tops=d.int8_tops, interconnect=d.interconnect,
        p2p_bandwidth_gbs=p2p_bandwidth_gbs, p2p_latency_us=p2p_latency_us,
        tdp_watts=d.tdp_watts, source=d.source, fp8_tflops=d.fp8_tflops,
    )


GPUS: dict[str, GpuSpec] = {
    # PCIe Gen4 x16 is 32 GB/s per direction; the seed calls > 25 GB/s P2P good
    # (/work/shared/gpu-facts.md: PCIe Gen4 x16, no NVLink). A ring step over PCIe crosses
    # the root complex (or host memory where P2P is off): NCCL's small-message all-reduce
    # between two PCIe cards takes ~20-30 us, i.e. ~12 us for each of its 2(n-1) = 2 steps.
    "l40s": _spec("l40s", p2p_bandwidth_gbs=25.0, p2p_latency_us=12.0),
    # 900 GB/s is both directions: 450 one way; measured GPU0->GPU1 copy here
    # 397 GB/s (gpu-facts.md).
    "h100": _spec("h100", p2p_bandwidth_gbs=397.0, p2p_latency_us=NVLINK_HOP_US),
    "h200": _spec("h200", p2p_bandwidth_gbs=400.0, p2p_latency_us=NVLINK_HOP_US),  # H100's NVLink 4
    # 600 GB/s both directions, 300 one way; NCCL reaches ~250 of it.
    "a100": _spec("a100", p2p_bandwidth_gbs=250.0, p2p_latency_us=NVLINK_HOP_US),
}
