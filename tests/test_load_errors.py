"""Every error kind is classified, counted once, visible everywhere, and never retried."""
from __future__ import annotations

import urllib.request

from conftest import free_port_block
from loadrun import harness_load, locust_aggregated, read_jsonl, summary, wait_for, whole_lines

KINDS = ("http_500", "http_429", "disconnect", "timeout", "malformed_event")
# About error accounting, not generator health: a busy shared machine's CPU samples must not
# turn the exit code into 3 (it takes precedence over 4).
NO_CPU_CHECK = ("--cpu-limit", "1000")


def _sim_success_total(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "vllm:request_success":
            total += sum(s.value for s in fam.samples if s.name.endswith("_total"))
    return total


def _check_visible(out, records, n):
    s = summary(out)
    counted = {}
    for r in records:
        if not r["ok"]:
            counted[r["error_kind"]] = counted.get(r["error_kind"], 0) + 1
            assert r["ttft_ms"] is None and r["e2e_ms"] is None and r["tpot_ms"] is None
    assert s["requests"]["errors_by_kind"] == counted
    assert s["requests"]["failed"] == sum(counted.values())
    assert s["requests"]["completed"] + s["requests"]["failed"] + s["requests"]["incomplete"] == n
    # Locust's own stats: one entry per request, failures included (no pseudo-requests)
    agg = locust_aggregated(out)
    assert int(agg["Request Count"]) == n
    assert int(agg["Failure Count"]) == s["requests"]["failed"]
    return s, counted


def test_each_simulator_fault_is_counted_under_its_kind_and_not_retried(start_sim, tmp_path):
    truth = tmp_path / "truth.jsonl"
    # roughly one request in seven for each kind (the checks run in this order)
    url, _ = start_sim("--truth-log", str(truth), "--fault-http-500", "0.15", "--fault-http-429", "0.15",
                       "--fault-drop", "0.2", "--fault-stall", "0.25", "--stall-seconds", "3",
                       "--fault-malformed", "0.35")
    out = tmp_path / "run"
    n = 80
    rc, log = harness_load("--url", url, "--users", "8", "--num-requests", str(n), "--input-len", "32",
                           "--output-len", "8", "--timeout", "0.8", "--out", str(out), "--quiet",
                           *NO_CPU_CHECK, timeout=60)
    assert rc == 4, log   # requests failed and no error_rate SLO judged them
    records = read_jsonl(out / "requests.jsonl")
    assert len(records) == n
    s, counted = _check_visible(out, records, n)
    assert set(counted) == set(KINDS), counted
    assert s["slo"]["passed"] and s["generator"]["valid"]
    statuses = {r["error_kind"]: r["status"] for r in records if not r["ok"]}
    assert statuses["http_500"] == 500 and statuses["http_429"] == 429

    # No retries: every request the engine admitted (all but the HTTP errors) is in the
    # server's truth log and its success counter exactly once.
    admitted = n - counted["http_500"] - counted["http_429"]
    # A request stalled at the end of the run is released 3 s later; the wait ends as soon as
    # every admitted request has its line (the bound only matters on a slow machine).
    assert wait_for(lambda: whole_lines(truth) >= admitted, 30.0), (whole_lines(truth), admitted)
    assert len(read_jsonl(truth)) == admitted
    assert wait_for(lambda: _sim_success_total(url) == admitted, 10.0), _sim_success_total(url)


def test_closed_port_is_counted_as_connect_errors(tmp_path):
    port = free_port_block(1)
    out = tmp_path / "run"
    rc, log = harness_load("--url", f"http://127.0.0.1:{port}", "--users", "2", "--num-requests", "6",
                           "--input-len", "16", "--output-len", "4", "--out", str(out), "--quiet",
                           "--no-preflight",   # about classifying a server gone mid-run
                           *NO_CPU_CHECK, timeout=40)
    assert rc == 4, log
    records = read_jsonl(out / "requests.jsonl")
    assert len(records) == 6
    assert {r["error_kind"] for r in records} == {"connect"}
    assert all(r["status"] is None and r["ok"] is False for r in records)
    s, counted = _check_visible(out, records, 6)
    assert counted == {"connect": 6}
    assert s["ttft_ms"]["count"] == 0
