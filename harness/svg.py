"""Small inline-SVG charts for the offline report: lines, scatter, heat map. No dependencies.

Every chart is a ``<svg>`` string with a ``<title>``, axis labels and a legend, sized in CSS
pixels; the report embeds them as they are (no scripts, no external fonts).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from html import escape
from collections.abc import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
W, H = 640, 320
ML, MR, MT, MB = 64, 150, 30, 46
Scale = Callable[[float], float]   # a data value to its pixel coordinate


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.floor(lo / step) * step
    ticks: list[float] = []
    t = start
    while t <= hi + step * 0.5 and len(ticks) < 20:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def _frame(title: str, xlabel: str, ylabel: str, xt: list[float], yt: list[float],
           sx: Scale, sy: Scale, cls: str) -> list[str]:
    out = [f'<svg class="chart {cls}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" '
           f'width="{W}" height="{H}" role="img" aria-label="{escape(title)}">',
           f"<title>{escape(title)}</title>",
           f'<text x="{ML}" y="18" class="ct">{escape(title)}</text>',
           f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" fill="none" stroke="#999"/>']
    for t in xt:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{H - MB}" x2="{x:.1f}" y2="{H - MB + 4}" stroke="#666"/>')
        out.append(f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle" class="tk">{_fmt(t)}</text>')
    for t in yt:
        y = sy(t)
        out.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end" class="tk">{_fmt(t)}</text>')
    out.append(f'<text x="{(ML + W - MR) / 2:.0f}" y="{H - 8}" text-anchor="middle" class="al">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {(MT + H - MB) / 2:.0f}) rotate(-90)" text-anchor="middle" '
               f'class="al">{escape(ylabel)}</text>')
    return out


def _scales(xs: Sequence[float], ys: Sequence[float],
            y0: bool = True) -> tuple[list[float], list[float], Scale, Scale]:
    xlo, xhi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if y0:
        ylo = min(0.0, ylo)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    if yhi == ylo:
        yhi = ylo + (abs(ylo) or 1.0)
    xt, yt = _nice_ticks(xlo, xhi), _nice_ticks(ylo, yhi * 1.05)
    xlo, xhi = min(xt[0], xlo), max(xt[-1], xhi)
    ylo, yhi = min(yt[0], ylo), max(yt[-1], yhi)
    sx = lambda v: ML + (v - xlo) / (xhi - xlo) * (W - ML - MR)  # noqa: E731
    sy = lambda v: H - MB - (v - ylo) / (yhi - ylo) * (H - MT - MB)  # noqa: E731
    return xt, yt, sx, sy


def line_chart(title: str, xlabel: str, ylabel: str,
               series: Sequence[tuple[str, Sequence[tuple[float, float]]]], cls: str = "line",
               markers: bool = True,
               rules: Sequence[tuple[str, float, str, int]] = ()) -> str:
    """rules: dashed reference lines (axis "x" or "y", value, label, colour index), e.g. an
    SLO's threshold (y) drawn in its series' colour, or a found capacity (x); the axes
    stretch to show them."""
    pts = [(x, y) for _, s in series for x, y in s if x is not None and y is not None]
    xs = [p[0] for p in pts] + [v for a, v, _, _ in rules if a == "x"]
    ys = [p[1] for p in pts] + [v for a, v, _, _ in rules if a == "y"]
    xt, yt, sx, sy = _scales(xs, ys)
    out = _frame(title, xlabel, ylabel, xt, yt, sx, sy, cls)
    for axis, v, label, ci in rules:
        color = PALETTE[ci % len(PALETTE)] if ci >= 0 else "#444"
        if axis == "y":
            out.append(f'<line class="rule" data-name="{escape(label)}" x1="{ML}" y1="{sy(v):.1f}" '
                       f'x2="{W - MR}" y2="{sy(v):.1f}" stroke="{color}" stroke-dasharray="5 4"/>'
                       f'<text x="{W - MR - 4}" y="{sy(v) - 4:.1f}" text-anchor="end" class="tk">'
                       f"{escape(label)}</text>")
        else:
            out.append(f'<line class="rule" data-name="{escape(label)}" x1="{sx(v):.1f}" y1="{MT}" '
                       f'x2="{sx(v):.1f}" y2="{H - MB}" stroke="{color}" stroke-width="1.5" '
                       f'stroke-dasharray="2 3"/><text x="{sx(v) + 4:.1f}" y="{MT + 12}" class="tk">'
                       f"{escape(label)}</text>")
    for i, (name, s) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        s = [(x, y) for x, y in s if x is not None and y is not None]
        if not s:
            continue
        d = " ".join(f"{'M' if k == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for k, (x, y) in enumerate(s))
        out.append(f'<path class="series" data-name="{escape(name)}" d="{d}" fill="none" '
                   f'stroke="{color}" stroke-width="1.8"/>')
        if markers and len(s) <= 60:
            for x, y in s:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{color}">'
                           f"<title>{escape(name)}: {_fmt(x)}, {_fmt(y)}</title></circle>")
        ly = MT + 14 + i * 16
        out.append(f'<line x1="{W - MR + 10}" y1="{ly - 4}" x2="{W - MR + 28}" y2="{ly - 4}" stroke="{color}" '
                   f'stroke-width="2"/><text x="{W - MR + 32}" y="{ly}" class="lg">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def scatter_chart(title: str, xlabel: str, ylabel: str,
                  points: Sequence[tuple[str, float, float, bool]], cls: str = "scatter") -> str:
    """points: (label, x, y, measured); expected points are drawn hollow."""
    pts = [(x, y) for _, x, y, _ in points]
    xt, yt, sx, sy = _scales([p[0] for p in pts], [p[1] for p in pts], y0=False)
    out = _frame(title, xlabel, ylabel, xt, yt, sx, sy, cls)
    for i, (label, x, y, measured) in enumerate(points):
        color = PALETTE[i % len(PALETTE)]
        fill = color if measured else "none"
        out.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{fill}" '
                   f'stroke="{color}" stroke-width="2"><title>{escape(label)}: {_fmt(x)}, {_fmt(y)} '
                   f'({"measured" if measured else "expected"})</title></circle>')
        out.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 6:.1f}" class="lg">{escape(label)}</text>')
    out.append(f'<text x="{W - MR + 10}" y="{MT + 14}" class="lg">filled: measured</text>')
    out.append(f'<text x="{W - MR + 10}" y="{MT + 30}" class="lg">hollow: expected</text>')
    out.append("</svg>")
    return "\n".join(out)


def heatmap(title: str, labels: Sequence[str], matrix: Sequence[Sequence[float | None]],
            unit: str = "GB/s", cls: str = "heatmap") -> str:
    n = len(labels)
    cell = max(18, min(56, int(420 / max(1, n))))
    left, top = 70, 40
    w, h = left + n * cell + 170, top + n * cell + 40
    vals = [v for row in matrix for v in row if v is not None]
    lo, hi = 0.0, (max(vals) if vals else 1.0)  # colour is the fraction of the best pair
    out = [f'<svg class="chart {cls}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
           f'height="{h}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<text x="{left}" y="18" class="ct">{escape(title)}</text>']

    def color(v: float) -> str:
        t = 0.5 if hi == lo else (v - lo) / (hi - lo)
        r, g, b = int(215 - 180 * t), int(48 + 140 * t), int(39 + 60 * t)
        return f"rgb({r},{g},{b})"

    for i in range(n):
        out.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4:.0f}" text-anchor="end" '
                   f'class="tk">{escape(labels[i])}</text>')
        out.append(f'<text x="{left + i * cell + cell / 2:.0f}" y="{top - 6}" text-anchor="middle" '
                   f'class="tk">{escape(labels[i])}</text>')
        for j in range(n):
            v = matrix[i][j] if j < len(matrix[i]) else None
            x, y = left + j * cell, top + i * cell
            if v is None:
                out.append(f'<rect class="cell" x="{x}" y="{y}" width="{cell}" height="{cell}" fill="#ddd"/>')
                continue
            out.append(f'<rect class="cell" x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{color(v)}" '
                       f'stroke="#fff"><title>{escape(labels[i])} -> {escape(labels[j])}: {v:.1f} {unit}'
                       f'</title></rect>')
            if cell >= 34:
                out.append(f'<text x="{x + cell / 2:.0f}" y="{y + cell / 2 + 4:.0f}" text-anchor="middle" '
                           f'class="cv">{v:.0f}</text>')
    out.append(f'<text x="{left + n * cell + 12}" y="{top + 12}" class="lg">row: source</text>')
    out.append(f'<text x="{left + n * cell + 12}" y="{top + 28}" class="lg">column: destination</text>')
    out.append(f'<text x="{left + n * cell + 12}" y="{top + 44}" class="lg">{_fmt(lo)}-{_fmt(hi)} {unit}</text>')
    out.append("</svg>")
    return "\n".join(out)
