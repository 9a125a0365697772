"""GPU datasheets: one record per card, the vendor's figures, for everything that needs them.

The simulator's roofline (:mod:`servers.simulator.gpus`) starts from these peaks and the
hardware stage (:mod:`harness.hardware.targets`) judges measurements against them; one table
so the two cannot drift apart (they did: 362.05 vs 362.0 and 989.4 vs 989.0 TFLOPS).

Figures are dense (no structured sparsity) peak rates as printed by the vendor. Where sources
disagree the datasheet wins and the disagreement is written down beside the figure.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuDatasheet:
    """One GPU model's vendor figures."""

    key: str                  # short name plans and the simulator use: "h100"
    sku: str                  # the exact product, the hardware stage's target key: "H100-SXM5-80GB"
    name: str                 # "NVIDIA H100 SXM5 80GB"
    name_patterns: tuple[str, ...]  # regexes matched (case-insensitive) against a device name
    memory_gb: float          # device memory, GB (1e9 bytes)
    memory_type: str
    mem_bandwidth_gbs: float  # peak DRAM/HBM bandwidth, GB/s
    bf16_tflops: float        # dense BF16 tensor-core peak
    int8_tops: float          # dense INT8 tensor-core peak
    # Dense FP8 (E4M3) tensor-core peak; None where the card has no FP8 tensor cores (A100).
    fp8_tflops: float | None
    nvlink_gbs: float | None  # NVLink bandwidth per GPU, both directions together; None: none
    pcie_gen: int
    pcie_width: int
    interconnect: str         # what GPU-GPU traffic crosses in a TP group
    tdp_watts: float
    source: str               # the datasheet, named, with the figures it gives

    def matches(self, device_name: str) -> bool:
        """Whether a device name (``'NVIDIA H100 80GB HBM3'``) is this model."""
        return any(re.search(p, device_name, re.IGNORECASE) for p in self.name_patterns)


DATASHEETS: dict[str, GpuDatasheet] = {
    d.key: d
    for d in (
        GpuDatasheet(
            key="l40s", sku="L40S", name="NVIDIA L40S", name_patterns=(r"\bL40S\b",),
            memory_gb=48.0, memory_type="GDDR6", mem_bandwidth_gbs=864.0,
            # The datasheet lists BF16 362.05 TFLOPS dense (733 with sparsity). The seed
            # plan quotes 183 TFLOPS, which is the TF32 dense figure; with 183, the seed's
            # own 8B throughput would exceed the compute ceiling.
            bf16_tflops=362.05, int8_tops=733.0, fp8_tflops=733.0,
            nvlink_gbs=None, pcie_gen=4, pcie_width=16, interconnect="PCIe 4.0 x16",
            tdp_watts=350.0,
            source="NVIDIA L40S GPU datasheet (nvidia.com/l40s, 2023): 48 GB GDDR6, 864 GB/s, "
                   "BF16 Tensor 362.05 TFLOPS dense (733 with sparsity), FP8 733 TFLOPS dense, "
                   "PCIe Gen4 x16, no NVLink",
        ),
        GpuDatasheet(
            key="h100", sku="H100-SXM5-80GB", name="NVIDIA H100 SXM5 80GB",
            name_patterns=(r"H100.*(HBM3|SXM)",),
            memory_gb=80.0, memory_type="HBM3", mem_bandwidth_gbs=3350.0,
            # 1,979 TFLOPS with sparsity; the H100 whitepaper's dense figure is 989.4.
            bf16_tflops=989.4, int8_tops=1978.9, fp8_tflops=1978.9,
            nvlink_gbs=900.0, pcie_gen=5, pcie_width=16, interconnect="NVLink 4 (900 GB/s)",
            tdp_watts=700.0,
            source="NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/h100), H100 SXM5: 80 GB "
                   "HBM3, 3.35 TB/s, BF16 Tensor 1,979 TFLOPS with sparsity = 989.4 dense, FP8 "
                   "1,979 TFLOPS dense, NVLink 900 GB/s, PCIe Gen5 128 GB/s",
        ),
        GpuDatasheet(
            key="h200", sku="H200-SXM-141GB", name="NVIDIA H200 SXM 141GB",
            name_patterns=(r"H200(?!.*NVL)",),
            memory_gb=141.0, memory_type="HBM3e", mem_bandwidth_gbs=4800.0,
            bf16_tflops=989.4, int8_tops=1978.9, fp8_tflops=1978.9,
            nvlink_gbs=900.0, pcie_gen=5, pcie_width=16, interconnect="NVLink 4 (900 GB/s)",
            tdp_watts=700.0,
            source="NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/h200), H200 SXM: 141 GB "
                   "HBM3e, 4.8 TB/s, BF16 Tensor 1,979 TFLOPS with sparsity = 989.4 dense, FP8 "
                   "1,979 TFLOPS dense, NVLink 900 GB/s, PCIe Gen5 128 GB/s",
        ),
        GpuDatasheet(
            key="a100", sku="A100-SXM4-80GB", name="NVIDIA A100 SXM4 80GB",
            name_patterns=(r"A100.*SXM.*80", r"A100-SXM4-80GB"),
            memory_gb=80.0, memory_type="HBM2e", mem_bandwidth_gbs=2039.0,
            bf16_tflops=312.0, int8_tops=624.0, fp8_tflops=None,
            nvlink_gbs=600.0, pcie_gen=4, pcie_width=16, interconnect="NVLink 3 (600 GB/s)",
            tdp_watts=400.0,
            source="NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/a100), A100 80GB SXM: "
                   "80 GB HBM2e, 2,039 GB/s, BF16 Tensor 312 TFLOPS dense (624 with sparsity), "
                   "NVLink 600 GB/s, PCIe Gen4 64 GB/s",
        ),
    )
}


def datasheet_for(device_name: str) -> GpuDatasheet | None:
    """The datasheet whose name pattern matches a device name, ``None`` for an unknown card."""
    return next((d for d in DATASHEETS.values() if d.matches(device_name)), None)
