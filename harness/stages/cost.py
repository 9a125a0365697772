"""Cost per million output tokens per layout, from a plan's prices.

A plan's ``cost:`` section::

    cost:
      currency: USD
      gpu_hour: 1.10                 # price per GPU-hour (cloud); or, for owned hardware:
      purchase: 70000                # price of all `gpu_count` GPUs (the seed's "~$60-80K")
      amortization_years: 3
      power_price_kwh: 0.15
      pue: 1.3                       # facility overhead on the GPUs' power (default 1.0)
      watts_per_gpu: 350             # default: measured NVML average, else the card's TDP
      layouts:
        - name: 12 x 8B BF16
          gpus: 12
          expected_output_tokens_per_s: 54000
          stage: cluster-8b          # its measured output_tokens_per_s wins when it ran
          metric: output_tokens_per_s
          capacity_stage: capacity-8b  # a capacity stage: its tokens/s at the SLO win over both

Cost per hour of a layout on ``g`` GPUs is ``g * gpu_hour``, or
``purchase * g / gpu_count / (years * 8760) + g * watts / 1000 * pue * power_price_kwh``.
Cost per million output tokens is that over ``tokens/s * 3600 / 1e6``. Every cell says where
its throughput and its power came from (measured, or the plan's expected figure / TDP).
"""
from __future__ import annotations

from typing import Any

FIELDS = {"currency": str, "gpu_hour": (int, float), "purchase": (int, float),
          "amortization_years": (int, float), "power_price_kwh": (int, float), "pue": (int, float),
          "watts_per_gpu": (int, float), "layouts": list}
LAYOUT_FIELDS = {"name": str, "gpus": int, "expected_output_tokens_per_s": (int, float),
                 "stage": str, "metric": str, "capacity_stage": str}
HOURS_PER_YEAR = 8760.0


def validate(cost: dict[str, Any]) -> None:
    """Raise ValueError('field: problem') for the first bad field."""
    for k, v in cost.items():
        if k not in FIELDS:
            raise ValueError(f"{k}: unknown cost field; known: {', '.join(FIELDS)}")
        if not isinstance(v, FIELDS[k]) or isinstance(v, bool):
            raise ValueError(f"{k}: expected {'a list' if k == 'layouts' else 'a number' if k != 'currency' else 'a string'}, got {v!r}")
        if isinstance(v, (int, float)) and v < 0:
            raise ValueError(f"{k}: must be >= 0, got {v!r}")
    if "gpu_hour" not in cost and "purchase" not in cost:
        raise ValueError("gpu_hour: give gpu_hour (per GPU-hour) or purchase + amortization_years")
    if "purchase" in cost and not cost.get("amortization_years"):
        raise ValueError("amortization_years: needed with purchase (years over which it is spread)")
    for i, layout in enumerate(cost.get("layouts") or []):
        if not isinstance(layout, dict):
            raise ValueError(f"layouts[{i}]: expected a mapping, got {layout!r}")
        for k, v in layout.items():
            if k not in LAYOUT_FIELDS:
                raise ValueError(f"layouts[{i}].{k}: unknown; known: {', '.join(LAYOUT_FIELDS)}")
            if not isinstance(v, LAYOUT_FIELDS[k]) or isinstance(v, bool):
                raise ValueError(f"layouts[{i}].{k}: wrong type ({v!r})")
        for k in ("name", "gpus"):
            if k not in layout:
                raise ValueError(f"layouts[{i}].{k}: is required")
        if layout["gpus"] < 1:
            raise ValueError(f"layouts[{i}].gpus: must be at least 1")


def _measured(results: dict[str, dict[str, Any]], stage: str | None, metric: str) -> tuple[float | None, dict | None]:
    if not stage or stage not in results:
        return None, None
    r = results[stage]
    if r.get("status") not in ("pass", "fail"):  # an invalid stage's figures are not the server's
        return None, None
    v = (r.get("measured") or {}).get(metric)
    return (float(v) if isinstance(v, (int, float)) else None), r.get("power")


def compute(plan: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cost layout; an empty list when the plan has no prices."""
    cost = plan.get("cost") or {}
    if not cost:
        return []
    from servers.simulator.gpus import GPUS

    gpu = GPUS.get(str(plan.get("gpu") or "").lower())
    gpu_count = plan.get("gpu_count") or 1
    rows = []
    for layout in cost.get("layouts") or []:
        g = int(layout["gpus"])
        metric = layout.get("metric") or "output_tokens_per_s"
        # tokens/s at the SLO (a capacity stage's, when it ran) over tokens/s at saturation
        tps, power = _measured(results, layout.get("capacity_stage"), "output_tokens_per_s")
        tps_source, used = "measured at the SLO", layout.get("capacity_stage")
        if tps and not power:   # a capacity stage samples no power: the throughput stage's, if it did
            power = _measured(results, layout.get("stage"), metric)[1]
        if not tps:
            tps, power = _measured(results, layout.get("stage"), metric)
            tps_source, used = ("measured" if tps else "expected"), layout.get("stage")
        if not tps:
            tps = layout.get("expected_output_tokens_per_s")
            tps_source = "expected" if tps else "none"
        if power and power.get("avg_w") and power.get("gpus"):
            watts_per_gpu, power_source = power["avg_w"] / power["gpus"], "measured"
        elif cost.get("watts_per_gpu"):
            watts_per_gpu, power_source = float(cost["watts_per_gpu"]), "plan"
        elif gpu is not None:
            watts_per_gpu, power_source = gpu.tdp_watts, "TDP"
        else:
            watts_per_gpu, power_source = None, "none"
        if cost.get("gpu_hour") is not None:
            per_hour = g * float(cost["gpu_hour"])
            basis = f"{g} GPU x {cost['gpu_hour']:g}/GPU-hour"
        else:
            capital = float(cost["purchase"]) * g / gpu_count / (float(cost["amortization_years"]) * HOURS_PER_YEAR)
            energy = 0.0
            if watts_per_gpu is not None and cost.get("power_price_kwh"):
                energy = g * watts_per_gpu / 1000.0 * float(cost.get("pue") or 1.0) * float(cost["power_price_kwh"])
            per_hour = capital + energy
            basis = (f"purchase {cost['purchase']:,.0f} x {g}/{gpu_count} over "
                     f"{cost['amortization_years']:g} y + power {energy:.3f}/h")
        per_m = per_hour / (tps * 3600 / 1e6) if tps else None
        rows.append({
            "layout": layout["name"], "gpus": g, "output_tokens_per_s": tps,
            "throughput_source": tps_source, "stage": used,
            "watts_per_gpu": round(watts_per_gpu, 1) if watts_per_gpu is not None else None,
            "power_source": power_source, "cost_per_hour": round(per_hour, 6), "basis": basis,
            "cost_per_million_tokens": per_m,
            "currency": cost.get("currency", "USD"),
            "tokens_per_joule": (tps / (g * watts_per_gpu)) if tps and watts_per_gpu else None,
        })
    return rows
