"""Soak-run drift: does latency (or server memory/KV use) trend over time?

Pure functions over `timeseries.jsonl` lines (one dict per window, as the plugin
writes them: `t` = window end, epoch s; `window_s`; `ttft_ms`/`tpot_ms` blocks
with `p50`/`p99`/`count`; optionally scraped server metrics). No I/O, no Locust.

Method: for each series, ordinary least squares of the per-window value against
the window's mid time in hours; the slope is the drift per hour. A two-sided
t-test on the slope (H0: slope = 0, df = n - 2) gives a p-value; the drift is
*significant* when p < alpha (default 0.01) and there are at least
`min_windows` windows. The scalar keys a drift SLO reads
(`ttft_drift_ms_per_h`, `tpot_drift_ms_per_h`) carry the slope when it is
significant and 0.0 when it is not (no evidence of drift), so a short, noisy,
flat run does not fail a `tpot_drift_ms_per_h<=5` gate on an extrapolated
wobble; with too few windows they are None, and such a gate fails (drift could
not be measured). Caveat: windows are treated as independent samples; strongly
autocorrelated windows make the test somewhat optimistic, which is why alpha is
strict.
"""
from __future__ import annotations

import math
from typing import Any
from collections.abc import Iterable

import numpy as np

DEFAULT_ALPHA = 0.01
MIN_WINDOWS = 5
# The latency series drift is computed on: (name in the result, timeseries block, statistic).
LATENCY_SERIES = (("ttft_p99", "ttft_ms", "p99"), ("tpot_p99", "tpot_ms", "p99"),
                  ("ttft_p50", "ttft_ms", "p50"), ("tpot_p50", "tpot_ms", "p50"))
# Containers another part of the harness may put scraped server metrics in.
SERVER_CONTAINERS = ("server", "server_metrics", "vllm")
# Server gauges worth a trend line (substring match on the metric name).
SERVER_PATTERNS = ("kv_cache_usage", "gpu_cache_usage", "cpu_cache_usage", "cache_usage",
                   "memory", "mem_bytes", "num_requests_running", "num_requests_waiting",
                   "num_requests_swapped", "num_preemptions")


# -- Student's t distribution (numpy only: no scipy here) ---------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        de = d * c
        h *= de
        if abs(de - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isnan(t):
        return 1.0
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (p > 0.5), by bisection on the two-sided tail."""
    tail = 2.0 * (1.0 - p)
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


# -- regression ------------------------------------------------------------------------------
def slope_test(x: Iterable[float], y: Iterable[float], alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """OLS y = a + b x with a two-sided t-test on b and its (1 - alpha) confidence interval."""
    x = np.asarray(list(x), dtype=float)
    y = np.asarray(list(y), dtype=float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0:
        return {"n": n, "slope": None, "intercept": None, "se": None, "t": None,
                "p_value": None, "ci": None}
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    b = float(((x - xm) * (y - ym)).sum() / sxx)
    a = float(ym - b * xm)
    resid = y - (a + b * x)
    df = n - 2
    s2 = float((resid ** 2).sum()) / df
    se = math.sqrt(s2 / sxx)
    if se == 0.0:
        t = 0.0 if b == 0.0 else math.copysign(math.inf, b)
    else:
        t = b / se
    p = t_two_sided_p(t, df)
    half = t_quantile(1.0 - alpha / 2.0, df) * se
    return {"n": n, "slope": b, "intercept": a, "se": se, "t": t, "p_value": p,
            "ci": [b - half, b + half]}


# -- reading timeseries lines ------------------------------------------------------------------
def _mid_time(line: dict[str, Any]) -> float | None:
    t = line.get("t")
    if not isinstance(t, (int, float)):
        return None
    return float(t) - float(line.get("window_s") or 0.0) / 2.0


def select_windows(lines: Iterable[dict[str, Any]], start: float | None = None,
                   end: float | None = None) -> list[dict[str, Any]]:
    """Windows whose mid time lies in [start, end] (warm-up/cool-down excluded)."""
    out = []
    for line in lines:
        mid = _mid_time(line)
        if mid is None:
            continue
        if start is not None and mid < start:
            continue
        if end is not None and mid > end:
            continue
        out.append(line)
    out.sort(key=lambda ln: ln["t"])
    return out


def latency_points(windows: list[dict[str, Any]], block: str, stat: str,
                   min_count: int = 1) -> tuple[list[float], list[float]]:
    """(mid times, values) of one latency statistic over windows with enough samples."""
    xs, ys = [], []
    for line in windows:
        b = line.get(block) or {}
        v = b.get(stat)
        if v is None or (b.get("count") or 0) < min_count:
            continue
        xs.append(_mid_time(line))
        ys.append(float(v))
    return xs, ys  # type: ignore[return-value]  # selected windows all have a mid time


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)


def server_values(line: dict[str, Any]) -> dict[str, float]:
    """Scraped server gauges in one timeseries line, flattened: top-level `vllm:*` keys and
    anything numeric inside a `server` / `server_metrics` / `vllm` dict (per replica or not),
    kept when the name looks like memory, KV cache, queue or preemption state."""
    flat: dict[str, float] = {}
    for key, value in line.items():
        if key in SERVER_CONTAINERS:
            _flatten(key, value, flat)
        elif key.startswith("vllm:"):
            _flatten(key, value, flat)
    return {k: v for k, v in flat.items() if any(p in k for p in SERVER_PATTERNS)}


# -- the analysis ----------------------------------------------------------------------------
def _per_hour(xs: list[float], ys: list[float], alpha: float, min_windows: int) -> dict[str, Any]:
    if len(xs) < max(3, min_windows):
        return {"windows": len(xs), "per_h": None, "p_value": None, "significant": False,
                "ci_per_h": None, "first": ys[0] if ys else None, "last": ys[-1] if ys else None}
    t0 = xs[0]
    hours = [(x - t0) / 3600.0 for x in xs]
    r = slope_test(hours, ys, alpha)
    sig = r["p_value"] is not None and r["p_value"] < alpha
    fit_first = r["intercept"]
    fit_last = None if r["slope"] is None else r["intercept"] + r["slope"] * hours[-1]
    return {"windows": len(xs), "per_h": r["slope"], "p_value": r["p_value"], "significant": bool(sig),
            "ci_per_h": r["ci"], "fit_first": fit_first, "fit_last": fit_last,
            "first": ys[0], "last": ys[-1], "mean": float(np.mean(ys)), "max": float(np.max(ys))}


def analyze(lines: Iterable[dict[str, Any]], *, start: float | None = None, end: float | None = None,
            alpha: float = DEFAULT_ALPHA, min_windows: int = MIN_WINDOWS,
            min_count: int = 1) -> dict[str, Any]:
    """The `drift` block of summary.json (see the module docstring)."""
    windows = select_windows(lines, start, end)
    result: dict[str, Any] = {
        "method": "OLS slope of per-window values against time, two-sided t-test on the slope",
        "alpha": alpha, "windows": len(windows),
        # (selected windows all have a mid time)
        "span_s": (_mid_time(windows[-1]) - _mid_time(windows[0]))  # type: ignore[operator]
        if len(windows) > 1 else 0.0,
        "window_s": float(np.median([w.get("window_s") or 0.0 for w in windows])) if windows else None,
    }
    series: dict[str, Any] = {}
    for name, block, stat in LATENCY_SERIES:
        xs, ys = latency_points(windows, block, stat, min_count)
        series[name] = _per_hour(xs, ys, alpha, min_windows)
    result["series"] = series
    for name in ("ttft_p99", "tpot_p99", "ttft_p50", "tpot_p50"):
        result[f"{name}_ms_per_h"] = series[name]["per_h"]
    result["p_values"] = {n: series[n]["p_value"] for n in ("ttft_p99", "tpot_p99")}
    result["significant"] = {n: series[n]["significant"] for n in ("ttft_p99", "tpot_p99")}
    result["detected"] = any(series[n]["significant"] and (series[n]["per_h"] or 0) > 0
                             for n in ("ttft_p99", "tpot_p99"))

    # Server state (memory, KV cache, queues) when the timeseries carries it; not from the
    # window flushed at shutdown (users 0), whose scrape sees the server already idle.
    per_name: dict[str, tuple[list[float], list[float]]] = {}
    for line in windows:
        if line.get("users") == 0:
            continue
        mid = _mid_time(line)
        for k, v in server_values(line).items():
            xs, ys = per_name.setdefault(k, ([], []))
            xs.append(mid)  # type: ignore[arg-type]  # selected: it has a mid time
            ys.append(v)
    result["server"] = {k: _per_hour(xs, ys, alpha, min_windows) for k, (xs, ys) in sorted(per_name.items())}
    if len(windows) < min_windows:
        result["note"] = (f"only {len(windows)} windows (need {min_windows}); give a longer --duration "
                          f"or a smaller --window")
    return result


def drift_scalars(drift: dict[str, Any]) -> dict[str, float | None]:
    """The summary keys a drift SLO reads: the slope if significant, 0.0 if not, None if
    there were too few windows to tell."""
    out: dict[str, float | None] = {}
    for key, name in (("ttft_drift_ms_per_h", "ttft_p99"), ("tpot_drift_ms_per_h", "tpot_p99")):
        s = drift["series"][name]
        if s["per_h"] is None:
            out[key] = None
        else:
            out[key] = float(s["per_h"]) if s["significant"] else 0.0
    return out


def describe(drift: dict[str, Any]) -> str:
    """One line per series for the terminal."""
    lines = []
    for name, label in (("ttft_p99", "TTFT p99"), ("tpot_p99", "TPOT p99")):
        s = drift["series"][name]
        if s["per_h"] is None:
            lines.append(f"drift {label}: not measured ({s['windows']} windows)")
            continue
        verdict = "SIGNIFICANT" if s["significant"] else "not significant"
        lines.append(f"drift {label}: {s['per_h']:+,.1f} ms/h (p={s['p_value']:.2g}, {verdict}; "
                     f"{s['first']:.1f} -> {s['last']:.1f} ms over {s['windows']} windows)")
    for name, s in (drift.get("server") or {}).items():
        if s["per_h"] is not None:
            lines.append(f"server {name}: {s['per_h']:+.4g}/h (p={s['p_value']:.2g}"
                         f"{', significant' if s['significant'] else ''}; {s['first']:.4g} -> {s['last']:.4g})")
    return "\n".join(lines)
