"""GPU power during a stage, sampled through NVML with the hardware stage's sampler.

    with power_sampling() as p:
        ...                     # the GPU work (a vLLM benchmark, a load run)
    p.summary()                 # None without NVML/GPUs; else {"avg_w", "peak_w", "per_gpu", ...}

Only the GPUs a stage uses are sampled where it knows them (an endpoint's GPUs, the first TP
GPUs an offline benchmark sees). ``avg_w`` is the sum over those GPUs of each GPU's average draw (board power, GPUs only), the figure a
cost per token and tokens per joule need.
"""
from __future__ import annotations

from typing import Any


class _Sampling:
    def __init__(self, interval_s: float = 0.5, gpus: list[int] | None = None) -> None:
        self.interval_s = interval_s
        self.gpus = gpus
        self.sampler = None
        self.nvml = None
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> _Sampling:
        import time

        self._t0 = time.perf_counter()
        try:
            from harness.hardware.nvml import PowerSampler, import_nvml

            nvml = import_nvml()
            if nvml is None:
                return self
            count = nvml.nvmlDeviceGetCount()
            wanted = [g for g in (self.gpus if self.gpus is not None else range(count)) if 0 <= g < count]
            handles = {i: nvml.nvmlDeviceGetHandleByIndex(i) for i in wanted}
            if not handles:
                return self
            self.nvml = nvml
            self.sampler = PowerSampler(nvml, handles, interval_s=self.interval_s)
            self.sampler.__enter__()
        except Exception:  # no NVML, no driver: no power figures, never a failed stage
            self.sampler = None
        return self

    def __exit__(self, *exc: Any) -> None:
        import time

        self.seconds = time.perf_counter() - self._t0
        if self.sampler is not None:
            try:
                self.sampler.__exit__(*exc)
            except Exception:
                pass

    def summary(self) -> dict[str, Any] | None:
        if self.sampler is None:
            return None
        per_gpu = {}
        for g in self.sampler.handles:
            st = self.sampler.stats(g)
            if st is not None:
                per_gpu[str(g)] = {"avg_w": st.avg_w, "peak_w": st.peak_w, "samples": st.samples}
        if not per_gpu:
            return None
        avg = sum(v["avg_w"] for v in per_gpu.values())
        peak = sum(v["peak_w"] for v in per_gpu.values())
        return {"avg_w": round(avg, 1), "peak_w": round(peak, 1), "gpus": len(per_gpu),
                "seconds": round(self.seconds, 2), "energy_j": round(avg * self.seconds, 1),
                "per_gpu": per_gpu}


def power_sampling(interval_s: float = 0.5, gpus: list[int] | None = None) -> _Sampling:
    """Sample ``gpus`` (NVML indices; default every GPU): the ones the stage's servers use, so
    idle cards do not inflate the watts a cost per token is charged."""
    return _Sampling(interval_s, gpus)


def visible_gpus(env: dict[str, str] | None = None, count: int | None = None) -> list[int] | None:
    """The GPU indices CUDA_VISIBLE_DEVICES names (in ``env``, else this process's), first
    ``count`` of them; None when it is unset or names UUIDs (then: every GPU)."""
    import os

    cvd = (env or os.environ).get("CUDA_VISIBLE_DEVICES")
    if cvd is None or not cvd.strip():
        return list(range(count)) if count else None
    try:
        ids = [int(x) for x in cvd.split(",") if x.strip()]
    except ValueError:
        return None
    return ids[:count] if count else ids


def tokens_per_joule(power: dict[str, Any] | None, tokens_per_s: float | None) -> float | None:
    if not power or not tokens_per_s or not power.get("avg_w"):
        return None
    return tokens_per_s / power["avg_w"]
