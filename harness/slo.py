"""Service-level objectives: `--slo 'ttft_p99_ms<=200'` checks against the summary,
and the per-request view of the same thresholds that defines goodput."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from harness.errors import UsageError

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_SLO = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")
# ttft_p99_ms -> ("ttft_ms", "p99"); e2e_mean_ms -> ("e2e_ms", "mean")
_PCT = re.compile(r"^(ttft|tpot|itl|icl|e2e|schedule_lag|ttft_from_schedule)_(p50|p90|p95|p99|p99_9|mean|min|max)_ms$")
_SCALARS = ("error_rate", "output_tokens_per_s", "total_tokens_per_s", "requests_per_s",
            "goodput_rps", "goodput_ratio", "ttft_drift_ms_per_h", "tpot_drift_ms_per_h",
            "requests_completed", "requests_failed")
# Scalars that live in a nested block of the summary.
_NESTED = {"requests_completed": ("requests", "completed"), "requests_failed": ("requests", "failed")}


@dataclass(frozen=True)
class Slo:
    text: str
    metric: str
    op: str
    threshold: float

    @property
    def per_request_field(self) -> str | None:
        """The requests.jsonl field a single request is judged on, for goodput."""
        m = _PCT.match(self.metric)
        if m and self.op in ("<=", "<") and m.group(1) in ("ttft", "tpot", "e2e", "ttft_from_schedule"):
            return m.group(1) + "_ms"
        return None

    def value(self, summary: dict[str, Any]) -> float | None:
        m = _PCT.match(self.metric)
        if m:
            block = summary.get(m.group(1) + "_ms") or {}
            return block.get(m.group(2))
        if self.metric in _NESTED:
            block, key = _NESTED[self.metric]
            return (summary.get(block) or {}).get(key)
        return summary.get(self.metric)

    def check(self, summary: dict[str, Any]) -> dict[str, Any]:
        """One entry of summary.json's `slo.checks`. A metric the run did not measure (no
        samples, or drift without enough windows) fails the check: a gate that cannot be
        verified does not pass."""
        v = self.value(summary)
        passed = v is not None and _OPS[self.op](v, self.threshold)
        out = {"slo": self.text, "metric": self.metric, "op": self.op,
               "threshold": self.threshold, "value": v, "passed": bool(passed)}
        if v is None:
            out["note"] = "not measured"
        return out

    def request_ok(self, record: dict[str, Any]) -> bool:
        field = self.per_request_field
        if field is None:
            return True
        v = record.get(field)
        if v is None:
            # TPOT is undefined for one-token outputs: nothing to violate.
            return field == "tpot_ms"
        ok: bool = _OPS[self.op](v, self.threshold)
        return ok


def parse_slo(text: str) -> Slo:
    m = _SLO.match(text)
    if not m:
        raise UsageError(f"bad --slo {text!r}: write METRIC<=VALUE, e.g. 'ttft_p99_ms<=200' "
                         f"or 'error_rate<=0.01'")
    metric, op, value = m.groups()
    if not (_PCT.match(metric) or metric in _SCALARS):
        raise UsageError(f"bad --slo {text!r}: unknown metric {metric!r}; use "
                         f"<ttft|tpot|itl|icl|e2e|schedule_lag|ttft_from_schedule>_"
                         f"<p50|p90|p95|p99|p99_9|mean|min|max>_ms or one of "
                         f"{', '.join(_SCALARS)}")
    try:
        threshold = float(value)
    except ValueError:
        raise UsageError(f"bad --slo {text!r}: {value!r} is not a number") from None
    return Slo(text.strip(), metric, op, threshold)


# Exit codes of a load run (README, "SLOs, soak and CI gates"); the Locust plugin and the
# post-run soak step both decide with run_exit_code; 2 (bad input) comes from harness/cli.py.
EXIT_OK = 0
EXIT_SLO_BREACH = 1
EXIT_BAD_INPUT = 2   # one line says what to fix; nothing (more) runs
EXIT_GENERATOR_INVALID = 3
EXIT_REQUEST_ERRORS = 4


def evaluate(slos: list[Slo], summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's `slo` block: every check, and whether all passed."""
    checks = [s.check(summary) for s in slos]
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def run_exit_code(summary: dict[str, Any]) -> int:
    """A finished run's exit code from its summary alone, by precedence: SLO breach (1) over
    generator invalid (3) over request errors (4: failures with no error_rate SLO to judge
    them, or no request at all)."""
    req = summary.get("requests") or {}
    completed, failed = req.get("completed") or 0, req.get("failed") or 0
    slo = summary.get("slo") or {}
    checks = slo.get("checks") or []
    if not slo.get("passed", True):
        return EXIT_SLO_BREACH
    if not (summary.get("generator") or {}).get("valid", True):
        return EXIT_GENERATOR_INVALID
    if failed and not any(c.get("metric") == "error_rate" for c in checks):
        return EXIT_REQUEST_ERRORS
    if completed == 0 and failed == 0:
        return EXIT_REQUEST_ERRORS
    return EXIT_OK


def request_is_good(slos: list[Slo], record: dict[str, Any]) -> bool:
    """Goodput's test: a request counts only if it succeeded and met every per-request SLO."""
    return bool(record.get("ok")) and all(s.request_ok(record) for s in slos)
