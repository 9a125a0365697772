"""Capacity at an SLO: the highest open-loop request rate (or, with load "users", the
highest closed-loop concurrency) at which every SLO holds.

The search (`search`) brackets then bisects: it measures `min_rate` (a break there means no
capacity in range), then doubles the rate (never past `max_rate`) until a step does not pass,
then bisects between the last passing and the first non-passing rate until the bracket is
narrower than `resolution` (relative to its lower end). How one step is measured is the
caller's: a live `harness load` run (harness/capacity_live.py) or virtual time on the
simulator's replay (harness/capacity_replay.py). Both hand back the step's requests in the
`requests.jsonl` shape, and both are judged here, the same way (`judge_step`).

Why a step passes only with confidence: one run's p99 is noisy, and a capacity read off one
lucky run is not one the server sustains. A step's SLO *holds* when the whole confidence
interval of the metric (block bootstrap over the step's requests in send order, the
machinery `harness compare` uses: harness/compare.py) lies on the good side of the
threshold; it *breaks* when the point value is past it; otherwise it is *uncertain*. The
step passes only when every SLO holds. A request still unfinished when the step ended
(drain timeout) counts as an infinitely slow one: dropping it would make an overloaded
step look fast. A percentile with too few samples above it (compare.MIN_TAIL) is *too few
samples*, never a pass: lengthen the step.

A step whose load generator was invalid, whose server failed (errors with no error_rate
SLO to judge them, or no results at all) or that was interrupted is reported with its
reasons and treated as an upper bound: never a pass.

`capacity.json` (`CapacityResult.to_dict`) holds the schema version, the answer, the
bracket and every step with its SLO values, intervals and verdicts.

The load axis: "rate" offers open-loop arrivals at a rate (requests/s); "users" runs a
closed loop of N concurrent users, each sending its next request when the last one ends
(the seed's "measured at batch_size=32" rows). Both searches are the same bracketing and
bisection over the level, and every step is judged by the same `judge_step`; users are
whole numbers, so that search also stops when the bracket is one user wide. In
capacity.json a step's ``rate`` field is its level in the search's unit (``load``: req/s,
or users), and its ``requests_per_s`` the rate it achieved.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from harness import metric_catalog as mc
from harness.compare import MIN_TAIL, bootstrap_quantiles, in_blocks, n_blocks
from harness.errors import UsageError
from harness.slo import Slo, parse_slo

SCHEMA_VERSION = 1
DEFAULT_RESOLUTION = 0.05
GROWTH = 2.0          # the bracketing step: each passing rate is doubled (capped at max_rate)
MAX_STEPS = 40        # a bound on the search whatever the inputs (bisection needs ~log2 of range/res)
# The metrics a step can judge with a confidence interval (what the block bootstrap covers).
JUDGED = tuple(mc.LATENCY[n] for n in ("ttft", "tpot", "itl", "e2e"))
JUDGED_STATS = (*mc.PERCENTILES, "mean")
_Q = {k: round(p / 100.0, 6) for k, p in mc.PERCENTILES.items()}   # p99_9 -> 0.999 exactly
PASS, FAIL = "pass", "fail"
LOADS = ("rate", "users")     # the search's axis: open-loop req/s, or closed-loop users
UNIT = {"rate": "req/s", "users": "users"}
# A step's status: pass; fail (an SLO breaks or is uncertain or has too few samples);
# invalid (its generator could not keep up); error (the server failed or nothing came back);
# interrupted (stopped by Ctrl-C before it ended).
STATUSES = (PASS, FAIL, "invalid", "error", "interrupted")


def parse_capacity_slos(texts: list[str]) -> list[Slo]:
    """The --slo list, each one a metric a step can judge with confidence; UsageError else."""
    if not texts:
        raise UsageError("give at least one --slo, e.g. --slo 'ttft_p99_ms<=200' --slo 'tpot_p99_ms<=30'")
    out = []
    for t in texts:
        s = parse_slo(t)
        if not (_judged(s.metric) or s.metric == "error_rate") or s.op not in ("<=", "<"):
            raise UsageError(f"--slo {t!r}: a capacity search judges upper bounds (<=) on "
                             f"({'|'.join(m.name for m in JUDGED)})_({'|'.join(JUDGED_STATS)})_ms "
                             f"or error_rate, "
                             f"the metrics it can put a confidence interval on")
        out.append(s)
    return out


def _judged(metric: str) -> tuple[mc.Latency, str] | None:
    """(latency, statistic) of a metric a step can put a confidence interval on, else None."""
    lat = mc.split_latency(metric)
    return lat if lat is not None and lat[0] in JUDGED and lat[1] in JUDGED_STATS else None


def min_requests(slos: list[Slo]) -> int:
    """The fewest requests a step needs so every percentile SLO can get a confidence interval
    (compare.MIN_TAIL samples above it: p99 needs 500, p90 50); ITL counts tokens, so a
    request is enough there. A step sends at least this many, however short --duration-per-step."""
    need = 10
    for s in slos:
        m = _judged(s.metric)
        if m and not m[0].per_token and m[1] in _Q:
            need = max(need, math.ceil(MIN_TAIL / (1.0 - _Q[m[1]]) - 1e-9))
    return need


def step_plan(rate: float, duration_s: float, slos: list[Slo]) -> tuple[float, int]:
    """(time bound in seconds, requests) of one step at `rate`: the requests
    --duration-per-step holds at that rate, more when the SLOs' percentiles need more (see
    min_requests). The step ends at the count; the time bound (a fifth over the count's
    expected span, plus 2 s) only stops one whose arrivals run late (random gaps)."""
    n = max(math.ceil(rate * duration_s), min_requests(slos))
    return n / rate * 1.2 + 2.0, n


USER_REQUESTS = 4   # a users step judges at least this many requests per user


def users_step_plan(users: int, duration_s: float, slos: list[Slo]) -> tuple[float, int]:
    """(time bound in seconds, requests) of one closed-loop step of `users`: the warm-up's
    `users` requests (see users_warmup), then USER_REQUESTS per user or more, at least what
    the SLOs' percentiles need (min_requests). The step ends at the count; its rate is the
    server's, unknown in advance, so --duration-per-step is the time bound: a step that
    reaches it first is judged on what came back (a percentile short of samples is "too few
    samples", never a pass)."""
    users = int(users)
    return float(duration_s), users + max(USER_REQUESTS * users, min_requests(slos))


def users_warmup(records: list[dict[str, Any]], users: int) -> list[dict[str, Any]]:
    """A users step's judged requests: all but the first `users` sent. Those are the start,
    when every user sends its first request at once, a burst no steady closed loop of that
    many users has (it would set a p99 on its own)."""
    return sorted(records, key=lambda r: r.get("sent_at") or 0.0)[int(users):]


# -- judging one step ---------------------------------------------------------------------------
def _latency_samples(records: list[dict[str, Any]], field: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(values, block per value, blocks, requests): the completed requests' values in send
    order, with every incomplete request as +inf (its TTFT as measured if its first token
    came), cut into compare.n_blocks contiguous blocks. Failed requests are the error rate's."""
    per_req: list[list[float]] = []
    for rec in sorted(records, key=lambda r: r.get("sent_at") or 0.0):
        v = rec.get(field)
        if rec.get("ok"):
            if v is None:
                continue
        elif rec.get("error_kind") == "incomplete":
            if field != "ttft_ms" or v is None:
                v = math.inf
        else:
            continue
        items = [float(x) for x in (v if isinstance(v, list) else [v]) if x is not None]
        if items:
            per_req.append(items)
    return in_blocks(per_req)


def _block_means(values: np.ndarray, groups: np.ndarray, k: int, resamples: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means resampling whole blocks (multinomial multiplicities, as
    compare.bootstrap_quantiles does), so correlated neighbours move together."""
    sums = np.bincount(groups, weights=values, minlength=k)
    sizes = np.bincount(groups, minlength=k).astype(float)
    counts = rng.multinomial(k, np.full(k, 1.0 / k), size=resamples)
    with np.errstate(invalid="ignore"):
        return (counts @ sums) / (counts @ sizes)


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def judge_slo(slo: Slo, records: list[dict[str, Any]], *, confidence: float, resamples: int,
              rng: np.random.Generator) -> dict[str, Any]:
    """One SLO on one step: value, confidence interval, verdict (holds, breaks, uncertain,
    too few samples, not measured)."""
    out: dict[str, Any] = {"slo": slo.text, "metric": slo.metric, "label": mc.label(slo.metric),
                           "op": slo.op, "threshold": slo.threshold, "value": None, "ci": None,
                           "unfinished": 0, "samples": 0, "verdict": "not measured"}
    a = (1.0 - confidence) / 2.0
    if slo.metric == "error_rate":
        flags = [0.0 if r.get("ok") or r.get("error_kind") == "incomplete" else 1.0
                 for r in sorted(records, key=lambda r: r.get("sent_at") or 0.0)]
        if not flags:
            return out
        vals = np.asarray(flags)
        k = min(len(vals), n_blocks(len(vals)))
        groups = (np.arange(len(vals)) * k // len(vals)).astype(np.int64)
        point = float(vals.mean())
        boot = _block_means(vals, groups, k, resamples, rng) if k >= 2 else None
        samples = len(vals)
        enough = True
    else:
        lat, stat = _judged(slo.metric)  # type: ignore[misc]  (parse_capacity_slos let it in)
        field = lat.field
        vals, groups, k, n = _latency_samples(records, field)
        if n == 0:
            return out
        out["unfinished"] = int(np.isinf(vals).sum())
        samples = len(vals)
        if stat == "mean":
            point = float(vals.mean())
            boot = _block_means(vals, groups, k, resamples, rng) if k >= 2 else None
            enough = True
        else:
            q = _Q[stat]
            sv = np.sort(vals)
            point = float(sv[max(1, math.ceil(q * len(sv))) - 1])
            boot = bootstrap_quantiles(vals, groups, k, [q], resamples, rng)[:, 0] if k >= 2 else None
            enough = samples * (1.0 - q) >= MIN_TAIL - 1e-9   # (1 - 0.9 is 0.0999...)
    out["samples"] = samples
    out["value"] = _finite(point)
    if not math.isfinite(point):
        out["note"] = "requests did not finish within the step"
    breaks = not (point < slo.threshold if slo.op == "<" else point <= slo.threshold)
    if boot is not None:
        lo, hi = (float(x) for x in np.quantile(boot, [a, 1.0 - a], method="nearest"))   # (no inf - inf)
        out["ci"] = [_finite(lo), _finite(hi)]
        hi_ok = hi < slo.threshold if slo.op == "<" else hi <= slo.threshold
    else:
        hi_ok = False
    if breaks:
        out["verdict"] = "breaks"
    elif not enough:
        out["verdict"] = "too few samples"
        need = math.ceil(MIN_TAIL / (1.0 - _Q[stat]) - 1e-9)
        out["note"] = f"{samples} samples; a {stat} needs at least {need} for a confidence interval"
    elif boot is None:
        out["verdict"] = "too few samples"
    elif hi_ok:
        out["verdict"] = "holds"
    else:
        out["verdict"] = "uncertain"
    return out


def step_rates(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Output tokens/s and requests/s of the completed requests over first send to last finish."""
    ok = [r for r in records if r.get("ok") and r.get("finished_at") is not None]
    sent = [r["sent_at"] for r in records if r.get("sent_at") is not None]
    if not ok or not sent:
        return {"output_tokens_per_s": None, "requests_per_s": None}
    span = max(r["finished_at"] for r in ok) - min(sent)
    if span <= 0:
        return {"output_tokens_per_s": None, "requests_per_s": None}
    tok = sum(float(r.get("output_tokens") or 0) for r in ok)
    return {"output_tokens_per_s": tok / span, "requests_per_s": len(ok) / span}


@dataclass
class Step:
    """One measured rate."""

    rate: float
    status: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)     # why it is not a pass (or is invalid)
    dir: str | None = None                               # its results directory (live mode)
    requests: dict[str, int] = field(default_factory=dict)
    output_tokens_per_s: float | None = None
    requests_per_s: float | None = None
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == PASS


def judge_step(rate: float, records: list[dict[str, Any]], slos: list[Slo], *,
               confidence: float = 0.95, resamples: int = 1000, seed: int = 0,
               generator_reasons: list[str] | None = None, server_reasons: list[str] | None = None,
               dir: str | None = None) -> Step:
    """A step's verdict from its requests (the requests.jsonl shape, measured window only)."""
    rng = np.random.default_rng(seed)
    checks = [judge_slo(s, records, confidence=confidence, resamples=resamples, rng=rng) for s in slos]
    counts = {"sent": len(records), "completed": sum(1 for r in records if r.get("ok")),
              "incomplete": sum(1 for r in records if r.get("error_kind") == "incomplete"),
              "failed": sum(1 for r in records if not r.get("ok") and r.get("error_kind") != "incomplete")}
    reasons: list[str] = []
    status = PASS
    if generator_reasons:
        status = "invalid"
        reasons += [f"load generator invalid: {r}" for r in generator_reasons]
    server = list(server_reasons or [])
    if counts["failed"] and not any(s.metric == "error_rate" for s in slos):
        server.append(f"{counts['failed']} of {counts['sent']} requests failed (give --slo "
                      f"'error_rate<=X' to tolerate some)")
    if not records:
        server.append("no request was recorded")
    if server:
        status = "error" if status == PASS else status
        reasons += server
    for c in checks:
        if c["verdict"] != "holds":
            if status == PASS:
                status = FAIL
            reasons.append(describe_check(c))
    return Step(rate=rate, status=status, checks=checks, reasons=reasons, dir=dir, requests=counts,
                **step_rates(records))


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "unbounded" if unit == "ms" else "-"
    if unit == "ms":
        return f"{v:,.1f} ms"
    return f"{v:.4g}"


def describe_check(c: dict[str, Any]) -> str:
    """'TTFT p99 8,231.0 ms > 200 (95% CI 7,900.2 ms - 8,610.4 ms): breaks'."""
    unit = "ms" if c["metric"].endswith("_ms") else ""
    ci = ""
    if c.get("ci"):
        ci = f" (CI {_fmt(c['ci'][0], unit)} - {_fmt(c['ci'][1], unit)})"
    value = _fmt(c["value"], unit) if c["value"] is not None or c.get("note") else "not measured"
    note = f"; {c['note']}" if c.get("note") else ""
    return f"{c['label']} {value} vs {c['op']} {c['threshold']:g}{ci}: {c['verdict']}{note}"


# -- the search ---------------------------------------------------------------------------------
@dataclass
class CapacityResult:
    """Everything a search knows; written as capacity.json at every step and at the end."""

    mode: str                                  # "live" or "virtual"
    slos: list[str]
    min_rate: float
    max_rate: float
    resolution: float
    confidence: float
    duration_per_step_s: float
    workload: dict[str, Any]
    target: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    interrupted: bool = False
    error_band: str | None = None              # virtual mode: the simulator's stated error
    started_at: float | None = None
    load: str = "rate"                         # LOADS: min/max_rate and step rates are in UNIT[load]

    def bracket(self) -> tuple[Step | None, Step | None]:
        """(highest passing step below every non-pass above it, lowest non-pass above it)."""
        passes = [s for s in self.steps if s.passed]
        fails = [s for s in self.steps if not s.passed and s.status != "interrupted"]
        lo = max(passes, key=lambda s: s.rate) if passes else None
        above = [s for s in fails if lo is None or s.rate > lo.rate]
        hi = min(above, key=lambda s: s.rate) if above else None
        return lo, hi

    def answer(self) -> dict[str, Any]:
        lo, hi = self.bracket()
        done = [s for s in self.steps if s.status != "interrupted"]
        out: dict[str, Any] = {"found": lo is not None, "rate": None, "unit": UNIT[self.load],
                               "output_tokens_per_s": None, "requests_per_s": None,
                               "step": None, "broke_at": None, "at_max_rate": False,
                               "complete": False, "text": ""}
        if hi is not None:
            out["broke_at"] = {"rate": hi.rate, "status": hi.status, "reasons": hi.reasons,
                               "step": self.steps.index(hi)}
        if lo is not None:
            out.update(rate=lo.rate, output_tokens_per_s=lo.output_tokens_per_s,
                       requests_per_s=lo.requests_per_s, step=self.steps.index(lo))
            out["at_max_rate"] = hi is None and lo.rate >= self.max_rate
            width = None if hi is None else (hi.rate - lo.rate) / lo.rate
            one_user = self.load == "users" and hi is not None and hi.rate - lo.rate <= 1
            out["complete"] = out["at_max_rate"] or one_user or (width is not None and width <= self.resolution)
        elif done and done[0].rate <= self.min_rate and hi is not None:
            out["complete"] = True
        out["text"] = self._text(lo, hi, out)
        return out

    def _text(self, lo: Step | None, hi: Step | None, ans: dict[str, Any]) -> str:
        where = " (virtual time on the simulator's replay)" if self.mode == "virtual" else ""
        unit = UNIT[self.load]
        if lo is None:
            if hi is None:
                return "no step finished" + (": interrupted" if self.interrupted else "")
            what = "breaks an SLO" if hi.status == FAIL else f"is {hi.status}"
            return (f"no capacity in range{where}: even {hi.rate:g} {unit} {what}: "
                    + "; ".join(hi.reasons))
        tok = f"{lo.output_tokens_per_s:,.0f} output tok/s" if lo.output_tokens_per_s else ""
        if self.load == "users" and lo.requests_per_s:
            tok += f"{', ' if tok else ''}{lo.requests_per_s:.3g} req/s"
        text = f"sustains {lo.rate:.4g} {unit}{f' ({tok})' if tok else ''}{where}"
        if hi is not None:
            text += f"; at {hi.rate:.4g} {unit} " + "; ".join(hi.reasons)
        elif ans["at_max_rate"]:
            flag = "--max-users" if self.load == "users" else "--max-rate"
            text += f"; {flag} {self.max_rate:g} reached, the capacity may be higher"
        if not ans["complete"]:
            text += " (search unfinished: the bracket is wider than the resolution)"
        return text

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.bracket()
        return {"schema_version": SCHEMA_VERSION, "mode": self.mode, "load": self.load,
                "unit": UNIT[self.load], "answer": self.answer(),
                "bracket": {"low": None if lo is None else lo.rate, "high": None if hi is None else hi.rate,
                            "resolution": self.resolution},
                "slos": self.slos, "confidence": self.confidence,
                "min_rate": self.min_rate, "max_rate": self.max_rate,
                "duration_per_step_s": self.duration_per_step_s,
                "workload": self.workload, "target": self.target,
                "error_band": self.error_band, "interrupted": self.interrupted,
                "started_at": self.started_at,
                "steps": [asdict(s) for s in self.steps]}


def next_rate(result: CapacityResult) -> float | None:
    """The next level (rate, or users) to measure, or None when the search is done.
    Deterministic from the steps so far (so a crashed or interrupted search is easy to read
    back). Users are whole: their bisection rounds down and ends at a one-user bracket."""
    whole = result.load == "users"
    steps = [s for s in result.steps if s.status != "interrupted"]
    if not steps:
        return result.min_rate
    if len(steps) >= MAX_STEPS:
        return None
    lo, hi = result.bracket()
    if lo is None:
        return None                      # even min_rate does not pass
    if hi is None:
        if lo.rate >= result.max_rate:
            return None
        return min(math.floor(lo.rate * GROWTH) if whole else lo.rate * GROWTH, result.max_rate)
    if (hi.rate - lo.rate) / lo.rate <= result.resolution or (whole and hi.rate - lo.rate <= 1):
        return None
    return float(math.floor((lo.rate + hi.rate) / 2.0)) if whole else (lo.rate + hi.rate) / 2.0


def search(result: CapacityResult, measure: Callable[[float], Step],
           on_step: Callable[[CapacityResult, Step], None] | None = None) -> CapacityResult:
    """Measure rates until `next_rate` says done; `on_step` after each (write capacity.json,
    print a line). A KeyboardInterrupt leaves `result` with every finished step and
    `interrupted` set, then propagates."""
    try:
        while True:
            rate = next_rate(result)
            if rate is None:
                return result
            if rate > result.max_rate:      # never offered, whatever the arithmetic
                return result
            step = measure(rate)
            result.steps.append(step)
            if on_step:
                on_step(result, step)
            if step.status == "interrupted":
                result.interrupted = True
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        result.interrupted = True
        raise


# -- presentation -------------------------------------------------------------------------------
def format_table(doc: dict[str, Any]) -> str:
    """The terminal table: one row per step in rate order, each SLO's value and verdict."""
    slos = doc["slos"]
    head = f"{doc.get('unit', 'req/s'):>9} {'status':<12}{'out tok/s':>10}  " + "  ".join(f"{s:<30}" for s in slos)
    lines = [head]
    for s in sorted(doc["steps"], key=lambda s: s["rate"]):
        cells = []
        for c in s["checks"]:
            unit = "ms" if c["metric"].endswith("_ms") else ""
            v = _fmt(c["value"], unit) if c["value"] is not None or c.get("note") else "-"
            cells.append(f"{v + ' ' + c['verdict']:<30}")
        tok = "-" if s["output_tokens_per_s"] is None else f"{s['output_tokens_per_s']:,.0f}"
        lines.append(f"{s['rate']:>9.4g} {s['status']:<12}{tok:>10}  " + "  ".join(cells))
        if s["status"] in ("invalid", "error", "interrupted"):
            lines.append(f"{'':>9} {'':<12}{'':>10}  " + "; ".join(s["reasons"]))
    lines.append("")
    lines.append(doc["answer"]["text"])
    if doc.get("error_band"):
        lines.append(f"simulator error band: {doc['error_band']}")
    return "\n".join(lines)


CALIBRATION_DOC = Path(__file__).resolve().parents[1] / "docs" / "simulator-calibration.md"


def error_band(doc: Path = CALIBRATION_DOC, regime: str | None = None) -> str:
    """The simulator's error band as docs/simulator-calibration.md states it: the first
    paragraph under a heading that names an "error band". The doc is the one place it is
    declared (benchmarks/calibration_published.py writes it from the published calibration
    set); until it has such a section, say so rather than invent a figure.

    `regime` (servers.simulator.calibration_set.band_of's names: "saturated throughput",
    "light TTFT", "light TPOT/ITL/latency") picks that regime's `REGIME: ...` clause of the
    paragraph; a regime the paragraph does not state gets the whole paragraph."""
    try:
        lines = doc.read_text().splitlines()
    except OSError:
        return f"not yet calibrated ({doc.name} not found)"
    for i, line in enumerate(lines):
        if line.startswith("#") and "error band" in line.lower():
            para: list[str] = []
            for nxt in lines[i + 1:]:
                if nxt.startswith("#"):
                    break
                if nxt.strip():
                    para.append(nxt.strip())
                elif para:
                    break
            if para:
                text = " ".join(para)
                where = f" (docs/{doc.name}, \"{line.lstrip('# ').strip()}\")"
                if regime is not None:
                    for clause in text.rstrip(".").split("; "):
                        head, sep, rest = clause.rpartition(f"{regime}: ")
                        if sep and rest and (not head or head.endswith(": ")):
                            return f"{regime}: {rest}{where}"
                return text + where
    return (f"not yet calibrated: docs/{doc.name} states no error band for the simulator yet, so "
            f"a virtual-time capacity is the model's figure with no stated error")
