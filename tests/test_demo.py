"""`harness demo` (the README's first command) keeps an earlier demo's results: a second demo
into the same --out is refused with one line naming --overwrite, which demo itself accepts."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _demo(out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "demo", "--users", "2",
                           "--num-requests", "3", "--input-len", "16", "--output-len", "4",
                           "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_second_demo_into_the_same_out_is_refused_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "demo"
    first = _demo(out)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    summary = (out / "summary.json").read_bytes()

    again = _demo(out)
    assert again.returncode == 2, again.stderr
    assert "already holds a run" in again.stderr and "--overwrite" in again.stderr
    assert (out / "summary.json").read_bytes() == summary

    replaced = _demo(out, "--overwrite")
    assert replaced.returncode == 0, replaced.stdout[-2000:] + replaced.stderr[-2000:]
    assert (out / "summary.json").read_bytes() != summary
