"""`harness perplexity`: lm-eval word perplexity over (model, quantization) variants."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="word perplexity per (model, quantization) with lm-eval",
                       description="Run lm-eval's simple_evaluate for each variant on a local text "
                                   "file (a task written at run time, offline) or on lm-eval's "
                                   "wikitext; print the seed's quality/throughput/memory table.")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=MODEL[:QUANT]",
                   help="e.g. bf16=meta-llama/Meta-Llama-3-8B, awq=/models/llama-3-8b-awq:awq (repeatable; "
                        "the first is the baseline)")
    p.add_argument("--text", required=True, help="a local text file, or 'wikitext'")
    p.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    p.add_argument("--python", default=None, help="the Python with lm-eval (default: .venv-vllm's)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", default="1")
    p.add_argument("--limit", type=int, default=None, help="documents per variant")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--doc-chars", type=int, default=None, help="local text: characters per document")
    p.add_argument("--out", default="results/perplexity")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=handle)


def parse_variant(text: str) -> dict:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise UsageError(f"--variant {text!r}: write NAME=MODEL or NAME=MODEL:QUANT")
    model, quant = rest, "none"
    head, colon, tail = rest.rpartition(":")
    if colon and head and "/" not in tail and tail:
        model, quant = head, tail
    return {"name": name, "model": model, "quantization": quant}


def handle(args: argparse.Namespace) -> int:
    from harness.plan import PlanError
    from harness.runner import print_result, run_single

    params = {"variants": [parse_variant(v) for v in args.variant], "text": args.text,
              "backend": args.backend, "batch_size": str(args.batch_size)}
    for k in ("python", "dtype", "device", "limit", "max_length", "doc_chars"):
        if getattr(args, k) is not None:
            params[k] = getattr(args, k)
    try:
        doc = run_single("perplexity", "perplexity", params, Path(args.out))
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    print_result(doc)
    rows = (doc.get("data") or {}).get("variants") or []
    if rows:
        from harness.stages.perplexity import variants_table_md

        print(variants_table_md(rows))
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    return {"pass": 0, "skipped": 0, "fail": 1}.get(doc["status"], 1)
