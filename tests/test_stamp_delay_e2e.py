"""End to end against the simulator: a load generator whose event loop is blocked in bursts
(a listener calling the real time.sleep for 50 ms every 100 ms, in each worker) stamps late,
and its run comes out `generator.valid: false` with the stamp-delay reason and exit code 3;
the same locustfile without the stall stays valid. The stall is gross on purpose (the default
limit is 10 ms at p99) so that a noisy machine cannot flip either outcome."""
from __future__ import annotations

from loadrun import harness_load, summary

STALL_LOCUSTFILE = '''
import os

import gevent
from gevent import monkey
from locust import events
from locust.runners import MasterRunner

import harness.plugin  # noqa: F401
from harness.llm_user import ChatUser

block = monkey.get_original("time", "sleep")   # Locust patched time.sleep into gevent's
STALL_S = float(os.environ.get("TEST_STALL_S", "0"))


class Chat(ChatUser):
    pass


@events.test_start.add_listener
def _stall(environment, **_kw):
    if STALL_S <= 0 or isinstance(environment.runner, MasterRunner):
        return

    def staller():
        while True:
            gevent.sleep(STALL_S)
            block(STALL_S)           # the whole event loop waits: every read is late
    gevent.spawn(staller)
'''

# The CPU check is not the subject here (a shared machine's noise must not fail the run).
COMMON = ("--users", "8", "--duration", "6", "--input-len", "32", "--output-len", "64",
          "--cpu-limit", "1000", "--quiet")


def test_a_stalled_generator_is_invalid_and_a_normal_one_valid(sim_server, tmp_path):
    locustfile = tmp_path / "stall_locustfile.py"
    locustfile.write_text(STALL_LOCUSTFILE)

    out = tmp_path / "normal"
    rc, log = harness_load("--url", sim_server, "--locustfile", str(locustfile), *COMMON,
                           "--out", str(out), timeout=90, env={"TEST_STALL_S": "0"})
    s = summary(out)
    gen = s["generator"]
    d = gen["stamp_delay_ms"]
    assert rc == 0 and gen["valid"], (gen, log[-3000:])
    assert d["count"] > 0 and d["p50"] is not None and d["p99"] is not None, d
    assert d["loop_lag"]["count"] > 0, d
    assert d["limit"] == 10.0
    assert s["requests"]["completed"] > 0

    out = tmp_path / "stalled"   # two workers: the delays travel in their reports to the master
    rc, log = harness_load("--url", sim_server, "--locustfile", str(locustfile), *COMMON,
                           "--workers", "2", "--out", str(out), timeout=120,
                           env={"TEST_STALL_S": "0.05"})
    s = summary(out)
    gen = s["generator"]
    assert rc == 3 and not gen["valid"], (gen, log[-3000:])
    late = [r for r in gen["reasons"] if r.startswith("stamp delay p99")]
    assert late, gen["reasons"]
    d = gen["stamp_delay_ms"]
    assert d["loop_lag"]["p99"] >= 20.0, d   # the 50 ms stalls, seen in full
    assert d["count"] > 0, d
    assert s["requests"]["completed"] > 0
