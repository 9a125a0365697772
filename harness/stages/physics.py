"""The physics check: every plan target and every measured figure against the roofline.

The bounds come from the simulator's roofline (:mod:`servers.simulator.roofline`) on an ideal
card (datasheet peaks, no overhead), so no real run can beat them:

- ``output_tokens_per_s``: above :func:`offline_throughput_ceiling` (times the replicas);
- ``tpot_*_ms``: below the time to read every weight once (one decode step of one sequence);
- ``ttft_*_ms``: below one prefill of the prompt on an idle card;
- ``vram_gb``: above the card's memory, or below the weights alone;
- any figure for a deployment whose weights do not fit the card;
- hardware: copy bandwidth above the datasheet's peak, GEMM above the dense peak.

A *target* past its bound is marked ``impossible``; a *measured* figure past it is a
``measurement error`` to investigate (clock skew, tokens miscounted, a cached result).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any
from collections.abc import Iterable

from servers.simulator.gpus import GPUS, GpuSpec
from servers.simulator.models import MODELS, PRECISIONS
from servers.simulator.roofline import Deployment, offline_throughput_ceiling

OK, IMPOSSIBLE, MEASUREMENT_ERROR = "ok", "impossible", "measurement error"
GIB_PER_GB = 2**30 / 1e9  # a memory figure may be GiB written as "GB"
_PROFILE = re.compile(r"^(?P<gpu>[a-z0-9]+)-(?P<model>.+)-(?P<precision>[a-z0-9]+?)(?:-tp(?P<tp>\d+))?$")


@dataclass(frozen=True)
class Hardware:
    """What a stage's figures are held against: a deployment, its replicas and its workload."""

    deployment: Deployment
    replicas: int = 1
    input_len: int = 512
    output_len: int = 128

    @property
    def max_num_seqs(self) -> int:
        return 1024 if self.deployment.gpu.memory_gb >= 75 else 256


def gpu_spec(gpu: str, overrides: dict[str, Any] | None = None) -> GpuSpec:
    key = gpu.lower()
    if key not in GPUS:
        raise KeyError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    spec = GPUS[key]
    if overrides:
        spec = replace(spec, **overrides)
    return spec


def deployment(gpu: str, model: str, precision: str, tp: int = 1,
               gpu_overrides: dict[str, Any] | None = None) -> Deployment:
    if model not in MODELS:
        raise KeyError(f"unknown model architecture {model!r}; known: {', '.join(MODELS)}")
    if precision not in PRECISIONS:
        raise KeyError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    return Deployment(gpu_spec(gpu, gpu_overrides), MODELS[model], PRECISIONS[precision], int(tp))


def parse_profile(name: str) -> tuple[str, str, str, int] | None:
    """'l40s-llama-3-70b-awq-tp2' -> ('l40s', 'llama-3-70b', 'awq', 2); None if not a profile."""
    m = _PROFILE.match(name)
    if not m or m.group("gpu") not in GPUS or m.group("model") not in MODELS:
        return None
    return m.group("gpu"), m.group("model"), m.group("precision"), int(m.group("tp") or 1)


def hardware_from(spec: dict[str, Any] | None, plan: dict[str, Any] | None = None, *,
                  replicas: int = 1, input_len: int = 512, output_len: int = 128) -> Hardware | None:
    """A stage's ``physics: {gpu, model, precision, tp}`` (gpu defaults to the plan's ``gpu``).

    None when the model or GPU is not known (a local tiny model, a CPU run): no check then.
    """
    plan = plan or {}
    spec = dict(spec or {})
    if spec.get("profile"):
        parsed = parse_profile(str(spec["profile"]))
        if parsed:
            spec.setdefault("gpu", parsed[0])
            spec.setdefault("model", parsed[1])
            spec.setdefault("precision", parsed[2])
            spec.setdefault("tp", parsed[3])
    gpu = spec.get("gpu") or plan.get("gpu")
    model, precision = spec.get("model"), spec.get("precision")
    if not gpu or not model or not precision:
        return None
    try:
        dep = deployment(str(gpu), str(model), str(precision), int(spec.get("tp") or 1),
                         plan.get("gpu_overrides"))
    except KeyError:
        return None
    return Hardware(dep, int(spec.get("replicas") or replicas), input_len, output_len)


def bounds(hw: Hardware) -> dict[str, tuple[str, float, str]]:
    """metric family -> (direction, bound, name). direction 'max': value must be <= bound."""
    dep = hw.deployment
    ideal = dep.ideal()
    out: dict[str, tuple[str, float, str]] = {}
    weights_gb = dep.weight_bytes_per_gpu / 1e9
    out["vram_gb"] = ("range", dep.gpu.memory_gb, f"card memory {dep.gpu.memory_gb:g} GB, "
                      f"weights {weights_gb:.1f} GB per GPU")
    if not ideal.fits:
        return out
    ceiling = offline_throughput_ceiling(dep, hw.input_len, hw.output_len, hw.max_num_seqs)
    out["output_tokens_per_s"] = (
        "max", ceiling * hw.replicas,
        f"hardware ceiling {ceiling:,.0f} tok/s per replica x {hw.replicas} "
        f"({hw.input_len} in, {hw.output_len} out)")
    tpot = dep.decode_floor_s(1, hw.input_len) * 1e3
    out["tpot"] = ("min", tpot, f"weight-read time {tpot:.1f} ms per decode step "
                   f"({weights_gb:.1f} GB at {dep.gpu.mem_bandwidth_gbs:g} GB/s)")
    ttft = dep.prefill_floor_s(hw.input_len) * 1e3
    out["ttft"] = ("min", ttft, f"prefill floor {ttft:.1f} ms for {hw.input_len} tokens")
    return out


def _family(metric: str) -> str | None:
    base = metric.rsplit(".", 1)[-1]
    if base.startswith("tpot_") or base.startswith("itl_"):
        return "tpot"
    if base.startswith("ttft_") and not base.startswith("ttft_from"):
        return "ttft"
    if base in ("output_tokens_per_s", "vram_gb"):
        return base
    return None


def check_value(metric: str, value: float | None, source: str, hw: Hardware | None,
                weights_gb: float | None = None) -> dict[str, Any] | None:
    """One figure against its bound; None when no bound applies."""
    if hw is None or value is None:
        return None
    dep = hw.deployment
    b = bounds(hw)
    bad = IMPOSSIBLE if source == "target" else MEASUREMENT_ERROR
    fam = _family(metric)
    if not dep.ideal().fits and fam is not None and fam != "vram_gb":
        wgb = dep.weight_bytes_per_gpu / 1e9
        return {"metric": metric, "value": value, "source": source, "bound": dep.gpu.memory_gb,
                "bound_name": "card memory", "mark": bad,
                "detail": f"{dep.model.name} {dep.precision.name} TP={dep.tp}: weights alone are "
                          f"{wgb:.1f} GB per GPU, more than the {dep.gpu.memory_gb:g} GB card"}
    if fam is None or fam not in b:
        return None
    direction, bound, name = b[fam]
    mark, detail = OK, name
    if fam == "vram_gb":
        wgb = dep.weight_bytes_per_gpu / 1e9
        if value > bound:
            mark, detail = bad, f"{value:g} GB is more than the {bound:g} GB card"
        elif value * GIB_PER_GB < wgb * 0.98:  # below the weights even if the figure meant GiB
            mark, detail = bad, f"{value:g} GB is less than the weights alone ({wgb:.1f} GB per GPU)"
    elif direction == "max" and value > bound:
        mark, detail = bad, f"{value:,.1f} above the {name}"
    elif direction == "min" and value < bound:
        mark, detail = bad, f"{value:,.1f} ms below the {name}"
    return {"metric": metric, "value": value, "source": source, "bound": round(bound, 3),
            "bound_name": name, "mark": mark, "detail": detail}


def check_hardware_value(metric: str, value: float | None, source: str,
                         gpu: GpuSpec | None) -> dict[str, Any] | None:
    """Hardware-stage figures: copy bandwidth and BF16 GEMM against the datasheet peaks."""
    if gpu is None or value is None:
        return None
    bad = IMPOSSIBLE if source == "target" else MEASUREMENT_ERROR
    if metric.startswith("hbm_tbs"):
        peak, name = gpu.mem_bandwidth_gbs / 1e3, f"{gpu.name} peak {gpu.mem_bandwidth_gbs / 1e3:g} TB/s"
    elif metric.startswith("gemm_tflops"):
        peak, name = gpu.bf16_tflops, f"{gpu.name} dense BF16 peak {gpu.bf16_tflops:g} TFLOPS"
    else:
        return None
    mark = bad if value > peak * 1.02 else OK
    return {"metric": metric, "value": value, "source": source, "bound": peak, "bound_name": name,
            "mark": mark, "detail": f"{value:g} above the {name}" if mark != OK else name}


def check_all(figures: Iterable[tuple[str, float | None, str]], hw: Hardware | None) -> list[dict[str, Any]]:
    out = []
    for metric, value, source in figures:
        r = check_value(metric, value, source, hw)
        if r is not None:
            out.append(r)
    return out


def target_number(expr: Any) -> float | None:
    """The number in a target as written ('>= 4500', 4500, '<80', {target: 80, informational:
    true}) or None."""
    if isinstance(expr, dict):
        expr = expr.get("target")
    if isinstance(expr, bool) or expr is None:
        return None
    if isinstance(expr, (int, float)):
        return float(expr)
    m = re.search(r"[-+]?\d[\d_,]*(?:\.\d+)?(?:[eE][-+]?\d+)?", str(expr))
    return float(m.group(0).replace(",", "").replace("_", "")) if m else None


# --- targets of a whole plan, before anything runs ------------------------------------------------

def stage_value(stage: dict[str, Any], key: str) -> Any:
    """A validated plan stage's ``key``, else its kind's default (``PARAMS``)."""
    from harness.stages.contract import stage_module

    v = stage.get(key)
    if v is not None:
        return v
    params = getattr(stage_module(stage["stage"]), "PARAMS", {})
    return params[key].default if key in params else None


def load_target_marks(stage: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """A load stage's targets (throughput, serving, soak) against the roofline of its
    ``physics:`` spec, or of its simulator target's profile (source 'target')."""
    in_len, out_len = int(stage_value(stage, "input_len") or 512), int(stage_value(stage, "output_len") or 128)
    spec = dict(stage.get("physics") or {})
    sim = (stage.get("target") or {}).get("simulator")
    if not spec and isinstance(sim, str):
        spec = {"profile": sim}
    hw = hardware_from(spec, plan, input_len=in_len, output_len=out_len)
    return check_all(((k, target_number(v), "target") for k, v in (stage.get("expect") or {}).items()), hw)


def target_marks(stage: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of one validated plan stage held against the roofline (source 'target'),
    by its kind's ``target_marks`` hook; none for a kind without one."""
    from harness.stages.contract import hook

    marks = hook(stage["stage"], "target_marks")
    return marks(stage, plan) if marks is not None and stage.get("expect") else []


def plan_marks(plan: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """stage name -> the physics marks of its targets."""
    return {s["name"]: target_marks(s, plan) for s in plan["stages"]}


def system_sheet(plan: dict[str, Any]) -> dict[str, Any]:
    """The datasheet's side of the plan's ``system:`` figures: ``gpu_count`` x the plan GPU's
    memory, bandwidth and TDP, its interconnect, and one GPU's 8B BF16 output-token ceiling;
    empty without ``system:``, ``gpu:`` and ``gpu_count:``."""
    gpu_key, count = plan.get("gpu"), plan.get("gpu_count")
    if not plan.get("system") or not gpu_key or not count:
        return {}
    try:
        spec = gpu_spec(gpu_key, plan.get("gpu_overrides"))
    except KeyError:
        return {}
    sheet: dict[str, Any] = {"total_memory_gb": count * spec.memory_gb,
                             "total_bandwidth_tbs": count * spec.mem_bandwidth_gbs / 1000,
                             "power_w": count * spec.tdp_watts, "interconnect": spec.interconnect}
    try:
        dep = deployment(gpu_key, "llama-3-8b", "bf16", 1, plan.get("gpu_overrides"))
        sheet["tokens_per_s_per_gpu_7b"] = bounds(Hardware(dep, 1, 512, 256))["output_tokens_per_s"][1]
    except Exception:
        pass
    return sheet
