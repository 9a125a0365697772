"""Layouts: built-ins, YAML files, model overrides, the vLLM command per replica, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from servers.launcher import (
    BUILTIN_LAYOUTS,
    LayoutError,
    layout_from_dict,
    load_layout,
    make_plan,
    parse_model_overrides,
)
from servers.launcher.command import VLLM_MODULE
from servers.launcher.plan import check_model, check_runnable, check_vllm
from servers.topology import Topology

REPO = Path(__file__).resolve().parents[1]


def flat_topology(n: int, label: str = "PIX") -> Topology:
    m = [["X" if i == j else label for j in range(n)] for i in range(n)]
    return Topology(gpus=list(range(n)), matrix=m, source="constructed")


def args_of(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_builtins_are_the_seed_layouts():
    assert set(BUILTIN_LAYOUTS) == {"single", "tp2", "mixed12", "cpu"}
    topo = flat_topology(12)
    single = make_plan(load_layout("single"), topo, python="python")
    assert len(single.servers) == 12
    assert [s.assignment.gpus for s in single.servers] == [(g,) for g in range(12)]
    assert {s.spec.served_model_name for s in single.servers} == {"llama-3-8b-instruct"}

    tp2 = make_plan(load_layout("tp2"), topo, python="python")
    assert len(tp2.servers) == 6
    assert all(len(s.assignment.gpus) == 2 for s in tp2.servers)
    assert sorted(g for s in tp2.servers for g in s.assignment.gpus) == list(range(12))

    mixed = make_plan(load_layout("mixed12"), topo, python="python")
    roles = [s.spec.role for s in mixed.servers]
    assert roles.count("large") == 4 and roles.count("small") == 4
    assert sorted(g for s in mixed.servers for g in s.assignment.gpus) == list(range(12))
    large = [s for s in mixed.servers if s.spec.role == "large"]
    assert all(s.spec.tensor_parallel_size == 2 and s.spec.precision == "awq" for s in large)


def test_exact_vllm_command_and_env():
    plan = make_plan(load_layout("tp2"), flat_topology(4), python="/opt/vllm/bin/python",
                     base_port=9000)
    s0, s1 = plan.servers
    argv = s0.argv
    assert argv[:3] == ["/opt/vllm/bin/python", "-m", VLLM_MODULE]
    assert args_of(argv, "--tensor-parallel-size") == "2"
    assert args_of(argv, "--quantization") == "awq"
    assert args_of(argv, "--dtype") == "float16"
    assert args_of(argv, "--max-model-len") == "4096"
    assert args_of(argv, "--gpu-memory-utilization") == "0.9"
    assert args_of(argv, "--host") == "127.0.0.1"
    assert args_of(argv, "--served-model-name") == "llama-3-70b-instruct-awq"
    assert (args_of(s0.argv, "--port"), args_of(s1.argv, "--port")) == ("9000", "9001")
    assert s0.env["CUDA_VISIBLE_DEVICES"] == "0,1" and s1.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert s0.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert s0.url == "http://127.0.0.1:9000"
    line = s0.command_line()
    assert "CUDA_VISIBLE_DEVICES=0,1" in line and "--tensor-parallel-size 2" in line


def test_cpu_layout_follows_the_vllm_cpu_notes(tmp_path):
    layout = load_layout("cpu", {"*": str(tmp_path / "tiny")})
    plan = make_plan(layout, None, python="py", base_port=8100)
    (s,) = plan.servers
    assert s.assignment.gpus == ()
    assert args_of(s.argv, "--dtype") == "float32"
    assert "--enforce-eager" in s.argv
    assert "--gpu-memory-utilization" not in s.argv
    assert "--quantization" not in s.argv
    assert args_of(s.argv, "--max-model-len") == "512"
    assert args_of(s.argv, "--served-model-name") == "tiny"
    assert s.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert s.env["HF_HUB_OFFLINE"] == "1"  # a local folder: never reach for a hub
    assert s.env["CUDA_VISIBLE_DEVICES"] == ""
    assert s.env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "60"


@pytest.mark.parametrize("precision,dtype,quant", [
    ("bf16", "bfloat16", None), ("fp16", "float16", None), ("int8", "bfloat16",
                                                            "compressed-tensors"),
    ("awq", "float16", "awq"), ("gptq", "float16", "gptq"),
])
def test_precisions(precision, dtype, quant):
    layout = layout_from_dict({"servers": [{"model": "org/m", "precision": precision}]})
    (s,) = make_plan(layout, flat_topology(1), python="py").servers
    assert args_of(s.argv, "--dtype") == dtype
    assert args_of(s.argv, "--quantization") == quant


def test_yaml_layout_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(textwrap.dedent("""\
        base_port: 8200
        defaults: {max_model_len: 2048, gpu_memory_utilization: 0.8}
        servers:
          - role: big
            model: org/big-awq
            precision: awq
            tp: 4
            replicas: 1
            extra_args: [--enable-prefix-caching]
            env: {VLLM_LOGGING_LEVEL: DEBUG}
          - role: small
            model: org/small
            served_model_name: small-chat
            precision: gptq
            quantization: gptq_marlin
            replicas: fill
            max_model_len: 8192
        """))
    plan = make_plan(load_layout(str(f)), flat_topology(8), python="py")
    assert plan.layout.name == "mine"
    big = [s for s in plan.servers if s.spec.role == "big"]
    small = [s for s in plan.servers if s.spec.role == "small"]
    assert len(big) == 1 and len(big[0].assignment.gpus) == 4
    assert len(small) == 4
    assert args_of(big[0].argv, "--max-model-len") == "2048"
    assert args_of(big[0].argv, "--gpu-memory-utilization") == "0.8"
    assert big[0].argv[-1] == "--enable-prefix-caching"
    assert big[0].env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert args_of(small[0].argv, "--quantization") == "gptq_marlin"
    assert args_of(small[0].argv, "--max-model-len") == "8192"
    assert args_of(small[0].argv, "--served-model-name") == "small-chat"
    assert [args_of(s.argv, "--port") for s in plan.servers] == [str(p) for p in range(8200, 8205)]


def test_example_layout_files_load():
    files = sorted((REPO / "plans" / "layouts").glob("*.yaml"))
    assert files, "plans/layouts/ should hold example layouts"
    for f in files:
        layout = load_layout(str(f))
        assert layout.servers


def test_model_overrides():
    assert parse_model_overrides(["/m"]) == {"*": "/m"}
    assert parse_model_overrides(["small=/m", "large=org/x"]) == {"small": "/m", "large": "org/x"}
    layout = load_layout("mixed12", parse_model_overrides(["small=/models/8b"]))
    small = [s for s in layout.servers if s.role == "small"][0]
    large = [s for s in layout.servers if s.role == "large"][0]
    assert small.model == "/models/8b" and small.served_model_name == "8b"
    assert large.model.endswith("awq")
    with pytest.raises(LayoutError, match="role 'nope'"):
        load_layout("mixed12", {"nope": "x"})


@pytest.mark.parametrize("doc,match", [
    ({"servers": [{"model": "m", "precision": "int3"}]}, "unknown precision 'int3'"),
    ({"servers": [{"model": "m", "tensor_parallel_size": 0}]}, "at least 1"),
    ({"servers": [{"model": "m", "replicas": 0}]}, "replicas must be at least 1"),
    ({"servers": [{"model": "m", "replicas": "lots"}]}, "whole number"),
    ({"servers": [{"model": "m", "gpu_memory_utilization": 1.5}]}, r"\(0, 1\]"),
    ({"servers": [{"model": "m", "extra_args": ["--port", "1"]}]}, "--port"),
    ({"servers": [{"model": "m", "colour": "red"}]}, "unknown key 'colour'"),
    ({"servers": [{"role": "a", "model": "m"}, {"role": "a", "model": "n"}]}, "named twice"),
    ({"servers": [{"model": "m", "replicas": "fill"}, {"role": "b", "model": "n",
                                                       "replicas": "fill"}]}, "only one role"),
    ({"servers": []}, "non-empty list"),
    ({"servers": [{"precision": "bf16"}]}, "'model'"),
    ({"servers": [{"model": "m", "device": "cpu", "tp": 2}]}, "tensor_parallel_size 1 only"),
])
def test_bad_layouts_are_one_line(doc, match):
    with pytest.raises(LayoutError, match=match) as info:
        load_layout_from(doc)
    assert "\n" not in str(info.value)


def load_layout_from(doc):
    from servers.launcher.layouts import validate

    layout = layout_from_dict(doc)
    validate(layout)
    return layout


def test_unknown_layout_and_missing_file(tmp_path):
    with pytest.raises(LayoutError, match="unknown layout 'tp3'.*single, tp2, mixed12, cpu"):
        load_layout("tp3")
    with pytest.raises(LayoutError, match="does not exist"):
        load_layout(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers: [ {model: \n")
    with pytest.raises(LayoutError, match="not valid YAML"):
        load_layout(str(bad))


def test_too_many_gpus_and_tp_that_does_not_divide():
    with pytest.raises(LayoutError, match="needs 12 GPUs .* only 2 are present"):
        make_plan(load_layout("mixed12"), flat_topology(2), python="py")
    with pytest.raises(LayoutError, match="does not divide the 3 GPUs"):
        make_plan(load_layout("tp2"), flat_topology(3), python="py")
    with pytest.raises(LayoutError, match="no GPU was found"):
        make_plan(load_layout("single"), None, python="py")
    with pytest.raises(LayoutError, match="GPU 7 was asked for but is not present"):
        make_plan(load_layout("single"), flat_topology(2), gpus=[7], python="py")
    # --gpus narrows the pool: tp2 on 4 of 5 GPUs works
    plan = make_plan(load_layout("tp2"), flat_topology(5), gpus=[0, 1, 2, 3], python="py")
    assert len(plan.servers) == 2


def test_model_folder_checks(tmp_path):
    from servers.launcher.layouts import ServerSpec

    with pytest.raises(LayoutError, match="does not exist"):
        check_model(ServerSpec(role="r", model=str(tmp_path / "nope"), served_model_name="x"))
    (tmp_path / "m").mkdir()
    with pytest.raises(LayoutError, match="no config.json"):
        check_model(ServerSpec(role="r", model=str(tmp_path / "m"), served_model_name="x"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_attention_heads": 6}))
    check_model(ServerSpec(role="r", model=str(tmp_path / "m"), served_model_name="x",
                           tensor_parallel_size=2))
    with pytest.raises(LayoutError, match="tensor parallel size 4 does not divide the 6 attention"):
        check_model(ServerSpec(role="r", model=str(tmp_path / "m"), served_model_name="x",
                               tensor_parallel_size=4))
    # a hub id is not checked on disk (vLLM downloads it on GPU machines)
    check_model(ServerSpec(role="r", model="meta-llama/Meta-Llama-3-8B-Instruct",
                           served_model_name="x"))


def test_vllm_not_installed_names_the_extra():
    # The harness's own venv has no vLLM.
    with pytest.raises(LayoutError, match=r"vLLM is not installed for .*'vllm' extra"):
        check_vllm(sys.executable)
    with pytest.raises(LayoutError, match="does not exist"):
        check_vllm("/nonexistent/python")


def test_check_runnable_refuses_a_port_in_use(tmp_path):
    import socket

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        plan = make_plan(load_layout("cpu", {"*": str(tmp_path / "m")}), None, python="py",
                         base_port=port)
        with pytest.raises(LayoutError, match=f"port {port} .* is in use"):
            check_runnable(plan, check_vllm_installed=False)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "serve", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_dry_run_prints_commands_gpus_and_ports(tmp_path):
    topo = tmp_path / "topo.txt"
    topo.write_text((REPO.parent / "shared" / "data" / "nvidia-smi-topo-h100x2.txt").read_text()
                    if (REPO.parent / "shared" / "data" / "nvidia-smi-topo-h100x2.txt").exists()
                    else "\tGPU0\tGPU1\tCPU Affinity\tNUMA Affinity\n"
                         "GPU0\t X \tNV18\t0-31\t0\nGPU1\tNV18\t X \t0-31\t0\n")
    r = run_cli("--layout", "tp2", "--dry-run", "--topology", str(topo), "--base-port", "8300")
    assert r.returncode == 0, r.stderr
    assert "tp2-0" in r.stdout and "0,1" in r.stdout and "NV18" in r.stdout
    assert "CUDA_VISIBLE_DEVICES=0,1" in r.stdout
    assert "-m vllm.entrypoints.openai.api_server" in r.stdout
    assert "--port 8300" in r.stdout
    r = run_cli("--layout", "single", "--dry-run", "--topology", str(topo), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [s["gpus"] for s in doc["servers"]] == [[0], [1]]
    assert doc["servers"][0]["argv"][1:3] == ["-m", "vllm.entrypoints.openai.api_server"]


@pytest.mark.parametrize("args,match", [
    (["--layout", "nope", "--dry-run"], "unknown layout 'nope'"),
    (["--layout", "single", "--dry-run"], "no GPU was found"),
    (["--layout", "cpu", "--dry-run"], "no model given"),
    (["--layout", "cpu", "--model", "/nonexistent/model"], "model folder /nonexistent/model"),
    (["--layout", "cpu", "--model", str(REPO), "--vllm-python", sys.executable],
     "has no config.json"),
])
def test_cli_bad_input_is_one_line_exit_2(args, match):
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("harness serve: error: ")
    assert __import__("re").search(match, lines[0]), lines[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_vllm_not_installed(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    r = run_cli("--layout", "cpu", "--model", str(tmp_path / "m"), "--vllm-python",
                sys.executable, "--out", str(tmp_path / "out"), "--base-port", str(free_port()))
    assert r.returncode == 2, r.stderr
    assert "vLLM is not installed" in r.stderr and "'vllm' extra" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "endpoints.json").exists()
