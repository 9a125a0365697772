"""A plan's expected figures (``expect:``) and the pass/fail of each against a measurement.

A target is written as a number or as ``"OP NUMBER"`` (``>=``, ``<=``, ``>``, ``<``), or a range
``"3000-5000"`` (inclusive). A bare number takes the metric's natural direction: throughputs
and rates must reach it (``>=``), latencies, memory, perplexity and error rates must not exceed
it (``<=``). A plan-wide ``tolerance`` (a fraction, default 0) loosens bare numbers only: the seed
writes "~4,500 tok/s", and ``tolerance: 0.1`` passes 4,050.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Sequence

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_EXPR = re.compile(r"^\s*(<=|>=|<|>)?\s*([-+]?[\d_,]*\.?\d+(?:[eE][-+]?\d+)?)\s*$")
_RANGE = re.compile(r"^\s*([\d_,]*\.?\d+)\s*(?:-|\.\.)\s*([\d_,]*\.?\d+)\s*$")
_HIGHER = ("tokens_per_s", "requests_per_s", "goodput", "tbs", "tflops", "gbs", "per_joule")


class TargetError(ValueError):
    pass


def default_op(metric: str) -> str:
    base = metric.rsplit(".", 1)[-1]
    return ">=" if any(h in base for h in _HIGHER) else "<="


def _num(text: str) -> float:
    return float(text.replace(",", "").replace("_", ""))


def parse_target(metric: str, expr: Any) -> tuple[str, float, float | None]:
    """-> (op, value, upper) where op is 'range' for ranges (value..upper)."""
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
        passed = bool(_OPS[op](measured, limit))
    shown = f"{value:g}-{upper:g}" if op == "range" else f"{op} {value:g}"
    return {"metric": metric, "op": op, "target": value, "upper": upper, "target_text": shown,
            "measured": measured, "passed": passed,
            "tolerance": tolerance if bare and tolerance else 0.0}


def check_all(expected: dict[str, Any], measured: dict[str, Any], tolerance: float = 0.0) -> list[dict[str, Any]]:
    return [check(k, v, measured.get(k), tolerance) for k, v in expected.items()]


def status_from(checks: list[dict[str, Any]], invalid: Sequence[str] = ()) -> str:
    """fail when a measured figure missed its target. A target whose figure this run did not
    measure (``passed: None``) fails nothing: the report shows it as "not measured".

    ``invalid``: why the figures cannot be trusted (a load generator that could not keep up
    measures itself, not the server); any reason makes the stage ``invalid`` whatever its
    targets say, since a missed target is then no verdict on what was measured."""
    if invalid:
        return "invalid"
    return "fail" if any(c["passed"] is False for c in checks) else "pass"
