"""A launcher layout served by simulated replicas: `harness sim --layout mixed12`
stands up the seed's cluster on one CPU, with each role's model, precision and TP
degree on the GPU the user plans to buy, and writes the same endpoints.json that
`harness serve` writes, so `harness load --endpoints` cannot tell them apart."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from servers.launcher.layouts import FILL, Layout, ServerSpec
from servers.simulator.profiles import Profile, make_profile

# Which architecture a layout's model id runs on (hub ids and local folder names alike).
_MODEL_PATTERNS = [(re.compile(r"70b", re.I), "llama-3-70b"), (re.compile(r"13b", re.I), "llama-2-13b"),
                   (re.compile(r"mistral", re.I), "mistral-7b"), (re.compile(r"8b|7b", re.I), "llama-3-8b")]
_PRECISIONS = {"bf16": "bf16", "fp16": "bf16", "fp32": "bf16", "int8": "int8", "awq": "awq", "gptq": "gptq",
               "fp8": "fp8"}


@dataclass(frozen=True)
class SimReplica:
    name: str
    role: str
    profile: Profile
    gpus: tuple[int, ...]


def architecture_for(model: str) -> str:
    for pattern, key in _MODEL_PATTERNS:
        if pattern.search(model):
            return key
    raise ValueError(f"cannot tell the architecture of model {model!r}: the simulator knows "
                     f"Llama-3 8B/70B, Llama-2 13B and Mistral 7B (name them in the id)")


def profile_for(spec: ServerSpec, gpu: str) -> Profile:
    """The simulator profile of one layout role on ``gpu`` (its model, precision and TP), with
    the role's served model name and context length. Raises ValueError when it cannot be."""
    profile = make_profile(gpu, architecture_for(spec.model), _PRECISIONS[spec.precision],
                           spec.tensor_parallel_size)
    if not profile.deployment.fits:
        raise ValueError(f"role {spec.role!r}: {profile.name} does not fit the card's memory")
    return replace(profile, served_model_name=spec.served_model_name or profile.served_model_name,
                   max_model_len=spec.max_model_len or profile.max_model_len)


def replicas_for_layout(layout: Layout, gpu: str, num_gpus: int) -> list[SimReplica]:
    """One simulated replica per replica of each role, GPUs numbered as a real
    placement would consume them (fixed roles first, then `fill` roles)."""
    out: list[SimReplica] = []
    next_gpu = 0
    fixed = [s for s in layout.servers if s.replicas != FILL]
    fill = [s for s in layout.servers if s.replicas == FILL]
    for spec in fixed + fill:
        tp = spec.tensor_parallel_size
        count = (num_gpus - next_gpu) // tp if spec.replicas == FILL else int(spec.replicas)
        profile = profile_for(spec, gpu)
        for i in range(count):
            gpus = tuple(range(next_gpu, next_gpu + tp))
            if gpus and gpus[-1] >= num_gpus:
                raise ValueError(f"layout {layout.name!r} needs more than the {num_gpus} GPUs given "
                                 f"(--gpus N)")
            next_gpu += tp
            out.append(SimReplica(f"{spec.role}-{i}", spec.role, profile, gpus))
    return out
