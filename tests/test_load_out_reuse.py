"""`harness load --out DIR` never mixes two runs: a directory that already holds a run is
refused (exit 2, one line naming --overwrite, the earlier results untouched, nothing sent);
with --overwrite the earlier run's files are replaced, not appended to; a plan's load stages
pass --overwrite for their own folders, so a stage run again on resume replaces its attempt."""
from __future__ import annotations

import json
import sys

from loadrun import Run, harness_load, read_jsonl, summary, whole_lines

QUIET_GENERATOR = ("--cpu-limit", "1000", "--lag-limit-ms", "1000000", "--stamp-delay-limit-ms", "0")


def _load(url: str, out, n: int, *extra: str) -> tuple[int, str]:
    return harness_load("--url", url, "--users", "1", "--num-requests", str(n), "--input-len", "16",
                        "--output-len", "4", "--out", str(out), "--quiet", *QUIET_GENERATOR, *extra,
                        timeout=90)


def test_a_second_run_into_the_same_out_is_refused_and_the_first_is_kept(start_sim, tmp_path):
    truth = tmp_path / "truth.jsonl"
    url, _ = start_sim("--truth-log", str(truth))
    out = tmp_path / "run"
    rc, log = _load(url, out, 3)
    assert rc == 0, log
    before = {name: (out / name).read_bytes() for name in ("summary.json", "requests.jsonl", "timeseries.jsonl")}
    sent = whole_lines(truth)

    rc, log = _load(url, out, 3)
    assert rc == 2, log
    assert log.strip().splitlines() == [
        f"harness load: error: --out {str(out)!r} already holds a run (summary.json); give another --out, "
        f"or add --overwrite to replace it"], log
    assert {name: (out / name).read_bytes() for name in before} == before
    assert whole_lines(truth) == sent   # nothing was sent


def test_a_run_killed_before_its_summary_still_counts_as_a_run(tmp_path, capsys):
    from harness import cli

    out = tmp_path / "run"
    out.mkdir()
    (out / "requests.jsonl").write_text('{"ok": true}\n')
    assert cli.main(["load", "--url", "http://127.0.0.1:9", "--duration", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run (requests.jsonl)" in err and "--overwrite" in err
    assert (out / "requests.jsonl").read_text() == '{"ok": true}\n'


def test_overwrite_replaces_the_earlier_run_and_leaves_other_files(sim_server, tmp_path):
    out = tmp_path / "run"
    rc, log = _load(sim_server, out, 4)
    assert rc == 0, log
    first = summary(out)
    (out / "notes.txt").write_text("mine")

    rc, log = _load(sim_server, out, 2, "--overwrite")
    assert rc == 0, log
    assert len(read_jsonl(out / "requests.jsonl")) == 2   # replaced, not 4 + 2
    s = summary(out)
    assert s["requests"]["completed"] == 2 and s["started_at"] > first["started_at"]
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_keeps_the_earlier_run_when_the_new_one_cannot_start(sim_server, tmp_path):
    out = tmp_path / "run"
    rc, log = _load(sim_server, out, 2)
    assert rc == 0, log
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc, log = _load(sim_server, out, 2, "--overwrite", "--model", "no-such-model")
    assert rc == 2 and "'no-such-model' is not served" in log, log
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_directory_without_a_run_is_used_as_it_is(sim_server, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, log = _load(sim_server, out, 1)
    assert rc == 0, log
    assert summary(out)["requests"]["completed"] == 1 and (out / "notes.txt").read_text() == "mine"


PLAN = """
name: reuse
stages:
  - name: serving
    stage: serving
    target: {{url: {url}}}
    users: 1
    num_requests: 3
    input_len: 16
    output_len: 4
    cpu_limit: 1000
    lag_limit_ms: 1000000
"""


def test_a_load_stage_run_again_on_resume_replaces_its_earlier_attempt(sim_server, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.format(url=sim_server))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "harness.cli", "run", str(plan), "--out", str(out)]
    rc, log = Run(argv).wait(120)
    assert rc == 0, log
    load_dir = out / "serving" / "load"
    first = summary(load_dir)
    # as if `harness run` had been stopped after the stage's load, before its result: resumed,
    # the stage runs again into the same folder
    (out / "serving" / "result.json").unlink()
    rc, log = Run(argv).wait(120)
    assert rc == 0, log
    result = json.loads((out / "serving" / "result.json").read_text())
    assert result["status"] == "pass", result
    assert summary(load_dir)["started_at"] > first["started_at"]
    assert len(read_jsonl(load_dir / "requests.jsonl")) == 3
