"""The cost model: how long one engine step takes on a given deployment.

A step is a forward pass over every token the scheduler picked (one per decoding
sequence, a chunk of each prefill). Its parts, in the order the GPU runs them:

* the GEMMs (QKV, output, MLP, LM head): every weight read once, 2 x params FLOPs a
  token; the larger of the two (a GEMM is memory-bound at small batch, compute-bound
  at large);
* attention: every cached token of every sequence read (memory-bound for decodes) and
  the QK^T/AV FLOPs (compute-bound for prefills); again the larger of the two;
* the tensor-parallel all-reduces (two a layer) over the interconnect;
* the engine's host work: a fixed part per step and a part per scheduled sequence.

GEMMs and attention are different kernels run one after the other, so a real step
pays both: their times add. Only the physical floor (`IDEAL`) lets every byte and FLOP
of a step overlap (one roofline max over the whole step), which no engine reaches but
none can beat. `Efficiency` holds the fitted numbers of one engine: how close its
kernels get to the datasheet peaks and what its host side costs; `ENGINES` names them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from servers.simulator.gpus import GpuSpec
from servers.simulator.models import KV_CACHE_DTYPES, ModelArch, Precision

GB = 1e9
ACTIVATION_BYTES = 2.0   # hidden states cross the all-reduce in BF16, whatever the weights


@dataclass(frozen=True)
class Efficiency:
    """One engine's distance from the datasheet, and its host-side costs."""

    # Decode GEMV + paged attention reach ~80% of peak DRAM bandwidth; a plain
    # device copy reaches ~90% (measured 3.02 of 3.35 TB/s on an H100 here).
    memory: float = 0.80
    # Prefill MFU: GEMMs reach 72-80% of peak BF16 on an H100 (measured here);
    # attention, norms, activations and sampling bring a whole step nearer 60%.
    compute: float = 0.60
    # Host work per step that does not depend on the batch: scheduling, building the
    # step's inputs, launching (a CUDA graph replay), copying the sampled ids back.
    step_overhead_s: float = 0.003
    # Host work per scheduled sequence: its slice of input preparation, the sampler's
    # per-row work (penalties, top-p/top-k), the output processing of its token.
    per_seq_overhead_s: float = 5e-6
    # Per request, outside the engine: the API server receiving and parsing the HTTP
    # request, applying the chat template and tokenizing, and detokenizing and sending
    # the first chunk. It delays the request's entry into the engine, so it is in TTFT
    # and E2E (not in TPOT/ITL: the later chunks' share is pipelined with the steps).
    request_overhead_s: float = 0.0
    # Host time to launch one layer's kernels (norms, GEMMs, attention, all-reduces: 10-20
    # launches at a few us each), paid only by a step that starts on an idle engine. A busy
    # engine launches step N+1 while the GPU still runs step N (CUDA graphs for decodes,
    # TensorRT-LLM's overlap scheduler, vLLM's async output processing), so the launches hide
    # behind the previous step's GPU time; the first step after idle has nothing to hide
    # behind. It is why a lone short prompt's TTFT is well above its weight-read time (a
    # 128-token prefill of Llama 2 7B on an H100 is 2.5 ms of memory traffic; TensorRT-LLM
    # publishes 7 ms) and it grows with the layer count (70B: 80 layers), not with tokens.
    idle_launch_s_per_layer: float = 0.0
    # Memory vLLM keeps back for activations, CUDA graphs and the allocator.
    reserved_gb: float = 2.0
    # How the scheduler admits a waiting request into the KV cache (engine.Engine):
    # "on_demand" (vLLM V1): blocks for the tokens it runs this step, more as it grows,
    # recompute-preempting the newest request when the cache runs out;
    # "reserve" (TensorRT-LLM's default GUARANTEED_NO_EVICT capacity scheduler): only when
    # blocks for its prompt plus its whole output are free, which it holds until it ends,
    # so nothing is ever evicted. With long prompts the difference is large: 20,000-token
    # prompts admitted on demand fill the cache with partial prefills that evict each
    # other (hundreds of 20k-token recomputes per 100 requests), where TensorRT-LLM runs
    # fewer sequences and never recomputes.
    kv_admission: str = "on_demand"
    # True only for the physical floor: every byte and FLOP of a step overlapped.
    overlapped: bool = False


IDEAL = Efficiency(memory=1.0, compute=1.0, step_overhead_s=0.0,
                   per_seq_overhead_s=0.0, request_overhead_s=0.0, reserved_gb=0.0,
                   overlapped=True)

# Each engine's constants. See benchmarks/fit_simulator.py for the fit they come from.
ENGINES: dict[str, Efficiency] = {
    # Fitted 2026-12-06 (benchmarks/fit_simulator.py --fit --passes 2 --max-requests 256
    # --hold vllm.memory,vllm.compute,vllm.request_overhead_s; 76 published points): vLLM had
    # only light-load points, so its kernel efficiencies stay at their priors. The two saturated
    # vLLM points since (PRs #5882, #7117: pre-0.6 V0 engine, read 1.58 and 1.69) are host-bound;
    # fitting memory and compute to them (0.70, 0.30) was not applied:
    # docs/simulator-calibration.md, "Fit: before and after".
    "vllm": Efficiency(memory=0.80, compute=0.60, step_overhead_s=0.00175,
                       per_seq_overhead_s=15e-6, request_overhead_s=0.010,
                       idle_launch_s_per_layer=100e-6),
    # TensorRT-LLM: the C++ executor schedules and prepares inputs without Python, and
    # its published runs (trtllm-bench) feed tokenized requests straight in, no HTTP.
    "trtllm": Efficiency(memory=0.75, compute=0.725, step_overhead_s=0.00125,
                         # request_overhead_s kept at its 2 ms prior: the fit put it at 0 from
                         # only two HTTP-served points, below what a real API server costs.
                         per_seq_overhead_s=0.0, request_overhead_s=0.002,
                         idle_launch_s_per_layer=125e-6, kv_admission="reserve"),
}
DEFAULT_ENGINE = "vllm"


@dataclass(frozen=True)
class Deployment:
    """One vLLM replica: a model at a precision on `tp` GPUs of one kind."""

    gpu: GpuSpec
    model: ModelArch
    precision: Precision
    tp: int = 1
    gpu_memory_utilization: float = 0.90
    efficiency: Efficiency = field(default_factory=lambda: ENGINES[DEFAULT_ENGINE])
    kv_cache_dtype: str = "auto"     # vLLM's --kv-cache-dtype (models.KV_CACHE_DTYPES)

    def ideal(self) -> Deployment:
        return replace(self, efficiency=IDEAL, gpu_memory_utilization=1.0)

    @property
    def weight_bytes_per_gpu(self) -> float:
        return self.model.params * self.precision.bytes_per_weight / self.tp

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        return self.model.kv_bytes_per_token(KV_CACHE_DTYPES[self.kv_cache_dtype]) / self.tp

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
        """The GEMMs' tensor-core peak: INT8 or FP8 where the precision and the card have
        them, else BF16 (FP8 weights on an A100 are dequantized into BF16 GEMMs)."""
        compute = self.precision.compute
        if compute == "int8":
            rate = self.gpu.int8_tops
        elif compute == "fp8" and self.gpu.fp8_tflops:
            rate = self.gpu.fp8_tflops
        else:
            rate = self.gpu.bf16_tflops
        return rate * 1e12 * self.precision.kernel_efficiency

    @property
    def idle_launch_s(self) -> float:
        """Extra time of a step that starts on an idle engine (Efficiency.idle_launch_s_per_layer)."""
        return self.model.layers * self.efficiency.idle_launch_s_per_layer

    def step_time(self, num_tokens: int, kv_tokens_read: int, attn_units: float,
                  num_seqs: int) -> float:
        """Seconds for one forward pass over `num_tokens` new tokens (the module
        docstring gives the parts).

        kv_tokens_read: cached tokens attention reads (sum of context lengths).
        attn_units: sum over sequences of new_tokens x context, for attention FLOPs.
        """
        eff = self.efficiency
        m = self.model
        bw = self.gpu.mem_bandwidth_gbs * GB * eff.memory
        weight_bytes = self.weight_bytes_per_gpu
        kv_bytes = (kv_tokens_read + num_tokens) * self.kv_bytes_per_token_per_gpu
        gemm_flops = 2.0 * m.params * num_tokens / self.tp
        attn_flops = 4.0 * m.layers * m.heads * m.head_dim * attn_units / self.tp
        gemm_rate = self.peak_flops_per_gpu * eff.compute
        # Attention runs in BF16 (the KV cache is dequantized on load when it is FP8).
        attn_rate = self.gpu.bf16_tflops * 1e12 * eff.compute
        if eff.overlapped:
            t_gpu = max((weight_bytes + kv_bytes) / bw,
                        gemm_flops / gemm_rate + attn_flops / attn_rate)
        else:
            t_gpu = (max(weight_bytes / bw, gemm_flops / gemm_rate)
                     + max(kv_bytes / bw, attn_flops / attn_rate))
        return (eff.step_overhead_s + eff.per_seq_overhead_s * num_seqs
                + t_gpu + self.allreduce_time(num_tokens))

    def allreduce_time(self, num_tokens: int) -> float:
        """Two all-reduces per layer (after attention, after the MLP) of the step's
        hidden states: num_tokens x hidden x 2 bytes (BF16).

        A ring all-reduce over n GPUs moves 2(n-1)/n of the message through each GPU's
        link (reduce-scatter then all-gather) in 2(n-1) steps, each paying the link's
        per-step latency (`GpuSpec.p2p_latency_us`). Small decode messages (a few
        hundred KB) are latency-bound, so TP=4/8 pays 6/14 step latencies per all-reduce,
        160 all-reduces a step for 80 layers; big prefill chunks are bandwidth-bound,
        which over PCIe (25 GB/s, the L40S pairs) is the larger part: a 2048-token chunk
        of Llama-3 70B moves 33.5 MB per all-reduce, 1.3 ms each at TP=2.
        The physical floor keeps the bandwidth term and drops the latency (vLLM's
        one-shot custom all-reduce for small messages beats a ring's step count).
        """
        n = self.tp
        if n == 1:
            return 0.0
        payload = num_tokens * self.model.hidden * ACTIVATION_BYTES
        ring = 2.0 * (n - 1) / n * payload / (self.gpu.p2p_bandwidth_gbs * GB)
        latency = 0.0 if self.efficiency.overlapped else 2 * (n - 1) * self.gpu.p2p_latency_us * 1e-6
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
    gemm_flops = 2.0 * m.params * tokens
    attn_flops = 4.0 * m.layers * m.heads * m.head_dim * (
        input_len * input_len / 2 + output_len * (input_len + output_len / 2))
    # GEMMs at the precision's tensor-core peak, attention at BF16 (as Deployment.step_time).
    t_compute = (gemm_flops / ideal.peak_flops_per_gpu
                 + attn_flops / (dep.gpu.bf16_tflops * 1e12)) / dep.tp
    batch = max(1, min(max_num_seqs, ideal.kv_capacity_tokens // tokens))
    kv_bytes = output_len * (input_len + output_len / 2) * ideal.kv_bytes_per_token_per_gpu
    weight_bytes = output_len / batch * ideal.weight_bytes_per_gpu
    t_memory = (kv_bytes + weight_bytes) / (dep.gpu.mem_bandwidth_gbs * GB)
    return output_len / max(t_compute, t_memory)
