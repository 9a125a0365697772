"""Plan files: the shipped plans validate; a bad field is one line naming it (exit 2); a run
directory resumes (finished stages are not run again, errored ones are); the physics marks on
the seed plan; cost per million tokens from measured or expected figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import plan as plan_mod
from harness.stages import cost, physics

REPO = Path(__file__).resolve().parents[1]
PLANS = sorted((REPO / "plans").glob("*.yaml"))


def harness(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("path", PLANS, ids=[p.name for p in PLANS])
def test_shipped_plans_validate(path):
    plan = plan_mod.load(path)
    assert plan["stages"] and len({s["name"] for s in plan["stages"]}) == len(plan["stages"])
    r = harness("run", str(path), "--validate")
    assert r.returncode == 0 and "is valid" in r.stdout, r.stderr


def test_the_three_plans_are_shipped():
    assert {p.name for p in PLANS} >= {"l40s-x12.yaml", "h200-x8.yaml", "local.yaml"}


GOOD = {"name": "p", "stages": [{"name": "a", "stage": "throughput", "model": "m"}]}


def bad(mutate) -> str:
    doc = json.loads(json.dumps(GOOD))
    mutate(doc)
    with pytest.raises(plan_mod.PlanError) as exc:
        plan_mod.validate(doc, "x.yaml")
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["stages"][0].update(num_prompts="abc"), "stages[0] (a).num_prompts: expected an integer, got 'abc'"),
    (lambda d: d["stages"][0].update(num_prompt=5), "stages[0] (a).num_prompt: unknown key for a throughput stage (did you mean 'num_prompts'?)"),
    (lambda d: d["stages"][0].update(stage="thruput"), "stages[0] (a).stage: 'thruput' is not one of"),
    (lambda d: d["stages"][0].pop("model"), "stages[0] (a).model: is required"),
    (lambda d: d["stages"][0].update(expect={"ttft_p50_ms": 5}), "stages[0] (a).expect.ttft_p50_ms: a throughput stage measures no 'ttft_p50_ms'"),
    (lambda d: d["stages"][0].update(expect={"output_tokens_per_s": "about 5"}), "stages[0] (a).expect.output_tokens_per_s:"),
    (lambda d: d["stages"][0].update(num_prompts=0), "stages[0] (a).num_prompts: 0 is below the minimum 1"),
    (lambda d: d["stages"].append({"name": "a", "stage": "command", "argv": ["true"]}), "stages[1].name: 'a' is already the name of stages[0]"),
    (lambda d: d["stages"][0].update(name="a b"), "stages[0] (a b).name:"),
    (lambda d: d.update(gpu="l41s"), "x.yaml: gpu: unknown GPU 'l41s'"),
    (lambda d: d.update(stagez=[]), "x.yaml: stagez: unknown top-level key (did you mean 'stages'?)"),
    (lambda d: d.update(stages=[]), "x.yaml: stages: a plan needs at least one stage"),
    (lambda d: d.update(on_failure="maybe"), "x.yaml: on_failure: 'maybe' is not one of stop, continue"),
    (lambda d: d.update(cost={"layouts": []}), "x.yaml: cost.gpu_hour: give gpu_hour"),
    (lambda d: d.update(cost={"gpu_hour": 1, "layouts": [{"name": "l", "gpus": 1, "stage": "nope"}]}),
     "cost.layouts (l).stage: no stage named 'nope'"),
    (lambda d: d["stages"].append({"name": "s", "stage": "serving", "target": {"url": "http://h:1", "simulator": "x"}}),
     "stages[1] (s).target: give exactly one of url, endpoints, simulator, layout"),
    (lambda d: d["stages"].append({"name": "s", "stage": "serving", "target": {"simulator": "l40s-llama-9b-bf16"}}),
     "stages[1] (s).target.simulator: unknown profile 'l40s-llama-9b-bf16'"),
    (lambda d: d["stages"].append({"name": "s", "stage": "serving", "target": {"layout": "tp3"}}),
     "stages[1] (s).target.layout: unknown layout 'tp3'"),
    (lambda d: d["stages"].append({"name": "q", "stage": "perplexity", "text": "t", "variants": [{"name": "v"}]}),
     "stages[1] (q).variants[0].model: is required"),
    (lambda d: d["stages"].append({"name": "c", "stage": "command", "argv": [True]}),
     "stages[1] (c).argv[0]: expected a string, got True (quote it in YAML)"),
])
def test_bad_field_is_named(mutate, field):
    assert field in bad(mutate)


def test_cli_reports_a_bad_plan_in_one_line_with_exit_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: p\nstages:\n  - name: a\n    stage: serving\n    target: {simulator: l40s-llama-3-8b-bf16}\n"
                 "    rate: fast\n")
    r = harness("run", str(p), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "stages[0] (a).rate: expected a number, got 'fast'" in lines[0]
    assert not (tmp_path / "run").exists()
    p.write_text("name: p\nstages: [\n")
    r = harness("run", str(p), "--validate")
    assert r.returncode == 2 and "not valid YAML at line" in r.stderr


RESUME_PLAN = """
name: resume
on_failure: stop
stages:
  - name: first
    stage: command
    argv: ["{python}", "-c", "open(r'COUNT', 'a').write('first\\\\n')"]
  - name: second
    stage: command
    argv: ["{python}", "-c", "import os, sys; open(r'COUNT', 'a').write('second\\\\n'); sys.exit(0 if os.path.exists(r'FLAG') else 3)"]
  - name: third
    stage: command
    argv: ["{python}", "-c", "open(r'COUNT', 'a').write('third\\\\n')"]
  - name: fourth
    stage: command
    skip: not on this machine
    argv: ["false"]
"""


def test_resume_skips_finished_stages_and_reruns_errored_ones(tmp_path):
    count, flag = tmp_path / "count.txt", tmp_path / "flag"
    plan = tmp_path / "resume.yaml"
    plan.write_text(RESUME_PLAN.replace("COUNT", str(count)).replace("FLAG", str(flag)))
    out = tmp_path / "run"
    r = harness("run", str(plan), "--out", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[2/4] second (command): ERROR" in r.stdout and "stopping after second" in r.stdout
    assert (out / "first" / "result.json").exists() and (out / "second" / "error.json").exists()
    assert not (out / "third").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["statuses"] == {"first": "pass", "second": "error", "third": "not run", "fourth": "not run"}
    assert count.read_text().split() == ["first", "second"]

    flag.write_text("")
    r = harness("run", str(plan), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[1/4] first (command): done earlier (pass), not run again" in r.stdout
    assert "[2/4] second (command): errored earlier, running again" in r.stdout
    assert count.read_text().split() == ["first", "second", "second", "third"]
    assert not (out / "second" / "error.json").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["statuses"] == {"first": "pass", "second": "pass", "third": "pass", "fourth": "skipped"}
    assert len(run["runs"]) == 2
    assert (out / "report.html").exists() and (out / "report.md").exists()

    r = harness("run", str(plan), "--out", str(out))  # nothing left to do
    assert r.returncode == 0 and count.read_text().split() == ["first", "second", "second", "third"]

    other = tmp_path / "other.yaml"
    other.write_text("name: other\nstages:\n  - {name: x, stage: command, argv: ['true']}\n")
    r = harness("run", str(other), "--out", str(out))
    assert r.returncode == 2 and "holds a run of plan 'resume'" in r.stderr


def test_on_failure_continue_runs_the_rest(tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("name: c\nstages:\n"
                    "  - {name: a, stage: command, argv: ['false'], on_failure: continue}\n"
                    "  - {name: b, stage: command, argv: ['true']}\n")
    r = harness("run", str(plan), "--out", str(tmp_path / "run"))
    assert r.returncode == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["statuses"] == {"a": "error", "b": "pass"}


# --- physics on the seed plan -----------------------------------------------------------------

@pytest.fixture(scope="module")
def seed_marks():
    plan = plan_mod.load(REPO / "plans" / "l40s-x12.yaml")
    return {(name, m["metric"]): m for name, marks in physics.plan_marks(plan).items() for m in marks}


def test_seed_plan_impossible_targets_are_marked(seed_marks):
    m = seed_marks
    # Llama-3 8B BF16 TPOT 12 ms: below the 18.7 ms it takes 864 GB/s to read 16 GB of weights
    tpot = m[("serving-llama3-8b-bf16", "tpot_p50_ms")]
    assert tpot["mark"] == "impossible" and tpot["bound"] == pytest.approx(18.7, abs=0.2)
    assert "weight-read" in tpot["detail"]
    # the latency benchmark's TPOT p50 < 15 ms too, but its p99 < 30 ms is possible
    assert m[("serving-llama3-8b-latency", "tpot_p50_ms")]["mark"] == "impossible"
    assert m[("serving-llama3-8b-latency", "tpot_p99_ms")]["mark"] == "ok"
    # 70B BF16 at 72 GB per GPU on a 48 GB card; its weights do not fit at TP=2
    assert m[("throughput-llama3-70b-bf16-tp2", "vram_gb")]["mark"] == "impossible"
    assert "weights alone are 70.5 GB" in m[("throughput-llama3-70b-bf16-tp2", "output_tokens_per_s")]["detail"]
    # 13B at 2,800 tok/s: above the hardware ceiling
    assert m[("throughput-llama2-13b-bf16", "output_tokens_per_s")]["mark"] == "impossible"
    # 6 x TP=2 70B AWQ at 18,000 tok/s: above six replicas' ceilings
    assert m[("cluster-tp2", "output_tokens_per_s")]["mark"] == "impossible"


def test_seed_plan_possible_targets_are_not_marked(seed_marks):
    m = seed_marks
    assert m[("throughput-llama3-8b-bf16", "output_tokens_per_s")]["mark"] == "ok"
    assert m[("throughput-llama3-8b-bf16", "vram_gb")]["mark"] == "ok"
    assert m[("serving-llama3-8b-latency", "ttft_p50_ms")]["mark"] == "ok"
    assert m[("cluster-single", "output_tokens_per_s")]["mark"] == "ok"
    assert m[("hardware", "hbm_tbs")]["mark"] == "ok"


def test_measured_figures_past_the_floor_are_measurement_errors():
    hw = physics.hardware_from({"gpu": "l40s", "model": "llama-3-8b", "precision": "bf16"}, {})
    assert physics.check_value("tpot_p50_ms", 9.0, "measured", hw)["mark"] == "measurement error"
    assert physics.check_value("tpot_p50_ms", 25.0, "measured", hw)["mark"] == "ok"
    assert physics.check_value("output_tokens_per_s", 1e6, "measured", hw)["mark"] == "measurement error"
    gpu = physics.gpu_spec("l40s")
    assert physics.check_hardware_value("hbm_tbs", 1.2, "measured", gpu)["mark"] == "measurement error"
    assert physics.check_hardware_value("gemm_tflops", 150, "target", gpu)["mark"] == "ok"


def test_h200_plan_has_no_impossible_targets():
    plan = plan_mod.load(REPO / "plans" / "h200-x8.yaml")
    assert all(m["mark"] == "ok" for marks in physics.plan_marks(plan).values() for m in marks)


# --- cost --------------------------------------------------------------------------------------

def test_cost_from_expected_then_measured():
    plan = plan_mod.load(REPO / "plans" / "l40s-x12.yaml")
    rows = {r["layout"]: r for r in cost.compute(plan, {})}
    r = rows["12 x 8B BF16"]
    assert r["throughput_source"] == "expected" and r["power_source"] == "TDP"
    capital = 70000 / (3 * 8760)
    energy = 12 * 350 / 1000 * 1.3 * 0.15
    assert r["cost_per_hour"] == pytest.approx(capital + energy, rel=1e-3)
    assert r["cost_per_million_tokens"] == pytest.approx((capital + energy) / (54000 * 3600 / 1e6), rel=1e-3)
    results = {"cluster-single": {"status": "fail", "measured": {"output_tokens_per_s": 27000.0},
                                  "power": {"avg_w": 12 * 300.0, "gpus": 12}}}
    m = {r["layout"]: r for r in cost.compute(plan, results)}["12 x 8B BF16"]
    assert m["throughput_source"] == "measured" and m["power_source"] == "measured"
    assert m["watts_per_gpu"] == 300.0
    capital_energy = capital + 12 * 300 / 1000 * 1.3 * 0.15
    assert m["cost_per_million_tokens"] == pytest.approx(capital_energy / (27000 * 3600 / 1e6), rel=1e-3)
    gpu_hour = cost.compute({"gpu": "h100", "cost": {"gpu_hour": 2.0, "layouts": [
        {"name": "x", "gpus": 2, "expected_output_tokens_per_s": 1000}]}}, {})[0]
    assert gpu_hour["cost_per_million_tokens"] == pytest.approx(4.0 / 3.6, rel=1e-6)
