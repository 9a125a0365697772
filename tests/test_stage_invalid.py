"""A stage whose figures cannot be trusted is ``invalid``: not a pass, not a fail (issue 13).

Load stages (serving, cluster, soak) are built from a recorded ``summary.json`` (``run_loads``
replaced, the target a plain URL, so no server or Locust starts); the hardware logic from
recorded ``hardware.json`` files and a fake torch with one GPU. The runner's exit code, run.json
and the report follow; ``on_invalid`` lets a plan count an invalid stage otherwise; one end to
end ``harness run`` on the simulator with a lag limit no generator meets closes it.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import plan as plan_mod
from harness import runner
from harness.commands import hw as hw_cmd
from harness.hardware import run as hw_run
from harness.hardware.judge import exit_code, nothing_measured, overall_status, rejudge
from harness.hardware.model import Check, HardwareReport
from harness.hardware.report_io import load_report
from harness.hardware.summary import format_summary
from harness.stages import serving
from servers import topology as T

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
# what plans/local.yaml's serving-vllm-cpu stage recorded when it was marked PASS (issue 13)
LAG = ("schedule lag p99 110.0 ms > 10 ms: the load generator cannot keep the schedule; "
       "add workers (--workers)")


def summary(valid: bool = True, ttft_p50: float = 40.0) -> dict:
    """A load run's summary.json, cut to what the stages read."""
    lat = {"mean": ttft_p50, "p50": ttft_p50, "p90": ttft_p50, "p95": ttft_p50, "p99": ttft_p50 * 2,
           "p99_9": ttft_p50 * 2, "min": 1.0, "max": ttft_p50 * 3, "count": 24}
    return {"schema": 1, "requests": {"completed": 24, "failed": 0, "errors_by_kind": {}},
            "ttft_ms": lat, "tpot_ms": dict(lat, p50=9.0), "e2e_ms": lat,
            "schedule_lag_ms": dict(lat, p99=110.0 if not valid else 0.4),
            "output_tokens_per_s": 120.0, "total_tokens_per_s": 400.0, "requests_per_s": 4.0,
            "goodput_rps": 4.0, "error_rate": 0.0, "slo": {"passed": True, "checks": []},
            "generator": {"valid": valid, "reasons": [] if valid else [LAG], "cpu_max_pct": 30.0}}


@pytest.fixture
def recorded_loads(monkeypatch):
    """``run_loads`` replaced: each job's summary.json is the recorded one for its rate ("rate
    40") or else its label (an endpoint's name), else "main", written where the stage reads it."""
    loads: dict[str, dict] = {}

    def fake_run_loads(jobs, timeout_s, log, total=None):
        out = {}
        for label, argv, path in jobs:
            rate = argv[argv.index("--rate") + 1] if "--rate" in argv else None
            doc = dict(loads.get(f"rate {rate}") or loads.get(label) or loads["main"])
            path.mkdir(parents=True, exist_ok=True)
            (path / "summary.json").write_text(json.dumps(doc))
            out[label] = dict(doc, _exit_code=0 if doc["generator"]["valid"] else 3)
        return out

    monkeypatch.setattr(serving, "run_loads", fake_run_loads)
    return loads


def load_plan(tmp_path: Path, *stages: dict, **top) -> dict:
    """A validated plan of ``stages`` (a URL target unless given) run into ``tmp_path / 'run'``."""
    target = {"url": "http://127.0.0.1:9", "model": "m"}
    doc = {"name": "inv", "stages": [dict({"target": target} if s.get("stage") in
                                            ("serving", "cluster", "soak") else {}, **s)
                                       for s in stages], **top}
    return plan_mod.validate(doc, "inv.yaml")


def run(plan: dict, tmp_path: Path) -> tuple[int, list[str], dict]:
    lines: list[str] = []
    code = runner.run_plan(plan, tmp_path / "run", log=lines.append)
    return code, lines, json.loads((tmp_path / "run" / "run.json").read_text())


def result(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "run" / name / "result.json").read_text())


# --- load stages --------------------------------------------------------------------------------

def test_serving_stage_with_an_invalid_generator_is_invalid(recorded_loads, tmp_path):
    recorded_loads["main"] = summary(valid=False)
    plan = load_plan(tmp_path, {"name": "s", "stage": "serving", "rate": 4, "num_requests": 24})
    doc = runner.run_one(plan["stages"][0], tmp_path / "run", plan, {}, lambda m: None)
    assert doc["status"] == "invalid" and doc["invalid"] == [LAG]
    assert "load generator INVALID: " + LAG in doc["detail"]
    assert result(tmp_path, "s")["status"] == "invalid"  # a finished stage: result.json


def test_a_missed_target_under_an_invalid_generator_is_no_fail(recorded_loads, tmp_path):
    recorded_loads["main"] = summary(valid=False, ttft_p50=500.0)
    plan = load_plan(tmp_path, {"name": "s", "stage": "serving", "expect": {"ttft_p50_ms": 80}})
    doc = runner.run_one(plan["stages"][0], tmp_path / "run", plan, {}, lambda m: None)
    assert doc["status"] == "invalid" and doc["checks"][0]["passed"] is False


def test_a_valid_generator_passes(recorded_loads, tmp_path):
    recorded_loads["main"] = summary()
    plan = load_plan(tmp_path, {"name": "s", "stage": "serving", "expect": {"ttft_p50_ms": 80}})
    doc = runner.run_one(plan["stages"][0], tmp_path / "run", plan, {}, lambda m: None)
    assert doc["status"] == "pass" and doc["invalid"] == [] and "INVALID" not in doc["detail"]


def test_an_invalid_sweep_run_makes_the_stage_invalid_naming_its_rate(recorded_loads, tmp_path):
    recorded_loads.update({"main": summary(), "rate 40": summary(valid=False)})
    plan = load_plan(tmp_path, {"name": "s", "stage": "serving", "rate": 4, "sweep_rates": [40]})
    doc = runner.run_one(plan["stages"][0], tmp_path / "run", plan, {}, lambda m: None)
    assert doc["status"] == "invalid" and doc["invalid"] == [f"at 40 req/s: {LAG}"]


@pytest.mark.parametrize("kind, extra", [("cluster", {"users": 2}), ("soak", {"rate": 4, "duration": "5s"})])
def test_cluster_and_soak_stages_with_an_invalid_generator_are_invalid(recorded_loads, tmp_path, kind, extra):
    recorded_loads.update({"main": summary(valid=False), "server": summary(valid=False)})
    plan = load_plan(tmp_path, {"name": "x", "stage": kind, **extra})
    doc = runner.run_one(plan["stages"][0], tmp_path / "run", plan, {}, lambda m: None)
    assert doc["status"] == "invalid" and doc["invalid"] and LAG in doc["invalid"][0]
    assert "load generator INVALID" in doc["detail"]


def test_generator_limits_pass_through_to_harness_load():
    p = {k: f.default for k, f in serving.PARAMS.items()}
    argv = serving.load_argv(dict(p, cpu_limit=1000.0, lag_limit_ms=0.5), "http://h:1", "m", Path("o"), [], 4.0)
    assert argv[argv.index("--cpu-limit") + 1] == "1000" and argv[argv.index("--lag-limit-ms") + 1] == "0.5"
    assert "--cpu-limit" not in serving.load_argv(p, "http://h:1", "m", Path("o"), [], 4.0)


# --- the run: console, run.json, exit code, report ------------------------------------------------

def test_an_invalid_stage_exits_3_does_not_stop_the_run_and_is_marked_in_the_report(recorded_loads, tmp_path):
    recorded_loads["main"] = summary(valid=False)
    plan = load_plan(tmp_path, {"name": "s", "stage": "serving", "table": "online", "row": "r",
                                "expect": {"ttft_p50_ms": 80}},
                     {"name": "after", "stage": "command", "argv": ["true"]})
    code, lines, doc = run(plan, tmp_path)
    assert code == runner.EXIT_INVALID == 3
    assert doc["statuses"] == {"s": "invalid", "after": "pass"} and doc["status"] == "invalid"
    assert any(line.startswith("[1/2] s (serving): INVALID in ") and LAG in line for line in lines)
    html = (tmp_path / "run" / "report.html").read_text()
    assert '<td class="invalid">invalid</td>' in html  # the stages table, in its own colour
    assert 'class="invalid" id="run-status">invalid<' in html
    assert 'id="invalid" class="invalid">Invalid: 1 stage(s)' in html and "schedule lag p99 110.0 ms" in html
    assert ".invalid{color:" in html
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.startswith("# Plan inv: invalid") and "### INVALID: 1 stage(s)" in md
    assert f"| s | **INVALID** | {LAG} |" in md
    assert "| r | ttft_p50_ms | <= 80 | 40 | invalid |" in md  # the plan table's result column


def test_a_failure_outranks_an_invalid_stage(recorded_loads, tmp_path):
    recorded_loads["main"] = summary(valid=False)
    plan = load_plan(tmp_path, {"name": "s", "stage": "serving"},
                     {"name": "bad", "stage": "command", "argv": ["false"]}, on_failure="continue")
    code, _, doc = run(plan, tmp_path)
    assert code == 1 and doc["status"] == "fail" and doc["statuses"]["s"] == "invalid"


@pytest.mark.parametrize("top, stage, status, code", [
    ({"on_invalid": "pass"}, {}, "pass", 0),
    ({"on_invalid": "pass"}, {"expect": {"ttft_p50_ms": 10}}, "fail", 1),  # judged by its targets
    ({"on_invalid": "fail"}, {}, "fail", 1),
    ({"on_invalid": "fail"}, {"on_invalid": "pass"}, "pass", 0),           # the stage's own wins
    ({}, {"on_invalid": "invalid"}, "invalid", 3),
])
def test_on_invalid_says_what_an_invalid_stage_counts_as(recorded_loads, tmp_path, top, stage, status, code):
    recorded_loads["main"] = summary(valid=False)
    plan = load_plan(tmp_path, {"name": "s", "stage": "serving", **stage}, **top)
    got, lines, doc = run(plan, tmp_path)
    assert (got, doc["statuses"]["s"]) == (code, status)
    r = result(tmp_path, "s")
    assert r["invalid"] == [LAG]  # the reasons stay whatever it counts as
    if status != "invalid":
        assert r["on_invalid"] in ("pass", "fail")
        assert any(f"invalid, counted as {status}" in line for line in lines)
        md = (tmp_path / "run" / "report.md").read_text()
        assert f"(counted as {status}: on_invalid: {r['on_invalid']})" in md


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(on_invalid="maybe"), "inv.yaml: on_invalid: 'maybe' is not one of invalid, fail, pass"),
    (lambda d: d["stages"][0].update(on_invalid=True), "inv.yaml: stages[0] (a).on_invalid: expected a string, got True"),
    (lambda d: d["stages"][0].update(on_invalid="ignore"),
     "inv.yaml: stages[0] (a).on_invalid: 'ignore' is not one of invalid, fail, pass"),
])
def test_a_bad_on_invalid_is_one_line(mutate, message):
    doc = {"name": "p", "stages": [{"name": "a", "stage": "command", "argv": ["true"]}]}
    mutate(doc)
    with pytest.raises(plan_mod.PlanError) as exc:
        plan_mod.validate(doc, "inv.yaml")
    assert str(exc.value) == message


def test_run_status_and_exit_code_precedence():
    cases = [({"a": "pass", "b": "skipped"}, "pass", 0), ({"a": "invalid", "b": "not run"}, "invalid", 3),
             ({"a": "invalid", "b": "error"}, "fail", 1), ({"a": "pass", "b": "not run"}, "incomplete", 0)]
    for statuses, status, code in cases:
        assert (runner.run_status(statuses), runner.exit_code(statuses)) == (status, code)


# --- hardware ---------------------------------------------------------------------------------

def test_a_recorded_one_gpu_run_asked_for_p2p_is_invalid_not_pass():
    report = rejudge(load_report(DATA / "hw" / "hardware-h100x1.json"))
    text = format_summary(report)
    assert report.status == "invalid" and exit_code(report) == 3
    assert "overall: invalid" in text and "overall: pass" not in text
    assert "p2p needs at least 2 GPUs; this machine has 1" in text
    assert [c.status for c in report.checks if c.name in ("hbm_bandwidth", "gemm_bf16")] == ["pass", "pass"]


def test_a_failed_check_outranks_invalid():
    report = load_report(DATA / "hw" / "hardware-h100x1.json")
    report.hbm[0].tbs = 1.0
    report = rejudge(report)
    assert report.status == "fail" and exit_code(report) == 1
    assert overall_status([Check("p2p", "invalid"), Check("x", "warn")]) == "invalid"


class FakeCuda:
    """torch.cuda with ``n`` H100s: enough for the inventory; nothing is measured on it."""

    def __init__(self, n: int):
        self.n = n

    def is_available(self):
        return True

    def device_count(self):
        return self.n

    def get_device_properties(self, g):
        return SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132, major=9, minor=0)

    def mem_get_info(self, g):
        return 80 << 30, 81 << 30


@pytest.fixture
def fake_gpus(monkeypatch):
    def with_gpus(n: int) -> None:
        torch = SimpleNamespace(cuda=FakeCuda(n), __version__="2.9+fake", version=SimpleNamespace(cuda="12.8"))
        monkeypatch.setattr(hw_run, "import_torch", lambda: (torch, None))
        monkeypatch.setattr(hw_run, "import_nvml", lambda: None)
        monkeypatch.setattr(T, "nvidia_smi_topo_text", lambda timeout=20.0: None)
    return with_gpus


def hw_args(out: Path, checks: str, gpus: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(out=str(out), gpus=gpus, quick=True, target=None, checks=checks, json=False)


def test_hw_p2p_on_one_gpu_measures_nothing_and_is_invalid(fake_gpus, tmp_path, capsys):
    fake_gpus(1)
    assert hw_cmd.handle(hw_args(tmp_path / "hw", "p2p")) == 3
    out = capsys.readouterr().out
    assert "INVALID   p2p: p2p needs at least 2 GPUs; this machine has 1" in out
    assert out.rstrip().endswith("overall: invalid") and "overall: pass" not in out
    data = json.loads((tmp_path / "hw" / "hardware.json").read_text())
    assert data["status"] == "invalid" and data["host"]["cuda_devices"] == 1
    assert rejudge(load_report(tmp_path / "hw" / "hardware.json")).status == "invalid"


def test_hw_p2p_on_one_chosen_gpu_of_two_says_so(fake_gpus, tmp_path, capsys):
    fake_gpus(2)
    assert hw_cmd.handle(hw_args(tmp_path / "hw", "p2p", gpus="1")) == 3
    assert "p2p needs at least 2 GPUs; 1 of this machine's 2 chosen (--gpus)" in capsys.readouterr().out


def test_nothing_measured_is_invalid():
    report = HardwareReport(status="pass")
    assert [c.status for c in nothing_measured(["hbm"], report)] == ["invalid"]
    report.checks.append(Check("hbm_bandwidth", "error", gpu=0))
    assert nothing_measured(["hbm"], report) == []


def hardware_plan(tmp_path: Path, **stage) -> dict:
    return plan_mod.validate({"name": "hw", "stages": [{"name": "hardware", "stage": "hardware", **stage}]},
                             "hw.yaml")


def test_hardware_stage_on_one_gpu_asked_for_p2p_is_invalid(fake_gpus, tmp_path):
    fake_gpus(1)
    code, lines, doc = run(hardware_plan(tmp_path, checks=["p2p"]), tmp_path)
    r = result(tmp_path, "hardware")
    assert (code, doc["statuses"], r["invalid"]) == (3, {"hardware": "invalid"},
                                                     ["p2p needs at least 2 GPUs; this machine has 1"])
    assert any("[1/1] hardware (hardware): INVALID" in line for line in lines)


def test_hardware_stage_reusing_a_one_gpu_result_is_invalid(tmp_path):
    plan = hardware_plan(tmp_path, result=str(DATA / "hw" / "hardware-h100x1.json"))
    doc = runner.run_one(plan["stages"][0], tmp_path / "run", plan, {}, lambda m: None)
    assert doc["status"] == "invalid" and "p2p needs at least 2 GPUs" in doc["detail"]


def test_hardware_stage_with_fewer_gpus_than_gpu_count_warns_and_is_invalid(tmp_path):
    recorded = str(DATA / "hw" / "hardware-h100x2.json")
    plan = plan_mod.validate({"name": "hw", "gpu_count": 8, "stages": [
        {"name": "hardware", "stage": "hardware", "result": recorded}]}, "hw.yaml")
    lines: list[str] = []
    doc = runner.run_one(plan["stages"][0], tmp_path / "run", plan, {}, lines.append)
    reason = "the plan expects 8 GPUs (gpu_count) and this run found 2"
    assert doc["status"] == "invalid" and doc["invalid"] == [reason]
    assert f"hardware: WARNING: {reason}" in lines
    ok = plan_mod.validate({"name": "hw", "gpu_count": 8, "stages": [
        {"name": "hardware", "stage": "hardware", "result": recorded, "gpu_count": 2}]}, "hw.yaml")
    assert runner.run_one(ok["stages"][0], tmp_path / "run2", ok, {}, lambda m: None)["status"] == "pass"


# --- end to end: harness run, the simulator, a lag limit no generator meets ----------------------

def harness_run(plan: Path, out: Path, timeout: float) -> tuple[int, str]:
    """``harness run PLAN --out OUT``: (exit code, stdout and stderr). Past ``timeout`` it gets
    SIGINT first, as Ctrl-C, so it stops the simulator and the load it started (a SIGKILL
    would leave them running), then SIGKILL."""
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(plan), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            stdout, _ = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        pytest.fail(f"harness run did not finish in {timeout:.0f} s:\n{stdout[-4000:]}")
    return proc.returncode, stdout


@pytest.mark.timeout(180)
def test_harness_run_marks_an_invalid_generator_and_exits_3(tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("""
name: e2e-invalid
stages:
  - name: serving
    stage: serving
    target: {simulator: l40s-llama-3-8b-bf16}
    rate: 10
    num_requests: 8
    input_len: 32
    output_len: 8
    lag_limit_ms: 0.001     # 1 us: no open-loop generator keeps that schedule
    cpu_limit: 0
""")
    out = tmp_path / "run"
    code, stdout = harness_run(plan, out, timeout=150)
    assert code == 3, stdout[-4000:]
    assert "[1/1] serving (serving): INVALID in " in stdout and "load generator INVALID" in stdout
    summary_doc = json.loads((out / "serving" / "load" / "summary.json").read_text())
    assert summary_doc["generator"]["valid"] is False
    doc = json.loads((out / "serving" / "result.json").read_text())
    assert doc["status"] == "invalid" and doc["invalid"] == summary_doc["generator"]["reasons"]
    assert json.loads((out / "run.json").read_text())["statuses"] == {"serving": "invalid"}
    assert '<td class="invalid">invalid</td>' in (out / "report.html").read_text()
