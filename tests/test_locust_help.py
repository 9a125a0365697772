"""Our `--llm-*` options are listed with Locust's own, where the README says they are."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_locust_help_module_lists_the_llm_options_beside_locusts():
    out = subprocess.run([sys.executable, "-m", "harness.locust_help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--llm-rate", "--llm-output-len", "--llm-input-len", "--llm-slo", "--run-time", "--host"):
        assert option in out.stdout, option


def test_readme_points_at_the_help_that_lists_the_llm_options():
    assert "python -m harness.locust_help" in (ROOT / "README.md").read_text()
