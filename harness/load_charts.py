"""The report's charts of a load stage (serving, soak): latency percentiles against the
offered rate of a sweep, and TTFT/TPOT over the run from ``timeseries.jsonl``.

Shared by the stage kinds that run ``harness load`` (their ``report_charts`` hooks), so each
draws them the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import svg
from harness.json_io import read_jsonl


def latency_vs_rate(name: str, result: dict[str, Any]) -> list[str]:
    """TTFT and TPOT percentiles at each rate of a ``sweep_rates`` sweep; none without one."""
    sweep = [s for s in (result.get("data") or {}).get("sweep") or [] if s.get("rate")]
    if not sweep:
        return []
    sweep.sort(key=lambda s: s["rate"])
    series = [(label, [(s["rate"], s.get(key)) for s in sweep]) for label, key in
              (("TTFT p50", "ttft_p50_ms"), ("TTFT p90", "ttft_p90_ms"), ("TTFT p99", "ttft_p99_ms"),
               ("TPOT p50", "tpot_p50_ms"), ("TPOT p99", "tpot_p99_ms"))]
    return [svg.line_chart(f"{name}: latency percentiles vs request rate", "requests/s",
                           "ms", series, cls="latency-vs-rate")]


def over_time(run_dir: Path, name: str, result: dict[str, Any]) -> list[str]:
    """TTFT and TPOT p50/p99 per window of a load run that finished, marked when its load
    generator was invalid."""

    if result.get("status") not in ("pass", "fail", "invalid"):
        return []
    load_dir = (result.get("data") or {}).get("load_dir") or "load"
    ts = read_jsonl(run_dir / name / load_dir / "timeseries.jsonl", missing_ok=True)
    if not ts:
        return []
    t0 = ts[0]["t"] - ts[0].get("window_s", 0)
    series = []
    for label, key, pct in (("TTFT p50", "ttft_ms", "p50"), ("TTFT p99", "ttft_ms", "p99"),
                            ("TPOT p50", "tpot_ms", "p50"), ("TPOT p99", "tpot_ms", "p99")):
        series.append((label, [(w["t"] - t0, (w.get(key) or {}).get(pct)) for w in ts]))
    tainted = " - load generator INVALID" if result.get("invalid") else ""
    return [svg.line_chart(f"{name}: TTFT and TPOT over time ({len(ts)} windows){tainted}",
                           "seconds into the run", "ms", series, cls="over-time")]
