"""`harness throughput`: vLLM's offline throughput benchmark (the seed's settings by default)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("throughput", help="vLLM's offline throughput benchmark, judged against a target",
                       description="Run `vllm bench throughput` (through vLLM's Python entry) with the "
                                   "seed's settings: 1000 random prompts, 512 tokens in, 256 out, bf16. "
                                   "Writes OUT/result.json; prints tokens/s, the target and the "
                                   "roofline's hardware ceiling when --gpu and --arch are given.")
    p.add_argument("--model", required=True, help="hub id or local folder")
    p.add_argument("--python", default=None, help="the Python with vLLM (default: .venv-vllm's)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="cpu: the CPU build's environment (VLLM_CPU_KVCACHE_SPACE=1, thread binding)")
    p.add_argument("--entry", default="python", choices=["python", "cli"])
    p.add_argument("--expect", default=None, metavar="TOK_S",
                   help="expected output tokens/s, e.g. 4500 or '>= 3000' or 3000-5000")
    p.add_argument("--gpu", default=None, help="l40s, h100, h200, a100: the roofline's card")
    p.add_argument("--arch", default=None, help="llama-3-8b, llama-3-70b, llama-2-13b, mistral-7b")
    p.add_argument("--precision", default="bf16", help="bf16, int8, w8a8, awq, gptq (roofline)")
    p.add_argument("--timeout", type=float, default=7200.0)
    p.add_argument("--out", default="results/throughput", help="folder for result.json and logs")
    p.add_argument("--json", action="store_true", help="print result.json too")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from harness.plan import PlanError
    from harness.runner import print_result, run_single

    params = {"model": args.model, "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "dtype": args.dtype, "tensor_parallel_size": args.tensor_parallel_size,
              "enforce_eager": args.enforce_eager, "device": args.device, "entry": args.entry,
              "timeout_s": args.timeout}
    for k in ("python", "quantization", "max_model_len", "max_num_seqs"):
        if getattr(args, k) is not None:
            params[k] = getattr(args, k)
    if args.expect is not None:
        try:
            params["expect"] = {"output_tokens_per_s": float(args.expect)}
        except ValueError:
            params["expect"] = {"output_tokens_per_s": args.expect}
    if args.arch:
        params["physics"] = {"gpu": args.gpu, "model": args.arch, "precision": args.precision,
                             "tp": args.tensor_parallel_size}
    try:
        doc = run_single("throughput", "throughput", params, Path(args.out))
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    print_result(doc)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    return {"pass": 0, "skipped": 0, "fail": 1}.get(doc["status"], 1)
