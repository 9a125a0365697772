"""Regenerate the published-calibration table in docs/simulator-calibration.md: every point of
docs/data/calibration-points.json replayed (servers/simulator/calibration_set.py), simulated vs
published with the ratio, and the error band per regime.

    .venv/bin/python benchmarks/calibration_published.py          # rewrite the doc's table
    .venv/bin/python benchmarks/calibration_published.py --print  # print it only
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servers.simulator.calibration_set import MAX_REQUESTS, regime_bands, replay_all  # noqa: E402

DOC = ROOT / "docs" / "simulator-calibration.md"
BEGIN = "<!-- calibration-published:begin (benchmarks/calibration_published.py) -->"
END = "<!-- calibration-published:end -->"
# The error band section: a heading naming an "error band" and one paragraph under it, which
# harness.capacity.error_band reads (whole, or one regime's clause).
BAND_HEADING = "### Error band per regime"


def band_paragraph(bands: dict[str, dict], total: int) -> str:
    """One paragraph: per regime, where a real engine's figure typically falls relative to
    the simulated one (the central 80% of published/simulated), as `REGIME: ...` clauses
    joined by '; ' (harness.capacity.error_band picks one by its regime name)."""
    clauses = []
    for regime, b in bands.items():
        if not b["points"]:
            continue
        clauses.append(f"{regime}: real typically {b['real_lo'] - 1:+.0%}..{b['real_hi'] - 1:+.0%} of "
                       f"simulated ({b['points']} published runs, median simulated/published "
                       f"{b['median']:.2f})")
    return ("Simulated figures are the model's, not measurements. Against " + str(total)
            + " published runs of vLLM and TensorRT-LLM (10th-90th percentile of published/simulated): "
            + "; ".join(clauses) + ".")


def render() -> str:
    results = replay_all()
    lines = [f"Requests per point capped at {MAX_REQUESTS} (servers/simulator/calibration_set.py).", "",
             "| point | engine | GPU x TP | model | weights/KV | ISL/OSL | load | metric | published | simulated | ratio |",
             "|---|---|---|---|---|---|---|---|---:|---:|---:|"]
    for r in results:
        p, w = r.point, r.point["workload"]
        load = ("max throughput" if w.get("max_throughput") else
                f"C={w['concurrency']}" if "concurrency" in w else f"{w.get('request_rate')} req/s")
        sim = f"{r.simulated:,.1f}" if r.simulated is not None else r.reason
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        lines.append(f"| {p['id']} | {p['engine']} | {p['gpu']} x{p['tp']} | {p['model']} | "
                     f"{p['weights_dtype']}/{p['kv_cache_dtype']} | {w['input_len']}/{w['output_len']} | "
                     f"{load} | {p['metric']} | {p['value']:,.1f} | {sim} | {ratio} |")
    bands = regime_bands(results)
    lines += ["", "| regime | points | median ratio | worst ratio | range | within +-20% |",
              "|---|---:|---:|---:|---|---:|"]
    for regime, b in bands.items():
        if not b["points"]:
            lines.append(f"| {regime} | 0 | - | - | - | - |")
            continue
        lines.append(f"| {regime} | {b['points']} | {b['median']:.2f} | {b['worst']:.2f} | "
                     f"{b['min']:.2f}..{b['max']:.2f} | {b['within_20pct']:.0%} |")
    ratios = [r.ratio for r in results if r.ratio is not None]
    lines += ["", f"All points: {len(ratios)}, "
              f"{sum(0.8 <= x <= 1.2 for x in ratios) / max(1, len(ratios)):.0%} within +-20%.",
              "", BAND_HEADING, "", band_paragraph(bands, len(ratios))]
    return "\n".join(lines)


def splice(doc: str, table: str) -> str:
    if BEGIN in doc:
        head, rest = doc.split(BEGIN, 1)
        return head + BEGIN + "\n" + table + "\n\n" + END + rest.split(END, 1)[1]
    return doc.rstrip("\n") + "\n\n" + BEGIN + "\n" + table + "\n\n" + END + "\n"


def current_table(doc: str) -> str | None:
    if BEGIN not in doc:
        return None
    return doc.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--print", action="store_true", help="print the table, do not touch the doc")
    args = ap.parse_args()
    table = render()
    if args.print:
        print(table)
        return
    DOC.write_text(splice(DOC.read_text(), table))
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
