"""The capacity curve: each latency SLO's value against the offered rate (or users), its threshold as a
dashed line in the same colour, the found capacity as a vertical line. Used by the plan
report (harness/report.py, a capacity stage's capacity.json) and by `harness capacity`'s
own DIR/report.html (the chart, the step table and the answer, offline, no scripts)."""
from __future__ import annotations

from html import escape
from typing import Any

from harness import svg

CLIP = 3.0   # values above CLIP x the largest threshold are drawn at that height (overload blows up)


def chart(doc: dict[str, Any], prefix: str = "") -> str:
    """The SVG of one capacity.json; "" when no step has a latency value. ``prefix`` (a plan
    stage's name) goes before the title, which says what the x axis is: rate or users."""
    metrics = []
    for s in doc.get("steps") or []:
        for c in s.get("checks") or []:
            if c["metric"].endswith("_ms") and c["metric"] not in [m for m, _, _ in metrics]:
                metrics.append((c["metric"], c["label"], c["threshold"]))
    if not metrics:
        return ""
    top = CLIP * max(t for _, _, t in metrics)
    steps = sorted((s for s in doc["steps"] if s.get("status") != "interrupted"), key=lambda s: s["rate"])
    series, rules, clipped = [], [], False
    for i, (metric, label, threshold) in enumerate(metrics):
        pts = []
        for s in steps:
            c = next((c for c in s["checks"] if c["metric"] == metric), None)
            if c is None or (c["value"] is None and not c.get("note")):
                continue
            v = c["value"]
            if v is None or v > top:
                v, clipped = top, True
            pts.append((s["rate"], v))
        series.append((label, pts))
        rules.append(("y", threshold, f"SLO {label} <= {threshold:g} ms", i))
    ans = doc.get("answer") or {}
    users = doc.get("load") == "users"
    unit = "users" if users else "req/s"
    if ans.get("found") and ans.get("rate"):
        tok = f", {ans['output_tokens_per_s']:,.0f} tok/s" if ans.get("output_tokens_per_s") else ""
        rules.append(("x", ans["rate"], f"capacity {ans['rate']:.4g} {unit}{tok}", -1))
    mode = " (virtual time)" if doc.get("mode") == "virtual" else ""
    head = prefix + ("Latency at each step vs concurrent users" if users else "Latency at each step vs offered rate")
    if clipped:
        head += f"; above {top:,.0f} ms drawn at the top"
    return svg.line_chart(head + mode, "concurrent users" if users else "offered requests/s", "ms", series,
                          cls="capacity-curve", rules=rules)


def render_html(doc: dict[str, Any], title: str = "harness capacity") -> str:
    from harness.report import CSS

    unit = doc.get("unit") or "req/s"
    rows = []
    for s in sorted(doc["steps"], key=lambda s: s["rate"]):
        cells = "".join(f"<td>{escape(_cell(c))}</td>" for c in s["checks"])
        tok = "-" if s.get("output_tokens_per_s") is None else f"{s['output_tokens_per_s']:,.0f}"
        why = "; ".join(s.get("reasons") or []) if s["status"] != "pass" else ""
        rows.append(f'<tr><td class="num">{s["rate"]:.4g}</td><td class="{_cls(s["status"])}">'
                    f"{escape(s['status'])}</td><td class=\"num\">{tok}</td>{cells}"
                    f"<td>{escape(str(s.get('dir') or '-'))}</td><td>{escape(why)}</td></tr>")
    head = "".join(f"<th>{escape(x)}</th>" for x in doc["slos"])
    band = (f"<p class=\"muted\">Virtual time on the simulator's replay, no server; the simulator's "
            f"error band: {escape(str(doc.get('error_band')))}</p>" if doc.get("mode") == "virtual" else "")
    return "\n".join([
        f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p id=\"answer\"><b>{escape(doc['answer']['text'])}</b></p>", band,
        f"<p class=\"muted\">SLOs {escape(', '.join(doc['slos']))}; a step passes only when every "
        f"SLO's {doc['confidence'] * 100:g}% block-bootstrap interval is within it; bracket "
        f"{doc['bracket']['low']} - {doc['bracket']['high']} {unit}, resolution "
        f"{doc['resolution'] if 'resolution' in doc else doc['bracket']['resolution']:g}.</p>",
        chart(doc) or '<p class="muted">no latency values to plot</p>',
        f"<table class=\"capacity-steps\"><thead><tr><th>{unit}</th><th>status</th><th>output tok/s</th>"
        f"{head}<th>results</th><th>why not a pass</th></tr></thead><tbody>",
        *rows, "</tbody></table></body></html>"])


def _cell(c: dict[str, Any]) -> str:
    unit = " ms" if c["metric"].endswith("_ms") else ""
    v = "unbounded" if c["value"] is None and c.get("note") else "-" if c["value"] is None else f"{c['value']:,.4g}{unit}"
    ci = "" if not c.get("ci") else " [" + ", ".join("inf" if x is None else f"{x:,.4g}" for x in c["ci"]) + "]"
    return f"{v}{ci} {c['verdict']}"


def _cls(status: str) -> str:
    return {"pass": "pass", "fail": "fail", "error": "error", "invalid": "invalid"}.get(status, "notrun")
