"""SLO parsing, checks against a summary, goodput from per-request SLOs, and the run exit
code's precedence (pure functions; the real-run exit codes are in test_slo_gates.py)."""
from __future__ import annotations

import pytest

from harness.errors import UsageError
from harness.results import summary_from_requests
from harness.slo import (
    EXIT_GENERATOR_INVALID,
    EXIT_OK,
    EXIT_REQUEST_ERRORS,
    EXIT_SLO_BREACH,
    evaluate,
    parse_slo,
    request_is_good,
    run_exit_code,
)


def rec(i, ok=True, ttft=50.0, tpot=10.0, e2e=200.0, out=16, kind=None):
    return {"id": str(i), "ok": ok, "status": 200 if ok else 500, "error_kind": kind,
            "sent_at": 1000.0 + i, "finished_at": 1000.5 + i, "input_tokens": 32,
            "output_tokens": out if ok else None, "tokens_estimated": False,
            "ttft_ms": ttft if ok else None, "tpot_ms": tpot if ok else None,
            "e2e_ms": e2e if ok else None, "itl_ms": [tpot] * (out - 1) if ok else [],
            "icl_ms": [tpot] * (out - 1) if ok else [], "scheduled_at": None,
            "ttft_from_schedule_ms": None, "schedule_lag_ms": None}


@pytest.mark.parametrize("text,metric,op,thr", [
    ("ttft_p99_ms<=200", "ttft_p99_ms", "<=", 200.0),
    (" tpot_p50_ms < 30 ", "tpot_p50_ms", "<", 30.0),
    ("itl_p99_9_ms<=5e1", "itl_p99_9_ms", "<=", 50.0),
    ("e2e_max_ms<=10000", "e2e_max_ms", "<=", 10000.0),
    ("output_tokens_per_s>=1000", "output_tokens_per_s", ">=", 1000.0),
    ("goodput_ratio>=0.95", "goodput_ratio", ">=", 0.95),
    ("error_rate<=0.01", "error_rate", "<=", 0.01),
    ("requests_failed<=0", "requests_failed", "<=", 0.0),
    ("tpot_drift_ms_per_h<=5", "tpot_drift_ms_per_h", "<=", 5.0),
    ("schedule_lag_p99_ms<=10", "schedule_lag_p99_ms", "<=", 10.0),
])
def test_parse_slo_accepts_summary_metrics(text, metric, op, thr):
    s = parse_slo(text)
    assert (s.metric, s.op, s.threshold) == (metric, op, thr)


@pytest.mark.parametrize("text,needle", [
    ("ttft_p99<=200", "unknown metric 'ttft_p99'"),
    ("ttft_p99_ms=200", "write METRIC<=VALUE"),
    ("ttft_p99_ms<=fast", "write METRIC<=VALUE"),
    ("ttft_p99_ms<=1.2.3", "is not a number"),
    ("latency<=3", "unknown metric"),
])
def test_parse_slo_rejects_with_one_clear_line(text, needle):
    with pytest.raises(UsageError) as e:
        parse_slo(text)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_checks_read_percentiles_scalars_and_nested_counts():
    records = [rec(i, ttft=10.0 * (i + 1)) for i in range(10)] + [rec(10, ok=False, kind="http_500")]
    slos = [parse_slo(t) for t in ("ttft_p50_ms<=51", "ttft_max_ms<=51", "error_rate<=0.1",
                                   "requests_failed<=0", "output_tokens_per_s>=1")]
    summary = summary_from_requests(records, slos)
    checks = {c["slo"]: c for c in summary["slo"]["checks"]}
    assert checks["ttft_p50_ms<=51"]["passed"] and checks["ttft_p50_ms<=51"]["value"] == pytest.approx(50, rel=1e-2)
    assert not checks["ttft_max_ms<=51"]["passed"]
    assert checks["error_rate<=0.1"]["value"] == pytest.approx(1 / 11) and checks["error_rate<=0.1"]["passed"]
    assert checks["requests_failed<=0"]["value"] == 1 and not checks["requests_failed<=0"]["passed"]
    assert checks["output_tokens_per_s>=1"]["passed"]
    assert summary["slo"]["passed"] is False


def test_unmeasured_metric_fails_its_check():
    summary = summary_from_requests([rec(0)], [])
    check = parse_slo("tpot_drift_ms_per_h<=5").check(summary)
    assert check["value"] is None and check["passed"] is False and check["note"] == "not measured"


def test_goodput_counts_requests_meeting_every_per_request_slo():
    slos = [parse_slo("ttft_p99_ms<=100"), parse_slo("tpot_p99_ms<=20"), parse_slo("output_tokens_per_s>=1")]
    records = [rec(0, ttft=50, tpot=10),          # good
               rec(1, ttft=150, tpot=10),         # TTFT too slow
               rec(2, ttft=50, tpot=30),          # TPOT too slow
               rec(3, ttft=50, tpot=None, out=1),  # one token: TPOT undefined, nothing violated
               rec(4, ok=False, kind="http_500")]  # failed: never good
    assert [request_is_good(slos, r) for r in records] == [True, False, False, True, False]
    summary = summary_from_requests(records, slos + [parse_slo("goodput_ratio>=0.5")])
    assert summary["goodput_ratio"] == pytest.approx(2 / 5)
    assert summary["goodput_rps"] == pytest.approx(2 / summary["duration_s"])
    goodput_check = [c for c in summary["slo"]["checks"] if c["metric"] == "goodput_ratio"][0]
    assert goodput_check["passed"] is False


def test_evaluate_lists_every_check():
    summary = summary_from_requests([rec(0)], [])
    block = evaluate([parse_slo("ttft_p99_ms<=100"), parse_slo("e2e_p99_ms<=1")], summary)
    assert [c["passed"] for c in block["checks"]] == [True, False] and block["passed"] is False


def _summary(completed=10, failed=0, slo_passed=True, metrics=(), valid=True):
    return {"requests": {"completed": completed, "failed": failed},
            "slo": {"passed": slo_passed, "checks": [{"metric": m, "passed": True} for m in metrics]},
            "generator": {"valid": valid}}


@pytest.mark.parametrize("summary,code", [
    (_summary(), EXIT_OK),
    (_summary(slo_passed=False), EXIT_SLO_BREACH),
    (_summary(valid=False), EXIT_GENERATOR_INVALID),
    (_summary(failed=2), EXIT_REQUEST_ERRORS),
    (_summary(failed=2, metrics=["error_rate"]), EXIT_OK),          # the error_rate SLO judges them
    (_summary(failed=2, valid=False), EXIT_GENERATOR_INVALID),      # 3 over 4
    (_summary(failed=2, valid=False, slo_passed=False), EXIT_SLO_BREACH),  # 1 over all
    (_summary(completed=0), EXIT_REQUEST_ERRORS),                   # nothing measured at all
])
def test_run_exit_code_precedence(summary, code):
    assert run_exit_code(summary) == code
