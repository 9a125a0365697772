"""The run's window cycle (harness.run_state, harness.aggregate): a local runner's direct merge
(`Aggregate.merge_local`, sets emptied in place) gives exactly what the encode -> decode -> merge path (`take_report` +
`merge_report`, which distributed runs use) gives on the same recorded values, window after
window: every percentile, count, counter, per-endpoint set and timeseries line.

Runs in a subprocess: importing harness.run_state imports Locust, which monkey-patches the
standard library (gevent) for the whole process.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import argparse, math, random, types
    from harness import aggregate, run_state
    from harness.histograms import HistogramSet
    from harness.timing import RequestRecord
    run_state.MIN_CPU_SAMPLE_S = 0.0   # a CPU sample per window, however fast this loop runs

    def make():
        opts = argparse.Namespace(llm_warmup=2.0, llm_slo="ttft_p99_ms<=40,tpot_p99_ms<=9")
        env = types.SimpleNamespace(parsed_options=opts, runner=None, host="http://x")
        state = run_state.LLMState(env)
        state.started_at = 1000.0
        agg = aggregate.Aggregate(state)
        lines = []
        agg.window_hooks.append(lines.append)
        return state, agg, lines

    rng = random.Random(5)
    def rec(i, t):
        n = rng.randint(1, 300)
        itl = [rng.lognormvariate(2.0, 0.4) for _ in range(n)]
        if i % 97 == 0:
            itl[0] = float("nan"); itl[-1] = -1.0            # out of range, counted
        ok = rng.random() > 0.07
        return RequestRecord(
            id=str(i), user_class="U", url="u", model="m", scheduled_at=None, sent_at=t,
            ok=ok, status=200 if ok else 500, error_kind=None if ok else rng.choice(["http_500", "timeout"]),
            input_tokens=64, output_tokens=n + 1, tokens_estimated=(i % 13 == 0),
            ttft_ms=rng.lognormvariate(3.0, 0.6), tpot_ms=sum(itl[1:-1] or [8.0]) / max(1, n - 2),
            e2e_ms=sum(itl[1:-1]) + 30.0, itl_ms=itl, icl_ms=list(itl),
            schedule_lag_ms=rng.uniform(0, 3) if i % 3 else None, ttft_from_schedule_ms=None,
            finished_at=t + 1.0)

    names = ["/v1/chat/completions [m]", "/v1/completions [m]", "/v1/embeddings [m]"]
    windows = []
    t = 1000.0
    for w in range(7):
        batch = []
        for i in range(rng.randint(0, 160) if w != 3 else 0):   # window 3: nothing at all
            t += 0.01
            # endpoint 2 only in some windows: its set must come and go like before
            name = names[2] if (w % 2 and i % 5 == 0) else names[i % 2]
            batch.append((rec(len(windows) * 1000 + i, t), name))
        windows.append(batch)

    A, B = make(), make()
    shipped = []                       # what a worker would have sent, per report
    whole, whole_by = HistogramSet(), {}
    for w, batch in enumerate(windows):
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            for r, name in part:
                A[0].record(r, "U", name)
                B[0].record(r, "U", name)
                if A[0].in_window(r):
                    whole.add_record(r)
                    whole_by.setdefault(name, HistogramSet()).add_record(r)
            if part is batch[:half] and w % 2:   # a live refresh in the middle of a window
                rep = A[0].take_report(sample_cpu=False)
                shipped.append(rep)
                A[1].merge_report("local", rep)
                B[1].merge_local(sample_cpu=False)
        rep = A[0].take_report()
        shipped.append(rep)
        A[1].merge_report("local", rep)
        B[1].merge_local()
        A[1].flush_window(64)
        B[1].flush_window(64)

    a, b = A[1], B[1]
    assert a.hist.summary() == b.hist.summary() == whole.summary()
    assert a.hist.encode() == b.hist.encode()
    for m in whole.hists:
        assert list(a.hist[m]._h.counts) == list(b.hist[m]._h.counts) == list(whole[m]._h.counts), m
    assert a.counters.to_dict() == b.counters.to_dict()
    assert sorted(a.by_name) == sorted(b.by_name) == sorted(whole_by)
    for name in whole_by:
        assert a.by_name[name].summary() == b.by_name[name].summary() == whole_by[name].summary()
        assert a.by_name[name].encode() == b.by_name[name].encode()
    assert a.requests_by_worker == b.requests_by_worker
    assert a.requests_by_worker["local"] == sum(len(x) for x in windows)
    assert len(a.cpu["local"]) == len(b.cpu["local"]) == len(windows)
    la, lb = A[2], B[2]
    assert len(la) == len(lb) == len(windows)
    timed = {"t", "window_s", "output_tokens_per_s", "requests_per_s", "goodput_rps"}
    for x, y in zip(la, lb):
        assert {k: v for k, v in x.items() if k not in timed} == \\
               {k: v for k, v in y.items() if k not in timed}
    assert la[3]["completed"] == 0 and la[3]["ttft_ms"]["count"] == 0
    # Each timeseries line is its window's whole truth: measured and warm-up records alike.
    for w, batch in enumerate(windows):
        truth_w = HistogramSet()
        for r, _ in batch:
            truth_w.add_record(r)
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            want = truth_w.summary(key)
            assert la[w][key] == {k: want[k] for k in ("p50", "p90", "p99", "mean", "count")}, (w, key)
    assert any(not A[0].in_window(r) for r, _ in windows[0]) and windows[-1] and all(
        A[0].in_window(r) for r, _ in windows[-1])   # both kinds of window were exercised
    assert any(x["ttft_ms"]["count"] for x in la)
    # A worker's reports are unchanged by the reuse: a name is shipped only when it was
    # recorded since the last report, and each report carries only its own period.
    st = B[0]
    assert all(h.count == 0 for hs in [st.pending, st.window, *st._by_name_sets.values()]
               for h in hs.hists.values())
    assert st.pending_by_name == {}
    assert any(names[2] not in rep["by_name"] and rep["by_name"] for rep in shipped)
    master = aggregate.Aggregate(make()[0])
    for rep in shipped:
        master.merge_report("w1", rep)
    assert master.hist.summary() == whole.summary()
    print("OK")
''')


def test_local_direct_merge_equals_encode_decode_path():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


CPU_SCRIPT = textwrap.dedent('''
    import argparse, types
    from harness import aggregate, run_state
    env = types.SimpleNamespace(parsed_options=argparse.Namespace(), runner=None, host="http://x")
    st = run_state.LLMState(env)
    st._cpu_since -= 2.0                      # the last sample was 2 s ago
    first = st.sample_cpu()
    assert first is not None and first >= 0.0, first
    assert st.sample_cpu() is None            # milliseconds later: no sample
    assert st.take_report()["cpu"] is None    # a worker's last report right after a regular one
    st._cpu_since -= 2.0
    assert st.take_report()["cpu"] is not None
    assert len(st.cpu_samples) == 2
    print("ok")
''')


def test_a_cpu_sample_needs_a_second_since_the_last_one():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CPU_SCRIPT], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
