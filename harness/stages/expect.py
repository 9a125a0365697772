"""A plan's expected figures (``expect:``) and the pass/fail of each against a measurement.

A target is written as a number or as ``"OP NUMBER"`` (``>=``, ``<=``, ``>``, ``<``), or a range
``"3000-5000"`` (inclusive). A bare number takes the metric's natural direction: throughputs
and rates must reach it (``>=``), latencies, memory, perplexity and error rates must not exceed
it (``<=``). A plan-wide ``tolerance`` (a fraction, default 0) loosens bare numbers only: the seed
writes "~4,500 tok/s", and ``tolerance: 0.1`` passes 4,050.

A target may also be a mapping ``{target: 80, informational: true}``: an *informational* target
is judged and reported like any other (its verdict marked informational) but never fails its
stage or the plan. It keeps a reference figure visible (the seed's latency targets, on a laptop
whose simulated L40S cannot meet them) beside the targets that decide the run.
"""
from __future__ import annotations

import re
from typing import Any
from collections.abc import Sequence

from harness import metric_catalog as mc

_EXPR = re.compile(rf"^\s*({mc.OP_PATTERN})?\s*([-+]?[\d_,]*\.?\d+(?:[eE][-+]?\d+)?)\s*$")
_RANGE = re.compile(r"^\s*([\d_,]*\.?\d+)\s*(?:-|\.\.)\s*([\d_,]*\.?\d+)\s*$")
_HIGHER = ("tokens_per_s", "requests_per_s", "goodput", "tbs", "tflops", "gbs", "per_joule")


TARGET_KEYS = ("target", "informational")


class TargetError(ValueError):
    pass


def unwrap(metric: str, expr: Any) -> tuple[Any, bool]:
    """-> (the target as written, informational) of one ``expect:`` entry: a bare target, or the
    mapping ``{target: ..., informational: true|false}``."""
    if not isinstance(expr, dict):
        return expr, False
    for k in expr:
        if k not in TARGET_KEYS:
            raise TargetError(f"target for {metric}: unknown key {k!r}; known: {', '.join(TARGET_KEYS)}")
    if "target" not in expr:
        raise TargetError(f"target for {metric}: a mapping needs target: (e.g. {{target: 80, informational: true}})")
    info = expr.get("informational", False)
    if not isinstance(info, bool):
        raise TargetError(f"target for {metric}: informational must be true or false, got {info!r}")
    if isinstance(expr["target"], dict):
        raise TargetError(f"target for {metric}: target: must be a number or 'OP NUMBER', not a mapping")
    return expr["target"], info


def default_op(metric: str) -> str:
    """The op a bare number takes: the catalog's direction for a load-run metric, else (the
    hardware, power and perplexity stages' figures) higher is better for a rate."""
    base = metric.rsplit(".", 1)[-1]
    if base in mc.SUMMARY_METRICS:
        return mc.SUMMARY_METRICS[base]
    return ">=" if any(h in base for h in _HIGHER) else "<="


def _num(text: str) -> float:
    return float(text.replace(",", "").replace("_", ""))


def parse_target(metric: str, expr: Any) -> tuple[str, float, float | None]:
    """-> (op, value, upper) where op is 'range' for ranges (value..upper)."""
    expr, _ = unwrap(metric, expr)
    if isinstance(expr, bool) or expr is None:
        raise TargetError(f"target for {metric} must be a number or 'OP NUMBER', not {expr!r}")
    if isinstance(expr, (int, float)):
        return default_op(metric), float(expr), None
    text = str(expr)
    m = _RANGE.match(text)
    if m:
        lo, hi = _num(m.group(1)), _num(m.group(2))
        if hi < lo:
            raise TargetError(f"target range {text!r} for {metric}: the upper end is below the lower")
        return "range", lo, hi
    m = _EXPR.match(text)
    if not m:
        raise TargetError(f"target {text!r} for {metric}: write a number, '>= N', '<= N' or 'LO-HI'")
    return m.group(1) or default_op(metric), _num(m.group(2)), None


def check(metric: str, expr: Any, measured: float | None, tolerance: float = 0.0) -> dict[str, Any]:
    expr, informational = unwrap(metric, expr)
    op, value, upper = parse_target(metric, expr)
    bare = isinstance(expr, (int, float))
    if measured is None:
        passed = None
    elif op == "range":
        passed = value <= measured <= (upper or value)
    else:
        limit = value
        if bare and tolerance:
            limit = value * (1 - tolerance) if op in (">=", ">") else value * (1 + tolerance)
        passed = bool(mc.OPS[op](measured, limit))
    shown = f"{value:g}-{upper:g}" if op == "range" else f"{op} {value:g}"
    return {"metric": metric, "op": op, "target": value, "upper": upper, "target_text": shown,
            "measured": measured, "passed": passed,
            "tolerance": tolerance if bare and tolerance else 0.0, "informational": informational}


def check_all(expected: dict[str, Any], measured: dict[str, Any], tolerance: float = 0.0) -> list[dict[str, Any]]:
    return [check(k, v, measured.get(k), tolerance) for k, v in expected.items()]


def status_from(checks: list[dict[str, Any]], invalid: Sequence[str] = ()) -> str:
    """fail when a measured figure missed its target. A target whose figure this run did not
    measure (``passed: None``) fails nothing: the report shows it as "not measured"; nor does
    an informational target, whatever its verdict.

    ``invalid``: why the figures cannot be trusted (a load generator that could not keep up
    measures itself, not the server); any reason makes the stage ``invalid`` whatever its
    targets say, since a missed target is then no verdict on what was measured."""
    if invalid:
        return "invalid"
    return "fail" if any(c["passed"] is False and not c.get("informational") for c in checks) else "pass"


def verdict(check: dict[str, Any]) -> str:
    """One check's verdict as the report and the run's log show it: ``pass``, ``FAIL``, ``not
    measured`` (with why, where the stage knows: ``not measured: p2p needs at least 2 GPUs``);
    an informational target's marked so (``missed (informational)``), since its miss is no
    failure of the run."""
    passed = check.get("passed")
    if passed is None:
        return f"not measured: {check['why']}" if check.get("why") else "not measured"
    if check.get("informational"):
        return "met (informational)" if passed else "missed (informational)"
    return "pass" if passed else "FAIL"
