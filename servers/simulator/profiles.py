"""Named simulator profiles: a GPU, a model, a precision and a TP degree, plus the
scheduler limits vLLM picks by default for that card."""
from __future__ import annotations

from dataclasses import dataclass

from servers.simulator.gpus import GPUS
from servers.simulator.models import MODELS, PRECISIONS
from servers.simulator.roofline import Deployment


@dataclass(frozen=True)
class Profile:
    name: str
    deployment: Deployment
    served_model_name: str
    max_model_len: int = 8192
    max_num_seqs: int = 256
    # vLLM's default for an API server: 2048 on cards under 70 GiB, 8192 above.
    max_num_batched_tokens: int = 2048
    # The offline `LLM` class defaults: 8192 under 70 GiB, 16384 above.
    offline_max_num_batched_tokens: int = 8192
    offline_max_num_seqs: int = 256


def make_profile(gpu: str, model: str, precision: str, tp: int = 1) -> Profile:
    dep = Deployment(GPUS[gpu], MODELS[model], PRECISIONS[precision], tp)
    big = dep.gpu.memory_gb >= 75
    name = f"{gpu}-{model}-{precision}" + (f"-tp{tp}" if tp > 1 else "")
    return Profile(
        name=name,
        deployment=dep,
        served_model_name=dep.model.hf_id,
        max_num_seqs=1024 if big else 256,
        max_num_batched_tokens=8192 if big else 2048,
        offline_max_num_batched_tokens=16384 if big else 8192,
        offline_max_num_seqs=1024 if big else 256,
    )


def all_profiles() -> dict[str, Profile]:
    """Every GPU x model x precision x TP in {1, 2, 4, 8} combination that loads."""
    out: dict[str, Profile] = {}
    for gpu in GPUS:
        for model in MODELS:
            for precision in PRECISIONS:
                for tp in (1, 2, 4, 8):
                    p = make_profile(gpu, model, precision, tp)
                    if p.deployment.fits:
                        out[p.name] = p
    return out


DEFAULT_PROFILE = "l40s-llama-3-8b-bf16"


def get_profile(name: str) -> Profile:
    profiles = all_profiles()
    if name not in profiles:
        close = [n for n in profiles if n.startswith(name.split("-")[0])][:6]
        raise KeyError(
            f"unknown profile {name!r}; profiles are GPU-MODEL-PRECISION[-tpN], "
            f"e.g. {', '.join(close or list(profiles)[:6])} (see `harness sim --list-profiles`)")
    return profiles[name]
