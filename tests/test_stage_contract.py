"""The stage contract (harness/stages/contract.py): a stage kind is its module alone. A kind
written into a folder of harness.stages runs in a plan, adds to run.json's environment and to
the report, and has its targets marked, with no other file naming it."""
from __future__ import annotations

import json
import sys

import pytest

import harness.stages as stages_pkg
from harness import plan as plan_mod
from harness import runner
from harness.stages import contract

DEMO = '''
"""A demo kind: measures the length of its own ``word:``."""
from harness.stages.base import Field, StageResult

PARAMS = {"word": Field("str", "hello")}
METRICS = {"letters": ">="}


def run_stage(params, ctx):
    letters = float(len(params["word"]))
    ok = letters >= float(params.get("expect", {}).get("letters", 0))
    return StageResult(name=ctx.name, stage="demo", status="pass" if ok else "fail",
                       measured={"letters": letters}, expected=dict(params.get("expect") or {}))


def target_marks(stage, plan):
    return [{"metric": "letters", "value": 99.0, "source": "target", "bound": 26.0,
             "mark": "impossible", "detail": "more letters than the alphabet"}]


def run_environment(result, env):
    env["demo_word_letters"] = result["measured"]["letters"]


def report_tables(name, result):
    return [("demo-letters", "Demo letters", ["stage", "letters"], [[name, str(result["measured"]["letters"])]])]


def report_charts(run_dir, name, result):
    return ['<svg class="chart demo-chart"></svg>']
'''


def test_the_kinds_are_the_stage_modules():
    assert contract.kinds() == ("capacity", "cluster", "command", "hardware", "perplexity",
                                "serving", "soak", "throughput")
    for kind in contract.kinds():
        assert isinstance(contract.stage_module(kind), contract.Stage), kind
    assert contract.hook("command", "report_charts") is None and contract.hook("gone", "target_marks") is None
    with pytest.raises(plan_mod.PlanError, match=r"stages\[0\] \(a\)\.stage: 'gone' is not one of capacity, "):
        plan_mod.validate({"name": "p", "stages": [{"name": "a", "stage": "gone"}]})


@pytest.fixture
def demo_kind(tmp_path, monkeypatch):
    folder = tmp_path / "kinds"
    folder.mkdir()
    (folder / "demo.py").write_text(DEMO)
    monkeypatch.setattr(stages_pkg, "__path__", [*stages_pkg.__path__, str(folder)])
    contract.kinds.cache_clear()
    yield
    monkeypatch.delitem(sys.modules, "harness.stages.demo", raising=False)
    contract.kinds.cache_clear()


def test_a_new_kind_touches_only_its_module(demo_kind, tmp_path):
    assert "demo" in contract.kinds()
    plan = plan_mod.validate({"name": "demo-plan", "stages": [
        {"name": "d", "stage": "demo", "word": "harness", "expect": {"letters": 5}}]})
    out = tmp_path / "run"
    assert runner.run_plan(plan, out, log=lambda m: None) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["statuses"] == {"d": "pass"}
    assert run["environment"]["demo_word_letters"] == 7.0
    assert run["target_marks"]["d"][0]["mark"] == "impossible"
    md = (out / "report.md").read_text()
    assert "## Demo letters" in md and "| d | 7.0 |" in md and "more letters than the alphabet" in md
    assert 'class="chart demo-chart"' in (out / "report.html").read_text()
