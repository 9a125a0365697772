"""How long harness.plugin's window cycle blocks the load generator's event loop.

Every `--llm-window` seconds (5 s) a local run's window greenlet merges what the process
recorded into the run's totals and writes the timeseries line (`flush_window`); a Locust worker
encodes the same sets into its report every 3 s and the master decodes and merges them. None of
it yields to gevent (no I/O here: no results directory), so the wall time of each call is the
time during which no token event can be read or stamped.

This fills one window with realistic content (closed loop: C streams, each finishing R requests
per second of O output tokens +-50%, ITLs around the token gap G ms), then times, per cycle:

- local: the local runner's cycle as the window greenlet runs it -- before this change
  `agg.merge_report("local", state.take_report())` + `agg.flush_window()` (encode, decode, merge,
  new empty sets); after it `agg.merge_local()` + `agg.flush_window()`, detected by whether
  `Aggregate.merge_local` exists;
- worker report / master merge: the distributed path's two halves (each process's own loop),
  which keeps the encoding;
- first record: `LLMState.record` of the first request after the cycle (where histograms
  created lazily would be paid), next to the median record.

Before/after: run it against the harness of two commits, e.g.

    mkdir -p /tmp/old && git archive HEAD~1 harness | tar -x -C /tmp/old
    taskset -c 1 .venv/bin/python benchmarks/plugin_window.py --harness /tmp/old
    taskset -c 1 .venv/bin/python benchmarks/plugin_window.py
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--harness", default=str(REPO),
                    help="directory holding the `harness` package to measure (default: this checkout)")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--rps-per-stream", type=float, default=8.0,
                    help="requests finished per second per stream (volume of values in a window)")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request (+-50%%)")
    ap.add_argument("--gap-ms", type=float, default=8.6, help="median token gap, ms")
    ap.add_argument("--window", type=float, default=5.0, help="window, seconds of content")
    ap.add_argument("--names", type=int, default=1, help="endpoints (per-name sets)")
    ap.add_argument("--cycles", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-collect", action="store_true",
                    help="do not run gc.collect() before each timed step (by default it does, so that "
                         "a full garbage collection, which can come anywhere in a run, does not land "
                         "in one step's figure by chance)")
    ap.add_argument("--json", default="", help="append the results as one JSON line here")
    return ap.parse_args(argv)


def make_records(args, rng: random.Random, t0: float, RequestRecord) -> list:
    n = max(1, round(args.streams * args.rps_per_stream * args.window))
    recs = []
    for i in range(n):
        out = max(2, round(args.tokens * rng.uniform(0.5, 1.5)))
        itl = [rng.lognormvariate(0, 0.25) * args.gap_ms for _ in range(out - 1)]
        if rng.random() < 0.02:
            itl[rng.randrange(len(itl))] += rng.uniform(20, 200)   # a preemption-like stall
        ttft = rng.lognormvariate(0, 0.5) * 3 * args.gap_ms
        sent = t0 + args.window * i / n
        e2e = ttft + sum(itl)
        recs.append(RequestRecord(
            id=str(i), user_class="ChatUser", url="http://127.0.0.1:8000/v1/chat/completions",
            model="m", scheduled_at=None, sent_at=sent, ok=True, status=200, error_kind=None,
            input_tokens=64, output_tokens=out, tokens_estimated=False, ttft_ms=ttft,
            tpot_ms=(e2e - ttft) / (out - 1), e2e_ms=e2e, itl_ms=itl, icl_ms=list(itl),
            schedule_lag_ms=None, ttft_from_schedule_ms=None, finished_at=sent + e2e / 1000.0))
    return recs


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, args.harness)
    import harness.plugin as plugin   # imports Locust (gevent monkey-patching)
    from harness.timing import RequestRecord

    new = hasattr(plugin.Aggregate, "merge_local")
    rng = random.Random(args.seed)
    names = [f"/v1/chat/completions [m{j}]" if j else "/v1/chat/completions [m]" for j in range(args.names)]

    def make():
        env = types.SimpleNamespace(parsed_options=argparse.Namespace(), runner=None, host="x")
        st = plugin.LLMState(env)
        return st, plugin.Aggregate(st)

    local, worker, master = make(), make(), make()
    t = {k: [] for k in ("local", "local_merge", "local_flush", "worker_report", "master_merge",
                         "first_record", "record")}
    users = args.streams

    def collect():
        if not args.no_collect:
            gc.collect()

    collect()
    recs = make_records(args, rng, 1000.0, RequestRecord)
    for cycle in range(args.cycles + 1):
        # this window's content (the local process's first request was recorded, and timed,
        # right after the previous cycle)
        for st, _ in (local, worker):
            collect()
            for i, r in enumerate(recs):
                if st is local[0] and i == 0 and cycle:
                    continue
                a = time.perf_counter()
                st.record(r, "ChatUser", names[i % len(names)])
                if st is local[0] and cycle:
                    t["record"].append(time.perf_counter() - a)
        nxt = make_records(args, rng, 1000.0 + (cycle + 1) * args.window, RequestRecord)
        st, agg = local
        collect()
        a = time.perf_counter()
        if new:
            agg.merge_local()
        else:
            agg.merge_report("local", st.take_report())
        b = time.perf_counter()
        agg.flush_window(users)
        c = time.perf_counter()
        st.record(nxt[0], "ChatUser", names[0])   # the next window's first request
        d = time.perf_counter()
        collect()
        a2 = time.perf_counter()
        rep = worker[0].take_report()
        b2 = time.perf_counter()
        master[1].merge_report("w1", rep)
        master[1].flush_window(users)
        c2 = time.perf_counter()
        recs = nxt
        if cycle == 0:   # warm-up: the run totals' histograms are built here
            continue
        t["local"].append(c - a)
        t["local_merge"].append(b - a)
        t["local_flush"].append(c - b)
        t["first_record"].append(d - c)
        t["worker_report"].append(b2 - a2)
        t["master_merge"].append(c2 - b2)

    hists = sum(len(hs.hists) for hs in [local[1].window, local[1].hist, *local[1].by_name.values()])
    itl = local[1].hist.summary("itl_ms")
    print(f"harness: {plugin.__file__}  ({'merge_local' if new else 'encode/decode'} local path)")
    print(f"content per window: {len(recs)} requests, ~{itl['count'] // (args.cycles + 1)} ITL values "
          f"({args.streams} streams x {args.rps_per_stream:g} req/s x {args.window:g} s, "
          f"{args.tokens} tokens +-50%), {args.names} endpoint(s), {hists} histograms per window")
    print(f"{args.cycles} cycles (after 1 warm-up); ms of event loop blocked per call")
    print(f"| {'step':<42} | {'median':>8} | {'max':>8} |")
    print(f"|{'-' * 44}|{'-' * 9}:|{'-' * 9}:|")
    rows = [("local window cycle (greenlet, total)", "local"),
            ("  merge into the run's totals", "local_merge"),
            ("  flush_window (summaries, next window)", "local_flush"),
            ("worker: take_report (encode, next sets)", "worker_report"),
            ("master: merge_report + flush_window", "master_merge"),
            ("first record after the cycle", "first_record"),
            ("any other record (median)", "record")]
    out = {"harness": str(plugin.__file__), "new": new, "args": vars(args), "ms": {}}
    for label, key in rows:
        v = t[key]
        med, mx = statistics.median(v) * 1e3, max(v) * 1e3
        out["ms"][key] = {"median": med, "max": mx, "n": len(v)}
        # (a record's max is whatever else the machine did meanwhile: not shown)
        print(f"| {label:<42} | {med:8.3f} | {(f'{mx:8.3f}' if key != 'record' else '-'):>8} |")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
