"""The offline throughput stage: argument building and parsing without vLLM, then for real with
vLLM's CPU build on the tiny local model (skipped, with the reason, where .venv-vllm is absent).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.stages import throughput

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("HARNESS_VLLM_VENV") or REPO / ".venv-vllm")
VLLM_PY = VENV / "bin" / "python"
HAVE_VLLM = (VENV / ".harness-vllm-built").exists() and VLLM_PY.exists()


def test_bench_args_carry_the_seed_defaults_and_overrides():
    p = {k: f.default for k, f in throughput.PARAMS.items()}
    p.update(model="m", quantization="awq", max_model_len=1024, enforce_eager=True)
    args = throughput.bench_args(p, "/x/out.json")
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--num-prompts"] == "1000" and pairs["--input-len"] == "512"
    assert pairs["--output-len"] == "256" and pairs["--dtype"] == "bfloat16"
    assert pairs["--dataset-name"] == "random" and pairs["--quantization"] == "awq"
    assert "--enforce-eager" in args and pairs["--output-json"] == "/x/out.json"
    p["quantization"] = "none"
    assert "--quantization" not in throughput.bench_args(p, "o.json")
    cmd = throughput.command(p, "/venv/bin/python", "o.json")
    assert cmd[:4] == ["/venv/bin/python", "-m", "harness.stages.throughput", "--vllm-bench"]
    cli = throughput.command(dict(p, entry="cli"), "py", "o.json")
    assert cli[1:5] == ["-m", "vllm.entrypoints.cli.main", "bench", "throughput"]


def test_parse_result_takes_output_tokens_from_the_printed_counts():
    raw = {"elapsed_time": 2.0, "num_requests": 16, "total_num_tokens": 768,
           "requests_per_second": 8.0, "tokens_per_second": 384.0}
    log = "Throughput: 8.00 requests/s ...\nTotal num prompt tokens:  512\nTotal num output tokens:  256\n"
    f = throughput.parse_result(raw, log, {"num_prompts": 16, "output_len": 16})
    assert f["output_tokens_per_s"] == 128.0 and f["total_tokens_per_s"] == 384.0
    assert f["requests_per_s"] == 8.0 and not f["output_tokens_estimated"]
    est = throughput.parse_result(raw, "", {"num_prompts": 16, "output_len": 16})
    assert est["output_tokens_estimated"] and est["output_tokens"] == 256


def test_physics_marks_a_target_above_the_hardware_ceiling():
    p = {"input_len": 512, "output_len": 256,
         "physics": {"gpu": "l40s", "model": "llama-2-13b", "precision": "bf16"}}
    checks, info = throughput.physics_checks(p, {"output_tokens_per_s": 2800},
                                             {"output_tokens_per_s": 500.0}, {})
    assert info["ceiling_output_tokens_per_s"] < 2800
    by = {(c["metric"], c["source"]): c["mark"] for c in checks}
    assert by[("output_tokens_per_s", "target")] == "impossible"
    assert by[("output_tokens_per_s", "measured")] == "ok"
    checks, _ = throughput.physics_checks(p, {}, {"output_tokens_per_s": 9e9}, {})
    assert checks[0]["mark"] == "measurement error"


def test_missing_vllm_is_a_skip_with_the_reason(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness.cli", "throughput", "--model", "x",
                        "--python", str(tmp_path / "no-python"), "--out", str(tmp_path / "tp")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "tp" / "result.json").read_text())
    assert doc["status"] == "skipped" and "tests/vllm_env.sh" in doc["detail"]


# --- a benchmark that ends abnormally -------------------------------------------------------------
# The stage runs `PYTHON -m harness.stages.throughput --vllm-bench ... --output-json PATH`. These
# tests give it a stand-in Python that answers the stage's probe for vllm, plays the benchmark
# (writes its result, or not), then aborts as vLLM 0.32's CPU build does now and then in its own
# shutdown. What it writes is real: tests/data/vllm-bench-throughput-tiny.{json,log} are the
# result file and the log's last lines from vLLM 0.32 CPU on the tiny model (16 prompts, 32 in,
# 16 out, float32).

RECORDED_JSON = REPO / "tests" / "data" / "vllm-bench-throughput-tiny.json"
RECORDED_LOG = REPO / "tests" / "data" / "vllm-bench-throughput-tiny.log"

FAKE_PYTHON = '''#!{exe}
import os, sys
if sys.argv[1] == "-c":  # the stage's check that vllm is installed
    sys.exit(0)
assert sys.argv[1:4] == ["-m", "harness.stages.throughput", "--vllm-bench"], sys.argv
out = sys.argv[sys.argv.index("--output-json") + 1]
if {write!r}:
    with open(out, "w") as f:
        f.write(open({recorded_json!r}).read())
sys.stdout.write(open({recorded_log!r}).read())
sys.stdout.flush()
sys.stderr.write("terminate called without an active exception\\n")
sys.stderr.flush()
os.abort()
'''


def _aborting_run(tmp_path: Path, write: bool) -> tuple[subprocess.CompletedProcess, Path]:
    exe = tmp_path / "fake-python"
    exe.write_text(FAKE_PYTHON.format(exe=sys.executable, write=write, recorded_json=str(RECORDED_JSON),
                                      recorded_log=str(RECORDED_LOG)))
    exe.chmod(0o755)
    out = tmp_path / "tp"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "throughput", "--model", str(tmp_path),
                        "--python", str(exe), "--num-prompts", "16", "--input-len", "32",
                        "--output-len", "16", "--device", "cpu", "--expect", ">= 1", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    return r, out


def test_result_written_before_an_abort_at_exit_is_kept_with_a_warning(tmp_path):
    r, out = _aborting_run(tmp_path, write=True)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "result.json").read_text())
    assert doc["status"] == "pass", doc
    recorded = json.loads(RECORDED_JSON.read_text())
    assert doc["data"]["vllm_result"] == recorded
    assert doc["measured"]["output_tokens_per_s"] == pytest.approx(256 / recorded["elapsed_time"])
    assert doc["data"]["figures"]["output_tokens_estimated"] is False
    warning = "vllm bench throughput exited with signal SIGABRT after writing its result; result accepted"
    assert doc["data"]["warnings"] == [warning]
    assert warning in doc["detail"] and "warning" in r.stdout + r.stderr


def test_abort_without_a_result_fails_naming_the_signal(tmp_path):
    r, out = _aborting_run(tmp_path, write=False)
    assert r.returncode != 0
    assert not (out / "result.json").exists()
    doc = json.loads((out / "error.json").read_text())
    assert doc["status"] == "error", doc
    assert "exited with signal SIGABRT and no results file was written" in doc["detail"]
    assert "terminate called without an active exception" in doc["detail"]


def test_a_result_file_from_an_earlier_run_does_not_count(tmp_path):
    path = tmp_path / "vllm-throughput.json"
    path.write_text(RECORDED_JSON.read_text())
    os.utime(path, (1_000_000_000, 1_000_000_000))
    raw, why = throughput.read_result(str(path), not_before=2_000_000_000)
    assert raw is None and "older than this run" in why


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    out = tmp_path_factory.getbasetemp() / "tiny-model-shared"
    r = subprocess.run([str(VLLM_PY), str(REPO / "tests" / "tiny_model.py"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out)


@pytest.mark.skipif(not HAVE_VLLM, reason=f"no vLLM CPU build at {VENV}: `bash tests/vllm_env.sh` builds it")
@pytest.mark.timeout(600)
def test_real_vllm_cpu_offline_benchmark(tiny_model, tmp_path):
    out = tmp_path / "throughput"
    r = subprocess.run(
        [sys.executable, "-m", "harness.cli", "throughput", "--model", tiny_model, "--python", str(VLLM_PY),
         "--num-prompts", "16", "--input-len", "32", "--output-len", "16", "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "256", "--device", "cpu", "--expect", ">= 1",
         "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=550)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "result.json").read_text())
    assert doc["status"] == "pass", doc
    raw = doc["data"]["vllm_result"]
    fig = doc["data"]["figures"]
    # vLLM's own JSON and its printed counts agree with what was asked for
    assert raw["num_requests"] == 16
    assert fig["output_tokens"] == 16 * 16 and not fig["output_tokens_estimated"]
    assert fig["prompt_tokens"] == 16 * 32
    assert raw["total_num_tokens"] == 16 * (32 + 16)
    m = doc["measured"]
    assert m["output_tokens_per_s"] == pytest.approx(256 / raw["elapsed_time"])
    assert m["total_tokens_per_s"] == pytest.approx(raw["tokens_per_second"])
    assert doc["checks"][0]["passed"] is True
    assert "--vllm-bench" in (out / "command.txt").read_text()
