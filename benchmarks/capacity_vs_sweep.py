"""Does `harness capacity` find what a fine manual sweep of the same server finds, and at
what cost? (docs/capacity.md holds the figures.)

Two cases:

* seed-8b: the seed's Llama-3 8B BF16 on one L40S (the simulator's l40s-llama-3-8b-bf16),
  512 tokens in, 128 out, Poisson arrivals, the seed's p99 SLOs (TTFT <= 200 ms, TPOT <=
  30 ms), 60 s steps (at least 500 requests: what a p99 needs);
* small: the tests' server (four sequence slots, 64 in, 16 out, constant arrivals,
  TTFT p90 <= 300 ms, 6 s steps), cheap enough to run live.

For each: the search in virtual time (the simulator's replay) for seeds 0..N-1, and a fine
sweep (every --sweep-step of the rate, each step judged exactly as the search judges one:
same request count, same bootstrap) whose capacity is the highest rate below the first
rate that does not pass. --live adds, for the small case, `harness capacity --url` against
a live `harness sim` and a live sweep of `harness load` steps around the knee;
--live-seed adds `harness capacity --url` for the seed-8b row (about 15 minutes), and
--live-seed-sweep LO HI STEP a live sweep of that row (about 2 minutes a point).

    .venv/bin/python benchmarks/capacity_vs_sweep.py                 # virtual only, ~1 min
    .venv/bin/python benchmarks/capacity_vs_sweep.py --live --live-seed --json benchmarks/results/capacity_vs_sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import capacity as cap  # noqa: E402
from harness import capacity_replay  # noqa: E402

CASES = {
    "seed-8b": {"profile": "l40s-llama-3-8b-bf16", "limits": {}, "sim_args": [],
                "input_len": 512, "output_len": 128, "arrival": "poisson",
                "slos": ["ttft_p99_ms<=200", "tpot_p99_ms<=30"], "duration": 60.0, "drain": 60.0,
                "min_rate": 1.0, "max_rate": 40.0, "sweep": (1.0, 8.0), "live_range": (3.0, 6.0)},
    "small": {"profile": "l40s-llama-3-8b-bf16", "limits": {"max_num_seqs": 4},
              "sim_args": ["--max-num-seqs", "4"], "input_len": 64, "output_len": 16,
              "arrival": "constant", "slos": ["ttft_p90_ms<=300"], "duration": 6.0, "drain": 3.0,
              "min_rate": 4.0, "max_rate": 16.0, "sweep": (6.0, 12.0), "live_range": (4.0, 16.0)},
}
LIMITS = ["--cpu-limit", "1000", "--lag-limit-ms", "1000000", "--stamp-delay-limit-ms", "0"]


def virtual_measure(case: dict, seed: int):
    from servers.simulator.replay import resolve_profile

    slos = cap.parse_capacity_slos(case["slos"])
    profile = resolve_profile(case["profile"], **case["limits"])

    def measure(rate: float) -> cap.Step:
        return capacity_replay.measure(rate, slos, profile=profile, duration_s=case["duration"],
                                       drain_s=case["drain"], input_len=case["input_len"],
                                       output_len=case["output_len"], arrival=case["arrival"], seed=seed)
    return measure


def new_result(case: dict, mode: str, resolution: float) -> cap.CapacityResult:
    return cap.CapacityResult(mode=mode, slos=case["slos"], min_rate=case["min_rate"],
                              max_rate=case["max_rate"], resolution=resolution, confidence=0.95,
                              duration_per_step_s=case["duration"], workload={}, target={})


def sweep_capacity(steps: list[cap.Step]) -> float | None:
    """The highest rate below the first one that does not pass (what reading the knee off a
    fine sweep gives)."""
    best = None
    for s in sorted(steps, key=lambda s: s.rate):
        if not s.passed:
            break
        best = s.rate
    return best


def point_capacity(steps: list[cap.Step]) -> float | None:
    """The same, judged on the point values alone (no confidence): a by-hand reading."""
    best = None
    for s in sorted(steps, key=lambda s: s.rate):
        ok = all(c["value"] is not None and c["value"] <= c["threshold"] for c in s.checks)
        if not ok:
            break
        best = s.rate
    return best


def virtual(name: str, case: dict, seeds: int, sweep_step: float, resolution: float) -> dict:
    rows = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        res = cap.search(new_result(case, "virtual", resolution), virtual_measure(case, seed))
        search_wall = time.perf_counter() - t0
        ans = res.answer()
        t0 = time.perf_counter()
        lo, hi = case["sweep"]
        n = int(round((hi - lo) / sweep_step)) + 1
        measure = virtual_measure(case, seed)
        sweep = [measure(round(lo + i * sweep_step, 6)) for i in range(n)]
        sweep_wall = time.perf_counter() - t0
        rows.append({"case": name, "seed": seed, "found": ans["rate"], "broke_at": (ans["broke_at"] or {}).get("rate"),
                     "found_tok_s": ans["output_tokens_per_s"], "search_steps": len(res.steps),
                     "search_requests": sum(s.requests.get("sent", 0) for s in res.steps),
                     "search_wall_s": round(search_wall, 2),
                     "sweep": sweep_capacity(sweep), "sweep_point_only": point_capacity(sweep),
                     "sweep_steps": len(sweep), "sweep_requests": sum(s.requests.get("sent", 0) for s in sweep),
                     "sweep_wall_s": round(sweep_wall, 2), "sweep_step": sweep_step})
        r = rows[-1]
        print(f"virtual {name} seed {seed}: search {r['found']} req/s ({r['search_steps']} steps, "
              f"{r['search_requests']} requests, {r['search_wall_s']} s); sweep {r['sweep']} "
              f"(point only {r['sweep_point_only']}; {r['sweep_steps']} steps, {r['sweep_requests']} requests, "
              f"{r['sweep_wall_s']} s)", flush=True)
    return {"rows": rows}


def start_sim(sim_args: list[str]):
    from harness.ports import free_port_block
    import urllib.request

    port = free_port_block(1)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "sim", "--port", str(port), *sim_args],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("harness sim did not come up")


def live_search(name: str, case: dict, resolution: float, out: Path) -> dict:
    lo, hi = case["live_range"]
    proc, url = start_sim(case["sim_args"])
    try:
        argv = [sys.executable, "-m", "harness.cli", "capacity", "--url", url, "--quiet",
                "--input-len", str(case["input_len"]), "--output-len", str(case["output_len"]),
                "--arrival", case["arrival"], "--duration-per-step", f"{case['duration']:g}",
                "--drain-timeout", f"{case['drain']:g}", "--min-rate", f"{lo:g}", "--max-rate", f"{hi:g}",
                "--resolution", f"{resolution:g}", "--out", str(out), *LIMITS]
        for s in case["slos"]:
            argv += ["--slo", s]
        t0 = time.monotonic()
        rc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True).returncode
        wall = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    doc = json.loads((out / "capacity.json").read_text())
    row = {"case": name, "exit": rc, "found": doc["answer"]["rate"], "text": doc["answer"]["text"],
           "steps": len(doc["steps"]), "requests": sum(s["requests"].get("sent", 0) for s in doc["steps"]),
           "wall_s": round(wall, 1), "range": [lo, hi]}
    print(f"live {name}: search {row['found']} req/s ({row['steps']} steps, {row['requests']} requests, "
          f"{row['wall_s']} s): {row['text']}", flush=True)
    return row


def live_sweep(name: str, case: dict, lo: float, hi: float, step: float, out: Path) -> dict:
    from harness import capacity_live as live

    slos = cap.parse_capacity_slos(case["slos"])
    proc, url = start_sim(case["sim_args"])
    steps = []
    t0 = time.monotonic()
    try:
        opts = live.LiveOptions(url=url, input_len=case["input_len"], output_len=case["output_len"],
                                arrival=case["arrival"], drain_s=case["drain"], cpu_limit=1000,
                                lag_limit_ms=1e6, stamp_delay_limit_ms=0)
        n = int(round((hi - lo) / step)) + 1
        for i in range(n):
            rate = round(lo + i * step, 6)
            s = live.measure(rate, slos, options=opts, out=out / f"{rate:g}rps", duration_s=case["duration"],
                             interrupt=live.Interrupt())
            steps.append(s)
            print(f"  live sweep {rate:g} req/s: {s.status} "
                  + ", ".join(f"{c['label']} {c['value']}" for c in s.checks), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    row = {"case": name, "sweep": sweep_capacity(steps), "sweep_point_only": point_capacity(steps),
           "steps": len(steps), "requests": sum(s.requests.get("sent", 0) for s in steps),
           "wall_s": round(time.monotonic() - t0, 1), "range": [lo, hi], "sweep_step": step,
           "values": [{"rate": s.rate, "status": s.status, **{c["metric"]: c["value"] for c in s.checks}}
                      for s in steps]}
    print(f"live {name}: sweep {row['sweep']} (point only {row['sweep_point_only']}; {row['steps']} steps, "
          f"{row['wall_s']} s)", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sweep-step", type=float, default=0.125, help="requests/s between sweep points")
    ap.add_argument("--resolution", type=float, default=0.05)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--live", action="store_true", help="the small case live: search and a sweep")
    ap.add_argument("--live-seed", action="store_true", help="the seed-8b case live: search (~15 min)")
    ap.add_argument("--live-seed-sweep", nargs=3, type=float, metavar=("LO", "HI", "STEP"), default=None,
                    help="the seed-8b case live: a sweep of harness load steps from LO to HI req/s "
                         "every STEP (each step ~2 min: a p99 needs 500 requests)")
    ap.add_argument("--json", default=None, help="write the figures here (after every part)")
    ap.add_argument("--keep", default=None, help="keep the live runs' results directories under DIR")
    args = ap.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "servers/simulator"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    doc = {"date": time.strftime("%Y-%m-%d"), "git": rev, "simulator_uncommitted_changes": dirty,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "resolution": args.resolution, "virtual": {}, "live": []}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")

    for name in args.cases:
        doc["virtual"][name] = virtual(name, CASES[name], args.seeds, args.sweep_step, args.resolution)
    save()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        if args.live:
            case = CASES["small"]
            doc["live"].append(live_search("small", case, args.resolution, work / "small"))
            save()
            doc["live"].append(live_sweep("small", case, 8.0, 11.0, 0.25, work / "small-sweep"))
            save()
        if args.live_seed:
            doc["live"].append(live_search("seed-8b", CASES["seed-8b"], args.resolution, work / "seed"))
            save()
        if args.live_seed_sweep:
            lo, hi, step = args.live_seed_sweep
            doc["live"].append(live_sweep("seed-8b", CASES["seed-8b"], lo, hi, step, work / "seed-sweep"))
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
