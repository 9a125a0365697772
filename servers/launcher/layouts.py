"""Layouts: which models are served, how (precision, tensor parallelism) and how many replicas.

A layout says *what* to serve; :mod:`servers.launcher.placement` decides *which GPUs* each replica
gets, and :mod:`servers.launcher.command` turns one replica into its vLLM command line.

Built-in layouts (the seed's L40S x12 plan, plus one for CPU-only machines):

- ``single``: one Llama-3-8B (BF16) replica per GPU ("12 x single-GPU 7B").
- ``tp2``: Llama-3-70B AWQ on tensor-parallel pairs that share a PCIe switch or NVLink
  ("6 x TP=2 70B AWQ").
- ``mixed12``: 4 single-GPU Llama-3-8B + 4 TP=2 Llama-3-70B AWQ on 12 GPUs.
- ``cpu``: one replica of a local model on real vLLM's CPU build (float32, eager mode); needs
  ``--model DIR``.

A custom layout is a YAML file (see ``plans/layouts/``)::

    name: my-layout                # optional, defaults to the file name
    host: 127.0.0.1                # optional
    base_port: 8000                # optional; replicas get consecutive ports
    allow_cross_switch: false      # true: TP groups without a shared switch warn instead of fail
    defaults:                      # optional, any server key below
      max_model_len: 4096
    servers:
      - role: small                # names the replicas small-0, small-1, ...
        model: meta-llama/Meta-Llama-3-8B-Instruct   # hub id or local folder
        served_model_name: llama-3-8b                # what clients put in "model"
        precision: bf16            # bf16 | fp16 | fp32 | int8 | awq | gptq
        quantization: null         # optional: overrides the precision's vLLM --quantization
        dtype: null                # optional: overrides the precision's vLLM --dtype
        tensor_parallel_size: 1
        replicas: 4                # a number, or "fill": as many as the free GPUs allow
        max_model_len: 8192
        gpu_memory_utilization: 0.90
        extra_args: [--enable-prefix-caching]
        env: {VLLM_LOGGING_LEVEL: INFO}
        device: cuda               # cuda | cpu
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from servers.launcher.errors import LayoutError

FILL = "fill"

# precision -> (vLLM --dtype, vLLM --quantization)
# - awq / gptq: a pre-quantized INT4 checkpoint; current vLLM picks its fastest kernel (Marlin
#   where the GPU runs it) for these names. Older vLLM releases forced their slow kernels for a
#   plain `awq`: set `quantization: awq_marlin` in a layout file there.
# - int8: a pre-quantized INT8 (W8A8) checkpoint in compressed-tensors format, e.g. made with
#   llm-compressor. The seed's "LLM.int8" (bitsandbytes) is no longer in vLLM (0.32 lists no
#   bitsandbytes method); `quantization:` in a layout file names another method where wanted.
PRECISIONS: dict[str, tuple[str, str | None]] = {
    "bf16": ("bfloat16", None),
    "fp16": ("float16", None),
    "fp32": ("float32", None),
    "int8": ("bfloat16", "compressed-tensors"),
    "awq": ("float16", "awq"),
    "gptq": ("float16", "gptq"),
}
_PRECISION_ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "awq-int4": "awq", "awq_int4": "awq", "gptq-int4": "gptq", "gptq_int4": "gptq",
    "llm.int8": "int8",
}
DEVICES = ("cuda", "cpu")

# Environment for vLLM's CPU build (../shared/vllm-cpu-notes.md): without a KV cache size it
# fails on NUMA nodes that report little memory.
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "auto",
}

LLAMA3_8B = "meta-llama/Meta-Llama-3-8B-Instruct"
LLAMA3_70B_AWQ = "casperhansen/llama-3-70b-instruct-awq"

_ROLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SERVER_KEYS = {
    "role", "model", "served_model_name", "precision", "quantization", "dtype",
    "tensor_parallel_size", "tp", "replicas", "max_model_len", "gpu_memory_utilization",
    "extra_args", "env", "device",
}
_LAYOUT_KEYS = {"name", "description", "host", "base_port", "allow_cross_switch", "defaults",
                "servers"}


@dataclass(frozen=True)
class ServerSpec:
    """One role of a layout: a model served by ``replicas`` vLLM servers of ``tensor_parallel_size``
    GPUs each (``replicas`` may be :data:`FILL`)."""

    role: str
    model: str
    served_model_name: str
    precision: str = "bf16"
    tensor_parallel_size: int = 1
    replicas: int | str = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    quantization: str | None = None
    dtype: str | None = None
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    device: str = "cuda"

    @property
    def vllm_dtype(self) -> str:
        return self.dtype or PRECISIONS[self.precision][0]

    @property
    def vllm_quantization(self) -> str | None:
        return self.quantization if self.quantization is not None else PRECISIONS[self.precision][1]

    @property
    def gpus_per_replica(self) -> int:
        return 0 if self.device == "cpu" else self.tensor_parallel_size


@dataclass(frozen=True)
class Layout:
    name: str
    servers: tuple[ServerSpec, ...]
    description: str = ""
    source: str = "built-in"
    host: str = "127.0.0.1"
    base_port: int = 8000
    allow_cross_switch: bool = False

    @property
    def needs_gpus(self) -> bool:
        return any(s.device == "cuda" for s in self.servers)


# -- built-in layouts ------------------------------------------------------------------------


def _single() -> Layout:
    return Layout(
        name="single",
        description="one Llama-3-8B BF16 replica per GPU (seed: 12 x single-GPU 7B)",
        servers=(ServerSpec(role="single", model=LLAMA3_8B, served_model_name="llama-3-8b-instruct",
                            precision="bf16", replicas=FILL, max_model_len=8192,
                            gpu_memory_utilization=0.90),),
    )


def _tp2() -> Layout:
    return Layout(
        name="tp2",
        description="Llama-3-70B AWQ on TP=2 pairs sharing a PCIe switch (seed: 6 x TP=2 70B AWQ)",
        servers=(ServerSpec(role="tp2", model=LLAMA3_70B_AWQ,
                            served_model_name="llama-3-70b-instruct-awq", precision="awq",
                            tensor_parallel_size=2, replicas=FILL, max_model_len=4096,
                            gpu_memory_utilization=0.90),),
    )


def _mixed12() -> Layout:
    return Layout(
        name="mixed12",
        description="4 single-GPU Llama-3-8B + 4 TP=2 Llama-3-70B AWQ (seed: mixed serving on 12 GPUs)",
        servers=(
            ServerSpec(role="large", model=LLAMA3_70B_AWQ,
                       served_model_name="llama-3-70b-instruct-awq", precision="awq",
                       tensor_parallel_size=2, replicas=4, max_model_len=4096,
                       gpu_memory_utilization=0.90),
            ServerSpec(role="small", model=LLAMA3_8B, served_model_name="llama-3-8b-instruct",
                       precision="bf16", replicas=4, max_model_len=8192,
                       gpu_memory_utilization=0.90),
        ),
    )


def _cpu() -> Layout:
    return Layout(
        name="cpu",
        description="one replica of a local model on vLLM's CPU build (float32, eager); needs --model",
        servers=(ServerSpec(role="cpu", model="", served_model_name="", precision="fp32",
                            replicas=1, max_model_len=512, extra_args=("--enforce-eager",),
                            env=tuple(CPU_ENV.items()), device="cpu"),),
    )


BUILTIN_LAYOUTS = {"single": _single, "tp2": _tp2, "mixed12": _mixed12, "cpu": _cpu}


# -- loading -----------------------------------------------------------------------------------


def load_layout(name_or_path: str, models: Mapping[str, str] | None = None) -> Layout:
    """A built-in layout by name, or a YAML file; ``models`` overrides models by role.

    ``models`` maps a role (or ``"*"`` for every role) to a model id or local folder, as given
    by ``harness serve --model [ROLE=]MODEL``.
    """
    if name_or_path in BUILTIN_LAYOUTS:
        layout = BUILTIN_LAYOUTS[name_or_path]()
    elif name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        layout = _load_yaml(name_or_path)
    else:
        raise LayoutError(
            f"unknown layout {name_or_path!r}: use one of {', '.join(BUILTIN_LAYOUTS)} "
            "or a YAML file (see plans/layouts/)")
    if models:
        layout = apply_models(layout, models)
    validate(layout)
    return layout


def parse_model_overrides(values: Iterable[str] | None) -> dict[str, str]:
    """``["DIR"]`` -> ``{"*": "DIR"}``; ``["small=DIR"]`` -> ``{"small": "DIR"}``."""
    out: dict[str, str] = {}
    for v in values or []:
        role, sep, model = v.partition("=")
        if sep and _ROLE_RE.match(role) and model and not os.path.exists(v):
            out[role] = model
        else:
            out["*"] = v
    return out


def apply_models(layout: Layout, models: Mapping[str, str]) -> Layout:
    roles = {s.role for s in layout.servers}
    unknown = sorted(set(models) - roles - {"*"})
    if unknown:
        raise LayoutError(f"--model names role {unknown[0]!r}, which layout {layout.name!r} does "
                          f"not have (roles: {', '.join(sorted(roles))})")
    servers = []
    for s in layout.servers:
        m = models.get(s.role, models.get("*"))
        if m and m != s.model:
            s = replace(s, model=m, served_model_name=_served_name(m))
        servers.append(s)
    return replace(layout, servers=tuple(servers))


def _served_name(model: str) -> str:
    """A short name clients can use: the last path component of a hub id or folder."""
    return os.path.basename(os.path.normpath(model)) or model


def _load_yaml(path: str) -> Layout:
    import yaml

    if not os.path.isfile(path):
        raise LayoutError(f"layout file {path} does not exist")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise LayoutError(f"layout file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise LayoutError(f"layout file {path}: expected a mapping with a 'servers' list")
    return layout_from_dict(doc, source=path,
                            default_name=os.path.splitext(os.path.basename(path))[0])


def layout_from_dict(doc: Mapping[str, Any], source: str = "dict",
                     default_name: str = "custom") -> Layout:
    where = source
    extra = sorted(set(doc) - _LAYOUT_KEYS)
    if extra:
        raise LayoutError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(_LAYOUT_KEYS))})")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise LayoutError(f"{where}: 'defaults' must be a mapping")
    servers_doc = doc.get("servers")
    if not isinstance(servers_doc, list) or not servers_doc:
        raise LayoutError(f"{where}: 'servers' must be a non-empty list")
    servers = tuple(_server_from_dict({**defaults, **(s or {})}, f"{where}: servers[{k}]")
                    for k, s in enumerate(servers_doc))
    try:
        base_port = int(doc.get("base_port", 8000))
    except (TypeError, ValueError):
        raise LayoutError(f"{where}: base_port must be a number") from None
    return Layout(
        name=str(doc.get("name") or default_name),
        description=str(doc.get("description") or ""),
        servers=servers,
        source=source,
        host=str(doc.get("host") or "127.0.0.1"),
        base_port=base_port,
        allow_cross_switch=bool(doc.get("allow_cross_switch", False)),
    )


def _server_from_dict(d: Mapping[str, Any], where: str) -> ServerSpec:
    if not isinstance(d, Mapping):
        raise LayoutError(f"{where}: expected a mapping")
    extra = sorted(set(d) - _SERVER_KEYS)
    if extra:
        raise LayoutError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(_SERVER_KEYS - {'tp'}))})")
    model = d.get("model")
    if not model or not isinstance(model, str):
        raise LayoutError(f"{where}: 'model' (a hub id or a local folder) is required")
    role = str(d.get("role") or _served_name(model))
    precision = str(d.get("precision", "bf16")).lower()
    precision = _PRECISION_ALIASES.get(precision, precision)
    device = str(d.get("device", "cuda")).lower()
    if "tp" in d and "tensor_parallel_size" in d:
        raise LayoutError(f"{where}: give 'tensor_parallel_size' or 'tp', not both")
    tp = _int(d.get("tensor_parallel_size", d.get("tp", 1)), f"{where}: tensor_parallel_size")
    replicas_raw = d.get("replicas", 1)
    replicas: int | str
    if isinstance(replicas_raw, str) and replicas_raw.lower() in (FILL, "all"):
        replicas = FILL
    else:
        replicas = _int(replicas_raw, f"{where}: replicas")
    mml = d.get("max_model_len")
    gmu = d.get("gpu_memory_utilization")
    extra_args = d.get("extra_args") or []
    if isinstance(extra_args, str):
        import shlex
        extra_args = shlex.split(extra_args)
    if not isinstance(extra_args, list):
        raise LayoutError(f"{where}: 'extra_args' must be a list of strings")
    env = d.get("env") or {}
    if not isinstance(env, dict):
        raise LayoutError(f"{where}: 'env' must be a mapping")
    if device == "cpu":
        env = {**CPU_ENV, **env}
    try:
        gmu_f = None if gmu is None else float(gmu)
    except (TypeError, ValueError):
        raise LayoutError(f"{where}: gpu_memory_utilization must be a number in (0, 1]") from None
    return ServerSpec(
        role=role,
        model=model,
        served_model_name=str(d.get("served_model_name") or _served_name(model)),
        precision=precision,
        tensor_parallel_size=tp,
        replicas=replicas,
        max_model_len=None if mml is None else _int(mml, f"{where}: max_model_len"),
        gpu_memory_utilization=gmu_f,
        quantization=None if d.get("quantization") is None else str(d["quantization"]),
        dtype=None if d.get("dtype") is None else str(d["dtype"]),
        extra_args=tuple(str(a) for a in extra_args),
        env=tuple((str(k), str(v)) for k, v in env.items()),
        device=device,
    )


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise LayoutError(f"{what} must be a whole number, not {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise LayoutError(f"{what} must be a whole number, not {value!r}") from None
    if n != value and not (isinstance(value, str) and value.strip().isdigit()):
        raise LayoutError(f"{what} must be a whole number, not {value!r}")
    return n


# -- validation --------------------------------------------------------------------------------

_MANAGED_ARGS = {
    "--model", "--served-model-name", "--host", "--port", "--tensor-parallel-size", "-tp",
    "--dtype", "--quantization", "-q", "--max-model-len", "--gpu-memory-utilization",
}


def validate(layout: Layout) -> None:
    """Checks that need no machine: every error is one line naming the role and the fix."""
    seen_roles: set[str] = set()
    fills = [s.role for s in layout.servers if s.replicas == FILL]
    if len(fills) > 1:
        raise LayoutError(f"layout {layout.name!r}: only one role may use replicas: fill "
                          f"({', '.join(fills)} do)")
    if not 1 <= layout.base_port <= 65535:
        raise LayoutError(f"layout {layout.name!r}: base_port {layout.base_port} is not a TCP port")
    for s in layout.servers:
        who = f"layout {layout.name!r}, role {s.role!r}"
        if not _ROLE_RE.match(s.role):
            raise LayoutError(f"{who}: role names may hold letters, digits, '.', '_' and '-' only")
        if s.role in seen_roles:
            raise LayoutError(f"{who}: role is named twice")
        seen_roles.add(s.role)
        if not s.model:
            hint = " (tests/tiny_model.py builds a tiny one)" if s.device == "cpu" else ""
            raise LayoutError(f"{who}: no model given: pass --model DIR{hint}")
        if s.precision not in PRECISIONS:
            raise LayoutError(f"{who}: unknown precision {s.precision!r} "
                              f"(use one of {', '.join(PRECISIONS)})")
        if s.device not in DEVICES:
            raise LayoutError(f"{who}: unknown device {s.device!r} (use cuda or cpu)")
        if s.tensor_parallel_size < 1:
            raise LayoutError(f"{who}: tensor_parallel_size must be at least 1")
        if s.device == "cpu" and s.tensor_parallel_size != 1:
            raise LayoutError(f"{who}: the CPU layout runs tensor_parallel_size 1 only")
        if s.device == "cpu" and s.vllm_quantization:
            raise LayoutError(f"{who}: precision {s.precision} is for GPUs; vLLM's CPU build "
                              "here runs fp32 (or bf16)")
        if s.replicas != FILL and int(s.replicas) < 1:
            raise LayoutError(f"{who}: replicas must be at least 1 (or 'fill')")
        if s.max_model_len is not None and s.max_model_len < 16:
            raise LayoutError(f"{who}: max_model_len {s.max_model_len} is too small")
        if s.gpu_memory_utilization is not None and not 0 < s.gpu_memory_utilization <= 1:
            raise LayoutError(f"{who}: gpu_memory_utilization must be in (0, 1], "
                              f"not {s.gpu_memory_utilization}")
        for a in s.extra_args:
            flag = a.split("=", 1)[0]
            if flag in _MANAGED_ARGS:
                raise LayoutError(f"{who}: extra_args sets {flag}, which the layout manages: use "
                                  "the layout key instead")
