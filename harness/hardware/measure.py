"""The timed measurements (need torch and a CUDA GPU): device copy, BF16 GEMM, P2P matrix.

All timing is with CUDA events after warm-up: several repeats of a fixed number of iterations,
the median repeat reported (min and max kept).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Sequence

from harness.hardware.model import GemmResult, HbmResult, P2PResult
from harness.hardware.nvml import PowerSampler


def import_torch() -> tuple[Any, str | None]:
    """(torch, None) when a CUDA GPU is usable, else (None or torch, reason)."""
    try:
        import torch  # noqa: PLC0415 - lazy on purpose
    except ImportError:
        return None, "no CUDA GPU (torch is not installed)"
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return torch, "no CUDA GPU (torch.cuda.is_available() is False)"
    except Exception as exc:  # a broken driver raises here
        return torch, f"no CUDA GPU ({exc.__class__.__name__}: {exc})"
    return torch, None


@dataclass
class Timing:
    """Seconds per iteration for each timed repeat, and the reduction reported."""

    per_iter_s: list[float]
    warmup: int
    iters: int
    repeats: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_iter_s)


def time_cuda(torch: Any, fn: Callable[[], Any], device: int, warmup: int, iters: int,
              repeats: int, sampler: PowerSampler | None = None) -> Timing:
    """Seconds per ``fn()`` call, timed with CUDA events on ``device``'s current stream."""
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        per_iter: list[float] = []
        ctx = sampler if sampler is not None else _Null()
        with ctx:
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                for _ in range(iters):
                    fn()
                end.record(stream)
                end.synchronize()
                per_iter.append(start.elapsed_time(end) / 1e3 / iters)
    return Timing(per_iter, warmup, iters, repeats)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


@dataclass
class Sizes:
    hbm_cap_bytes: int
    hbm_fraction: float
    gemm_dim: int
    p2p_cap_bytes: int
    warmup: int
    iters_hbm: int
    iters_gemm: int
    iters_p2p: int
    repeats: int

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(1 << 30, 1 / 8, 8192, 256 << 20, 3, 5, 10, 3, 3)
        return cls(8 << 30, 1 / 8, 8192, 1 << 30, 10, 10, 20, 5, 7)


def buffer_bytes(free_bytes: int, fraction: float, cap: int, floor: int = 64 << 20) -> int:
    """A buffer of ``fraction`` of free memory, capped, at least ``floor``, a multiple of 1 MiB."""
    b = min(int(free_bytes * fraction), cap)
    b = max(b, floor)
    return b // (1 << 20) * (1 << 20)


def measure_hbm(torch: Any, gpu: int, sizes: Sizes, sampler: PowerSampler | None) -> HbmResult:
    free, _total = torch.cuda.mem_get_info(gpu)
    nbytes = buffer_bytes(free, sizes.hbm_fraction, sizes.hbm_cap_bytes)
    x = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{gpu}")
    x.random_(0, 255)
    y = torch.empty_like(x)
    t = time_cuda(torch, lambda: y.copy_(x), gpu, sizes.warmup, sizes.iters_hbm, sizes.repeats,
                  sampler)
    rates = [2 * nbytes / s / 1e12 for s in t.per_iter_s]  # read + write
    del x, y
    torch.cuda.empty_cache()
    return HbmResult(gpu=gpu, buffer_bytes=nbytes, tbs=round(2 * nbytes / t.median_s / 1e12, 4),
                     tbs_min=round(min(rates), 4), tbs_max=round(max(rates), 4),
                     warmup=t.warmup, iters=t.iters, repeats=t.repeats,
                     power=sampler.stats(gpu) if sampler else None)


def measure_gemm(torch: Any, gpu: int, sizes: Sizes, sampler: PowerSampler | None) -> GemmResult:
    free, _ = torch.cuda.mem_get_info(gpu)
    dim = sizes.gemm_dim
    while dim > 1024 and 3 * dim * dim * 2 > free // 2:
        dim //= 2
    dev = f"cuda:{gpu}"
    a = torch.randn(dim, dim, device=dev, dtype=torch.bfloat16)
    b = torch.randn(dim, dim, device=dev, dtype=torch.bfloat16)
    c = torch.empty(dim, dim, device=dev, dtype=torch.bfloat16)
    t = time_cuda(torch, lambda: torch.mm(a, b, out=c), gpu, sizes.warmup, sizes.iters_gemm,
                  sizes.repeats, sampler)
    flop = 2 * dim ** 3
    rates = [flop / s / 1e12 for s in t.per_iter_s]
    del a, b, c
    torch.cuda.empty_cache()
    return GemmResult(gpu=gpu, m=dim, n=dim, k=dim, dtype="bfloat16",
                      tflops=round(flop / t.median_s / 1e12, 1), tflops_min=round(min(rates), 1),
                      tflops_max=round(max(rates), 1), warmup=t.warmup, iters=t.iters,
                      repeats=t.repeats, power=sampler.stats(gpu) if sampler else None)


def measure_p2p(torch: Any, gpus: Sequence[int], sizes: Sizes, links: Callable[[int, int], str | None],
                sampler: PowerSampler | None, log: Callable[[str], None]) -> P2PResult:
    frees = [torch.cuda.mem_get_info(g)[0] for g in gpus]
    nbytes = buffer_bytes(min(frees), 1 / 8, sizes.p2p_cap_bytes)
    src = {g: torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{g}") for g in gpus}
    dst = {g: torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{g}") for g in gpus}
    for t in src.values():
        t.random_(0, 255)
    n = len(gpus)
    gbs: list[list[float | None]] = [[None] * n for _ in range(n)]
    gbs_min: list[list[float | None]] = [[None] * n for _ in range(n)]
    peer: list[list[bool | None]] = [[None] * n for _ in range(n)]
    lab: list[list[str | None]] = [[None] * n for _ in range(n)]
    ctx = sampler if sampler is not None else _Null()
    with ctx:
        for a, i in enumerate(gpus):
            for b, j in enumerate(gpus):
                lab[a][b] = links(i, j)
                if i == j:
                    continue
                peer[a][b] = bool(torch.cuda.can_device_access_peer(i, j))
                s_buf, d_buf = src[i], dst[j]
                t = time_cuda(torch, lambda: d_buf.copy_(s_buf), i, sizes.warmup // 2 + 1,
                              sizes.iters_p2p, sizes.repeats)
                torch.cuda.synchronize(j)
                gbs[a][b] = round(nbytes / t.median_s / 1e9, 2)
                gbs_min[a][b] = round(nbytes / max(t.per_iter_s) / 1e9, 2)
                log(f"  p2p GPU{i}->GPU{j} ({lab[a][b] or '?'}, peer access "
                    f"{'yes' if peer[a][b] else 'no'}): {gbs[a][b]:.1f} GB/s")
    del src, dst
    torch.cuda.empty_cache()
    power = {}
    if sampler is not None:
        for g in gpus:
            st = sampler.stats(g)
            if st is not None:
                power[str(g)] = st
    return P2PResult(gpus=list(gpus), buffer_bytes=nbytes, gbs=gbs, gbs_min=gbs_min,
                     can_access_peer=peer, links=lab, warmup=sizes.warmup // 2 + 1,
                     iters=sizes.iters_p2p, repeats=sizes.repeats, power=power)

