"""summary.json's model: one run's summary, put together whole and written once.

The master (or the local runner) of a load run builds it at the end of the run: the merged
figures (`results.build_summary`: counts, latency blocks, rates, SLOs, generator), how the run
ended, the per-endpoint and per-model breakdown of requests.jsonl and, when asked for
(`--llm-drift`, which `harness load --soak` or a drift SLO sets), the drift of the run's
timeseries with the SLOs judged again on it. `harness load` only reads the file. (It used to be
written three times in two processes: by the plugin at quit, then rewritten by `harness load`
with the breakdowns, then again with the drift.)
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterable

from harness import drift as drift_mod
from harness.json_io import write_json
from harness.results import SCHEMA, endpoint_breakdown
from harness.slo import Slo, evaluate

SUMMARY_FILE = "summary.json"


@dataclass
class RunSummary:
    """summary.json, typed where the end of the run adds to the merged figures."""

    figures: dict[str, Any]                   # results.build_summary's, as measured
    slos: list[Slo] = field(default_factory=list)
    interrupted: bool = False                 # stopped by a signal (no drain)
    drain: dict[str, Any] | None = None       # {"timeout_s", "waited_s", "interrupted"}
    error: str | None = None                  # why the run stopped early (only then: readers take it as failure)
    recovered: str | None = None              # why the figures were rebuilt from requests.jsonl
    by_endpoint: dict[str, Any] | None = None
    by_model: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None       # harness.drift.analyze's block
    schema: int = SCHEMA

    def add_breakdowns(self, records: Iterable[dict[str, Any]]) -> None:
        """Per-endpoint and per-model figures (the seed's cluster table), from requests.jsonl's
        lines, so that they add up to the aggregate by construction."""
        self.by_endpoint, self.by_model = endpoint_breakdown(records, self.figures.get("duration_s") or 0.0)

    def add_drift(self, lines: list[dict[str, Any]], alpha: float = drift_mod.DEFAULT_ALPHA) -> None:
        """The drift of the timeseries `lines` (their measured part: after the warm-up)."""
        wl = self.figures.get("workload") or {}
        started = self.figures.get("started_at")
        start = (started + float(wl.get("warmup_s") or 0.0)) if started else None
        self.drift = drift_mod.analyze(lines, start=start, alpha=alpha)

    def to_dict(self) -> dict[str, Any]:
        """summary.json's content (with drift, the SLOs judged again: a drift SLO reads
        "not measured" on the figures alone)."""
        d = dict(self.figures, schema=self.schema)
        if self.drain is not None:
            d["interrupted"], d["drain"] = self.interrupted, self.drain
        if self.error:
            d["error"] = self.error
        if self.recovered:
            d["recovered"] = self.recovered
        if self.by_endpoint is not None:
            d["by_endpoint"], d["by_model"] = self.by_endpoint, self.by_model
        if self.drift is not None:
            d["drift"] = self.drift
            d.update(drift_mod.drift_scalars(self.drift))
            d["slo"] = evaluate(self.slos, d)
        return d

    def write(self, out: str | pathlib.Path) -> dict[str, Any]:
        """Write summary.json into the results directory `out` (its one writer); returns it."""
        doc = self.to_dict()
        write_json(pathlib.Path(out) / SUMMARY_FILE, doc)
        return doc
