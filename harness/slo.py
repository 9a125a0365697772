"""Service-level objectives: `--slo 'ttft_p99_ms<=200'` checks against the summary,
and the per-request view of the same thresholds that defines goodput."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from harness import metric_catalog as mc
from harness.errors import UsageError

_SLO = re.compile(rf"^\s*([a-z0-9_]+)\s*({mc.OP_PATTERN})\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Slo:
    text: str
    metric: str
    op: str
    threshold: float

    @property
    def per_request_field(self) -> str | None:
        """The requests.jsonl field a single request is judged on, for goodput."""
        lat = mc.split_latency(self.metric)
        if lat is not None and self.op in ("<=", "<") and lat[0].goodput:
            return lat[0].field
        return None

    def value(self, summary: dict[str, Any]) -> float | None:
        return mc.summary_value(summary, self.metric)

    def check(self, summary: dict[str, Any]) -> dict[str, Any]:
        """One entry of summary.json's `slo.checks`. A metric the run did not measure (no
        samples, or drift without enough windows) fails the check: a gate that cannot be
        verified does not pass."""
        v = self.value(summary)
        passed = v is not None and mc.OPS[self.op](v, self.threshold)
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
        ok: bool = mc.OPS[self.op](v, self.threshold)
        return ok


def parse_slo(text: str) -> Slo:
    m = _SLO.match(text)
    if not m:
        raise UsageError(f"bad --slo {text!r}: write METRIC<=VALUE, e.g. 'ttft_p99_ms<=200' "
                         f"or 'error_rate<=0.01'")
    metric, op, value = m.groups()
    if metric not in mc.SUMMARY_METRICS:
        raise UsageError(f"bad --slo {text!r}: unknown metric {metric!r}; use "
                         f"<{'|'.join(m.name for m in mc.LATENCIES)}>_"
                         f"<{'|'.join(mc.STATS)}>_ms or one of "
                         f"{', '.join(mc.SCALAR)}")
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
