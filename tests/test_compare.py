"""`harness compare` on synthetic results directories: the bootstrap machinery, verdicts,
exit codes and outputs. Real runs against the simulator are in test_compare_runs.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness.cli import main
from harness.compare import (
    bootstrap_quantiles,
    compare,
    grouped_samples,
    load_run,
    measured,
    metric_keys,
)

T0 = 1_800_000_000.0


def write_run(path, *, n=400, scale=1.0, fail_every=0, seed=0, gap=0.05, out_tokens=32,
              started_at=T0, extra_records=()):
    """A results directory whose latencies are lognormal around realistic values."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    lines = list(extra_records)
    t = started_at + 0.01
    for i in range(n):
        ok = not (fail_every and i % fail_every == 0)
        ttft = float(80 * scale * rng.lognormal(0, 0.25))
        tpot = float(20 * scale * rng.lognormal(0, 0.1))
        itl = [float(tpot * rng.lognormal(0, 0.2)) for _ in range(out_tokens - 1)]
        e2e = ttft + tpot * (out_tokens - 1)
        lines.append({"id": str(i), "ok": ok, "status": 200 if ok else 500,
                      "error_kind": None if ok else "http_500", "sent_at": t,
                      "finished_at": t + e2e / 1000, "output_tokens": out_tokens if ok else None,
                      "input_tokens": 64, "ttft_ms": ttft if ok else None, "tpot_ms": tpot if ok else None,
                      "e2e_ms": e2e if ok else None, "itl_ms": itl if ok else []})
        t += gap * scale
    with open(path / "requests.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    (path / "summary.json").write_text(json.dumps(
        {"schema": 1, "started_at": started_at, "duration_s": t - started_at,
         "workload": {"warmup_s": 0.0, "cooldown_s": 0.0}}))
    return path


def by_metric(result):
    return {m["metric"]: m for m in result["metrics"]}


def test_weighted_bootstrap_equals_materialized_resamples():
    rng = np.random.default_rng(0)
    values = rng.lognormal(3, 0.5, 60)
    groups = np.repeat(np.arange(12), 5)
    qs = [0.5, 0.9, 0.99]
    got = bootstrap_quantiles(values, groups, 12, qs, 50, np.random.default_rng(42))
    # Same draws, materialized: repeat each group's values by its multiplicity.
    counts = np.random.default_rng(42).multinomial(12, np.full(12, 1 / 12), size=50)
    for b in range(50):
        sample = np.sort(np.concatenate([np.tile(values[groups == g], c) for g, c in enumerate(counts[b])]))
        want = [sample[max(1, math.ceil(q * len(sample))) - 1] for q in qs]
        assert list(got[b]) == want


def test_grouped_samples_blocks_follow_send_order_and_keep_tokens_together():
    recs = [{"ok": True, "sent_at": 10 - i, "itl_ms": [float(i)] * 3} for i in range(10)]
    recs.append({"ok": False, "sent_at": 0.5, "itl_ms": []})
    vals, groups, k, n = grouped_samples(recs, "itl_ms")
    assert n == 10 and k == 5 and len(vals) == 30
    # sent last -> first in time order is i=9; blocks are contiguous in send order
    assert list(vals[:3]) == [9.0] * 3 and groups[0] == 0 and groups[-1] == k - 1
    assert all(len(set(groups[j:j + 3])) == 1 for j in range(0, 30, 3))


def test_same_distribution_is_not_a_regression(tmp_path):
    base = load_run(write_run(tmp_path / "a", seed=1))
    run = load_run(write_run(tmp_path / "b", seed=2))
    r = compare(base, run)
    assert r["regression"] is False and r["regressions"] == []
    assert set(by_metric(r)) == set(metric_keys())
    for row in r["metrics"]:
        assert row["verdict"] in ("within noise", "below threshold", "improved", "too few samples")


def test_thirty_percent_slower_is_a_regression_with_ci_excluding_zero(tmp_path):
    base = load_run(write_run(tmp_path / "a", seed=1))
    run = load_run(write_run(tmp_path / "b", seed=2, scale=1.3))
    r = compare(base, run)
    rows = by_metric(r)
    for key in ("ttft_p50_ms", "tpot_p50_ms", "tpot_p90_ms", "itl_p99_ms", "e2e_p50_ms"):
        assert rows[key]["verdict"] == "REGRESSION", rows[key]
        assert rows[key]["ci"][0] > 0 and rows[key]["rel_change"] > 0.05
    assert rows["ttft_p99_ms"]["verdict"] == "too few samples"   # 400 requests: 4 above p99
    assert rows["output_tokens_per_s"]["verdict"] == "REGRESSION"
    assert rows["output_tokens_per_s"]["ci"][1] < 0
    # the other way round it is an improvement, not a regression
    back = compare(run, base)
    assert back["regression"] is False and by_metric(back)["tpot_p50_ms"]["verdict"] == "improved"


def test_a_real_but_small_change_is_below_threshold(tmp_path):
    base = load_run(write_run(tmp_path / "a", seed=1, n=3000))
    run = load_run(write_run(tmp_path / "b", seed=1, n=3000, scale=1.02))   # same draws, 2% slower
    row = by_metric(compare(base, run))["tpot_p50_ms"]
    assert row["ci"][0] > 0 and row["verdict"] == "below threshold"
    assert by_metric(compare(base, run, threshold=0.01))["tpot_p50_ms"]["verdict"] == "REGRESSION"


def test_error_rate_regression_uses_an_absolute_threshold(tmp_path):
    base = load_run(write_run(tmp_path / "a", seed=1))
    run = load_run(write_run(tmp_path / "b", seed=1, fail_every=5))       # 20% failures
    row = by_metric(compare(base, run))["error_rate"]
    assert row["run"] == pytest.approx(0.2) and row["verdict"] == "REGRESSION"
    assert by_metric(compare(base, run, error_rate_threshold=0.5))["error_rate"]["verdict"] == "below threshold"


def test_seeded_results_are_reproducible(tmp_path):
    base = load_run(write_run(tmp_path / "a", seed=1))
    run = load_run(write_run(tmp_path / "b", seed=2))
    assert compare(base, run, seed=5) == compare(base, run, seed=5)


def test_measured_window_drops_warmup_and_an_earlier_runs_lines(tmp_path):
    old = [{"id": "old", "ok": True, "sent_at": T0 - 500, "finished_at": T0 - 499, "ttft_ms": 9999.0}]
    p = write_run(tmp_path / "a", n=20, extra_records=old)
    summary = json.loads((p / "summary.json").read_text())
    summary["workload"]["warmup_s"] = 0.5          # the first 10 requests (gap 0.05 s) are warm-up
    recs = measured([json.loads(x) for x in (p / "requests.jsonl").read_text().splitlines()], summary)
    assert len(recs) == 10 and all(r["id"] != "old" for r in recs)


def test_cli_exit_codes_table_and_json(tmp_path, capsys):
    a = write_run(tmp_path / "a", seed=1)
    b = write_run(tmp_path / "b", seed=2)
    slow = write_run(tmp_path / "slow", seed=2, scale=1.5)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "TTFT p50 ms" in out and "no regression" in out
    assert json.loads((b / "compare.json").read_text())["regression"] is False

    assert main(["compare", str(a), str(slow), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["regression"] is True and "tpot_p50_ms" in result["regressions"]
    assert main(["compare", str(a), str(slow)]) == 1
    assert "REGRESSION: " in capsys.readouterr().out
    # gate on one metric only
    assert main(["compare", str(a), str(slow), "--metric", "error_rate", "--out", str(tmp_path / "x.json")]) == 0
    assert [m["metric"] for m in json.loads((tmp_path / "x.json").read_text())["metrics"]] == ["error_rate"]


@pytest.mark.parametrize("argv,needle", [
    (["{tmp}/missing", "{a}"], "no such results directory"),
    (["{a}", "{tmp}/empty"], "no requests.jsonl"),
    (["{a}", "{a}", "--confidence", "1.5"], "--confidence"),
    (["{a}", "{a}", "--metric", "ttft_p42_ms"], "unknown --metric"),
    (["{a}", "{a}", "--resamples", "5"], "--resamples"),
])
def test_cli_bad_input_is_exit_2_with_one_line(tmp_path, capsys, argv, needle):
    a = write_run(tmp_path / "a", n=20)
    (tmp_path / "empty").mkdir()
    argv = [x.format(tmp=tmp_path, a=a) for x in argv]
    assert main(["compare", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness compare: error:") and needle in err and "\n" not in err


def test_table_labels_the_change_in_percent_and_its_interval_in_the_metrics_unit(tmp_path, capsys):
    a = write_run(tmp_path / "a", seed=1)
    slow = write_run(tmp_path / "slow", seed=2, scale=1.5)
    main(["compare", str(a), str(slow)])
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("metric"))
    assert "change %" in head and "CI of change (unit)" in head
    ttft = next(line for line in lines if line.startswith("TTFT p50 ms"))
    assert "%" in ttft and "] ms" in ttft, ttft
    rate = next(line for line in lines if line.startswith("output tok/s"))
    assert "] tok/s" in rate, rate
