"""The capacity search (harness/capacity.py): bracketing and bisection, how a step is judged
(confidence, unfinished requests, invalid steps), capacity.json, the error band's source,
and `harness capacity --profile` end to end in virtual time."""
from __future__ import annotations

import json
import math

import pytest

from harness import capacity as cap
from harness.cli import main


def result(min_rate=1.0, max_rate=100.0, resolution=0.05, slos=("ttft_p90_ms<=300",)) -> cap.CapacityResult:
    return cap.CapacityResult(mode="virtual", slos=list(slos), min_rate=min_rate, max_rate=max_rate,
                              resolution=resolution, confidence=0.95, duration_per_step_s=10.0,
                              workload={}, target={})


def threshold_server(capacity: float, offered: list[float], above: str = "fail"):
    """A step function whose SLO holds up to `capacity` req/s; records every rate offered."""
    def measure(rate: float) -> cap.Step:
        offered.append(rate)
        return cap.Step(rate=rate, status="pass" if rate <= capacity else above,
                        reasons=[] if rate <= capacity else ["over capacity"])
    return measure


def test_search_finds_the_capacity_within_the_resolution():
    offered: list[float] = []
    res = cap.search(result(resolution=0.05), threshold_server(13.7, offered))
    ans = res.answer()
    assert ans["found"] and ans["complete"]
    assert ans["rate"] <= 13.7 < ans["broke_at"]["rate"]
    assert (ans["broke_at"]["rate"] - ans["rate"]) / ans["rate"] <= 0.05
    assert offered[:5] == [1, 2, 4, 8, 16]          # bracketing doubles from --min-rate


def test_search_never_offers_more_than_max_rate():
    offered: list[float] = []
    res = cap.search(result(max_rate=20.0), threshold_server(1e9, offered))
    assert max(offered) == 20.0
    ans = res.answer()
    assert ans["found"] and ans["at_max_rate"] and ans["rate"] == 20.0
    assert "may be higher" in ans["text"]


def test_min_rate_breaking_is_no_capacity():
    offered: list[float] = []
    res = cap.search(result(min_rate=5.0), threshold_server(2.0, offered))
    assert offered == [5.0]
    assert not res.answer()["found"]
    assert "even 5 req/s breaks an SLO" in res.answer()["text"]


def test_an_invalid_step_is_never_a_pass_and_bounds_the_search():
    offered: list[float] = []
    res = cap.search(result(), threshold_server(6.0, offered, above="invalid"))
    ans = res.answer()
    assert ans["rate"] <= 6.0
    assert ans["broke_at"]["status"] == "invalid"
    assert all(s.status == "invalid" for s in res.steps if s.rate > 6.0)


def records(ttfts: list[float | None], *, incomplete: int = 0, failed: int = 0) -> list[dict]:
    """Requests sent 0.1 s apart with these TTFTs (ms); then incomplete and failed ones."""
    out = []
    for i, t in enumerate(ttfts):
        out.append({"sent_at": i * 0.1, "finished_at": i * 0.1 + t / 1e3 + 0.5, "ok": True,
                    "ttft_ms": t, "tpot_ms": 10.0, "e2e_ms": t + 500, "itl_ms": [10.0] * 3,
                    "output_tokens": 4})
    n = len(out)
    for j in range(incomplete):
        out.append({"sent_at": (n + j) * 0.1, "ok": False, "error_kind": "incomplete", "ttft_ms": None})
    for j in range(failed):
        out.append({"sent_at": (n + incomplete + j) * 0.1, "ok": False, "error_kind": "http_500"})
    return out


SLO_P90 = cap.parse_capacity_slos(["ttft_p90_ms<=300"])


def test_a_step_whose_interval_is_within_the_slo_passes():
    step = cap.judge_step(4.0, records([100.0 + (i % 7) for i in range(200)]), SLO_P90)
    assert step.status == "pass"
    c = step.checks[0]
    assert c["verdict"] == "holds" and c["ci"][1] <= 300


def test_unfinished_requests_count_as_infinitely_slow():
    # 175 fast requests and 25 that never finished: the fast ones alone would hold
    step = cap.judge_step(4.0, records([100.0] * 175, incomplete=25), SLO_P90)
    assert step.status == "fail"
    assert step.checks[0]["verdict"] == "breaks"
    assert step.checks[0]["unfinished"] == 25
    assert step.requests["incomplete"] == 25


def test_a_point_inside_the_slo_with_an_interval_across_it_is_uncertain_not_a_pass():
    # 15 of 200 requests (scattered) take 2 s: the p90 is 100 ms, but resampled blocks that
    # happen to hold more of the slow ones put it at 2 s
    import random

    vals = [100.0] * 185 + [2000.0] * 15
    random.Random(1).shuffle(vals)
    step = cap.judge_step(4.0, records(vals), SLO_P90)
    c = step.checks[0]
    assert c["value"] == 100.0 and c["ci"][1] > 300
    assert c["verdict"] == "uncertain"
    assert step.status == "fail"


def test_too_few_samples_for_a_percentile_is_not_a_pass():
    step = cap.judge_step(4.0, records([50.0] * 30), cap.parse_capacity_slos(["ttft_p99_ms<=300"]))
    assert step.checks[0]["verdict"] == "too few samples"
    assert "needs at least 500" in step.checks[0]["note"]
    assert step.status == "fail"


def test_failed_requests_without_an_error_rate_slo_make_the_step_a_server_error():
    step = cap.judge_step(4.0, records([50.0] * 100, failed=3), SLO_P90)
    assert step.status == "error"
    assert any("3 of 103 requests failed" in r for r in step.reasons)
    with_budget = cap.judge_step(4.0, records([50.0] * 100, failed=3),
                                 cap.parse_capacity_slos(["ttft_p90_ms<=300", "error_rate<=0.1"]))
    assert with_budget.status == "pass"


def test_a_step_needs_the_requests_its_percentiles_need():
    assert cap.min_requests(cap.parse_capacity_slos(["ttft_p99_ms<=200"])) == 500
    assert cap.min_requests(cap.parse_capacity_slos(["tpot_p90_ms<=30", "itl_p99_ms<=50"])) == 50
    bound, n = cap.step_plan(2.0, 10.0, cap.parse_capacity_slos(["ttft_p99_ms<=200"]))
    assert n == 500 and bound >= 250
    assert cap.step_plan(100.0, 10.0, SLO_P90)[1] == 1000


@pytest.mark.parametrize("slo", ["goodput_rps>=3", "ttft_p99_ms>=5", "icl_p99_ms<=3"])
def test_slos_without_a_confidence_interval_are_refused(slo, tmp_path, capsys):
    assert main(["capacity", "--profile", "l40s-llama-3-8b-bf16", "--slo", slo, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "capacity search judges upper bounds" in err[0]


@pytest.mark.parametrize("extra,words", [
    (["--min-rate", "5", "--max-rate", "2"], "--max-rate 2 must be at least --min-rate 5"),
    (["--resolution", "0"], "--resolution"),
    (["--max-num-seqs", "4", "--url", "http://127.0.0.1:9"], "only with --profile"),
    (["--dataset", "x.jsonl"], "--dataset needs a server"),
])
def test_bad_input_is_one_line_and_exit_2(extra, words, tmp_path, capsys):
    argv = ["capacity", "--slo", "ttft_p90_ms<=300", "--out", str(tmp_path / "o"), *extra]
    if "--url" not in extra:
        argv += ["--profile", "l40s-llama-3-8b-bf16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "o").exists()


def test_a_dead_url_is_bad_input_before_any_step(tmp_path, capsys):
    from harness.ports import free_port_block

    port = free_port_block(1)
    code = main(["capacity", "--url", f"http://127.0.0.1:{port}", "--slo", "ttft_p90_ms<=300",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "o" / "steps").exists()


def test_error_band_is_read_from_the_calibration_doc(tmp_path):
    doc = tmp_path / "cal.md"
    doc.write_text("# Calibration\n\ntext\n")
    assert cap.error_band(doc).startswith("not yet calibrated")
    doc.write_text("# Calibration\n\n## Error band per regime\n\nTTFT within +-12%, TPOT within +-6%.\n"
                   "Second line.\n\nlater paragraph\n")
    band = cap.error_band(doc)
    assert band.startswith("TTFT within +-12%, TPOT within +-6%. Second line.")
    assert "later paragraph" not in band


VIRTUAL = ["capacity", "--profile", "l40s-llama-3-8b-bf16", "--max-num-seqs", "4", "--input-len", "64",
           "--output-len", "16", "--slo", "ttft_p90_ms<=300", "--duration-per-step", "8",
           "--drain-timeout", "5", "--arrival", "constant", "--resolution", "0.1"]


def test_profile_mode_finds_a_capacity_in_virtual_time_and_writes_capacity_json(tmp_path, capsys):
    out = tmp_path / "cap"
    assert main([*VIRTUAL, "--min-rate", "2", "--max-rate", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "virtual time" in text and "simulator error band" in text
    doc = json.loads((out / "capacity.json").read_text())
    assert doc["schema_version"] == cap.SCHEMA_VERSION and doc["mode"] == "virtual"
    ans = doc["answer"]
    assert ans["found"] and ans["complete"] and ans["output_tokens_per_s"] > 0
    lo, hi = doc["bracket"]["low"], doc["bracket"]["high"]
    assert lo == ans["rate"] and (hi - lo) / lo <= 0.1
    # four slots, 16 tokens of ~25 ms decode steps each: about 10 requests/s
    assert 6 < ans["rate"] < 14
    by_rate = {s["rate"]: s for s in doc["steps"]}
    assert by_rate[lo]["status"] == "pass" and by_rate[hi]["status"] != "pass"
    for s in doc["steps"]:
        c = s["checks"][0]
        assert c["slo"] == "ttft_p90_ms<=300" and c["verdict"] in ("holds", "breaks", "uncertain")
        assert (s["status"] == "pass") == (c["verdict"] == "holds")
    assert doc["error_band"] == cap.error_band()
    html = (out / "report.html").read_text()
    assert 'class="chart capacity-curve"' in html
    assert 'class="rule" data-name="SLO TTFT p90 &lt;= 300 ms"' in html
    assert f'data-name="capacity {lo:.4g} req/s' in html


def test_profile_mode_exits_1_when_even_min_rate_breaks(tmp_path, capsys):
    out = tmp_path / "cap"
    assert main([*VIRTUAL[:-6], "--slo", "ttft_p90_ms<=1", "--out", str(out)]) == 1
    doc = json.loads((out / "capacity.json").read_text())
    assert not doc["answer"]["found"] and len(doc["steps"]) == 1
    assert "no capacity in range" in capsys.readouterr().out


def test_an_existing_search_is_not_overwritten(tmp_path):
    out = tmp_path / "cap"
    assert main([*VIRTUAL, "--min-rate", "2", "--max-rate", "4", "--out", str(out)]) == 0
    assert main([*VIRTUAL, "--min-rate", "2", "--max-rate", "4", "--out", str(out)]) == 2


def test_infinite_values_are_written_as_json_null(tmp_path):
    step = cap.judge_step(4.0, records([], incomplete=60), SLO_P90)
    res = result()
    res.steps.append(step)
    text = json.dumps(res.to_dict(), allow_nan=False)
    c = json.loads(text)["steps"][0]["checks"][0]
    assert c["value"] is None and c["verdict"] == "breaks" and "did not finish" in c["note"]
    assert not math.isnan(step.checks[0]["samples"])


# -- --users: the highest closed-loop concurrency -----------------------------------------------
def users_result(min_users=1, max_users=256) -> cap.CapacityResult:
    res = result(min_rate=float(min_users), max_rate=float(max_users))
    res.load = "users"
    return res


def test_users_search_bisects_whole_users_and_ends_at_a_one_user_bracket():
    offered: list[float] = []
    res = cap.search(users_result(), threshold_server(23, offered))
    ans = res.answer()
    assert offered == [1, 2, 4, 8, 16, 32, 24, 20, 22, 23]
    assert all(float(r).is_integer() for r in offered)
    assert ans["found"] and ans["complete"] and ans["rate"] == 23 and ans["broke_at"]["rate"] == 24
    assert ans["unit"] == "users" and ans["text"].startswith("sustains 23 users")


def test_users_search_never_runs_more_than_max_users():
    offered: list[float] = []
    res = cap.search(users_result(min_users=3, max_users=20), threshold_server(1e9, offered))
    assert offered == [3, 6, 12, 20]
    assert "--max-users 20 reached" in res.answer()["text"]


def test_a_users_step_judges_all_but_every_users_first_request():
    slos = cap.parse_capacity_slos(["ttft_p99_ms<=200"])
    bound, n = cap.users_step_plan(8, 120.0, slos)
    assert (bound, n) == (120.0, 8 + 500)
    assert cap.users_step_plan(200, 120.0, slos)[1] == 200 + 4 * 200
    recs = records([900.0] * 8 + [50.0] * 100)      # the start's burst, then steady
    judged = cap.users_warmup(list(reversed(recs)), 8)
    assert len(judged) == 100 and all(r["ttft_ms"] == 50.0 for r in judged)


def test_a_closed_loop_never_has_more_requests_in_flight_than_users():
    from harness.capacity_replay import closed_loop
    from servers.simulator.replay import resolve_profile

    prof = resolve_profile("l40s-llama-3-8b-bf16", max_num_seqs=4)
    recs = closed_loop(prof, 6, 120, 60.0, 70.0, 64, 16)
    assert len(recs) == 120 and all(r.ok for r in recs)
    events = sorted([(r.arrival_s, 1) for r in recs] + [(r.finish_s, -1) for r in recs],
                    key=lambda e: (e[0], e[1]))
    in_flight, most = 0, 0
    for _, d in events:
        in_flight += d
        most = max(most, in_flight)
    assert most == 6
    # every user starts at once; each next request is sent the moment one finished
    sends = sorted(r.arrival_s for r in recs)
    assert sends[:6] == [0.0] * 6
    assert sends[6:] == pytest.approx(sorted(r.finish_s for r in recs)[:120 - 6])


USERS = ["capacity", "--users", "--profile", "l40s-llama-3-8b-bf16", "--max-num-seqs", "4",
         "--input-len", "64", "--output-len", "16", "--slo", "ttft_p90_ms<=300",
         "--duration-per-step", "30", "--drain-timeout", "3"]


def test_users_profile_mode_finds_the_highest_concurrency_in_virtual_time(tmp_path, capsys):
    out = tmp_path / "cap"
    assert main([*USERS, "--min-users", "2", "--max-users", "16", "--out", str(out)]) == 0
    doc = json.loads((out / "capacity.json").read_text())
    assert doc["load"] == "users" and doc["unit"] == "users" and doc["mode"] == "virtual"
    ans = doc["answer"]
    # four slots of ~0.4 s requests, every user started at once: a fifth user's request
    # waits a whole request for a slot (~0.4 s), one in five: the p90 breaks
    assert ans["found"] and ans["complete"] and ans["rate"] == 4
    assert ans["broke_at"]["rate"] == ans["rate"] + 1
    assert ans["requests_per_s"] > 0 and ans["output_tokens_per_s"] > 0
    assert {s["rate"] for s in doc["steps"]} <= set(map(float, range(2, 17)))
    assert all(s["requests"]["sent"] >= 50 for s in doc["steps"])
    text = capsys.readouterr().out
    assert f"sustains {ans['rate']:g} users" in text and "users 2..16" in text
    assert 'data-name="capacity' in (out / "report.html").read_text()
    assert "concurrent users" in (out / "report.html").read_text()


@pytest.mark.parametrize("extra,words", [
    (["--min-users", "4"], "--min-users and --max-users bound a concurrency search: add --users"),
    (["--users", "--min-rate", "2"], "with --users give --min-users and --max-users"),
    (["--users", "--min-users", "8", "--max-users", "4"], "--max-users 4 must be at least --min-users 8"),
    (["--users", "--min-users", "0"], "--min-users must be at least 1 user"),
])
def test_bad_users_input_is_one_line_and_exit_2(extra, words, tmp_path, capsys):
    argv = ["capacity", "--profile", "l40s-llama-3-8b-bf16", "--slo", "ttft_p90_ms<=300",
            "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_an_unreadable_endpoint_list_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "endpoints.json"
    bad.write_text("{}")
    assert main(["capacity", "--endpoints", str(bad), "--slo", "ttft_p90_ms<=300",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable endpoint list" in err[0]
    assert not (tmp_path / "o").exists()


def test_an_open_loop_step_over_n_endpoints_runs_a_multiple_of_n_workers():
    from harness.commands.capacity import spread_workers

    assert spread_workers(1, 12, users=False) == 12
    assert spread_workers(13, 12, users=False) == 24
    assert spread_workers(1, 1, users=False) == 1
    assert spread_workers(1, 12, users=True) == 1     # a closed loop's users spread by class
