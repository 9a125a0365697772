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
    p2p_latency_us: float     # one all-reduce hop latency over that link
    tdp_watts: float
    source: str


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
        # PCIe Gen4 x16 is 32 GB/s per direction; the seed calls > 25 GB/s good.
        p2p_bandwidth_gbs=25.0,
        p2p_latency_us=25.0,
        tdp_watts=350.0,
        source="NVIDIA L40S datasheet (2023): 48 GB GDDR6, 864 GB/s, BF16 362.05 TFLOPS dense",
    ),
    "h100": GpuSpec(
        name="NVIDIA H100 SXM5 80GB",
        memory_gb=80.0,
        mem_bandwidth_gbs=3350.0,
        bf16_tflops=989.4,
        int8_tops=1978.9,
        interconnect="NVLink 4 (900 GB/s)",
        p2p_bandwidth_gbs=397.0,  # measured GPU0->GPU1 copy here (gpu-facts.md)
        p2p_latency_us=8.0,
        tdp_watts=700.0,
        source="NVIDIA H100 Tensor Core GPU datasheet: SXM5 80 GB HBM3, 3.35 TB/s, BF16 989 TFLOPS dense",
    ),
    "h200": GpuSpec(
        name="NVIDIA H200 SXM 141GB",
        memory_gb=141.0,
        mem_bandwidth_gbs=4800.0,
        bf16_tflops=989.4,
        int8_tops=1978.9,
        interconnect="NVLink 4 (900 GB/s)",
        p2p_bandwidth_gbs=400.0,
        p2p_latency_us=8.0,
        tdp_watts=700.0,
        source="NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e, 4.8 TB/s, BF16 989 TFLOPS dense",
    ),
    "a100": GpuSpec(
        name="NVIDIA A100 SXM 80GB",
        memory_gb=80.0,
        mem_bandwidth_gbs=2039.0,
        bf16_tflops=312.0,
        int8_tops=624.0,
        interconnect="NVLink 3 (600 GB/s)",
        p2p_bandwidth_gbs=250.0,
        p2p_latency_us=10.0,
        tdp_watts=400.0,
        source="NVIDIA A100 Tensor Core GPU datasheet: SXM 80 GB HBM2e, 2,039 GB/s, BF16 312 TFLOPS dense",
    ),
}
