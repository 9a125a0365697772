"""The run report: ``report.html`` (self-contained, offline, inline SVG) and ``report.md``.

Built from a run directory alone (``run.json``, each stage's ``result.json``/``error.json``, the
load runs' ``timeseries.jsonl``, the hardware stage's ``hardware.json``), so it can be rewritten
at any time (``harness run PLAN --out DIR --report-only``). Sections:

1. run and environment (GPUs, driver, vLLM, lm-eval and harness versions);
2. stages: status, duration, what ran; the ``invalid`` ones (figures that cannot be trusted:
   a load generator that could not keep up, a hardware run short of what it was asked) apart,
   with the reasons, in their own colour;
3. the plan's tables (the seed's, by each stage's ``table``/``row``): every expected figure with
   the measured one beside it, pass/fail, and the physics mark of both;
4. the physics check: every target and measured figure held against the roofline;
5. cost per million output tokens per layout, each cell saying measured or expected;
6. system figures (the comparison table) against the datasheets;
7. each stage kind's own sections (its ``report_tables`` hook: the hardware stages' power per
   GPU, the perplexity table of perplexity, throughput and memory relative to the baseline);
8. plots, each stage's own (its ``report_charts`` hook): latency percentiles vs rate, TTFT/TPOT
   over time, the capacity curve, the P2P heat map, perplexity vs throughput.

The physics shown is what the runner stored in ``run.json`` (``target_marks``, ``datasheet``)
and each stage in its result: the report judges nothing again.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from harness.stages.contract import hook

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin-top:20px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#176d27;font-weight:600}.fail,.error{color:#b00020;font-weight:600}
.invalid{color:#a85200;font-weight:600;font-style:italic}
.informational{color:#555;font-style:italic}
.skipped,.nm,.notrun{color:#777}.impossible,.measurement-error{color:#b00020;font-weight:600}
.ok{color:#176d27}.muted{color:#666;font-size:12px}
.chart{display:block;margin:8px 0 20px;max-width:100%;height:auto}
.ct{font-size:13px;font-weight:600}.tk{font-size:10px;fill:#444}.al{font-size:11px;fill:#333}
.lg{font-size:11px;fill:#333}.cv{font-size:10px;fill:#fff}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
"""


# --- loading ---------------------------------------------------------------------------------

def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    run = json.loads((run_dir / "run.json").read_text())
    results: dict[str, dict[str, Any]] = {}
    for s in run["plan"]["stages"]:
        for fname in ("result.json", "error.json"):
            p = run_dir / s["name"] / fname
            if p.exists():
                try:
                    results[s["name"]] = json.loads(p.read_text())
                except ValueError:
                    continue
                break
    return run, results


# --- formatting --------------------------------------------------------------------------------

def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def verdict(check: dict[str, Any]) -> str:
    from harness.stages.expect import verdict as check_verdict

    return check_verdict(check)


def _cls(text: str) -> str:
    return {"pass": "pass", "FAIL": "fail", "fail": "fail", "error": "error", "skipped": "skipped",
            "invalid": "invalid", "missed (informational)": "informational",
            "met (informational)": "informational",
            "not measured": "nm", "not run": "notrun", "impossible": "impossible",
            "measurement error": "measurement-error", "ok": "ok"}.get(text, "")


def physics_index(results: dict[str, dict[str, Any]], run: dict[str, Any] | None = None
                  ) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(stage, metric, source) -> physics mark: the plan's targets as the runner judged them
    (``run.json``'s ``target_marks``, from the plan alone, so a stage that never ran still shows
    them), then what each stage recorded."""
    idx = {}
    if run is not None:
        for name, marks in (run.get("target_marks") or {}).items():
            for ph in marks:
                idx[(name, ph["metric"], ph["source"])] = ph
    for name, r in results.items():
        for ph in r.get("physics") or []:
            idx[(name, ph["metric"], ph["source"])] = ph
    return idx


# --- the tables (plain data, shared by HTML and Markdown) ------------------------------------

def environment_rows(run: dict[str, Any]) -> list[list[str]]:
    env = run.get("environment") or {}
    gpus = env.get("gpus") or []
    if isinstance(gpus, list):
        counts: dict[str, int] = {}
        for g in gpus:
            counts[str(g)] = counts.get(str(g), 0) + 1
        gpus_text = ", ".join(f"{c} x {g}" for g, c in counts.items()) or "none found"
    else:
        gpus_text = str(gpus)
    return [["GPUs", gpus_text], ["driver", fmt(env.get("driver"))], ["vLLM", fmt(env.get("vllm"))],
            ["lm-eval", fmt(env.get("lm_eval"))], ["harness", fmt(env.get("harness"))],
            ["Python", fmt(env.get("python"))], ["platform", fmt(env.get("platform"))],
            ["host", fmt(env.get("hostname"))]]


def stage_rows(run: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in run["plan"]["stages"]:
        r = results.get(s["name"])
        status = r["status"] if r else "not run"
        rows.append([s["name"], s["stage"], status, fmt(r.get("duration_s")) + " s" if r else "-",
                     (r or {}).get("detail") or s.get("description") or ""])
    return rows


INFORMATIONAL_NOTE = ("Targets marked informational (informational: true in the plan) are judged and "
                      "shown here, but a miss fails neither the stage nor the plan: they keep a reference "
                      "figure (such as the seed's, on hardware that cannot meet it) beside the targets "
                      "that decide the run.")


def has_informational(tables: list[tuple[str, list[list[str]]]]) -> bool:
    return any("(informational)" in row[4] for _, rows in tables for row in rows)


INVALID_NOTE = ("Their figures cannot be trusted: a load generator that could not keep up measured "
                "itself, not the server (add workers or loosen cpu_limit / lag_limit_ms), and a hardware "
                "run short of what it was asked has not validated it. A missed target there is no "
                "verdict; the plan's on_invalid says what the run counted them as.")


def invalid_rows(run: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """[stage, "invalid", why]: every stage whose result lists reasons its figures cannot be
    trusted, also one the plan's ``on_invalid`` counted as pass or fail (the why says so)."""
    rows = []
    for s in run["plan"]["stages"]:
        r = results.get(s["name"]) or {}
        if not r.get("invalid"):
            continue
        counted = (f" (counted as {r.get('status')}: on_invalid: {r['on_invalid']})"
                   if r.get("on_invalid") else "")
        rows.append([s["name"], "invalid", "; ".join(r["invalid"]) + counted])
    return rows


def _measured_cell(stage: dict[str, Any], metric: str, measured: Any) -> str:
    """A measured figure; from a simulator target it is the model's, so it carries the
    calibration's error band for its regime (harness.sim_band)."""
    shown = fmt(measured)
    if measured is None or not (stage.get("target") or {}).get("simulator"):
        return shown
    from harness.sim_band import short_band
    band = short_band(metric)
    return f"{shown} (simulated; {band})" if band else f"{shown} (simulated)"


def plan_tables(run: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[tuple[str, list[list[str]]]]:
    """[(table name, rows)] rows: row, metric, expected, measured, result, physics of target,
    physics of measurement, stage."""
    ph = physics_index(results, run)
    tables: dict[str, list[list[str]]] = {}
    for s in run["plan"]["stages"]:
        table = s.get("table")
        if not table:
            continue
        r = results.get(s["name"]) or {}
        status = r.get("status", "not run")
        checks = r.get("checks") or []
        if not checks:
            from harness.stages.expect import check_all

            checks = check_all(s.get("expect") or {}, {})
            for c in checks:
                c["passed"] = None
        for c in checks:
            metric = c["metric"]
            pt = ph.get((s["name"], metric, "target"))
            pm = ph.get((s["name"], metric, "measured"))
            # a figure not measured says why whatever the stage's status (P2P on one GPU)
            shown = status in ("pass", "fail") or (c.get("passed") is None and c.get("why"))
            result = verdict(c) if shown else status
            tables.setdefault(table, []).append([
                s.get("row") or s["name"], metric, c.get("target_text") or fmt(c.get("target")),
                _measured_cell(s, metric, c.get("measured")), result,
                f"{pt['mark']}: {pt['detail']}" if pt else "-",
                f"{pm['mark']}: {pm['detail']}" if pm else "-", s["name"]])
    return list(tables.items())


def physics_rows(results: dict[str, dict[str, Any]], run: dict[str, Any] | None = None) -> list[list[str]]:
    rows = []
    for (name, _metric, _source), p in physics_index(results, run).items():
        rows.append([name, p["metric"], p["source"], fmt(p.get("value")), fmt(p.get("bound")),
                     p["mark"], p.get("detail") or ""])
    order = {"impossible": 0, "measurement error": 1, "ok": 2}
    rows.sort(key=lambda x: (order.get(x[5], 3), x[0]))
    return rows


def cost_rows(run: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in run.get("costs") or []:
        rows.append([c["layout"], str(c["gpus"]),
                     f"{fmt(c.get('output_tokens_per_s'))} ({c['throughput_source']})",
                     f"{fmt(c.get('watts_per_gpu'))} W ({c['power_source']})",
                     f"{c['cost_per_hour']:.3f} {c['currency']}/h", c.get("basis") or "",
                     (f"{c['cost_per_million_tokens']:.4f} {c['currency']} ({c['throughput_source']})"
                      if c.get("cost_per_million_tokens") is not None else "-")])
    return rows


def system_rows(run: dict[str, Any]) -> list[list[str]]:
    """The plan's ``system:`` figures beside the datasheet's, as the runner stored them."""
    system = run["plan"].get("system") or {}
    sheet = run.get("datasheet") or {}
    if not system or not sheet:
        return []
    rows = []
    for k, v in system.items():
        d = sheet.get(k)
        if isinstance(v, (int, float)) and isinstance(d, (int, float)):
            if k == "tokens_per_s_per_gpu_7b":
                mark = "impossible (above the hardware ceiling)" if v > d else "ok (below the hardware ceiling)"
            else:
                mark = "ok" if abs(v - d) <= 0.05 * d else f"differs from the datasheet by {100 * (v / d - 1):+.0f}%"
        else:
            mark = "-"
        rows.append([k, fmt(v), fmt(d), mark])
    return rows


# --- what each stage kind adds (its contract hooks) ---------------------------------------------

def stage_sections(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(key, title, head, rows) of the stages' own sections (their ``report_tables`` hook): one
    per key, the rows of every stage that adds it together, in stage order."""
    merged: dict[str, tuple[str, list[str], list[list[str]]]] = {}
    for name, r in results.items():
        tables = hook(str(r.get("stage")), "report_tables")
        for key, title, head, rows in (tables(name, r) if tables is not None else []):
            if rows:
                merged.setdefault(key, (title, head, []))[2].extend(rows)
    return [(key, title, head, rows) for key, (title, head, rows) in merged.items()]


def stage_charts(run_dir: Path, results: dict[str, dict[str, Any]]) -> list[str]:
    """The stages' charts (their ``report_charts`` hook), in stage order."""
    charts: list[str] = []
    for name, r in results.items():
        plots = hook(str(r.get("stage")), "report_charts")
        if plots is not None:
            charts += plots(run_dir, name, r)
    return charts


# --- rendering -----------------------------------------------------------------------------------

def _html_table(head: list[str], rows: list[list[str]], cls: str = "", status_cols: tuple[int, ...] = ()) -> str:
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            klass = _cls(c.split(":")[0]) if i in status_cols else ""
            num = " num" if c and c[0].isdigit() and i not in status_cols else ""
            cells.append(f'<td class="{klass}{num}">{escape(c)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


TABLE_HEAD = ["row", "metric", "expected", "measured", "result", "physics (expected)", "physics (measured)", "stage"]
STAGE_HEAD = ["stage", "kind", "status", "duration", "detail"]
INVALID_HEAD = ["stage", "status", "why its figures cannot be trusted"]
PHYS_HEAD = ["stage", "figure", "of", "value", "bound", "mark", "detail"]
COST_HEAD = ["layout", "GPUs", "output tok/s", "power per GPU", "cost per hour", "basis", "cost per 1M output tokens"]
SYS_HEAD = ["figure", "plan", "datasheet", "check"]


def render_html(run_dir: Path) -> str:
    run, results = load_run(run_dir)
    plan = run["plan"]
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(plan['name'])} "
             f"- llm-harness report</title><style>{CSS}</style></head><body>",
             f"<h1>Plan {escape(plan['name'])}: <span class=\"{_cls(run.get('status', ''))}\" id=\"run-status\">"
             f"{escape(run.get('status', ''))}</span></h1>"]
    if plan.get("description"):
        parts.append(f"<p>{escape(plan['description'])}</p>")
    runs = run.get("runs") or []
    if runs:
        parts.append(f'<p class="muted">run directory {escape(str(run_dir))}; {len(runs)} invocation(s), '
                     f"last started {escape(str(runs[-1].get('started_at')))}; plan file "
                     f"{escape(str(run.get('plan_source')))}</p>")
    parts.append('<h2 id="environment">Environment</h2>')
    parts.append(_html_table(["", ""], environment_rows(run), "environment"))
    parts.append('<h2 id="stages">Stages</h2>')
    parts.append(_html_table(STAGE_HEAD, stage_rows(run, results), "stages", status_cols=(2,)))
    invalid = invalid_rows(run, results)
    if invalid:
        parts.append(f'<h3 id="invalid" class="invalid">Invalid: {len(invalid)} stage(s)</h3>'
                     f'<p class="muted">{escape(INVALID_NOTE)}</p>')
        parts.append(_html_table(INVALID_HEAD, invalid, "invalid-stages", status_cols=(1,)))
    tables = plan_tables(run, results)
    if tables:
        parts.append('<h2 id="tables">Expected vs measured (the plan\'s tables)</h2>')
        if has_informational(tables):
            parts.append(f'<p class="muted informational-note">{escape(INFORMATIONAL_NOTE)}</p>')
        for name, rows in tables:
            parts.append(f"<h3>{escape(name)}</h3>")
            parts.append(_html_table(TABLE_HEAD, rows, "plan-table", status_cols=(4, 5, 6)))
    for name, r in results.items():
        if r.get("status") == "error":
            parts.append(f"<h3>{escape(name)}: error</h3><pre>{escape(r.get('detail') or '')}</pre>")
    phys = physics_rows(results, run)
    sysrows = system_rows(run)
    if phys or sysrows:
        parts.append('<h2 id="physics">Physics check</h2><p class="muted">Targets and measurements held '
                     "against the roofline floor of the GPU and model (ideal card: datasheet peaks, no "
                     "overhead). A target past it is impossible; a measurement past it is a measurement "
                     "error to investigate.</p>")
        if phys:
            parts.append(_html_table(PHYS_HEAD, phys, "physics", status_cols=(5,)))
        if sysrows:
            parts.append("<h3>System figures</h3>")
            parts.append(_html_table(SYS_HEAD, sysrows, "system"))
    costs = cost_rows(run)
    if costs:
        parts.append('<h2 id="cost">Cost per million output tokens</h2>')
        parts.append(_html_table(COST_HEAD, costs, "cost"))
    for key, title, head, rows in stage_sections(results):
        parts.append(f'<h2 id="{escape(key)}">{escape(title)}</h2>')
        parts.append(_html_table(head, rows, key))
    charts = stage_charts(run_dir, results)
    parts.append('<h2 id="plots">Plots</h2>')
    parts.extend(charts or ['<p class="muted">no data to plot in this run</p>'])
    parts.append("</body></html>")
    return "\n".join(parts)


def render_md(run_dir: Path) -> str:
    run, results = load_run(run_dir)
    plan = run["plan"]
    out = [f"# Plan {plan['name']}: {run.get('status')}", ""]
    if plan.get("description"):
        out += [plan["description"], ""]
    out += ["## Environment", "", md_table(["", ""], environment_rows(run)), "",
            "## Stages", "", md_table(STAGE_HEAD, stage_rows(run, results)), ""]
    invalid = invalid_rows(run, results)
    if invalid:
        out += [f"### INVALID: {len(invalid)} stage(s)", "", INVALID_NOTE, "",
                md_table(INVALID_HEAD, [[n, f"**{st.upper()}**", why] for n, st, why in invalid]), ""]
    tables = plan_tables(run, results)
    if has_informational(tables):
        out += [INFORMATIONAL_NOTE, ""]
    for name, rows in tables:
        out += [f"## {name}", "", md_table(TABLE_HEAD, rows), ""]
    phys = physics_rows(results, run)
    if phys:
        out += ["## Physics check", "", md_table(PHYS_HEAD, phys), ""]
    sysrows = system_rows(run)
    if sysrows:
        out += ["## System figures", "", md_table(SYS_HEAD, sysrows), ""]
    costs = cost_rows(run)
    if costs:
        out += ["## Cost per million output tokens", "", md_table(COST_HEAD, costs), ""]
    for _key, title, head, rows in stage_sections(results):
        out += [f"## {title}", "", md_table(head, rows), ""]
    out += ["Plots (latency vs rate, TTFT/TPOT over time, P2P heat map, perplexity vs throughput) are in "
            "report.html.", ""]
    return "\n".join(out)


def write(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    html_path.write_text(render_html(run_dir))
    md_path.write_text(render_md(run_dir))
    return [html_path, md_path]
