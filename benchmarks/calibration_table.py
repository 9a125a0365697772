"""Regenerate docs/simulator-calibration.md: every seed row vs simulator vs physics.

    .venv/bin/python benchmarks/calibration_table.py
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servers.simulator.calibration import SEED_ROWS, check_row, markdown_table  # noqa: E402

DOC = ROOT / "docs" / "simulator-calibration.md"
BEGIN, END = "<!-- table:begin -->\n", "<!-- table:end -->\n"


def render() -> str:
    return markdown_table([check_row(r) for r in SEED_ROWS])


def main() -> None:
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + BEGIN + render() + END + tail)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
