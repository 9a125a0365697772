"""`harness demo` (`make demo`): the simulator with the L40S Llama-3-8B BF16 profile,
a short streaming load through the Locust users, and the table a user reads."""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time
import urllib.request

from harness.errors import UsageError
from harness.ports import free_port_block


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulator + a short load + the latency table")
    p.add_argument("--profile", default="l40s-llama-3-8b-bf16")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=96)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--out", default=None, help="results directory (default runs/demo-TIMESTAMP)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (refused otherwise)")
    p.set_defaults(func=run)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UsageError(f"the simulator exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise UsageError(f"the simulator did not answer {url}/health within {timeout:.0f} s")


def run(args: argparse.Namespace) -> int:
    port = free_port_block()
    url = f"http://127.0.0.1:{port}"
    out = pathlib.Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    sim = subprocess.Popen([sys.executable, "-m", "harness.cli", "sim", "--profile", args.profile,
                            "--port", str(port)])
    try:
        wait_healthy(url, sim)
        print(f"demo: simulated {args.profile} at {url}; {args.users} users, "
              f"{args.num_requests} requests, {args.input_len} tokens in, {args.output_len} out")
        from harness.cli import main
        return main(["load", "--url", url, "--users", str(args.users),
                     "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
                     "--output-len", str(args.output_len), "--duration", "120", "--out", str(out),
                     *(["--overwrite"] if args.overwrite else [])])
    finally:
        sim.terminate()
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()
