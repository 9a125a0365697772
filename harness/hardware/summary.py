"""What a run prints: one line per check, the P2P matrix, and each GPU's power beside its limit."""
from __future__ import annotations

from harness.hardware.model import HardwareReport, PowerStats


def power_figures(p: PowerStats, limit_w: float | None = None) -> str:
    """``avg 612 W, peak sample 893 W (instantaneous; limit 700 W - short spikes above the limit
    are normal)``. The peak is one sample, not a sustained draw: NVML's instantaneous field
    reads spikes of a few milliseconds that the card's power controller (which holds the
    *average* to the limit, pulling the clock down: ``sw_power_cap``) lets through, so a peak
    above the limit is no fault; the 1 s average lags a check shorter than a second."""
    limit = p.limit_w if p.limit_w is not None else limit_w
    kind = {"instant": "instantaneous", "1s-average": "NVML 1 s average"}.get(p.power_reading or "",
                                                                             "reading unknown")
    note = f"limit {limit:.0f} W" if limit else "limit unknown"
    if limit and p.peak_w is not None and p.peak_w > limit:
        note += (" - short spikes above the limit are normal" if p.power_reading == "instant"
                 else " - the average itself above the limit: check the power settings")
    return f"avg {p.avg_w:.0f} W, peak sample {p.peak_w:.0f} W ({kind}; {note})"


def run_power(report: HardwareReport) -> dict[int, PowerStats]:
    """GPU -> its power over the whole run: every check's samples together (the average
    weighted by each check's sample count, the highest single sample), with the card's limit."""
    per: dict[int, list[PowerStats]] = {}
    for r in [*report.hbm, *report.gemm]:
        if r.power is not None and r.power.samples:
            per.setdefault(r.gpu, []).append(r.power)
    if report.p2p is not None:
        for g, st in (report.p2p.power or {}).items():
            if st.samples:
                per.setdefault(int(g), []).append(st)
    limits = {g.index: g.power_limit_w for g in report.gpus}
    out: dict[int, PowerStats] = {}
    for g, stats in sorted(per.items()):
        n = sum(st.samples for st in stats)
        readings = {st.power_reading for st in stats if st.power_reading}
        out[g] = PowerStats(
            samples=n, avg_w=round(sum(st.avg_w * st.samples for st in stats) / n, 1),
            peak_w=max(st.peak_w for st in stats),
            temp_max_c=max((st.temp_max_c for st in stats if st.temp_max_c is not None), default=None),
            clock_event_reasons=sorted({r for st in stats for r in st.clock_event_reasons}),
            power_reading=readings.pop() if len(readings) == 1 else ("mixed" if readings else None),
            limit_w=next((st.limit_w for st in stats if st.limit_w is not None), limits.get(g)))
    return out


def power_lines(report: HardwareReport) -> list[str]:
    """One line per GPU sampled: its power over the run (format_summary, the stage's log)."""
    return [f"power     GPU{g} over the run: {power_figures(st)} ({st.samples} samples)"
            for g, st in run_power(report).items()]


def power_text(p: PowerStats | None, limit_w: float | None = None) -> str:
    if p is None or not p.samples:
        return ""
    txt = f"; {power_figures(p, limit_w)}"
    if p.sm_clock_avg_mhz is not None:
        txt += f", SM {p.sm_clock_avg_mhz:.0f} MHz avg ({p.sm_clock_min_mhz:.0f} min)"
    if p.clock_event_reasons:
        txt += ", clocks held by " + "+".join(p.clock_event_reasons)
    return txt


def format_summary(report: HardwareReport) -> str:
    """Human-readable lines: one per check that is not a single P2P pair, then the P2P matrix."""
    if report.status == "skipped":
        return f"skipped: {report.skipped_reason}"
    lines = []
    for c in report.checks:
        if c.name == "p2p_pair":
            continue
        who = f"GPU{c.gpu} " if c.gpu is not None else ""
        lines.append(f"{c.status.upper():9} {who}{c.name}: {c.detail}")
        if c.remedy and c.status in ("fail", "warn", "error", "invalid"):
            lines.append(f"          remedy: {c.remedy}")
    for c in report.checks:
        if c.name == "p2p_pair" and c.status in ("fail", "warn"):
            lines.append(f"{c.status.upper():9} p2p {c.detail}")
    p = report.p2p
    if p is not None:
        lines.append("P2P GB/s (row: source, column: destination):")
        head = "      " + "".join(f"{'GPU' + str(g):>9}" for g in p.gpus)
        lines.append(head)
        for a, g in enumerate(p.gpus):
            cells = "".join(f"{'-' if v is None else f'{v:.1f}':>9}" for v in p.gbs[a])
            lines.append(f"GPU{g:<3}" + cells)
    lines += power_lines(report)
    lines.append(f"overall: {report.status}")
    return "\n".join(lines)
