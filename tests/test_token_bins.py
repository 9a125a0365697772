"""Throughput over time books each output token to the window it streamed in.

Unit tests of harness.token_bins, the charts' revision of earlier windows, and a real closed
loop whose timeseries.jsonl lines are checked token by token against requests.jsonl.
"""
from __future__ import annotations

import math

from harness import token_bins
from harness.webui import Timeline
from loadrun import harness_load, read_jsonl, summary


def _rec(sent, ttft_ms, itl_ms, tokens):
    return {"ok": True, "sent_at": sent, "ttft_ms": ttft_ms, "itl_ms": itl_ms, "output_tokens": tokens,
            "e2e_ms": ttft_ms + sum(itl_ms)}


def test_tokens_go_to_the_bins_they_streamed_in():
    bins: token_bins.Bins = {}
    # first token at 9.5 s, then one every 0.2 s: 9.5..9.9 | 10.1..10.9 | 11.1, 11.3
    token_bins.book(bins, _rec(9.0, 500, [200] * 9, 10), 1.0)
    assert bins == {9: 3.0, 10: 5.0, 11: 2.0}


def test_fewer_events_than_tokens_share_the_tokens_evenly():
    bins: token_bins.Bins = {}
    token_bins.book(bins, _rec(9.0, 500, [200] * 9, 20), 1.0)   # 10 events carried 20 tokens
    assert bins == {9: 6.0, 10: 10.0, 11: 4.0}


def test_a_request_within_one_bin_and_failed_requests():
    bins: token_bins.Bins = {}
    token_bins.book(bins, _rec(3.1, 100, [10] * 5, 6), 5.0)
    token_bins.book(bins, {"ok": False, "sent_at": 3.0, "ttft_ms": 5, "output_tokens": 7}, 5.0)
    assert bins == {0: 6.0}


def test_workers_bins_add_up():
    a: token_bins.Bins = {1: 2.0}
    changed = token_bins.merge(a, token_bins.to_pairs({1: 3.0, 2: 1.5}))
    assert a == {1: 5.0, 2: 1.5} and changed == {1, 2}


def test_charts_timeline_revises_a_window_that_gained_tokens():
    tl = Timeline()
    tl({"t": 10.0, "output_tokens": 5.0, "output_tokens_per_s": 1.0})
    tl({"t": 15.0, "output_tokens": 0.0, "output_tokens_per_s": 0.0})
    tl.revise({"t": 10.0, "output_tokens": 25.0, "output_tokens_per_s": 5.0})
    assert tl.revised_since(0, 15.0) == [{"t": 10.0, "output_tokens": 25.0, "output_tokens_per_s": 5.0,
                                          "rev": 1}]
    assert tl.revised_since(1, 15.0) == []


def _arrivals(r):
    t = r["sent_at"] + r["ttft_ms"] / 1000
    points = [t]
    for gap in r["itl_ms"]:
        t += gap / 1000
        points.append(t)
    return points


def test_timeseries_tokens_are_booked_by_arrival_and_add_up_to_the_summary(sim_server, tmp_path):
    out = tmp_path / "run"
    width = 1.0
    # closed loop of requests (~2.5 s each) longer than a window: booked when they finished,
    # windows would alternate between none and several requests' worth of tokens
    rc, log = harness_load("--url", sim_server, "--users", "3", "--duration", "6", "--window", str(width),
                           "--input-len", "32", "--output-len", "100", "--out", str(out), "--quiet",
                           "--cpu-limit", "1000", "--stamp-delay-limit-ms", "0", timeout=90)
    assert rc == 0, log
    lines = read_jsonl(out / "timeseries.jsonl")
    recs = [r for r in read_jsonl(out / "requests.jsonl") if r["ok"]]
    s = summary(out)
    assert math.isclose(sum(ln["output_tokens"] for ln in lines), s["output_tokens"], rel_tol=1e-9)
    # each line's tokens, recomputed point by point from requests.jsonl over the bins it covers
    start = None
    for ln in lines:
        lo = math.floor((ln["t"] - ln["window_s"]) / width) * width
        hi = max(math.floor(ln["t"] / width) * width, lo + width) if ln is not lines[-1] else math.inf
        if start is None:
            lo = -math.inf   # the first line covers the run's start
        start = lo
        expected = sum(r["output_tokens"] / len(_arrivals(r)) * sum(lo <= p < hi for p in _arrivals(r))
                       for r in recs)
        assert math.isclose(ln["output_tokens"], expected, rel_tol=1e-6, abs_tol=1e-6), (ln, expected)
        assert math.isclose(ln["output_tokens_per_s"], ln["output_tokens"] / ln["window_s"], rel_tol=1e-9)
