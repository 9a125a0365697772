"""The cost model: how long one engine step takes on a given deployment.

A decode step must read every weight once plus the KV cache of every sequence in
the batch (memory-bound); a prefill chunk does 2 x params FLOPs per token
(compute-bound). A step takes the larger of the two, plus the tensor-parallel
all-reduces and a fixed per-step overhead. `Efficiency` holds the only fitted
numbers: how close vLLM's kernels get to the datasheet peaks. `IDEAL` (100%, no
overhead) turns the same model into the physical floor.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from servers.simulator.gpus import GpuSpec
from servers.simulator.models import ModelArch, Precision

GB = 1e9


@dataclass(frozen=True)
class Efficiency:
    # Decode GEMV + paged attention reach ~80% of peak DRAM bandwidth; a plain
    # device copy reaches ~90% (measured 3.02 of 3.35 TB/s on an H100 here).
    memory: float = 0.80
    # Prefill MFU: GEMMs reach 72-80% of peak BF16 on an H100 (measured here);
    # attention, norms, activations and sampling bring a whole step nearer 60%.
    compute: float = 0.60
    # Scheduler, input preparation, sampling and kernel launches per step.
    step_overhead_s: float = 0.003
    per_seq_overhead_s: float = 5e-6
    # Memory vLLM keeps back for activations, CUDA graphs and the allocator.
    reserved_gb: float = 2.0


IDEAL = Efficiency(memory=1.0, compute=1.0, step_overhead_s=0.0,
                   per_seq_overhead_s=0.0, reserved_gb=0.0)


@dataclass(frozen=True)
class Deployment:
    """One vLLM replica: a model at a precision on `tp` GPUs of one kind."""

    gpu: GpuSpec
    model: ModelArch
    precision: Precision
    tp: int = 1
    gpu_memory_utilization: float = 0.90
    efficiency: Efficiency = field(default_factory=Efficiency)

    def ideal(self) -> "Deployment":
        return replace(self, efficiency=IDEAL, gpu_memory_utilization=1.0)

    @property
    def weight_bytes_per_gpu(self) -> float:
        return self.model.params * self.precision.bytes_per_weight / self.tp

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        return self.model.kv_bytes_per_token() / self.tp

    @property
    def kv_budget_bytes_per_gpu(self) -> float:
        usable = self.gpu.memory_gb * GB * self.gpu_memory_utilization
        return usable - self.efficiency.reserved_gb * GB - self.weight_bytes_per_gpu

    @property
    def fits(self) -> bool:
        return self.kv_budget_bytes_per_gpu > 0

    @property
    def kv_capacity_tokens(self) -> int:
        return max(0, int(self.kv_budget_bytes_per_gpu / self.kv_bytes_per_token_per_gpu))

    @property
    def peak_flops_per_gpu(self) -> float:
        rate = self.gpu.int8_tops if self.precision.compute == "int8" else self.gpu.bf16_tflops
        return rate * 1e12 * self.precision.kernel_efficiency

    def step_time(self, num_tokens: int, kv_tokens_read: int, attn_units: float,
                  num_seqs: int) -> float:
        """Seconds for one forward pass over `num_tokens` new tokens.

        kv_tokens_read: cached tokens attention reads (sum of context lengths).
        attn_units: sum over sequences of new_tokens x context, for attention FLOPs.
        """
        eff = self.efficiency
        m = self.model
        bytes_moved = (self.weight_bytes_per_gpu
                       + (kv_tokens_read + num_tokens) * self.kv_bytes_per_token_per_gpu)
        flops = (2.0 * m.params * num_tokens
                 + 4.0 * m.layers * m.heads * m.head_dim * attn_units) / self.tp
        t_mem = bytes_moved / (self.gpu.mem_bandwidth_gbs * GB * eff.memory)
        t_compute = flops / (self.peak_flops_per_gpu * eff.compute)
        return (eff.step_overhead_s + eff.per_seq_overhead_s * num_seqs
                + max(t_mem, t_compute) + self.allreduce_time(num_tokens))

    def allreduce_time(self, num_tokens: int) -> float:
        """Two all-reduces per layer (attention out, MLP out) of the hidden states."""
        if self.tp == 1:
            return 0.0
        payload = num_tokens * self.model.hidden * 2.0  # bf16 activations
        ring = 2.0 * (self.tp - 1) / self.tp * payload / (self.gpu.p2p_bandwidth_gbs * GB)
        latency = self.gpu.p2p_latency_us * 1e-6 if self.efficiency is not IDEAL else 0.0
        return 2 * self.model.layers * (latency + ring)

    def decode_floor_s(self, batch: int, context: int) -> float:
        """Least possible time per output token for `batch` sequences at `context`."""
        ideal = self.ideal()
        return ideal.step_time(batch, batch * context, batch * context, batch)

    def prefill_floor_s(self, prompt_tokens: int) -> float:
        """Least possible time to first token for one prompt on an idle replica."""
        ideal = self.ideal()
        return ideal.step_time(prompt_tokens, 0, prompt_tokens * prompt_tokens / 2, 1)


def offline_throughput_ceiling(dep: Deployment, input_len: int, output_len: int,
                               max_num_seqs: int) -> float:
    """Output tokens/s no scheduler could beat on this hardware (perfect overlap).

    Time is at least the larger of: every FLOP at peak, and every byte at peak
    bandwidth, where the bytes are the KV context each output token must read plus
    one pass over the weights per decode step (batch capped by max_num_seqs and by
    how many sequences' contexts fit the KV cache).
    """
    ideal = dep.ideal()
    if not ideal.fits:
        return 0.0
    m = dep.model
    tokens = input_len + output_len
    flops_per_request = 2.0 * m.params * tokens + 4.0 * m.layers * m.heads * m.head_dim * (
        input_len * input_len / 2 + output_len * (input_len + output_len / 2))
    t_compute = flops_per_request / dep.tp / ideal.peak_flops_per_gpu
    batch = max(1, min(max_num_seqs, ideal.kv_capacity_tokens // tokens))
    kv_bytes = output_len * (input_len + output_len / 2) * ideal.kv_bytes_per_token_per_gpu
    weight_bytes = output_len / batch * ideal.weight_bytes_per_gpu
    t_memory = (kv_bytes + weight_bytes) / (dep.gpu.mem_bandwidth_gbs * GB)
    return output_len / max(t_compute, t_memory)
