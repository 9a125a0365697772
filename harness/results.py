"""The results directory: requests.jsonl appended per request, timeseries.jsonl per
window, summary.json at the end. Plain data; the summary can be recomputed from
requests.jsonl (`summary_from_requests`), which is how tests check the live path.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterable

from harness.histograms import HistogramSet
from harness.json_io import read_jsonl
from harness.metric_catalog import LATENCIES, LATENCY
from harness.progress import STATUS_FILE
from harness.slo import Slo, evaluate, request_is_good
from harness.timing import INCOMPLETE, RequestRecord

SCHEMA = 1
# A requests.jsonl line's fields, in contract order (harness.timing.RequestRecord).
REQUEST_FIELDS = tuple(RequestRecord.__dataclass_fields__)


class RequestLog:
    """Append-only requests.jsonl: one write() per line, so a run killed at any moment
    leaves only whole lines, and several worker processes can share the file."""

    def __init__(self, path: str | os.PathLike):
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, line: bytes) -> None:
        os.write(self.fd, line)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Counters:
    """Everything besides latency that a summary needs; additive across workers."""

    completed: int = 0
    failed: int = 0
    incomplete: int = 0   # in flight when the run stopped: neither completed nor failed
    good: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    first_sent: float | None = None      # epoch seconds, measured requests only
    last_finished: float | None = None

    def add(self, rec: dict[str, Any], slos: list[Slo]) -> None:
        if rec["ok"]:
            self.completed += 1
            self.input_tokens += rec.get("input_tokens") or 0
            self.output_tokens += rec.get("output_tokens") or 0
            if rec.get("tokens_estimated"):
                self.estimated += 1
            if request_is_good(slos, rec):
                self.good += 1
        elif rec.get("error_kind") == INCOMPLETE:
            self.incomplete += 1
        else:
            self.failed += 1
            kind = rec.get("error_kind") or "error"
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
        sent, fin = rec.get("sent_at"), rec.get("finished_at")
        if sent is not None and (self.first_sent is None or sent < self.first_sent):
            self.first_sent = sent
        if rec.get("error_kind") == INCOMPLETE:
            return   # it never finished: the measured window ends at the last request that did
        if fin is not None and (self.last_finished is None or fin > self.last_finished):
            self.last_finished = fin

    def merge(self, other: Counters) -> None:
        for name in ("completed", "failed", "incomplete", "good", "input_tokens", "output_tokens", "estimated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.errors_by_kind.items():
            self.errors_by_kind[k] = self.errors_by_kind.get(k, 0) + v
        if other.first_sent is not None and (self.first_sent is None or other.first_sent < self.first_sent):
            self.first_sent = other.first_sent
        if other.last_finished is not None and (self.last_finished is None
                                                or other.last_finished > self.last_finished):
            self.last_finished = other.last_finished

    @property
    def recorded(self) -> int:
        """Every request with a requests.jsonl line."""
        return self.completed + self.failed + self.incomplete

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Counters:
        c = cls()
        c.__dict__.update(d)
        c.errors_by_kind = dict(d.get("errors_by_kind") or {})
        return c


def rates(counters: Counters, duration_s: float) -> dict[str, float | None]:
    if duration_s <= 0:
        return {"output_tokens_per_s": None, "total_tokens_per_s": None,
                "requests_per_s": None, "goodput_rps": None}
    return {
        "output_tokens_per_s": counters.output_tokens / duration_s,
        "total_tokens_per_s": (counters.output_tokens + counters.input_tokens) / duration_s,
        "requests_per_s": counters.completed / duration_s,
        "goodput_rps": counters.good / duration_s,
    }


def build_summary(*, hist: HistogramSet, counters: Counters, duration_s: float,
                  started_at: float, target: dict, workload: dict, slos: list[Slo],
                  generator: dict, by_name: dict[str, HistogramSet] | None = None,
                  extra: dict | None = None) -> dict[str, Any]:
    total = counters.completed + counters.failed
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": started_at,
        "duration_s": duration_s,
        "target": target,
        "workload": workload,
        "requests": {"completed": counters.completed, "failed": counters.failed,
                     "incomplete": counters.incomplete, "errors_by_kind": counters.errors_by_kind,
                     "tokens_estimated": counters.estimated},
        "input_tokens": counters.input_tokens,
        "output_tokens": counters.output_tokens,
        "error_rate": counters.failed / total if total else 0.0,
    }
    for lat in LATENCIES:
        summary[lat.field] = hist.summary(lat.field)
    summary.update(rates(counters, duration_s))
    summary["goodput_ratio"] = counters.good / total if total else None
    summary["slo"] = evaluate(slos, summary)
    summary["generator"] = generator
    if by_name:
        summary["by_name"] = {name: {k: h.summary(k) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}
                              for name, h in by_name.items()}
    if extra:
        summary.update(extra)
    return summary


STARTED_FILE = "started.jsonl"
STARTED_FIELDS = ("id", "user_class", "url", "model", "scheduled_at", "sent_at", "input_tokens")


def reconcile_started(out: pathlib.Path) -> int:
    """Give every request that was sent but never recorded (its worker was killed) its
    requests.jsonl line: incomplete, with what was known when it was sent and nothing
    measured. Returns how many lines it wrote."""
    started_path, log_path = out / STARTED_FILE, out / "requests.jsonl"
    if not started_path.exists():
        return 0
    recorded = {d.get("id") for d in read_jsonl(log_path, missing_ok=True)}
    lost = [d for d in read_jsonl(started_path) if d.get("id") not in recorded]
    if not lost:
        return 0
    log = RequestLog(log_path)
    try:
        for d in lost:
            rec = {f: None for f in REQUEST_FIELDS} | {k: d.get(k) for k in STARTED_FIELDS}
            rec.update(ok=False, error_kind=INCOMPLETE, tokens_estimated=False, itl_ms=[], icl_ms=[])
            log.write(json.dumps(rec).encode() + b"\n")
    finally:
        log.close()
    return len(lost)


def summary_from_requests(records: Iterable[dict[str, Any]], slos: list[Slo] | None = None) -> dict[str, Any]:
    """Recompute the latency and count parts of a summary from requests.jsonl alone."""
    slos = slos or []
    hist = HistogramSet()
    counters = Counters()
    for rec in records:
        counters.add(rec, slos)
        hist.add_record(rec)
    duration = ((counters.last_finished or 0) - (counters.first_sent or 0)) if counters.first_sent else 0.0
    return build_summary(hist=hist, counters=counters, duration_s=duration, started_at=counters.first_sent or 0,
                         target={}, workload={}, slos=slos, generator={})


# One run's files in its results directory: what archive_run moves aside.
RUN_FILES = ("summary.json", "requests.jsonl", "timeseries.jsonl", STARTED_FILE, STATUS_FILE)
EARLIER_RUN_PREFIX = "test-"


def archive_run(out: pathlib.Path) -> pathlib.Path | None:
    """Move the run in `out` (its summary and append-only files) to `out/test-<n>/`, n the
    first number free, so that the next run in the same process (a test started again from
    Locust's web UI) starts with the directory empty and the earlier test's results kept.
    Returns the new directory, or None when `out` held no run."""
    present = [name for name in RUN_FILES if (out / name).exists()]
    if not present:
        return None
    n = 1
    while (out / f"{EARLIER_RUN_PREFIX}{n}").exists():
        n += 1
    dest = out / f"{EARLIER_RUN_PREFIX}{n}"
    dest.mkdir()
    for name in present:
        os.replace(out / name, dest / name)
    return dest


def now() -> float:
    return time.time()


def format_table(summary: dict[str, Any]) -> str:
    """The human summary `harness load` and `make demo` print."""
    shown = ["ttft", "tpot", "itl", "e2e"]
    if (summary.get("schedule_lag_ms") or {}).get("count"):
        shown += ["ttft_from_schedule", "schedule_lag"]
    rows = [(LATENCY[n].label, LATENCY[n].field) for n in shown]
    cols = ("p50", "p90", "p99", "p99_9", "mean", "max")
    fmt = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
    lines = [f"{'ms':<20}" + "".join(f"{c:>10}" for c in cols) + f"{'count':>10}"]
    for label, key in rows:
        s = summary.get(key) or {}
        lines.append(f"{label:<20}" + "".join(f"{fmt(s.get(c)):>10}" for c in cols)
                     + f"{s.get('count') or 0:>10}")
    req = summary.get("requests", {})
    rate = lambda k: fmt(summary.get(k))  # noqa: E731
    lines.append("")
    incomplete = req.get("incomplete") or 0
    drain = summary.get("drain") or {}
    lines.append(f"requests: {req.get('completed', 0)} ok, {req.get('failed', 0)} failed "
                 f"{req.get('errors_by_kind') or ''}"
                 + (f", {incomplete} incomplete" if incomplete else "")
                 + f" over {summary.get('duration_s', 0):.1f} s")
    if drain:
        waited = drain.get("waited_s")
        lines.append("end of run: " + ("interrupted (no drain); " if drain.get("interrupted") else
                                        f"drained {waited:.1f} s of up to {drain.get('timeout_s'):g} s; "
                                        if waited is not None else "")
                     + (f"{incomplete} still in flight recorded as incomplete" if incomplete
                        else "no request left in flight"))
    lines.append(f"throughput: {rate('output_tokens_per_s')} output tok/s, {rate('total_tokens_per_s')} "
                 f"total tok/s, {rate('requests_per_s')} req/s, goodput {rate('goodput_rps')} req/s")
    slo = summary.get("slo") or {}
    for c in slo.get("checks", []):
        lines.append(f"SLO {c['slo']}: {'pass' if c['passed'] else 'FAIL'} (measured {fmt(c['value'])})")
    gen = summary.get("generator") or {}
    if gen and not gen.get("valid", True):
        lines.append("generator INVALID: " + "; ".join(gen.get("reasons", [])))
    return "\n".join(lines)


def endpoint_breakdown(records: Iterable[dict[str, Any]], duration_s: float
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Requests, tokens and throughput per endpoint URL and per model, over the
    run's measured duration (so replicas' throughputs sum to the aggregate)."""
    by_endpoint: dict[str, dict[str, Any]] = {}
    by_model: dict[str, dict[str, Any]] = {}
    for rec in records:
        base = rec.get("url", "").rsplit("/v1/", 1)[0]
        for key, table in ((base, by_endpoint), (rec.get("model") or "", by_model)):
            row = table.setdefault(key, {"completed": 0, "failed": 0, "output_tokens": 0,
                                         "endpoints": set()})
            row["completed" if rec.get("ok") else "failed"] += 1
            row["output_tokens"] += (rec.get("output_tokens") or 0) if rec.get("ok") else 0
            row["endpoints"].add(base)
            if table is by_endpoint:
                row["model"] = rec.get("model")
    for table in (by_endpoint, by_model):
        for row in table.values():
            row["replicas"] = len(row.pop("endpoints"))
            row["output_tokens_per_s"] = row["output_tokens"] / duration_s if duration_s else None
    for row in by_endpoint.values():
        row.pop("replicas")
    return by_endpoint, by_model
