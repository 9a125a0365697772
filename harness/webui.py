"""An "LLM" tab in Locust's own web UI, a live charts page, and a rate control.

Built on Locust's extension points (no JavaScript build): the tab and its table come
from the web UI's template args (`extended_tabs`, `extended_tables`) and an
`extended_stats` key this module adds to every `/stats/requests` answer; the numbers
come from the run's merged HDR histograms and counters (`environment.llm_aggregate`),
never from Locust's rounded response-time buckets. On a local runner the aggregate is
refreshed on each request (the same exact merge the window greenlet does); on a master
it is as fresh as the workers' last reports (every 3 s).

Routes (under `--web-base-path` when set):

- `GET  /llm/charts`      the charts page: TTFT and TPOT p50/p99, tokens/s and the
                          server's running/waiting requests and KV-cache use over time,
                          one point per timeseries window (`--llm-window`), plus a form
                          that changes the open-loop rate; drawn with uPlot, vendored
                          in `harness/static/` (works offline).
- `GET  /llm/timeseries`  the windows so far as JSON (`?since=<epoch s>` for new ones, and
                          `&rev=<n>` for the earlier ones whose output tokens grew since
                          revision n: tokens are booked to the window they streamed in).
- `GET  /llm/stats`       the tab's numbers as JSON: its rows, the notes on their empty
                          cells, and each SLO judged on the run so far.
- `POST /llm/rate`        `rate=<requests/s>` (form or JSON): the open-loop rate of the
                          running test on every worker; 0 switches to closed loop.
- `GET  /llm/static/...`  the page's scripts.

A small script injected into Locust's index page (static/llm-tab.js) adds to the open LLM
tab a link to the charts page and, below the table, each SLO's live value and PASS/FAIL and
what each dash in the table means; its stylesheet keeps the table within a 1400 px window.
Locust's DOWNLOAD DATA tab links to the charts page too.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import pathlib
import time
from typing import Any
from collections.abc import Iterable, Mapping

from flask import Response, jsonify, request, send_from_directory

from harness.histograms import HistogramSet
from harness.metric_catalog import LATENCY
from harness.results import Counters

log = logging.getLogger(__name__)

STATIC = pathlib.Path(__file__).resolve().parent / "static"
TAB_KEY = "llm"
TIMELINE_MAX = 20_000           # windows kept for the charts (5 s windows: about a day)
AGGREGATE_ROW = "All (merged)"

_LAT = tuple((m.name, m.field, m.label) for m in (LATENCY[n] for n in ("ttft", "tpot", "itl", "e2e")))
_PCTS = ("p50", "p90", "p99")

TABLE_STRUCTURE: list[dict[str, str]] = (
    [{"key": "name", "title": "Endpoint [model]"}, {"key": "ok", "title": "OK"},
     {"key": "failed", "title": "Failed"}]
    + [{"key": f"{short}_{p}", "title": f"{label} {p} ms"} for short, _m, label in _LAT for p in _PCTS]
    + [{"key": "out_tok_s", "title": "Output tok/s"}, {"key": "req_s", "title": "Req/s"},
       {"key": "goodput_rps", "title": "Goodput req/s"}, {"key": "errors", "title": "Errors by kind"}]
)


DASH = "\u2013"   # a table cell with no value yet; the tab's notes say why


def _r(v: float | None, nd: int = 1) -> float | None:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return round(float(v), nd)


def _row(name: str, hs: HistogramSet, c: Counters, duration: float) -> tuple[dict[str, Any], list[str]]:
    """One endpoint's (or the merged) row, None where a value does not exist yet, and a note
    for each such gap saying why (the tab shows a dash there and the note below the table)."""
    row: dict[str, Any] = {"name": name, "ok": c.completed, "failed": c.failed}
    for short, metric, _label in _LAT:
        s = hs.summary(metric)
        for p in _PCTS:
            row[f"{short}_{p}"] = _r(s[p])
    timed = duration > 0
    row["out_tok_s"] = _r(c.output_tokens / duration, 1) if timed else None
    row["req_s"] = _r(c.completed / duration, 2) if timed else None
    row["goodput_rps"] = _r(c.good / duration, 2) if timed else None
    row["errors"] = ", ".join(f"{k}: {v}" for k, v in sorted(c.errors_by_kind.items())) or "none"
    notes = []
    if c.completed == 0:
        why = (f"every request so far failed ({c.failed}; see Errors by kind)" if c.failed
               else "no request has finished yet")
        notes.append(f"{name}: latencies {DASH} {why}")
    else:
        for short, label in (("tpot", "TPOT"), ("itl", "ITL")):
            if row[f"{short}_p50"] is None:
                notes.append(f"{name}: {label} {DASH} no response so far streamed more than one "
                             f"token ({label} needs two)")
    if not timed:
        notes.append(f"{name}: rates {DASH} no request has finished yet, so no measured time")
    return row, notes


def live_rows(environment) -> tuple[list[dict[str, Any]], list[str]]:
    """The tab's rows from the merged data (a row per endpoint, then the merged row) and the
    notes on their empty cells."""
    agg = environment.llm_aggregate
    agg.refresh()
    duration = agg.measured_window(time.time())
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in sorted(set(agg.by_name) | set(agg.counters_by_name)):
        row, why = _row(name, agg.by_name.get(name) or HistogramSet(),
                        agg.counters_by_name.get(name) or Counters(), duration)
        rows.append(row)
        notes += why
    total, why = _row(AGGREGATE_ROW, agg.hist, agg.counters, duration)
    return rows + [total], notes + why


def live_stats(environment) -> dict[str, Any]:
    """What `/llm/stats` returns and the tab's panel shows: the rows and notes, and each SLO
    judged now (harness.slo, on the run's summary as it stands: the same judgement as
    summary.json's at the end)."""
    rows, notes = live_rows(environment)
    agg = environment.llm_aggregate
    state = environment.llm
    now = time.time()
    c = agg.counters
    slo = agg.figures(now)["slo"] if state.slos else {"passed": None, "checks": []}
    runner = environment.runner
    return {"rows": rows, "notes": notes, "rate": state.rate, "slos": [s.text for s in state.slos],
            "slo": slo, "state": getattr(runner, "state", None),
            "user_count": getattr(runner, "user_count", 0),
            "duration_s": agg.measured_window(now), "input_tokens": c.input_tokens,
            "output_tokens": c.output_tokens, "good": c.good}


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tab's table: every cell a value, or the dash that the notes explain."""
    return [{k: DASH if v is None else v for k, v in row.items()} for row in rows]


class Timeline:
    """The timeseries windows kept in memory for the charts page (a window hook, and a revision
    hook: a window's output tokens grow as requests that streamed in it finish later)."""

    REVISED = ("output_tokens", "output_tokens_per_s")

    def __init__(self, maxlen: int = TIMELINE_MAX) -> None:
        self.lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self.revision = 0

    def __call__(self, line: dict[str, Any]) -> None:
        self.lines.append(json.loads(json.dumps(line, default=str)))   # a frozen copy

    def revise(self, line: dict[str, Any]) -> None:
        for mine in reversed(self.lines):   # revisions touch the latest windows
            if mine.get("t") == line.get("t"):
                self.revision += 1
                mine.update({k: line.get(k) for k in self.REVISED}, rev=self.revision)
                return

    def since(self, t: float) -> list[dict[str, Any]]:
        return [ln for ln in self.lines if ln.get("t", 0) > t]

    def revised_since(self, rev: int, t: float) -> list[dict[str, Any]]:
        """Lines up to `t` whose tokens changed after revision `rev` (the page has the rest)."""
        return [ln for ln in self.lines if ln.get("t", 0) <= t and ln.get("rev", 0) > rev]


def parse_rate(value: Any) -> float:
    """A posted rate (form text or a JSON number): requests/s in 0..harness.arrivals.MAX_RATE;
    ValueError (the ceiling and why, a boolean, a list, a missing value) otherwise."""
    from harness.arrivals import check_rate

    if value is None or value == "":
        raise ValueError("give rate=<requests/s> (0 = closed loop)")
    return check_rate(value)


# Start-form keys Locust handles itself (`/swarm`), each with its own parsing. Any other posted
# key that names a parsed option is copied into the options as it is: only those the form
# shows (`include_in_web_ui`) may be, never e.g. the API key's source or the results directory.
LOCUST_FORM_KEYS = frozenset({"user_count", "spawn_rate", "host", "run_time", "user_classes",
                              "shape_class", "profile"})


def forbidden_form_keys(form_keys: Iterable[str], options: Mapping[str, Any],
                        shown: Iterable[str]) -> list[str]:
    """The posted keys that would set an option the start form does not show."""
    allowed = LOCUST_FORM_KEYS | set(shown)
    return sorted({k for k in form_keys if k in options and k not in allowed})


def _tab_assets(prefix: str) -> str:
    """What the index page gets before </body>: the LLM tab's stylesheet and script."""
    return (f'<link rel="stylesheet" href="{prefix}/llm/static/llm-tab.css">'
            f'<script src="{prefix}/llm/static/llm-tab.js" defer></script>')


def install(environment, web_ui) -> None:
    """Add the tab, the routes and the hooks to a running web UI (master or local runner)."""
    from harness.run_state import set_rate

    app = web_ui.app
    prefix = (getattr(environment.parsed_options, "web_base_path", "") or "").rstrip("/")
    timeline = Timeline()
    environment.llm_timeline = timeline
    environment.llm_aggregate.window_hooks.append(timeline)
    environment.llm_aggregate.revision_hooks.append(timeline.revise)

    web_ui.template_args.update({
        "extended_tabs": [{"title": "LLM", "key": TAB_KEY}],
        "extended_tables": [{"key": TAB_KEY, "structure": TABLE_STRUCTURE}],
        "extended_csv_files": [{"href": f"{prefix}/llm/charts", "title": "LLM charts and rate control (live)"},
                               {"href": f"{prefix}/llm/stats", "title": "LLM statistics (JSON)"},
                               {"href": f"{prefix}/metrics", "title": "Prometheus metrics"}],
    })

    @app.after_request
    def _extend(response: Response) -> Response:
        path = request.path
        try:
            if path == f"{prefix}/stats/requests" and response.is_json and response.status_code == 200:
                data = response.get_json()
                data["extended_stats"] = [{"key": TAB_KEY, "data": table_rows(live_rows(environment)[0])}]
                response.set_data(json.dumps(data))
            elif path in (f"{prefix}/", prefix or "/") and response.mimetype == "text/html" \
                    and response.status_code == 200 and not response.direct_passthrough:
                html = response.get_data(as_text=True)
                if "llm-tab.js" not in html and "</body>" in html:
                    response.set_data(html.replace("</body>", _tab_assets(prefix) + "</body>", 1))
        except Exception:  # the UI must keep working even if our part fails
            log.exception("LLM web UI extension failed for %s", path)
        return response

    from locust.argument_parser import ui_extra_args_dict
    shown = frozenset(ui_extra_args_dict())   # what the start form offers, as Locust builds it

    @app.before_request
    def _guard_start_form():
        if request.method != "POST" or request.path != f"{prefix}/swarm":
            return None
        bad = forbidden_form_keys(request.form.keys(), vars(environment.parsed_options) if environment.parsed_options else {}, shown)
        if not bad:
            return None
        msg = (f"refused: {', '.join(bad)} cannot be set from the web UI (only the start form's "
               f"fields can); set it on the command line")
        log.warning("web UI start form %s", msg)
        return jsonify({"success": False, "message": msg, "host": environment.host}), 400

    auth = web_ui.auth_required_if_enabled

    @app.route(f"{prefix}/llm/charts")
    @auth
    def llm_charts():
        return send_from_directory(STATIC, "llm-charts.html")

    @app.route(f"{prefix}/llm/static/<path:name>")
    @auth
    def llm_static(name: str):
        return send_from_directory(STATIC, name)

    @app.route(f"{prefix}/llm/stats")
    @auth
    def llm_stats():
        return jsonify(live_stats(environment))

    @app.route(f"{prefix}/llm/timeseries")
    @auth
    def llm_timeseries():
        try:
            since = float(request.args.get("since", "0") or 0)
            rev = int(request.args.get("rev", "0") or 0)
        except ValueError:
            since, rev = 0.0, 0
        runner = environment.runner
        return jsonify({"lines": timeline.since(since), "revised": timeline.revised_since(rev, since),
                        "rev": timeline.revision, "rate": environment.llm.rate,
                        "state": getattr(runner, "state", None),
                        "user_count": getattr(runner, "user_count", 0),
                        "window_s": environment.llm.window_s,
                        "now": time.time()})

    @app.route(f"{prefix}/llm/rate", methods=["POST"])
    @auth
    def llm_rate():
        payload = request.get_json(silent=True) if request.is_json else request.form
        try:
            if not isinstance(payload, Mapping):
                raise ValueError("post a form or a JSON object with rate=<requests/s>")
            rate = parse_rate(payload.get("rate"))
        except (TypeError, ValueError) as exc:
            return jsonify({"ok": False, "message": str(exc)}), 400
        set_rate(environment, rate)
        log.info("open-loop rate set to %g requests/s from the web UI", rate)
        return jsonify({"ok": True, "rate": rate})
