"""The offline throughput stage (``harness throughput``): vLLM's own offline benchmark.

Runs ``vllm bench throughput`` with the seed's settings (1000 prompts, 512 tokens in, 256 out,
random prompts, bf16; every one overridable) through vLLM's Python entry
(``vllm.benchmarks.throughput``), in the Python that has vLLM (``.venv-vllm/bin/python`` for the
CPU build, whose ``vllm`` console script and ``vllm.entrypoints.cli.main`` both fail: they look
up package metadata named "vllm"). ``entry: cli`` uses ``python -m vllm.entrypoints.cli.main
bench throughput`` instead, for a GPU install where that works.

The benchmark's ``--output-json`` gives elapsed time, request count and total tokens; its
printed ``Total num output tokens`` gives the output tokens (vLLM counts them from the engine's
outputs). A run that wrote its result and then exited non-zero (vLLM's CPU build can abort in
its own shutdown) is kept, with a warning in ``data.warnings`` and the detail. The stage reports output tokens/s (the seed's figure), total tokens/s and requests/s,
held against the plan's expected row and the roofline's hardware ceiling where the GPU and
model are known (``physics: {gpu, model, precision, tp}``).

Note on vLLM's random dataset: its ``--random-input-len``/``--random-output-len`` default to
1024/128 and win over ``--input-len``/``--output-len`` in vLLM 0.11+, so the entry here sets the
``random_*`` values from ``--input-len``/``--output-len`` when the parser has them.

Run inside the vLLM Python (not by users)::

    PYTHONPATH=REPO python -m harness.stages.throughput --vllm-bench [vllm bench throughput args]
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

from harness.stages.base import (
    Field, StageContext, StageResult, StageSkipped, exit_text, find_python_with, python_has,
    read_fresh_json, repo_root,
)
from harness.stages.physics import load_target_marks as target_marks  # noqa: F401  (contract hook)
from harness.stages.contract import vllm_python_environment as run_environment  # noqa: F401  (contract hook)

PARAMS: dict[str, Field] = {
    "model": Field("str", required=True, help="hub id or local folder"),
    "python": Field("str", help="the Python with vLLM (default: the launcher's choice)"),
    "num_prompts": Field("int", 1000, minimum=1),
    "input_len": Field("int", 512, minimum=1),
    "output_len": Field("int", 256, minimum=1),
    "dtype": Field("str", "bfloat16"),
    "quantization": Field("str", None),
    "tensor_parallel_size": Field("int", 1, minimum=1),
    "max_model_len": Field("int", None, minimum=1),
    "max_num_seqs": Field("int", None, minimum=1),
    "enforce_eager": Field("bool", False),
    "seed": Field("int", 0),
    "device": Field("str", "auto", choices=("auto", "cuda", "cpu"),
                    help="cpu: the CPU build's environment (KV cache space, thread binding)"),
    "entry": Field("str", "python", choices=("python", "cli")),
    "extra_args": Field("list", []),
    "env": Field("dict", {}),
    "timeout_s": Field("float", 7200.0, minimum=1),
    "physics": Field("dict", None, help="{gpu, model, precision, tp} for the roofline"),
}
METRICS = {"output_tokens_per_s": ">=", "total_tokens_per_s": ">=", "requests_per_s": ">=",
           "elapsed_s": "<=", "vram_gb": "<=", "tokens_per_joule": ">="}

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
QUIET_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


def bench_args(p: dict[str, Any], output_json: str) -> list[str]:
    """The ``vllm bench throughput`` arguments for params ``p``."""
    args = ["--backend", "vllm", "--model", str(p["model"]), "--dataset-name", "random",
            "--num-prompts", str(p["num_prompts"]), "--input-len", str(p["input_len"]),
            "--output-len", str(p["output_len"]), "--dtype", str(p["dtype"]),
            "--tensor-parallel-size", str(p["tensor_parallel_size"]), "--seed", str(p["seed"]),
            "--output-json", output_json]
    if p.get("quantization") and str(p["quantization"]).lower() not in ("none", "null"):
        args += ["--quantization", str(p["quantization"])]
    if p.get("max_model_len"):
        args += ["--max-model-len", str(p["max_model_len"])]
    if p.get("max_num_seqs"):
        args += ["--max-num-seqs", str(p["max_num_seqs"])]
    if p.get("enforce_eager"):
        args.append("--enforce-eager")
    args += [str(a) for a in p.get("extra_args") or []]
    return args


def command(p: dict[str, Any], python: str, output_json: str) -> list[str]:
    if p.get("entry") == "cli":
        return [python, "-m", "vllm.entrypoints.cli.main", "bench", "throughput",
                *bench_args(p, output_json)]
    return [python, "-m", "harness.stages.throughput", "--vllm-bench", *bench_args(p, output_json)]


def environment(p: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in QUIET_ENV.items():
        env.setdefault(k, v)
    if os.path.isdir(str(p["model"])):
        env.setdefault("HF_HUB_OFFLINE", "1")
    if p.get("device") == "cpu":
        for k, v in CPU_ENV.items():
            env.setdefault(k, v)
    env.update({str(k): str(v) for k, v in (p.get("env") or {}).items()})
    root = str(repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


_OUT_TOKENS = re.compile(r"Total num output tokens:\s*([0-9]+)")
_PROMPT_TOKENS = re.compile(r"Total num prompt tokens:\s*([0-9]+)")


def parse_result(result: dict[str, Any], log_text: str, p: dict[str, Any]) -> dict[str, Any]:
    """Figures from the benchmark's JSON and its printed token counts."""
    elapsed = float(result["elapsed_time"])
    n = int(result.get("num_requests") or p["num_prompts"])
    total = int(result.get("total_num_tokens") or 0)
    m_out, m_in = _OUT_TOKENS.findall(log_text), _PROMPT_TOKENS.findall(log_text)
    estimated = not m_out
    out_tokens = int(m_out[-1]) if m_out else n * int(p["output_len"])
    prompt_tokens = int(m_in[-1]) if m_in else max(0, total - out_tokens)
    return {
        "elapsed_s": elapsed, "num_requests": n, "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens, "total_tokens": total or out_tokens + prompt_tokens,
        "output_tokens_per_s": out_tokens / elapsed if elapsed > 0 else None,
        "total_tokens_per_s": (total or out_tokens + prompt_tokens) / elapsed if elapsed > 0 else None,
        "requests_per_s": n / elapsed if elapsed > 0 else None,
        "output_tokens_estimated": estimated,
    }


def read_result(path: str, not_before: float) -> tuple[dict[str, Any] | None, str]:
    """(the benchmark's result, "") when ``path`` is a whole result written at or after
    ``not_before`` (time.time()), else (None, why not)."""
    doc, why = read_fresh_json(path, not_before)
    if doc is None:
        return None, why
    elapsed = doc.get("elapsed_time")
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not elapsed > 0:
        return None, f"{path} has no positive elapsed_time"
    return doc, ""


def physics_checks(p: dict[str, Any], expected: dict[str, Any], measured: dict[str, Any],
                   plan: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from harness.stages import physics

    hw = physics.hardware_from(p.get("physics"), plan, input_len=int(p["input_len"]),
                               output_len=int(p["output_len"]))
    info: dict[str, Any] = {}
    if hw is None:
        return [], info
    b = physics.bounds(hw)
    if "output_tokens_per_s" in b:
        info["ceiling_output_tokens_per_s"] = round(b["output_tokens_per_s"][1], 1)
    info["weights_gb_per_gpu"] = round(hw.deployment.weight_bytes_per_gpu / 1e9, 2)
    info["fits"] = hw.deployment.ideal().fits
    figs = [(k, physics.target_number(v), "target") for k, v in expected.items()]
    figs += [(k, v, "measured") for k, v in measured.items() if isinstance(v, (int, float))]
    return physics.check_all(figs, hw), info


def run_stage(params: dict[str, Any], ctx: StageContext) -> StageResult:
    from harness.stages import expect as expect_mod
    from harness.stages.power import power_sampling, tokens_per_joule, visible_gpus

    p = {k: (params.get(k, f.default)) for k, f in PARAMS.items()}
    expected = dict(params.get("expect") or {})
    python = find_python_with("vllm", p.get("python"))
    reason = python_has(python, "vllm")
    if reason:
        raise StageSkipped(f"{reason}: build the CPU build with `bash tests/vllm_env.sh` "
                           f"(or pip install vllm on a GPU machine) and give python: PATH")
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    result_json = str((out / "vllm-throughput.json").resolve())
    if os.path.exists(result_json):
        os.remove(result_json)
    cmd = command(p, python, result_json)
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    log_path = out / "vllm-bench.log"
    ctx.log(f"vllm bench throughput: {p['num_prompts']} prompts, {p['input_len']} in, "
            f"{p['output_len']} out, {p['dtype']}, model {p['model']} (log: {log_path})")
    started = time.time()
    env = environment(p)
    gpus = visible_gpus(env, int(p["tensor_parallel_size"])) if p.get("device") != "cpu" else []
    with open(log_path, "wb") as log, power_sampling(gpus=gpus) as pw:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=str(repo_root()), start_new_session=True)
        try:
            code = proc.wait(timeout=float(p["timeout_s"]))
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise RuntimeError(f"vllm bench throughput ran past {p['timeout_s']:.0f} s; see {log_path}") from None
        except BaseException:
            _stop(proc)
            raise
    log_text = log_path.read_text(errors="replace")
    raw, why = read_result(result_json, started)
    if raw is None:
        tail = "\n".join(log_text.strip().splitlines()[-5:])
        raise RuntimeError(f"vllm bench throughput exited with {exit_text(code)} and {why}; "
                           f"last lines of {log_path}:\n{tail}")
    warnings: list[str] = []
    if code != 0:
        warnings.append(f"vllm bench throughput exited with {exit_text(code)} after writing its result; "
                        f"result accepted")
        ctx.log(f"throughput: warning: {warnings[-1]} (log: {log_path})")
    figures = parse_result(raw, log_text, p)
    measured: dict[str, Any] = {k: figures[k] for k in
                                ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "elapsed_s")}
    power = pw.summary()
    if power:
        measured["tokens_per_joule"] = tokens_per_joule(power, measured["output_tokens_per_s"])
        measured["avg_power_w"] = power["avg_w"]
    tol = float((ctx.plan or {}).get("tolerance") or 0.0)
    checks = expect_mod.check_all(expected, measured, tol)
    phys, phys_info = physics_checks(p, expected, measured, ctx.plan)
    ctx.log(f"throughput: {measured['output_tokens_per_s']:,.1f} output tok/s, "
            f"{measured['total_tokens_per_s']:,.1f} total tok/s, {measured['requests_per_s']:.2f} req/s "
            f"in {figures['elapsed_s']:.2f} s" + (
                f"; hardware ceiling {phys_info['ceiling_output_tokens_per_s']:,.0f} tok/s"
                if phys_info.get("ceiling_output_tokens_per_s") else ""))
    return StageResult(
        name=ctx.name, stage="throughput", status=expect_mod.status_from(checks) if checks else "pass",
        measured=measured, expected=expected, checks=checks, physics=phys, params=p, power=power,
        detail=f"{p['num_prompts']} prompts x ({p['input_len']} in, {p['output_len']} out), "
               f"{p['dtype']}{', ' + str(p['quantization']) if p.get('quantization') else ''}"
               + "".join(f"; warning: {w}" for w in warnings),
        data={"vllm_result": raw, "figures": figures, "python": python, "command": cmd,
              "physics": phys_info, "warnings": warnings},
    )


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the benchmark's process group (its engine and workers), then SIGKILL."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


# --- the entry that runs inside the vLLM Python --------------------------------------------

def _vllm_bench_main(argv: list[str]) -> None:  # pragma: no cover - runs under vLLM's Python
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM before 0.11
        from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef]
    from vllm.benchmarks.throughput import add_cli_args, main

    parser = FlexibleArgumentParser(prog="vllm bench throughput")
    add_cli_args(parser)
    args = parser.parse_args(argv)
    if getattr(args, "dataset_name", None) == "random":
        for name in ("input_len", "output_len"):
            if getattr(args, name, None) is not None and hasattr(args, f"random_{name}"):
                setattr(args, f"random_{name}", getattr(args, name))
        if hasattr(args, "random_range_ratio") and args.random_range_ratio is None:
            args.random_range_ratio = 0.0
    main(args)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) > 1 and sys.argv[1] == "--vllm-bench":
        _vllm_bench_main(sys.argv[2:])
    else:
        print("usage: python -m harness.stages.throughput --vllm-bench [vllm bench throughput args]"
              "  (users: `harness throughput`)", file=sys.stderr)
        sys.exit(2)
