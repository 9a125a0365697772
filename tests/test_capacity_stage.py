"""The `capacity` plan stage: validated like every stage, run as `harness capacity` into the
stage's folder, its capacity in the plan's table, its curve in report.html, and the cost
table's tokens/s taken at the SLO when it ran."""
from __future__ import annotations

import json

import pytest

from harness import plan as plan_mod
from harness.runner import run_plan
from harness.stages import cost

PROFILE = "l40s-llama-3-8b-bf16"
STAGE = {"name": "cap", "stage": "capacity", "table": "latency benchmark", "row": "8B, capacity at SLO",
         "target": {"simulator": PROFILE}, "virtual": True, "slo": ["ttft_p90_ms<=300"],
         "min_rate": 2, "max_rate": 32, "resolution": 0.1, "duration_per_step": 8,
         "input_len": 64, "output_len": 16, "arrival": "constant",
         "expect": {"capacity_rps": ">= 2"}}


def plan(**stage) -> dict:
    return {"name": "cap-plan", "gpu": "l40s", "gpu_count": 1,
            "cost": {"currency": "USD", "gpu_hour": 1.0,
                     "layouts": [{"name": "8B", "gpus": 1, "expected_output_tokens_per_s": 4500,
                                  "capacity_stage": "cap"}]},
            "stages": [dict(STAGE, **stage)]}


@pytest.mark.parametrize("change, words", [
    ({"slo": ["goodput_rps>=3"]}, "stages[0] (cap).slo:"),
    ({"virtual": True, "target": {"url": "http://127.0.0.1:9"}}, "virtual: needs target: {simulator: PROFILE}"),
    ({"max_rate": 1}, "max_rate: 1 is below min_rate 2"),
    ({"expect": {"tokens_per_joule": 3}}, "a capacity stage measures no 'tokens_per_joule'"),
])
def test_a_bad_capacity_stage_is_one_line(change, words):
    with pytest.raises(plan_mod.PlanError) as exc:
        plan_mod.validate(plan(**change), "x.yaml")
    assert words in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("change, words", [
    ({"users": True}, "min_rate: a users search is bounded by min_users and max_users"),
    ({"min_rate": None, "max_rate": None, "min_users": 4}, "min_users: bounds a concurrency search"),
    ({"users": True, "min_rate": None, "max_rate": None, "min_users": 8, "max_users": 4},
     "max_users: 4 is below min_users 8"),
])
def test_a_users_capacity_stage_is_bounded_in_users(change, words):
    stage = {k: v for k, v in dict(STAGE, **change).items() if v is not None}
    doc = plan()
    doc["stages"] = [stage]
    with pytest.raises(plan_mod.PlanError) as exc:
        plan_mod.validate(doc, "x.yaml")
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_a_users_capacity_stage_measures_the_highest_concurrency(tmp_path):
    stage = {k: v for k, v in STAGE.items() if k not in ("min_rate", "max_rate", "arrival")}
    stage.update(users=True, min_users=2, max_users=16, duration_per_step=30, drain_timeout=3,
                 expect={"capacity_users": ">= 2"})
    doc = plan()
    doc["stages"] = [stage]
    run_dir = tmp_path / "run"
    assert run_plan(plan_mod.validate(doc), run_dir, log=lambda _m: None) == 0
    result = json.loads((run_dir / "cap" / "result.json").read_text())
    cap_doc = json.loads((run_dir / "cap" / "capacity.json").read_text())
    assert cap_doc["load"] == "users" and result["status"] == "pass"
    assert result["measured"]["capacity_users"] == cap_doc["answer"]["rate"] >= 2
    assert "capacity_rps" not in result["measured"]
    assert result["measured"]["requests_per_s"] == cap_doc["answer"]["requests_per_s"] > 0
    assert "users" in result["detail"]
    html = (run_dir / "report.html").read_text()   # the curve's x axis is users, and its title says so
    assert "cap: Latency at each step vs concurrent users" in html and "vs offered rate" not in html


def test_a_cost_layout_naming_no_capacity_stage_is_refused():
    doc = plan()
    doc["cost"]["layouts"][0]["capacity_stage"] = "nope"
    with pytest.raises(plan_mod.PlanError, match=r"capacity_stage: no stage named 'nope'"):
        plan_mod.validate(doc, "x.yaml")


def test_virtual_capacity_stage_fills_the_table_the_report_and_the_cost(tmp_path):
    run_dir = tmp_path / "run"
    code = run_plan(plan_mod.validate(plan()), run_dir, log=lambda _m: None)
    assert code == 0
    result = json.loads((run_dir / "cap" / "result.json").read_text())
    doc = json.loads((run_dir / "cap" / "capacity.json").read_text())
    assert result["status"] == "pass" and doc["mode"] == "virtual"
    assert result["measured"]["capacity_rps"] == doc["answer"]["rate"] > 2
    assert result["measured"]["output_tokens_per_s"] == doc["answer"]["output_tokens_per_s"]
    assert result["measured"]["ttft_p90_ms"] <= 300
    assert "virtual time" in result["detail"]
    run = json.loads((run_dir / "run.json").read_text())
    row = run["costs"][0]
    assert row["throughput_source"] == "measured at the SLO" and row["stage"] == "cap"
    assert row["output_tokens_per_s"] == doc["answer"]["output_tokens_per_s"]
    html = (run_dir / "report.html").read_text()
    assert 'class="chart capacity-curve"' in html and "cap: Latency at each step vs offered rate" in html
    md = (run_dir / "report.md").read_text()
    assert "8B, capacity at SLO" in md and "capacity_rps" in md


def test_without_a_capacity_run_the_cost_falls_back_to_the_throughput_stage():
    p = {"gpu": "l40s", "gpu_count": 1,
         "cost": {"gpu_hour": 1.0, "layouts": [{"name": "8B", "gpus": 1, "stage": "tp",
                                                "capacity_stage": "cap"}]}}
    rows = cost.compute(p, {"tp": {"status": "pass", "measured": {"output_tokens_per_s": 2000.0}}})
    assert rows[0]["output_tokens_per_s"] == 2000.0 and rows[0]["throughput_source"] == "measured"
    rows = cost.compute(p, {"tp": {"status": "pass", "measured": {"output_tokens_per_s": 2000.0}},
                            "cap": {"status": "invalid", "measured": {"output_tokens_per_s": 900.0}}})
    assert rows[0]["throughput_source"] == "measured"   # an invalid capacity is not the server's


def test_live_capacity_stage_on_a_simulator_target(tmp_path):
    stage = {"target": {"simulator": PROFILE, "sim_args": ["--max-num-seqs", "4"]}, "virtual": False,
             "min_rate": 4, "max_rate": 8, "resolution": 0.5, "duration_per_step": 6, "drain_timeout": 3,
             "cpu_limit": 1000, "lag_limit_ms": 1000000, "stamp_delay_limit_ms": 0}
    run_dir = tmp_path / "run"
    code = run_plan(plan_mod.validate(plan(**stage)), run_dir, log=lambda _m: None)
    result = json.loads((run_dir / "cap" / "result.json").read_text())
    assert code == 0, result
    doc = json.loads((run_dir / "cap" / "capacity.json").read_text())
    assert doc["mode"] == "live" and result["measured"]["capacity_rps"] == 8
    assert all((run_dir / "cap" / s["dir"] / "summary.json").exists() for s in doc["steps"])


def test_a_capacity_stage_on_several_endpoints_searches_the_whole_layout(tmp_path):
    # 12 req/s is over one four-slot replica's ~10.5 but within two's: only a search that
    # loads both replicas passes it
    stage = {"target": {"simulator": PROFILE, "replicas": 2, "sim_args": ["--max-num-seqs", "4"]},
             "virtual": False, "min_rate": 12, "max_rate": 12, "duration_per_step": 6, "drain_timeout": 3,
             "cpu_limit": 1000, "lag_limit_ms": 1000000, "stamp_delay_limit_ms": 0}
    run_dir = tmp_path / "run"
    code = run_plan(plan_mod.validate(plan(**stage)), run_dir, log=lambda _m: None)
    result = json.loads((run_dir / "cap" / "result.json").read_text())
    assert code == 0, result
    doc = json.loads((run_dir / "cap" / "capacity.json").read_text())
    assert doc["target"]["endpoint_count"] == 2 and result["measured"]["capacity_rps"] == 12
    assert (run_dir / "cap" / "endpoints.json").exists() and "2 endpoints" in result["detail"]


def test_the_seed_plan_has_a_capacity_line_beside_every_serving_row():
    from pathlib import Path

    seed = plan_mod.load(Path(__file__).resolve().parents[1] / "plans" / "l40s-x12.yaml")
    stages = {s["name"]: s for s in seed["stages"]}
    for s in seed["stages"]:
        if s["stage"] == "serving":
            line = stages[s["name"].replace("serving-", "capacity-")]
            assert line["stage"] == "capacity" and line["table"] == s["table"]
            assert line["target"] == s["target"]
            # the row's own targets are the capacity line's SLOs
            assert {x.split("<=")[0] for x in line["slo"]} <= set(s["expect"])
    layouts = {x["name"]: x for x in seed["cost"]["layouts"]}
    assert all(stages[x["capacity_stage"]]["stage"] == "capacity"
               for x in layouts.values() if "capacity_stage" in x)
    assert "capacity_stage" in layouts["12 x 8B BF16"] and "capacity_stage" not in layouts["4 x 8B + 4 x TP=2 70B AWQ"]


def test_the_cost_at_the_slo_keeps_the_throughput_stages_measured_power():
    p = {"gpu": "l40s", "gpu_count": 1,
         "cost": {"purchase": 1000.0, "amortization_years": 1, "power_price_kwh": 0.1,
                  "layouts": [{"name": "8B", "gpus": 1, "stage": "tp", "capacity_stage": "cap"}]}}
    rows = cost.compute(p, {"tp": {"status": "pass", "measured": {"output_tokens_per_s": 2000.0},
                                   "power": {"avg_w": 300.0, "gpus": 1}},
                            "cap": {"status": "pass", "measured": {"output_tokens_per_s": 700.0}}})
    assert rows[0]["output_tokens_per_s"] == 700.0 and rows[0]["throughput_source"] == "measured at the SLO"
    assert rows[0]["power_source"] == "measured" and rows[0]["watts_per_gpu"] == 300.0
