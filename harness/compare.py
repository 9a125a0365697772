"""`harness compare BASELINE RUN`: per-metric deltas between two results directories with
noise-aware thresholds, for CI gates.

Everything is recomputed from each run's requests.jsonl (restricted to the run's
measured window as its summary.json describes it), so both sides use the same
definitions:

- latency percentiles (TTFT/TPOT/E2E over requests, ITL over tokens) are nearest-rank
  percentiles of the raw values;
- their uncertainty comes from a *block* bootstrap: a run's requests, in the order they
  were sent, are cut into about sqrt(n) contiguous blocks (5..50), and whole blocks are
  resampled (a block brings all its requests and their tokens). Requests in flight
  together share a batch and queue, so their latencies move together; resampling single
  requests would pretend they are independent and give intervals too narrow to hold
  from one run to the next. Each run is resampled independently, `resamples` times
  (seeded), and the confidence interval of the change is the percentile interval of
  (run* - baseline*);
- throughput (output tokens/s, requests/s) is bootstrapped over the same number of equal
  time bins of the measured span, the error rate over requests.

A metric *regresses* when its change is bad (latency or errors up, throughput down),
the confidence interval of the change excludes zero on the bad side, AND the change
exceeds the minimum: `threshold` relative (default 5%), or `error_rate_threshold`
absolute for the error rate (default 0.01). A noisy difference is never a regression
and neither is a real but tiny one.
"""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness import metric_catalog as mc
from harness.errors import UsageError
from harness.json_io import read_jsonl

SCHEMA = 1
LATENCY = tuple(mc.LATENCY[n] for n in ("ttft", "tpot", "itl", "e2e"))   # the ones judged
STATS = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
RATES = (("output_tokens_per_s", "output tok/s"), ("requests_per_s", "requests/s"))
# A bootstrap cannot see beyond the largest values it was given: a percentile is judged
# only when at least this many samples lie above it in both runs (p99: 500 samples,
# p90: 50, p50: 10); otherwise its verdict is "too few samples", never a regression.
MIN_TAIL = 5


def metric_keys() -> list[str]:
    keys = [m.key(s) for m in LATENCY for s, _ in STATS]
    return keys + [k for k, _ in RATES] + ["error_rate"]


@dataclass
class Run:
    path: pathlib.Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]


def load_run(path: str | pathlib.Path) -> Run:
    """A results directory's summary and measured requests; UsageError when unusable."""
    p = pathlib.Path(path)
    if not p.is_dir():
        raise UsageError(f"{path}: no such results directory")
    req = p / "requests.jsonl"
    if not req.is_file():
        raise UsageError(f"{path}: no requests.jsonl (is this a `harness load` results directory?)")
    summary: dict[str, Any] = {}
    if (p / "summary.json").is_file():
        try:
            summary = json.loads((p / "summary.json").read_text())
        except ValueError as e:
            raise UsageError(f"{p / 'summary.json'}: not JSON ({e})") from None
    try:
        records = read_jsonl(req)
    except ValueError as e:   # json_io.JsonlError: the file and line
        raise UsageError(str(e)) from None
    records = measured(records, summary)
    if not records:
        raise UsageError(f"{req}: no requests in the run's measured window")
    return Run(p, summary, records)


def measured(records: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The requests the summary counted: sent after start + warm-up (which also drops lines
    an earlier run appended to the same directory), and before the cool-down."""
    started = summary.get("started_at")
    wl = summary.get("workload") or {}
    out = records
    if started:
        start = started + float(wl.get("warmup_s") or 0.0)
        out = [r for r in out if r.get("sent_at") is not None and r["sent_at"] >= start]
    if wl.get("cooldown_s") and summary.get("duration_s") and out:
        end = min(r["sent_at"] for r in out) + float(summary["duration_s"])
        out = [r for r in out if (r.get("finished_at") or 0) <= end]
    return out


# -- bootstrap machinery ------------------------------------------------------------------------
def _nearest_rank(sorted_values: np.ndarray, q: float) -> float:
    n = len(sorted_values)
    return float(sorted_values[max(1, math.ceil(q * n)) - 1])


def n_blocks(n: int) -> int:
    """How many blocks (or time bins) n requests are cut into for the bootstrap."""
    return int(min(50, max(5, round(math.sqrt(n)))))


def grouped_samples(records: list[dict[str, Any]], field: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(values, block index per value, number of blocks, number of requests) for one latency
    field: the requests that have the value (failed ones never do), in send order, cut into
    `n_blocks` contiguous blocks of nearly equal size; ITL brings all of a request's tokens."""
    per_req: list[list[float]] = []
    for rec in sorted(records, key=lambda r: (r.get("sent_at") is None, r.get("sent_at") or 0.0)):
        if not rec.get("ok"):
            continue
        v = rec.get(field)
        if v is None:
            continue
        items = [float(x) for x in (v if isinstance(v, list) else [v]) if x is not None]
        if items:
            per_req.append(items)
    return in_blocks(per_req)


def in_blocks(per_req: list[list[float]]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(values, block index per value, number of blocks, number of requests) for requests'
    values in send order: `n_blocks` contiguous blocks of nearly equal size, a request's values
    (ITL's tokens) kept in one block, so the bootstrap resamples neighbours together."""
    n = len(per_req)
    if n == 0:
        return np.empty(0), np.empty(0, dtype=np.int64), 0, 0
    k = min(n, n_blocks(n))
    vals: list[float] = []
    groups: list[int] = []
    for i, items in enumerate(per_req):
        vals.extend(items)
        groups.extend([i * k // n] * len(items))
    return np.asarray(vals, dtype=float), np.asarray(groups, dtype=np.int64), k, n


def bootstrap_quantiles(values: np.ndarray, groups: np.ndarray, n_groups: int, qs: list[float],
                        resamples: int, rng: np.random.Generator) -> np.ndarray:
    """resamples x len(qs) nearest-rank quantiles, resampling groups (blocks) with replacement.

    A resample is a vector of multiplicities (multinomial over groups); each value counts as
    many times as its group was drawn. The quantile is the smallest sorted value whose
    weighted rank reaches ceil(q * total), found by a vectorized binary search over the
    once-sorted values: no resample is ever materialized, so the cost is
    about resamples x groups x log2(samples)^2, not resamples x samples.
    """
    order = np.argsort(values, kind="stable")
    v, g = values[order], groups[order]
    t = len(v)
    # positions (in sorted order) of each group's values: W(j) = sum_b c_b * #{pos_b <= j}
    pos = [np.flatnonzero(g == b) for b in range(n_groups)]
    sizes = np.array([len(p) for p in pos], dtype=np.int64)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples)
    total = counts @ sizes
    out = np.empty((resamples, len(qs)))
    for j, q in enumerate(qs):
        thr = np.maximum(np.ceil(q * total), 1)
        lo = np.zeros(resamples, dtype=np.int64)
        hi = np.full(resamples, t - 1, dtype=np.int64)
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) // 2
            w = np.zeros(resamples, dtype=np.int64)
            for b in range(n_groups):
                w += counts[:, b] * np.searchsorted(pos[b], mid, side="right")
            reach = w >= thr
            hi = np.where(active & reach, mid, hi)
            lo = np.where(active & ~reach, mid + 1, lo)
        out[:, j] = v[lo]
    return out


def latency_stats(run: Run, field: str, resamples: int, rng: np.random.Generator) -> dict[str, Any]:
    vals, groups, k, n = grouped_samples(run.records, field)
    if n == 0:
        return {"n": 0, "samples": 0, "point": {s: None for s, _ in STATS}, "boot": None}
    qs = [q for _, q in STATS]
    sv = np.sort(vals)
    point = {s: _nearest_rank(sv, q) for s, q in STATS}
    boot = None
    if k >= 2:
        boot = bootstrap_quantiles(vals, groups, k, qs, resamples, rng)
    return {"n": n, "samples": len(vals), "blocks": k, "point": point, "boot": boot}


def rate_stats(run: Run, resamples: int, rng: np.random.Generator) -> dict[str, Any]:
    """Output tokens/s and requests/s over the measured span, bootstrapped over time bins."""
    ok = [r for r in run.records if r.get("ok") and r.get("finished_at") is not None]
    sent = [r["sent_at"] for r in run.records if r.get("sent_at") is not None]
    if not ok or not sent:
        return {k: {"point": None, "boot": None} for k, _ in RATES}
    start = min(sent)
    end = max(r["finished_at"] for r in ok)
    span = end - start
    if span <= 0:
        return {k: {"point": None, "boot": None} for k, _ in RATES}
    fin = np.array([r["finished_at"] for r in ok])
    tok = np.array([float(r.get("output_tokens") or 0) for r in ok])
    k = n_blocks(len(ok))
    width = span / k
    bins = np.minimum(((fin - start) / width).astype(int), k - 1)
    per_bin_tok = np.bincount(bins, weights=tok, minlength=k) / width
    per_bin_req = np.bincount(bins, minlength=k) / width
    out = {}
    for key, series, point in (("output_tokens_per_s", per_bin_tok, tok.sum() / span),
                               ("requests_per_s", per_bin_req, len(ok) / span)):
        idx = rng.integers(0, k, size=(resamples, k))
        out[key] = {"point": float(point), "boot": series[idx].mean(axis=1), "bins": k}
    return out


def error_stats(run: Run, resamples: int, rng: np.random.Generator) -> dict[str, Any]:
    """Resampling n requests' 0/1 failure flags with replacement is Binomial(n, p) / n."""
    n = len(run.records)
    p = sum(0 if r.get("ok") else 1 for r in run.records) / n
    return {"n": n, "point": p, "boot": rng.binomial(n, p, size=resamples) / n}


# -- the comparison -----------------------------------------------------------------------------
def judge(key: str, label: str, unit: str, better: str, base: float | None, run: float | None,
          boot_base: np.ndarray | None, boot_run: np.ndarray | None, *, confidence: float,
          min_change: float, absolute: bool, n: tuple[int, int]) -> dict[str, Any]:
    row: dict[str, Any] = {"metric": key, "label": label, "unit": unit, "better": better,
                           "baseline": base, "run": run, "delta": None, "rel_change": None,
                           "ci": None, "n_baseline": n[0], "n_run": n[1], "verdict": "n/a"}
    if base is None or run is None:
        return row
    delta = run - base
    row["delta"] = delta
    rel = delta / base if base else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    row["rel_change"] = rel
    if boot_base is None or boot_run is None:
        row["verdict"] = "too few samples"
        return row
    m = min(len(boot_base), len(boot_run))
    d = boot_run[:m] - boot_base[:m]
    a = (1.0 - confidence) / 2.0
    lo, hi = (float(x) for x in np.quantile(d, [a, 1.0 - a]))
    row["ci"] = [lo, hi]
    size = abs(delta) if absolute else abs(rel)
    bad_sign = 1.0 if better == "lower" else -1.0
    excludes_zero_bad = (lo > 0) if bad_sign > 0 else (hi < 0)
    excludes_zero_good = (hi < 0) if bad_sign > 0 else (lo > 0)
    if excludes_zero_bad and delta * bad_sign > 0 and size > min_change:
        row["verdict"] = "REGRESSION"
    elif excludes_zero_good and delta * bad_sign < 0 and size > min_change:
        row["verdict"] = "improved"
    elif excludes_zero_bad or excludes_zero_good:
        row["verdict"] = "below threshold"
    else:
        row["verdict"] = "within noise"
    return row


def compare(baseline: Run, run: Run, *, threshold: float = 0.05, error_rate_threshold: float = 0.01,
            confidence: float = 0.95, resamples: int = 1000, seed: int = 0,
            metrics: list[str] | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    opts = dict(confidence=confidence)
    for lat in LATENCY:
        b = latency_stats(baseline, lat.field, resamples, rng)
        r = latency_stats(run, lat.field, resamples, rng)
        for j, (stat, q) in enumerate(STATS):
            key, label = lat.key(stat), lat.label
            enough = min(b.get("samples", 0), r.get("samples", 0)) * (1.0 - q) >= MIN_TAIL
            rows.append(judge(key, f"{label} {stat}", "ms", "lower", b["point"][stat], r["point"][stat],
                              None if b["boot"] is None or not enough else b["boot"][:, j],
                              None if r["boot"] is None or not enough else r["boot"][:, j],
                              min_change=threshold, absolute=False, n=(b["n"], r["n"]), **opts))
    b, r = rate_stats(baseline, resamples, rng), rate_stats(run, resamples, rng)
    nb = sum(1 for x in baseline.records if x.get("ok"))
    nr = sum(1 for x in run.records if x.get("ok"))
    for key, label in RATES:
        rows.append(judge(key, label, "/s", "higher", b[key]["point"], r[key]["point"], b[key]["boot"],
                          r[key]["boot"], min_change=threshold, absolute=False, n=(nb, nr), **opts))
    b, r = error_stats(baseline, resamples, rng), error_stats(run, resamples, rng)
    rows.append(judge("error_rate", "error rate", "", "lower", b["point"], r["point"], b["boot"], r["boot"],
                      min_change=error_rate_threshold, absolute=True, n=(b["n"], r["n"]), **opts))
    if metrics:
        rows = [row for row in rows if row["metric"] in metrics]
    regressions = [row["metric"] for row in rows if row["verdict"] == "REGRESSION"]
    return {"schema": SCHEMA, "baseline": str(baseline.path), "run": str(run.path),
            "threshold": threshold, "error_rate_threshold": error_rate_threshold,
            "confidence": confidence, "resamples": resamples, "seed": seed,
            "metrics": rows, "regressions": regressions, "regression": bool(regressions)}


def _ci_unit(row: dict[str, Any]) -> str:
    """The unit a change's confidence interval is in: the metric's own (ms for a latency, the
    rate's unit for a rate: "output tok/s" is in tok/s), never the % of the change column."""
    unit: str = row["unit"]
    if unit == "/s":
        label: str = row["label"]
        return label.split()[-1]
    return unit


def format_table(result: dict[str, Any]) -> str:
    conf = f"{result['confidence'] * 100:g}%"
    lines = [f"baseline: {result['baseline']}", f"run:      {result['run']}",
             f"regression = worse by more than {result['threshold'] * 100:g}% (error rate: "
             f"{result['error_rate_threshold']:g} absolute) with the {conf} CI of the change "
             f"excluding zero ({result['resamples']} bootstrap resamples, seed {result['seed']})", ""]
    head = (f"{'metric':<16}{'baseline':>12}{'run':>12}{'change %':>10}  "
            f"{conf + ' CI of change (unit)':<34}{'verdict':<16}")
    lines.append(head)

    def num(v: float | None, unit: str) -> str:
        if v is None:
            return "-"
        if unit == "":
            return f"{v:.4f}"
        return f"{v:,.1f}"

    for row in result["metrics"]:
        unit = row["unit"]
        label = row["label"] + (f" {unit}" if unit == "ms" else "")
        if row["rel_change"] is None:
            change = "-"
        elif row["metric"] == "error_rate":
            change = f"{row['delta']:+.4f}"
        elif math.isinf(row["rel_change"]):
            change = "new"
        else:
            change = f"{row['rel_change'] * 100:+.1f}%"
        ci = "-" if row["ci"] is None else (
            f"[{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}] absolute" if unit == "" else
            f"[{row['ci'][0]:+,.1f}, {row['ci'][1]:+,.1f}] {_ci_unit(row)}")
        lines.append(f"{label:<16}{num(row['baseline'], unit):>12}{num(row['run'], unit):>12}"
                     f"{change:>10}  {ci:<34}{row['verdict']:<16}")
    lines.append("")
    if result["regression"]:
        lines.append("REGRESSION: " + ", ".join(result["regressions"]))
    else:
        lines.append("no regression")
    return "\n".join(lines)
