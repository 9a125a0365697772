"""Model architectures and weight precisions: what a forward pass reads and computes.

Numbers are from each model's published config.json. The seed's "Llama-3 13B" does
not exist; the 13B entry is Llama-2-13B (multi-head attention, no GQA), the 13B a
vLLM user actually deploys.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArch:
    name: str
    hf_id: str
    params: float        # total parameters
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def kv_bytes_per_token(self, kv_dtype_bytes: float = 2.0) -> float:
        # kv_dtype_bytes: 2 for the model's BF16 cache (vLLM's --kv-cache-dtype auto),
        # 1 for --kv-cache-dtype fp8 (KV_CACHE_DTYPES).
        """K and V for every layer: what one token of context costs in cache."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * kv_dtype_bytes

    def attention_flops_per_token(self, context: float) -> float:
        """QK^T and AV for one query token against `context` cached tokens."""
        return 4.0 * self.layers * self.heads * self.head_dim * context


@dataclass(frozen=True)
class Precision:
    name: str
    bytes_per_weight: float
    # Which tensor-core rate the GEMMs run at, and what fraction of it the
    # quantized kernels reach relative to a plain BF16 GEMM.
    compute: str            # "bf16", "int8" or "fp8": which tensor-core peak the GEMMs use
    kernel_efficiency: float
    note: str


PRECISIONS: dict[str, Precision] = {
    "bf16": Precision("bf16", 2.0, "bf16", 1.0, "dense BF16 weights"),
    # The seed's INT8 row is LLM.int8() (bitsandbytes): int8 weights, outlier
    # columns in fp16, activations quantized per step. Its matmuls run well below
    # BF16 GEMM speed (the LLM.int8 paper reports slower-than-fp16 inference for
    # models under ~30B); 0.6 of BF16 GEMM throughput.
    "int8": Precision("int8", 1.0, "bf16", 0.6, "LLM.int8 (bitsandbytes) weight int8, fp16 outliers"),
    # W8A8 INT8 (SmoothQuant / compressed-tensors) uses the INT8 tensor cores.
    "w8a8": Precision("w8a8", 1.0, "int8", 0.8, "W8A8 int8 GEMMs on INT8 tensor cores"),
    # 4-bit weights with a fp16 scale and zero per group of 128: 4 + 32/128 bits.
    # GEMMs dequantize into BF16 (Marlin-class kernels reach ~0.8 of BF16 at batch).
    # FP8 (E4M3) weights and activations, per-tensor or per-channel scales (vLLM's
    # `quantization=fp8`, TensorRT-LLM's FP8 checkpoints): one byte a weight, GEMMs on the
    # FP8 tensor cores where the card has them (Hopper, Ada: gpus.GpuSpec.fp8_tflops). FP8
    # GEMMs reach a smaller share of their (doubled) peak than BF16 GEMMs of theirs: the
    # scaling epilogue and the activation quantization are extra passes; 0.8 of the BF16
    # GEMM's fraction. On a card without FP8 (A100) they run weight-only (FP8 Marlin:
    # dequantize into BF16 GEMMs), see roofline.Deployment.peak_flops_per_gpu.
    "fp8": Precision("fp8", 1.0, "fp8", 0.8, "FP8 E4M3 weights and activations"),
    "awq": Precision("awq", 0.53125, "bf16", 0.8, "AWQ INT4, group 128, BF16 compute"),
    "gptq": Precision("gptq", 0.53125, "bf16", 0.75, "GPTQ INT4, group 128, BF16 compute"),
}


# vLLM's --kv-cache-dtype: bytes per cached K or V element. "auto" keeps the model's
# dtype (BF16 for every model here); "fp8" (E4M3, as vLLM's fp8 / fp8_e4m3) halves what
# each token of context costs: twice the tokens fit, and a decode step reads half the
# bytes per token of context.
KV_CACHE_DTYPES: dict[str, float] = {"auto": 2.0, "bf16": 2.0, "fp8": 1.0, "fp8_e4m3": 1.0}


MODELS: dict[str, ModelArch] = {
    "llama-3-8b": ModelArch("Llama-3 8B", "meta-llama/Meta-Llama-3-8B-Instruct",
                            8.03e9, 32, 4096, 32, 8, 128, 128256),
    "llama-3-70b": ModelArch("Llama-3 70B", "meta-llama/Meta-Llama-3-70B-Instruct",
                             70.55e9, 80, 8192, 64, 8, 128, 128256),
    # Llama 2 7B and 70B: the models TensorRT-LLM's v0.5/v0.6 performance tables name
    # "LLaMA 7B" / "LLaMA 70B" (their methodology says Llama2-7b and Llama2-70b). 7B has
    # no GQA (32 KV heads: 4x Llama-3 8B's cache per token); 70B has Llama-3 70B's shape
    # with the 32,000-token vocabulary.
    "llama-2-7b": ModelArch("Llama-2 7B", "meta-llama/Llama-2-7b-chat-hf",
                            6.74e9, 32, 4096, 32, 32, 128, 32000),
    "llama-2-70b": ModelArch("Llama-2 70B", "meta-llama/Llama-2-70b-chat-hf",
                             68.98e9, 80, 8192, 64, 8, 128, 32000),
    "llama-2-13b": ModelArch("Llama-2 13B", "meta-llama/Llama-2-13b-chat-hf",
                             13.02e9, 40, 5120, 40, 40, 128, 32000),
    "mistral-7b": ModelArch("Mistral 7B", "mistralai/Mistral-7B-Instruct-v0.1",
                            7.24e9, 32, 4096, 32, 8, 128, 32000),
}
