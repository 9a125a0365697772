"""How fast one `harness sim` process streams, and how close its event timing stays to its model.

Starts one simulator process (pinned to one core with `taskset` when available), drives it from
a Locust-free asyncio client on raw sockets (pinned to another core) that keeps `--concurrency`
streaming chat requests open in a closed loop, counts token events and stamps every socket read
with `time.perf_counter_ns()`, and reads the simulator's `--truth-log` afterwards:

* events/s: token events the client received in the measured window (after a warm-up);
* server lag: truth log `event_ns - model_ns`, when the server wrote an event minus the time
  its model sampled that token (what "event timing within 1 ms of the model" means);
* client lag: when the client read the event minus the model time (server lag + the kernel +
  the client's own scheduling), for the same events.

Both clocks are CLOCK_MONOTONIC (`perf_counter_ns`), shared by every process on the machine.

    .venv/bin/python benchmarks/sim_stream_rate.py            # 6 replicas x 50 streams, 10 s
    .venv/bin/python benchmarks/sim_stream_rate.py --replicas 1 --concurrency 768

Why several replicas in the one process: a step's events are written one syscall each, and a
loopback send costs ~6-10 us of kernel time on a small VM, so the last of B events in a step
leaves B x that after the model time. One replica reaches 50,000 events/s only with batches of
~500+ (no profile steps faster than ~9 ms at that batch), i.e. a write burst of several ms;
six replicas of 50 streams make the same rate out of bursts of ~0.3 ms.

Prints a table and, with --json FILE, writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.ports import free_port_block

REPO = Path(__file__).resolve().parents[1]
perf_ns = time.perf_counter_ns


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stream(asyncio.Protocol):
    """One keep-alive connection sending the same streaming request again as each one ends."""

    def __init__(self, bench: Bench, requests: list[bytes], first: int):
        self.bench = bench
        self.requests = requests
        self.next = first
        self.transport: asyncio.Transport | None = None
        self.rid: bytes | None = None
        self.reads: list[tuple[int, int]] = []   # (read time ns, token events in the read)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        self.rid = None
        self.reads = []
        if not self.bench.stopping:
            self.transport.write(self.requests[self.next % len(self.requests)])
            self.next += 1

    def data_received(self, data: bytes) -> None:
        t = perf_ns()
        n = data.count(b'{"content":')   # token events; the role event is {"role":...}
        if n:
            self.reads.append((t, n))
        if self.rid is None:
            i = data.find(b'"id":"')
            if i >= 0:
                self.rid = data[i + 6:data.index(b'"', i + 6)]
        if data.endswith(b"0\r\n\r\n"):
            self.bench.finished(self)
            self.send()

    def connection_lost(self, exc) -> None:
        if not self.bench.stopping:
            self.bench.errors += 1


class Bench:
    def __init__(self):
        self.stopping = False
        self.errors = 0
        self.responses: list[tuple[bytes, list[tuple[int, int]]]] = []
        self.live: list[Stream] = []

    def finished(self, s: Stream) -> None:
        self.responses.append((s.rid, s.reads))


def request_variants(model: str, prompt_words: int, max_tokens: int, spread: float) -> list[bytes]:
    """Requests whose max_tokens cover max_tokens x (1 +- spread) evenly (one, without spread)."""
    if spread <= 0:
        return [request_bytes(model, prompt_words, max_tokens)]
    n = 17
    lo, hi = max_tokens * (1 - spread), max_tokens * (1 + spread)
    return [request_bytes(model, prompt_words, max(1, round(lo + (hi - lo) * i / (n - 1))))
            for i in (0, 9, 2, 11, 4, 13, 6, 15, 8, 1, 10, 3, 12, 5, 14, 7, 16)]


def request_bytes(model: str, prompt_words: int, max_tokens: int) -> bytes:
    words = ("the river near the old mill runs cold in winter and warm in summer " * 100).split()
    body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                       "ignore_eos": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": " ".join(words[:prompt_words])}]
                       }).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


async def drive(ports: list[int], concurrency: int, requests: list[bytes], warmup: float,
                duration: float, server_pid: int) -> dict:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass
    bench = Bench()
    loop = asyncio.get_running_loop()
    for i in range(concurrency):
        _, proto = await loop.create_connection(lambda: Stream(bench, requests, i), "127.0.0.1",
                                                ports[i % len(ports)])
        bench.live.append(proto)
    await asyncio.sleep(warmup)
    t0 = perf_ns()
    cpu0 = cpu_seconds(server_pid)
    await asyncio.sleep(duration)
    t1 = perf_ns()
    cpu1 = cpu_seconds(server_pid)
    bench.stopping = True
    # Keep in-flight responses: their events inside [t0, t1] count too.
    for s in bench.live:
        if s.reads:
            bench.responses.append((s.rid, s.reads))
        s.transport.close()
    return {"t0": t0, "t1": t1, "server_cpu_s": cpu1 - cpu0, "responses": bench.responses,
            "errors": bench.errors}


def percentiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    return {"count": int(values.size), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)),
            "p99_9": float(np.percentile(values, 99.9)), "max": float(values.max()),
            "mean": float(values.mean()), "min": float(values.min())}


def analyse(run: dict, truth_path: Path) -> dict:
    t0, t1 = run["t0"], run["t1"]
    window_s = (t1 - t0) / 1e9
    received = 0
    for _rid, reads in run["responses"]:
        received += sum(n for t, n in reads if t0 <= t <= t1)
    truth = {}
    with open(truth_path) as f:
        for line in f:
            rec = json.loads(line)
            truth[rec["id"]] = rec
    server_lag, client_lag, itl_error = [], [], []
    for rec in truth.values():
        ev, mo = rec["event_ns"], rec["model_ns"]
        if not rec["stream"]:
            continue
        for i, (e, m) in enumerate(zip(ev, mo)):
            if t0 <= m <= t1:
                server_lag.append(e - m)
                if i and e > 0 and ev[i - 1] > 0:
                    itl_error.append(abs((e - ev[i - 1]) - (m - mo[i - 1])))
    # Split the lag: every event of one engine step has the same model time, so the earliest
    # write of a step is how late the loop woke for it (timer, scheduler, other replicas'
    # work), and the spread of its writes is what the writes themselves took.
    steps: dict[int, list[int]] = {}
    for rec in truth.values():
        if rec["stream"]:
            for e, m in zip(rec["event_ns"], rec["model_ns"]):
                if t0 <= m <= t1 and e > 0:
                    steps.setdefault(m, []).append(e)
    wake = [min(es) - m for m, es in steps.items()]
    spread = [max(es) - min(es) for es in steps.values()]
    for rid, reads in run["responses"]:
        rec = truth.get(rid.decode()) if rid else None
        if rec is None:
            continue
        times = [t for t, n in reads for _ in range(n)]
        for t, m in zip(times, rec["model_ns"]):
            if t0 <= m <= t1:
                client_lag.append(t - m)
    ms = lambda xs: np.asarray(xs, dtype=np.float64) / 1e6  # noqa: E731
    return {"window_s": window_s, "token_events": received,
            "events_per_s": received / window_s,
            "server_cpu_pct": 100.0 * run["server_cpu_s"] / window_s,
            "server_lag_ms": percentiles(ms(server_lag)),
            "client_lag_ms": percentiles(ms(client_lag)),
            "server_itl_error_ms": percentiles(ms(itl_error)),
            "step_wake_lag_ms": percentiles(ms(wake)),
            "step_write_spread_ms": percentiles(ms(spread)),
            "events_per_step_mean": (len(server_lag) / len(steps)) if steps else 0.0,
            "requests_logged": len(truth), "errors": run["errors"]}


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="h200-llama-3-8b-bf16-tp8")
    ap.add_argument("--replicas", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=300,
                    help="streams open at once, spread evenly over the replicas")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-tokens-spread", type=float, default=0.0,
                    help="vary max_tokens over max_tokens x (1 +- this), e.g. 0.5; 0: all equal, "
                         "so each replica's streams start and end in the same steps")
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--sim-arg", action="append", default=[], help="extra argument for harness sim")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--server-rt", action="store_true",
                    help="run the server at real-time priority (chrt -f 10): shows what is left "
                         "of the lag once other processes on its core cannot delay it")
    ap.add_argument("--truth-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the truth log goes (default: tmpfs, so disk writeback stays out "
                         "of the measurement)")
    ap.add_argument("--repo", default=str(REPO),
                    help="checkout whose simulator to run (compare before/after a change)")
    ap.add_argument("--server-prefix", default="",
                    help="command to run the server under, e.g. 'py-spy record -o prof.svg --'")
    args = ap.parse_args(argv)

    port = free_port_block(args.replicas)
    truth = Path(tempfile.mkdtemp(prefix="simbench-", dir=args.truth_dir)) / "truth.jsonl"
    cmd = [sys.executable, "-m", "harness.cli", "sim", "--profile", args.profile,
           "--port", str(port), "--replicas", str(args.replicas), "--truth-log", str(truth)]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    cmd += args.sim_arg
    if args.server_rt and shutil.which("chrt"):
        cmd = ["chrt", "-f", "10"] + cmd
    cmd = shlex.split(args.server_prefix) + cmd
    load_before = os.getloadavg()
    if shutil.which("taskset") and args.server_cpu is not None:
        cmd = ["taskset", "-c", str(args.server_cpu)] + cmd
    server = subprocess.Popen(cmd, cwd=args.repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        seen = []
        while True:  # skip what a --server-prefix tool prints first
            line = server.stdout.readline()
            seen.append(line)
            if "harness sim:" in line and "serving" in line:
                break
            if not line or len(seen) > 20:
                server.kill()
                raise SystemExit("simulator did not start: " + "".join(seen) + server.stdout.read())
        model = line.split("serving '", 1)[1].split("'", 1)[0]
        pin(args.client_cpu)
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        run = runner(drive(list(range(port, port + args.replicas)), args.concurrency,
                           request_variants(model, args.prompt_words, args.max_tokens,
                                            args.max_tokens_spread),
                           args.warmup, args.duration, server.pid))
    finally:
        server.send_signal(signal.SIGINT)  # harness sim and py-spy both stop cleanly on it
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    load_after = os.getloadavg()
    result = analyse(run, truth)
    truth.unlink()
    truth.parent.rmdir()
    result.update({
        "profile": args.profile, "replicas": args.replicas, "concurrency": args.concurrency,
        "max_num_seqs": args.max_num_seqs, "max_tokens": args.max_tokens,
        "max_tokens_spread": args.max_tokens_spread,
        "prompt_words": args.prompt_words, "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}".strip(", "),
        "python": platform.python_version(),
        "server_pinned_cpu": args.server_cpu if shutil.which("taskset") else None,
        "client_pinned_cpu": args.client_cpu, "server_rt": args.server_rt, "repo": args.repo,
        "loadavg_1m_before_after": [load_before[0], load_after[0]],
    })
    sl, cl = result["server_lag_ms"], result["client_lag_ms"]
    print(f"profile {args.profile} x{args.replicas}, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}, window {result['window_s']:.1f} s, load average "
          f"{load_before[0]:.2f} -> {load_after[0]:.2f}{', server at RT priority' if args.server_rt else ''}"
          f"  [{args.repo}]")
    print(f"token events/s   {result['events_per_s']:,.0f}   (server CPU {result['server_cpu_pct']:.0f}% "
          f"of one core, {result['errors']} errors)")
    for name, d in (("server lag ms", sl), ("|ITL error| ms", result["server_itl_error_ms"]),
                    ("step wake ms", result["step_wake_lag_ms"]),
                    ("step spread ms", result["step_write_spread_ms"]),
                    ("client lag ms", cl)):
        if d:
            print(f"{name:15s}  p50 {d['p50']:.3f}  p90 {d['p90']:.3f}  p99 {d['p99']:.3f}  "
                  f"p99.9 {d['p99_9']:.3f}  max {d['max']:.3f}  (n={d['count']:,})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
