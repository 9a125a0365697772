"""Client-side TTFT/ITL/E2E against the simulator's own record of when it wrote each event.

The simulator's truth log stamps `received_ns` (request parsed) and `event_ns` (each token
event written) with time.perf_counter_ns(), the same CLOCK_MONOTONIC the client stamps
reads with, so client minus truth is the measurement error plus loopback delivery: small
and never much below zero.
"""
from __future__ import annotations

import math
import statistics

from loadrun import harness_load, read_jsonl, summary, wait_for, whole_lines

N = 24


def _pct(values, p):
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def _match(records, truths):
    """Pair each client record with the server's truth line: the client sends its request id as
    X-Request-Id and the simulator names the request after it ("chatcmpl-<id>")."""
    by_id = {t["id"].split("-", 1)[1]: t for t in truths}
    return [(rec, by_id[rec["id"]]) for rec in records if rec["id"] in by_id]


def test_client_latencies_match_simulator_truth(start_sim, tmp_path):
    truth_path = tmp_path / "truth.jsonl"
    url, _ = start_sim("--truth-log", str(truth_path))
    out = tmp_path / "run"
    rc, log = harness_load("--url", url, "--users", "4", "--num-requests", str(N),
                           "--input-len", "64", "--output-len", "16", "--out", str(out), "--quiet",
                           # about timing fidelity, not generator health: a busy shared
                           # machine's CPU samples must not turn the exit code into 3
                           "--cpu-limit", "1000")
    assert rc == 0, log
    records = read_jsonl(out / "requests.jsonl")
    assert len(records) == N and all(r["ok"] for r in records)
    # The simulator writes truth lines in idle gaps and flushes them in buffered chunks: count
    # only whole lines while it may still be writing (read_jsonl asserts on a torn last line).
    assert wait_for(lambda: whole_lines(truth_path) >= N, 15.0), whole_lines(truth_path)
    truths = read_jsonl(truth_path)
    assert len(truths) == N

    pairs = _match(records, truths)
    assert len(pairs) == N
    ttft_err, e2e_err, itl_err = [], [], []
    for rec, t in pairs:
        # token counts come from usage and equal what the server generated
        assert rec["output_tokens"] == t["completion_tokens"] == 16
        assert rec["input_tokens"] == t["prompt_tokens"] == 64
        assert rec["tokens_estimated"] is False
        ev = t["event_ns"]
        ttft_err.append(rec["ttft_ms"] - (ev[0] - t["received_ns"]) / 1e6)
        e2e_err.append(rec["e2e_ms"] - (ev[-1] - t["received_ns"]) / 1e6)
        truth_itl = [(b - a) / 1e6 for a, b in zip(ev, ev[1:])]
        assert len(rec["itl_ms"]) == len(truth_itl) == 15
        itl_err += [c - s for c, s in zip(rec["itl_ms"], truth_itl)]

    # Client minus server: send->receive plus write->read on loopback, so positive; below
    # zero only when the server is descheduled between its write and its stamp (a busy
    # 2-core machine: a few ms at most).
    assert min(ttft_err) > -5.0, sorted(ttft_err)
    assert 0.0 <= _pct(ttft_err, 50) < 5.0, sorted(ttft_err)
    assert _pct(ttft_err, 90) < 20.0, sorted(ttft_err)
    assert min(e2e_err) > -5.0 and 0.0 <= _pct(e2e_err, 50) < 5.0, sorted(e2e_err)
    # ITL errors are differences of two delivery delays: centred on zero.
    assert _pct([abs(e) for e in itl_err], 50) < 5.0
    assert abs(statistics.mean(itl_err)) < 2.0

    # The summary's percentiles are those of the truth, within the same small error.
    s = summary(out)
    truth_ttft = [(t["event_ns"][0] - t["received_ns"]) / 1e6 for _, t in pairs]
    assert s["ttft_ms"]["count"] == N
    assert 0.0 <= s["ttft_ms"]["p50"] - _pct(truth_ttft, 50) < 5.0
    truth_tpot = [(t["event_ns"][-1] - t["event_ns"][0]) / 1e6 / 15 for _, t in pairs]
    assert abs(s["tpot_ms"]["p50"] - _pct(truth_tpot, 50)) < 1.0
    assert s["requests"]["completed"] == N and s["output_tokens"] == 16 * N
