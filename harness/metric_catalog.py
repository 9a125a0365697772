"""The metric vocabulary of a load run, declared once: every latency and scalar a
``summary.json`` carries, with its unit, the statistics it has, which way is better and what
it means. ``--slo`` (harness/slo.py), a plan's ``expect:`` (harness/stages/expect.py and the
serving stage), the histograms, the results table, the comparison, the exporter and the web
UI all read their names from here, so a metric one of them knows is a metric all of them know
(ICL was gateable with ``--slo`` but refused by ``expect:`` while each kept its own list).

Which *subset* a consumer shows (the web UI's three percentiles, the capacity search's
bootstrap-able latencies) stays with that consumer; the names come from here.

``OPS`` is the one comparison table ``--slo 'METRIC<=N'`` and ``expect: {METRIC: '<= N'}`` share.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from collections.abc import Callable

#: The comparisons a threshold may use, for --slo and expect: alike. Longest first, so a
#: regex alternation built from it matches ``<=`` before ``<``.
OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
OP_PATTERN = "|".join(OPS)

LOWER, HIGHER = "lower", "higher"   # which way is better

#: A latency block's percentiles (summary key -> percentile), what the HDR histograms report.
PERCENTILES: dict[str, float] = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99_9": 99.9}
#: Every statistic of a latency block in summary.json (besides ``count``).
STATS: tuple[str, ...] = (*PERCENTILES, "mean", "min", "max")


@dataclass(frozen=True)
class Latency:
    """A latency distribution: summary.json's ``<name>_ms`` block, requests.jsonl's
    ``<name>_ms`` field. Every one is in ms and lower is better."""
    name: str            # "ttft"
    label: str           # "TTFT", as tables and charts title it
    help: str
    per_token: bool = False   # requests.jsonl holds a list (one sample per token), not one value
    goodput: bool = False     # a per-request bound on it decides whether a request is "good"
    generator: bool = False   # it measures the load generator, not the server
    unit: str = "ms"
    direction: str = LOWER

    @property
    def field(self) -> str:
        """The summary block / request record key: ``ttft_ms``."""
        return f"{self.name}_ms"

    def key(self, stat: str) -> str:
        """The flat metric name of one statistic: ``ttft_p99_ms``."""
        return f"{self.name}_{stat}_ms"


@dataclass(frozen=True)
class Scalar:
    """One number of summary.json (``path`` where it is nested)."""
    name: str
    unit: str
    direction: str
    help: str
    path: tuple[str, ...] = ()

    @property
    def op(self) -> str:
        return ">=" if self.direction == HIGHER else "<="


LATENCIES: tuple[Latency, ...] = (
    Latency("ttft", "TTFT", "Time to first token (send -> first token-carrying event)", goodput=True),
    Latency("tpot", "TPOT", "Time per output token per request, (E2E - TTFT) / (tokens - 1)",
            goodput=True),
    Latency("itl", "ITL", "Inter-token latency, one sample per token", per_token=True),
    Latency("icl", "ICL", "Inter-chunk latency, one sample per streamed chunk", per_token=True),
    Latency("e2e", "E2E", "End-to-end request latency (send -> last token)", goodput=True),
    Latency("schedule_lag", "schedule lag", "How late each request was sent against its schedule",
            generator=True),
    Latency("ttft_from_schedule", "TTFT from schedule",
            "Time to first token counted from the scheduled send time", goodput=True),
)
LATENCY: dict[str, Latency] = {m.name: m for m in LATENCIES}

SCALARS: tuple[Scalar, ...] = (
    Scalar("output_tokens_per_s", "tok/s", HIGHER, "output tokens per second of the run"),
    Scalar("total_tokens_per_s", "tok/s", HIGHER, "input + output tokens per second"),
    Scalar("requests_per_s", "req/s", HIGHER, "completed requests per second"),
    Scalar("goodput_rps", "req/s", HIGHER, "requests per second that met every per-request SLO"),
    Scalar("goodput_ratio", "ratio", HIGHER, "the share of requests that met every per-request SLO"),
    Scalar("error_rate", "ratio", LOWER, "failed / (completed + failed)"),
    Scalar("ttft_drift_ms_per_h", "ms/h", LOWER, "TTFT p99's trend over a soak"),
    Scalar("tpot_drift_ms_per_h", "ms/h", LOWER, "TPOT p99's trend over a soak"),
    Scalar("requests_completed", "requests", HIGHER, "requests that completed",
           ("requests", "completed")),
    Scalar("requests_failed", "requests", LOWER, "requests that failed", ("requests", "failed")),
)
SCALAR: dict[str, Scalar] = {s.name: s for s in SCALARS}

#: Every flat name a summary can be judged on -> the op a bare target takes (its direction).
SUMMARY_METRICS: dict[str, str] = {m.key(s): "<=" for m in LATENCIES for s in STATS}
SUMMARY_METRICS.update({s.name: s.op for s in SCALARS})


def split_latency(metric: str) -> tuple[Latency, str] | None:
    """``ttft_p99_ms`` -> (TTFT, "p99"); None for a name that is no latency statistic."""
    if not metric.endswith("_ms"):
        return None
    for m in LATENCIES:
        stat = metric[len(m.name) + 1:-3] if metric.startswith(m.name + "_") else ""
        if stat in STATS:
            return m, stat
    return None


def summary_value(summary: dict, metric: str) -> float | None:
    """The value of one flat metric name in a summary.json (None where not measured)."""
    lat = split_latency(metric)
    if lat is not None:
        return (summary.get(lat[0].field) or {}).get(lat[1])
    scalar = SCALAR.get(metric)
    if scalar is not None and scalar.path:
        block, key = scalar.path
        return (summary.get(block) or {}).get(key)
    return summary.get(metric)


def label(metric: str) -> str:
    """``ttft_p99_ms`` -> 'TTFT p99'; ``error_rate`` -> 'error rate'."""
    lat = split_latency(metric)
    if lat is not None:
        return f"{lat[0].label} {lat[1].replace('_', '.')}"
    return metric.replace("_", " ")
