"""The exact vLLM command line and environment of one replica.

vLLM is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
is broken in the CPU build, and the module works in every build), with the Python of the
environment vLLM is installed in.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence

from servers.launcher.layouts import ServerSpec

VLLM_MODULE = "vllm.entrypoints.openai.api_server"

# Set for every server. The keep-alive is raised from uvicorn's 5 s: a starved load generator
# otherwise reuses connections the server has just closed (../shared/vllm-cpu-notes.md).
BASE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "60",
}


def vllm_argv(spec: ServerSpec, *, python: str, host: str, port: int) -> list[str]:
    argv = [
        python, "-m", VLLM_MODULE,
        "--model", spec.model,
        "--served-model-name", spec.served_model_name,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
        "--dtype", spec.vllm_dtype,
    ]
    if spec.vllm_quantization:
        argv += ["--quantization", spec.vllm_quantization]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization is not None and spec.device == "cuda":
        argv += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
    argv += list(spec.extra_args)
    return argv


def server_env(spec: ServerSpec, gpus: Sequence[int], *, local_model: bool) -> dict[str, str]:
    """Variables set for this server on top of the launcher's own environment."""
    env = dict(BASE_ENV)
    if spec.device == "cuda":
        # nvidia-smi/NVML number GPUs in PCI bus order; make CUDA agree so the indices chosen
        # from the topology are the GPUs the server gets.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if local_model:
        env["HF_HUB_OFFLINE"] = "1"
    env.update(dict(spec.env))
    return env


def render_command(argv: Sequence[str], env: Mapping[str, str], cpus: Sequence[int] = ()) -> str:
    """One shell line that does what the launcher does: ``VAR=... [taskset -c CPUS] python ...``."""
    from servers.topology import format_cpu_list

    parts = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    if cpus:
        parts += ["taskset", "-c", format_cpu_list(cpus)]
    parts += [shlex.quote(a) for a in argv]
    return " ".join(parts)


def is_local_model(model: str) -> bool:
    """A folder on disk rather than a hub id (``org/name``)."""
    return (model.startswith(("/", "./", "../", "~")) or os.path.isabs(model)
            or os.path.exists(os.path.expanduser(model)))
