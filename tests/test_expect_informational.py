"""Informational targets (``expect: {metric: {target: N, informational: true}}``): judged and
reported with their verdict, marked informational, and never a failure of the stage or the plan;
a normal target beside them still decides. A recorded hardware.json stands in for the machine,
so these runs measure nothing and take seconds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import plan as plan_mod
from harness.stages import expect

REPO = Path(__file__).resolve().parents[1]
RECORDED = REPO / "tests" / "data" / "hw" / "hardware-h100x2.json"   # hbm 3.0 TB/s, gemm ~700 TFLOPS


def write_plan(tmp_path: Path, expect_: dict) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "info", "stages": [
        {"name": "hardware", "stage": "hardware", "table": "hardware", "row": "2 x H100",
         "result": str(RECORDED), "expect": expect_}]}, sort_keys=False))
    return path


def harness_run(plan: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "run", str(plan), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_an_informational_target_that_misses_fails_nothing_and_is_reported(tmp_path):
    plan = write_plan(tmp_path, {"hbm_tbs": {"target": 100, "informational": True}, "gemm_tflops": 100})
    r = harness_run(plan, tmp_path / "run")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "run" / "hardware" / "result.json").read_text())
    assert doc["status"] == "pass"
    hbm = next(c for c in doc["checks"] if c["metric"] == "hbm_tbs")
    assert hbm["passed"] is False and hbm["informational"] is True and hbm["target_text"] == ">= 100"
    assert "missed (informational, fails nothing): hbm_tbs >= 100" in r.stdout
    md = (tmp_path / "run" / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| 2 x H100 | hbm_tbs"))
    assert [c.strip() for c in row.strip("|").split("|")][4] == "missed (informational)"
    assert "informational: true in the plan" in md
    html = (tmp_path / "run" / "report.html").read_text()
    assert '<td class="informational">missed (informational)</td>' in html


def test_a_normal_target_that_misses_still_fails_beside_an_informational_one(tmp_path):
    plan = write_plan(tmp_path, {"hbm_tbs": {"target": 1, "informational": True}, "gemm_tflops": 100000})
    r = harness_run(plan, tmp_path / "run")
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads((tmp_path / "run" / "hardware" / "result.json").read_text())
    assert doc["status"] == "fail"
    verdicts = {c["metric"]: expect.verdict(c) for c in doc["checks"]}
    assert verdicts == {"hbm_tbs": "met (informational)", "gemm_tflops": "FAIL"}


def test_informational_false_is_an_ordinary_target():
    c = expect.check("ttft_p50_ms", {"target": 80, "informational": False}, 90.0)
    assert c["passed"] is False and expect.status_from([c]) == "fail"
    c = expect.check("ttft_p50_ms", {"target": 80, "informational": True}, 90.0)
    assert expect.status_from([c]) == "pass" and expect.verdict(c) == "missed (informational)"


@pytest.mark.parametrize("target, message", [
    ({"target": 80, "informational": "sometimes"},
     "stages[0] (hardware).expect.hbm_tbs: target for hbm_tbs: informational must be true or false, got 'sometimes'"),
    ({"target": 80, "informational": 1},
     "stages[0] (hardware).expect.hbm_tbs: target for hbm_tbs: informational must be true or false, got 1"),
    ({"targte": 80, "informational": True}, "expect.hbm_tbs: target for hbm_tbs: unknown key 'targte'"),
    ({"informational": True}, "expect.hbm_tbs: target for hbm_tbs: a mapping needs target:"),
    ({"target": "about 80", "informational": True}, "expect.hbm_tbs: target 'about 80' for hbm_tbs: write a number"),
])
def test_a_bad_informational_target_is_one_line(target, message):
    with pytest.raises(plan_mod.PlanError) as exc:
        plan_mod.validate({"name": "p", "stages": [{"name": "hardware", "stage": "hardware",
                                                    "expect": {"hbm_tbs": target}}]}, "x.yaml")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_the_cli_refuses_a_bad_informational_value_in_one_line_with_exit_2(tmp_path):
    plan = write_plan(tmp_path, {"hbm_tbs": {"target": 1, "informational": "maybe"}})
    r = harness_run(plan, tmp_path / "run")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "informational must be true or false, got 'maybe'" in lines[0]
    assert not (tmp_path / "run").exists()
