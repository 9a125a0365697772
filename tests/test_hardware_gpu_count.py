"""plans/h200-x8.yaml's hardware stage on a machine with one GPU (a recorded 2 x H200 run cut
to its first card, as `harness hw` writes it on one GPU): the stage warns and is ``invalid``
(not pass) because the plan asks for 8 GPUs, and its P2P targets say why they were not
measured, in the stage's log and in the report."""
from __future__ import annotations

import json
from pathlib import Path

from harness import plan as plan_mod
from harness import runner
from harness.hardware.judge import rejudge, unmeasurable
from harness.hardware.report_io import report_from_dict, write_report

REPO = Path(__file__).resolve().parents[1]
P2P_WHY = "p2p needs at least 2 GPUs; this machine has 1"


def one_h200(tmp_path: Path) -> Path:
    """hardware-h200x2.json as a one-GPU machine would have written it."""
    d = json.loads((REPO / "tests" / "data" / "hw" / "hardware-h200x2.json").read_text())
    d["gpus"], d["p2p"] = d["gpus"][:1], None
    d["hbm"] = [r for r in d["hbm"] if r["gpu"] == 0]
    d["gemm"] = [r for r in d["gemm"] if r["gpu"] == 0]
    d["host"]["cuda_devices"] = 1
    report = report_from_dict({**d, "checks": []})
    report.checks = unmeasurable(["hbm", "gemm", "p2p"], [0], 1)
    return write_report(rejudge(report), tmp_path / "recorded")


def run_h200_plan_hardware(tmp_path: Path) -> tuple[int, list[str], Path]:
    plan = plan_mod.load(REPO / "plans" / "h200-x8.yaml")
    hw = next(s for s in plan["stages"] if s["stage"] == "hardware")
    hw["result"] = str(one_h200(tmp_path))
    lines: list[str] = []
    out = tmp_path / "run"
    code = runner.run_plan(plan, out, lines.append, only=[hw["name"]])
    return code, lines, out


def test_h200_plan_on_one_gpu_warns_and_marks_the_hardware_stage_invalid(tmp_path):
    code, lines, out = run_h200_plan_hardware(tmp_path)
    doc = json.loads((out / "hardware" / "result.json").read_text())
    assert doc["status"] == "invalid" and code == 3
    fewer = "the plan expects 8 GPUs (gpu_count) and this run found 1"
    assert fewer in doc["invalid"] and P2P_WHY in doc["invalid"]
    assert any(f"hardware: WARNING: {fewer}" in ln for ln in lines)
    # the one card measured passes its datasheet targets: only the count makes it unjudged
    assert {c["metric"]: c["passed"] for c in doc["checks"]}["hbm_tbs"] is True


def test_p2p_not_measured_says_why_in_the_log_and_the_report(tmp_path):
    _, lines, out = run_h200_plan_hardware(tmp_path)
    doc = json.loads((out / "hardware" / "result.json").read_text())
    p2p = next(c for c in doc["checks"] if c["metric"] == "p2p_gbs")
    assert p2p["passed"] is None and p2p["why"] == P2P_WHY
    assert any(f"not measured: p2p_gbs: {P2P_WHY}" in ln for ln in lines)
    md = (out / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| 8 x H200 | p2p_gbs"))
    assert [c.strip() for c in row.strip("|").split("|")][4] == f"not measured: {P2P_WHY}"
    html = (out / "report.html").read_text()
    assert f'<td class="nm">not measured: {P2P_WHY}</td>' in html


def test_a_figure_the_stage_did_not_ask_for_says_so():
    from harness.stages.hardware import why_not_measured

    hw = {"checks": [{"name": "hbm_bandwidth", "status": "pass", "detail": "3.0 TB/s"}]}
    assert why_not_measured("p2p_gbs", hw) == "the p2p check did not run (checks:)"
    assert why_not_measured("hbm_tbs", hw) is None
