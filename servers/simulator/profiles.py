"""Named simulator profiles: a GPU, a model, a precision and a TP degree, plus the
scheduler limits vLLM picks by default for that card.

Two options sit on top of a named profile (`with_options`, `harness sim --engine /
--kv-cache-dtype`, the same for `harness sim replay`): which engine serves it (its
efficiency and overheads, roofline.ENGINES) and the KV cache's dtype. Profile names
keep the plain GPU-MODEL-PRECISION[-tpN] form for vLLM with its default cache; the
options append `-trtllm` / `-kvfp8` to the name, so a result says what was modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from servers.simulator.gpus import GPUS
from servers.simulator.models import KV_CACHE_DTYPES, MODELS, PRECISIONS
from servers.simulator.roofline import DEFAULT_ENGINE, ENGINES, Deployment


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
    engine: str = DEFAULT_ENGINE       # roofline.ENGINES key; its efficiency is the deployment's

    @property
    def kv_cache_dtype(self) -> str:
        return self.deployment.kv_cache_dtype


def _suffix(engine: str, kv_cache_dtype: str) -> str:
    return (("" if engine == DEFAULT_ENGINE else f"-{engine}")
            + ("" if KV_CACHE_DTYPES[kv_cache_dtype] == 2.0 else "-kvfp8"))


def make_profile(gpu: str, model: str, precision: str, tp: int = 1, engine: str = DEFAULT_ENGINE,
                 kv_cache_dtype: str = "auto") -> Profile:
    dep = Deployment(GPUS[gpu], MODELS[model], PRECISIONS[precision], tp,
                     efficiency=ENGINES[engine], kv_cache_dtype=kv_cache_dtype)
    big = dep.gpu.memory_gb >= 75
    name = f"{gpu}-{model}-{precision}" + (f"-tp{tp}" if tp > 1 else "") + _suffix(engine, kv_cache_dtype)
    return Profile(
        name=name,
        deployment=dep,
        served_model_name=dep.model.hf_id,
        max_num_seqs=1024 if big else 256,
        max_num_batched_tokens=8192 if big else 2048,
        offline_max_num_batched_tokens=16384 if big else 8192,
        offline_max_num_seqs=1024 if big else 256,
        engine=engine,
    )


def with_options(profile: Profile, engine: str | None = None,
                 kv_cache_dtype: str | None = None) -> Profile:
    """`profile` served by another engine and/or with another KV-cache dtype. Unknown
    values raise KeyError naming the known ones."""
    if engine is not None and engine not in ENGINES:
        raise KeyError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise KeyError(f"unknown kv cache dtype {kv_cache_dtype!r}; known: "
                       f"{', '.join(KV_CACHE_DTYPES)}")
    engine = profile.engine if engine is None else engine
    kv = profile.kv_cache_dtype if kv_cache_dtype is None else kv_cache_dtype
    if engine == profile.engine and kv == profile.kv_cache_dtype:
        return profile
    dep = replace(profile.deployment, efficiency=ENGINES[engine], kv_cache_dtype=kv)
    old = _suffix(profile.engine, profile.kv_cache_dtype)
    base = profile.name[:len(profile.name) - len(old)] if old else profile.name
    return replace(profile, deployment=dep, engine=engine, name=base + _suffix(engine, kv))


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
