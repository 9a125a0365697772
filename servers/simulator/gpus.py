"""GPU specifications from vendor datasheets: the physics the roofline starts from.

Figures are dense (no structured sparsity) peak rates. Where sources disagree the
datasheet wins and the disagreement is written down, so a plan can override it.
"""
from __future__ import annotations

from dataclasses import dataclass


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

GPUS: dict[str, GpuSpec] = {
    "l40s": GpuSpec(
        name="NVIDIA L40S",
        memory_gb=48.0,
        mem_bandwidth_gbs=864.0,
        # The datasheet lists BF16 362.05 TFLOPS dense (733 with sparsity). The seed
        # plan quotes 183 TFLOPS, which is the TF32 dense figure; with 183, the seed's
        # own 8B throughput would exceed the compute ceiling.
        bf16_tflops=362.05,
        int8_tops=733.0,
        interconnect="PCIe 4.0 x16",
        # PCIe Gen4 x16 is 32 GB/s per direction; the seed calls > 25 GB/s P2P good
        # (/work/shared/gpu-facts.md: PCIe Gen4 x16, no NVLink).
        p2p_bandwidth_gbs=25.0,
        # A ring step over PCIe crosses the root complex (or host memory where P2P is
        # off): NCCL's small-message all-reduce between two PCIe cards takes ~20-30 us,
        # i.e. ~12 us for each of its 2(n-1) = 2 steps.
        p2p_latency_us=12.0,
        tdp_watts=350.0,
        source="NVIDIA L40S datasheet (2023): 48 GB GDDR6, 864 GB/s, BF16 362.05 TFLOPS dense, "
               "FP8 733 TFLOPS dense",
        fp8_tflops=733.0,
    ),
    "h100": GpuSpec(
        name="NVIDIA H100 SXM5 80GB",
        memory_gb=80.0,
        mem_bandwidth_gbs=3350.0,
        bf16_tflops=989.4,
        int8_tops=1978.9,
        interconnect="NVLink 4 (900 GB/s)",
        # 900 GB/s is both directions: 450 one way; measured GPU0->GPU1 copy here
        # 397 GB/s (gpu-facts.md).
        p2p_bandwidth_gbs=397.0,
        p2p_latency_us=NVLINK_HOP_US,
        tdp_watts=700.0,
        source="NVIDIA H100 Tensor Core GPU datasheet: SXM5 80 GB HBM3, 3.35 TB/s, BF16 989 TFLOPS "
               "dense, FP8 1,979 TFLOPS dense",
        fp8_tflops=1978.9,
    ),
    "h200": GpuSpec(
        name="NVIDIA H200 SXM 141GB",
        memory_gb=141.0,
        mem_bandwidth_gbs=4800.0,
        bf16_tflops=989.4,
        int8_tops=1978.9,
        interconnect="NVLink 4 (900 GB/s)",
        p2p_bandwidth_gbs=400.0,   # the same NVLink 4 as the H100
        p2p_latency_us=NVLINK_HOP_US,
        tdp_watts=700.0,
        source="NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e, 4.8 TB/s, BF16 989 TFLOPS dense, "
               "FP8 1,979 TFLOPS dense",
        fp8_tflops=1978.9,
    ),
    "a100": GpuSpec(
        name="NVIDIA A100 SXM 80GB",
        memory_gb=80.0,
        mem_bandwidth_gbs=2039.0,
        bf16_tflops=312.0,
        int8_tops=624.0,
        interconnect="NVLink 3 (600 GB/s)",
        # 600 GB/s both directions, 300 one way; NCCL reaches ~250 of it.
        p2p_bandwidth_gbs=250.0,
        p2p_latency_us=NVLINK_HOP_US,
        tdp_watts=400.0,
        source="NVIDIA A100 Tensor Core GPU datasheet: SXM 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS dense",
    ),
}
