"""How fast `replay` (servers/simulator/replay.py) runs: wall seconds per workload.

Poisson arrivals at --rate with input lengths uniform in 64..2048 and output lengths uniform
in 16..512 (seeded), replayed on each profile; prints requests, virtual duration, wall time,
requests replayed per wall second and engine steps per wall second. One process, one core.

    .venv/bin/python benchmarks/sim_replay_speed.py
    .venv/bin/python benchmarks/sim_replay_speed.py --requests 20000 --rate 40 --profiles h100-llama-3-8b-bf16
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from servers.simulator.replay import replay  # noqa: E402


def workload(n: int, rate: float, seed: int = 0) -> list[tuple[float, int, int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, rng.randint(64, 2048), rng.randint(16, 512)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--rate", type=float, default=10.0, help="requests/s offered")
    ap.add_argument("--profiles", nargs="+",
                    default=["l40s-llama-3-8b-bf16", "h100-llama-3-8b-bf16", "h200-llama-3-70b-bf16-tp8"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, rate {args.rate}/s")
    print(f"{'profile':28}{'requests':>9}{'virtual s':>11}{'wall s':>8}{'req/s wall':>12}"
          f"{'steps/s':>10}{'TTFT p50 ms':>13}")
    for profile in args.profiles:
        for n in args.requests:
            arrivals = workload(n, args.rate)
            t = time.perf_counter()
            result = replay(profile, arrivals)
            wall = time.perf_counter() - t
            s = result.summary()
            row = {"profile": profile, "requests": n, "rate": args.rate, "virtual_s": s["duration_s"],
                   "wall_s": wall, "requests_per_wall_s": n / wall, "steps": s["steps"],
                   "ttft_p50_ms": s["ttft_ms"]["p50"]}
            rows.append(row)
            print(f"{profile:28}{n:>9}{s['duration_s']:>11.1f}{wall:>8.2f}{n / wall:>12,.0f}"
                  f"{s['steps'] / wall:>10,.0f}{s['ttft_ms']['p50']:>13,.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
