"""locustfiles/shapes.py: ramp, step and spike over users (closed loop) or over the
request rate (open loop, changed while running through harness.plugin.set_rate, which the
master passes on to its workers)."""
from __future__ import annotations

import json
import subprocess
import sys

from loadrun import REPO, locust, read_jsonl, summary

# About load shapes, not generator health: a busy shared machine's CPU samples must not turn
# the exit code into 3.
NO_CPU_CHECK = ("--llm-cpu-limit", "1000")


def _levels(env: dict, times: list[float]) -> list:
    """level_at(t) of the shape the environment describes (in a subprocess: importing
    Locust monkey-patches the process)."""
    code = ("import json, sys; sys.path.insert(0, 'locustfiles'); import shapes; "
            f"s = shapes.make_shape(); print(json.dumps([s.level_at(t) for t in {times!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**_base_env(), **env}, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _base_env():
    import os
    return {k: v for k, v in os.environ.items() if not k.startswith("LLM_SHAPE")}


def test_shape_levels_from_environment_variables():
    assert _levels({"LLM_SHAPE": "ramp", "LLM_SHAPE_START": "2", "LLM_SHAPE_END": "10",
                    "LLM_SHAPE_DURATION": "8", "LLM_SHAPE_HOLD": "2"},
                   [0, 1, 4, 7.9, 8, 9.9, 10]) == [2, 3, 6, 9, 10, 10, None]
    assert _levels({"LLM_SHAPE": "ramp", "LLM_SHAPE_UNIT": "rate", "LLM_SHAPE_START": "1",
                    "LLM_SHAPE_END": "2", "LLM_SHAPE_DURATION": "10"}, [0, 5, 9.99]) == [1, 1.5, 1.9]
    assert _levels({"LLM_SHAPE": "step", "LLM_SHAPE_LEVELS": "4, 8,16", "LLM_SHAPE_STEP_SECONDS": "5"},
                   [0, 4.9, 5, 14.9, 15]) == [4, 4, 8, 16, None]
    assert _levels({"LLM_SHAPE": "spike", "LLM_SHAPE_BASE": "3", "LLM_SHAPE_PEAK": "30",
                    "LLM_SHAPE_SPIKE_AT": "10", "LLM_SHAPE_SPIKE_SECONDS": "5",
                    "LLM_SHAPE_DURATION": "20"}, [0, 9.9, 10, 14.9, 15, 19.9, 20]) == \
        [3, 3, 30, 30, 3, 3, None]


def test_bad_shape_settings_fail_with_a_message():
    code = "import sys; sys.path.insert(0, 'locustfiles'); import shapes; shapes.make_shape()"
    for env, words in (({"LLM_SHAPE": "zigzag"}, "LLM_SHAPE must be one of"),
                       ({"LLM_SHAPE": "step", "LLM_SHAPE_LEVELS": "a,b"}, "LLM_SHAPE_LEVELS"),
                       ({"LLM_SHAPE_UNIT": "tokens"}, "LLM_SHAPE_UNIT")):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                             env={**_base_env(), **env}, timeout=30)
        assert out.returncode != 0 and words in out.stderr, out.stderr


def _max_concurrency(records, start, end):
    """Most requests in flight at once among those sent in [start, end)."""
    events = []
    for r in records:
        if start <= r["sent_at"] < end:
            events += [(r["sent_at"], 1), (r["finished_at"], -1)]
    best = cur = 0
    for _, d in sorted(events):
        cur += d
        best = max(best, cur)
    return best


def test_step_shape_over_users_changes_closed_loop_concurrency(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    rc, log = locust("-f", "locustfiles/chat.py,locustfiles/shapes.py", "--headless", "--host", url,
                     "--llm-out", str(out), "--llm-input-len", "32", "--llm-output-len", "8",
                     "--only-summary", *NO_CPU_CHECK, timeout=40,
                     env={"LLM_SHAPE": "step", "LLM_SHAPE_LEVELS": "1,3", "LLM_SHAPE_STEP_SECONDS": "3"})
    assert rc == 0, log
    records = read_jsonl(out / "requests.jsonl")
    t0 = summary(out)["started_at"]
    assert _max_concurrency(records, t0, t0 + 2.5) == 1
    assert _max_concurrency(records, t0 + 4, t0 + 6) == 3
    assert max(r["sent_at"] for r in records) < t0 + 7     # the shape ended the run


def test_rate_shape_changes_the_open_loop_rate_on_every_worker(start_sim, tmp_path):
    url, _ = start_sim()
    out = tmp_path / "run"
    rc, log = locust("-f", "locustfiles/chat.py,locustfiles/shapes.py", "--headless", "--host", url,
                     "--processes", "2", "--llm-arrival", "constant", "--llm-window", "1",
                     "--llm-lag-limit-ms", "250",
                     "--llm-out", str(out), "--llm-input-len", "32", "--llm-output-len", "8",
                     "--only-summary", *NO_CPU_CHECK, timeout=60,
                     env={"LLM_SHAPE": "step", "LLM_SHAPE_UNIT": "rate", "LLM_SHAPE_LEVELS": "4,16",
                          "LLM_SHAPE_STEP_SECONDS": "4"})
    assert rc == 0, log
    records = read_jsonl(out / "requests.jsonl")
    s = summary(out)
    t0 = s["started_at"]

    def rate(a, b):
        return sum(1 for r in records if t0 + a <= r["scheduled_at"] < t0 + b) / (b - a)

    slow, fast = rate(1.0, 3.5), rate(5.0, 7.5)
    assert 3.0 <= slow <= 5.0, (slow, fast)
    assert 13.0 <= fast <= 19.0, (slow, fast)
    # both workers took part in each phase (each runs half of the rate)
    assert len(s["generator"]["requests_by_worker"]) == 2
    assert all(n > 0 for n in s["generator"]["requests_by_worker"].values())
    # the master's timeseries shows the target rate of each window
    targets = [json.loads(line)["target_rate"] for line in (out / "timeseries.jsonl").read_text().splitlines()]
    assert 4.0 in targets and 16.0 in targets
