"""One metric vocabulary (harness/metric_catalog.py, issue #15 point 6): a plan's ``expect:`` and
``--slo`` accept the same names with the same operators, and ICL, which ``--slo`` gated while
``expect:`` refused it, is now accepted, measured and judged by a serving stage.

The serving stage runs on a recorded ``summary.json`` (``run_loads`` replaced, a plain URL
target), so no server or Locust starts.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import metric_catalog as mc
from harness import plan as plan_mod
from harness import runner
from harness.errors import UsageError
from harness.slo import parse_slo
from harness.stages import expect, serving


def _block(p99: float) -> dict:
    return {"mean": p99 / 2, "p50": p99 / 2, "p90": p99, "p95": p99, "p99": p99, "p99_9": p99,
            "min": 0.1, "max": p99, "count": 40}


def _summary() -> dict:
    return {"schema": 1, "requests": {"completed": 40, "failed": 0, "errors_by_kind": {}},
            "ttft_ms": _block(50.0), "tpot_ms": _block(8.0), "itl_ms": _block(9.0),
            "icl_ms": _block(12.0), "e2e_ms": _block(900.0), "schedule_lag_ms": _block(0.5),
            "output_tokens_per_s": 120.0, "total_tokens_per_s": 400.0, "requests_per_s": 4.0,
            "goodput_rps": 4.0, "goodput_ratio": 1.0, "error_rate": 0.0,
            "slo": {"passed": True, "checks": []}, "generator": {"valid": True, "reasons": []}}


@pytest.fixture
def recorded_load(monkeypatch):
    """``run_loads`` replaced: the recorded summary written where the stage reads it; the argv
    of each load kept."""
    argvs: list[list[str]] = []

    def fake_run_loads(jobs, timeout_s, log, total=None):
        out = {}
        for label, argv, path in jobs:
            argvs.append(argv)
            path.mkdir(parents=True, exist_ok=True)
            (path / "summary.json").write_text(json.dumps(_summary()))
            out[label] = dict(_summary(), _exit_code=0)
        return out

    monkeypatch.setattr(serving, "run_loads", fake_run_loads)
    return argvs


def _serving_plan(expected: dict) -> dict:
    return plan_mod.validate({"name": "cat", "stages": [
        {"name": "s", "stage": "serving", "target": {"url": "http://127.0.0.1:9", "model": "m"},
         "rate": 4, "num_requests": 40, "expect": expected}]}, "cat.yaml")


def test_an_icl_target_in_a_plan_is_accepted_and_judged(recorded_load, tmp_path: Path):
    plan = _serving_plan({"icl_p99_ms": "<= 20", "icl_p50_ms": 5})
    doc = runner.run_one(plan["stages"][0], tmp_path / "run", plan, {}, lambda m: None)
    checks = {c["metric"]: c for c in doc["checks"]}
    assert checks["icl_p99_ms"]["measured"] == 12.0 and checks["icl_p99_ms"]["passed"] is True
    assert checks["icl_p50_ms"]["measured"] == 6.0 and checks["icl_p50_ms"]["passed"] is False
    assert doc["status"] == "fail"
    # the latency targets also go to the load run as SLOs, ICL among them
    argv = recorded_load[0]
    slos = [argv[i + 1] for i, a in enumerate(argv) if a == "--slo"]
    assert "icl_p99_ms<=20" in ",".join(slos)


def test_slo_and_expect_accept_the_same_names():
    for metric, op in mc.SUMMARY_METRICS.items():
        parse_slo(f"{metric}{op}1")          # raises on a name --slo does not know
        assert metric in serving.METRICS     # a serving stage's expect: takes it
        assert expect.default_op(metric) == op
        _serving_plan({metric: 1})           # and plan validation lets it through
    # nothing --slo refuses is a load figure a serving plan accepts (tokens_per_joule is the
    # power sampler's, not the load run's)
    for metric in set(serving.METRICS) - {"tokens_per_joule"}:
        parse_slo(f"{metric}<=1")
    with pytest.raises(UsageError):
        parse_slo("tokens_per_joule>=1")


@pytest.mark.parametrize("op", list(mc.OPS))
def test_slo_and_expect_accept_the_same_operators(op: str):
    s = parse_slo(f"icl_p99_ms{op}20")
    got_op, value, _ = expect.parse_target("icl_p99_ms", f"{op} 20")
    assert (s.op, s.threshold) == (got_op, value) == (op, 20.0)
    for measured in (10.0, 20.0, 30.0):
        summary = {"icl_ms": {"p99": measured}}
        assert s.check(summary)["passed"] == expect.check("icl_p99_ms", f"{op} 20", measured)["passed"]


@pytest.mark.parametrize("text", ["icl_p99_ms=<20", "icl_p99_ms==20", "icl_p99_ms!=20"])
def test_an_operator_outside_the_table_is_refused_by_both(text: str):
    metric, rest = text[:10], text[10:]
    with pytest.raises(UsageError):
        parse_slo(text)
    with pytest.raises(expect.TargetError):
        expect.parse_target(metric, rest)
