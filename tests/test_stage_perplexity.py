"""The perplexity stage: the local-text task it writes, variant arguments, then for real with
lm-eval's hf backend on the tiny local model and a text written here (skipped, with the reason,
where lm-eval is not installed for the vLLM environment's Python)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.stages import perplexity

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("HARNESS_VLLM_VENV") or REPO / ".venv-vllm")
PY = VENV / "bin" / "python"


def _has_lm_eval() -> bool:
    if not PY.exists():
        return False
    r = subprocess.run([str(PY), "-c", "import importlib.util,sys;"
                        "sys.exit(0 if importlib.util.find_spec('lm_eval') and importlib.util.find_spec('accelerate') else 1)"],
                       capture_output=True, timeout=60)
    return r.returncode == 0


HAVE_LM_EVAL = _has_lm_eval()
TEXT = "\n\n".join(
    " ".join(f"the quick brown fox number {i * 7 + j} jumps over the lazy dog." for j in range(6))
    for i in range(12))


def test_documents_pack_paragraphs():
    docs = perplexity.documents(TEXT, 500)
    assert len(docs) > 1 and all(len(d) <= 1000 for d in docs)
    assert "".join(docs).replace("\n", "").replace(" ", "") == TEXT.replace("\n", "").replace(" ", "")


def test_task_yaml_points_at_the_local_documents(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    n = perplexity.write_task(str(tmp_path / "t.txt"), tmp_path / "task", 500)
    y = (tmp_path / "task" / f"{perplexity.TASK_NAME}.yaml").read_text()
    assert "loglikelihood_rolling" in y and "word_perplexity" in y
    assert str((tmp_path / "task" / "docs.jsonl").resolve()) in y
    assert len((tmp_path / "task" / "docs.jsonl").read_text().splitlines()) == n


def test_model_args_map_the_seed_quantizations():
    p = {"backend": "vllm"}
    assert perplexity.model_args({"model": "m", "quantization": "none"}, p) == ("vllm", "pretrained=m")
    assert perplexity.model_args({"model": "m", "quantization": "awq"}, p)[1] == \
        "pretrained=m,quantization=awq,dtype=float16"
    assert "quantization=compressed-tensors" in perplexity.model_args({"model": "m", "quantization": "int8"}, p)[1]
    assert perplexity.model_args({"model": "m", "quantization": "int8", "backend": "hf"}, p)[1] == \
        "pretrained=m,load_in_8bit=True"


@pytest.mark.skipif(not HAVE_LM_EVAL, reason=f"lm-eval is not installed for {PY}: "
                    f"`{PY} -m pip install 'lm-eval[hf]'` (after tests/vllm_env.sh)")
@pytest.mark.timeout(600)
def test_real_lm_eval_hf_on_the_tiny_model(tmp_path_factory, tmp_path):
    model = tmp_path_factory.getbasetemp() / "tiny-model-shared"
    r = subprocess.run([str(PY), str(REPO / "tests" / "tiny_model.py"), str(model)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    plan = tmp_path / "ppl.yaml"
    plan.write_text(f"""
name: ppl-test
stages:
  - name: quality
    stage: perplexity
    table: quality
    backend: hf
    device: cpu
    python: {PY}
    text: {text}
    doc_chars: 600
    variants:
      - {{name: fp32, model: {model}, dtype: float32, expect: {{word_perplexity: "< 1e9"}}}}
      - {{name: bf16, model: {model}, dtype: bfloat16, expect: {{memory_x: "<= 0.51"}}}}
""")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(plan), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=550)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "quality" / "result.json").read_text())
    assert doc["status"] == "pass", doc
    rows = {v["name"]: v for v in doc["data"]["variants"]}
    fp32, bf16 = rows["fp32"], rows["bf16"]
    # the three metrics agree with each other: word_ppl = exp(LL/words), byte_ppl = exp(LL/bytes)
    docs = [json.loads(line)["text"] for line in (out / "quality" / "task" / "docs.jsonl").read_text().splitlines()]
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert math.log(fp32["word_perplexity"]) / math.log(fp32["byte_perplexity"]) == pytest.approx(nbytes / words, rel=1e-6)
    assert fp32["bits_per_byte"] == pytest.approx(math.log2(fp32["byte_perplexity"]), rel=1e-6)
    # random weights over a ~1,000-token vocabulary: better than uniform bytes, far from perfect
    assert 1.0 < fp32["byte_perplexity"] < 256.0
    # bf16 weights are half of fp32's, and quality barely moves
    assert bf16["memory_x"] == pytest.approx(0.5, rel=0.01)
    assert bf16["word_perplexity"] == pytest.approx(fp32["word_perplexity"], rel=0.05)
    assert "Quality: perplexity" in (out / "report.md").read_text()


@pytest.mark.skipif(not HAVE_LM_EVAL or not (VENV / ".harness-vllm-built").exists(),
                    reason=f"needs vLLM's CPU build and lm-eval in {VENV}")
@pytest.mark.timeout(600)
def test_vllm_and_hf_backends_agree(tmp_path_factory, tmp_path):
    """The seed's path (lm-eval's vLLM backend, here on vLLM's CPU build) and transformers give
    the same perplexity on the same documents: two engines, one figure."""
    model = tmp_path_factory.getbasetemp() / "tiny-model-shared"
    r = subprocess.run([str(PY), str(REPO / "tests" / "tiny_model.py"), str(model)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    plan = tmp_path / "p.yaml"
    plan.write_text(f"""
name: backends
stages:
  - name: q
    stage: perplexity
    python: {PY}
    text: {text}
    doc_chars: 600
    limit: 3
    max_length: 512
    device: cpu
    dtype: float32
    variants:
      - {{name: hf, model: {model}, backend: hf}}
      - {{name: vllm, model: {model}, backend: vllm}}
""")
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(plan), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=REPO, timeout=550)
    if r.returncode != 0 and "exited with -6" in r.stdout and "terminate called without an active exception" in r.stdout:
        # vLLM 0.32's CPU build sometimes aborts in its own shutdown (C++ terminate after
        # "all workers exited gracefully"); seen once in ~5 full runs. Not this harness's bug.
        pytest.skip("vLLM CPU build aborted during its shutdown (SIGABRT in C++ terminate)")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {v["name"]: v for v in json.loads((tmp_path / "run" / "q" / "result.json").read_text())["data"]["variants"]}
    assert rows["hf"]["backend"] == "hf" and rows["vllm"]["backend"] == "vllm"
    assert rows["vllm"]["word_perplexity"] == pytest.approx(rows["hf"]["word_perplexity"], rel=0.01)
    assert rows["vllm"]["lm_eval"] and rows["vllm"]["memory_source"] == "checkpoint on disk"
