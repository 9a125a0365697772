"""Load-generator performance: client CPU per streamed token and timing fidelity, ours vs vLLM's.

Each *case* starts one `harness sim` (pinned to `--server-cpu`, writing a `--truth-log`), drives it
with one client pinned to `--client-cpus`, and measures, over the steady part of the run (the
span during which at least 75% of the requested concurrency is in flight at the server, 0.5 s
trimmed from each end):

* **client CPU per token**: user+system CPU seconds of the client's whole process tree (Locust
  master and workers, or vLLM's benchmark process) in the window, divided by the tokens the
  server wrote in the window (truth log), in microseconds;
* **tokens/s** in the window, and the client's CPU use in cores (CPU seconds / window seconds);
* **fidelity**: the client's per-request TTFT and per-token ITL minus the simulator's truth.
  TTFT error = client first-token stamp - truth write time of the first token (the client's
  TTFT minus the true time from the client's own send stamp to the token's write), so it is
  what the client's reading and stamping add; ITL error = client gap - truth gap per token
  (reported as |error|). `transit` = truth `received_ns` - client send stamp (request building,
  writing and the server's accept, reported apart: it adds to the client's TTFT too).

The clients:

* `harness`: `harness load --locustfile benchmarks/bench_locustfile.py` (our Locust `ChatUser`,
  closed loop, `--users C --num-requests N`); records are paired with truth lines by the
  server's response id.
* `vllm`: vLLM's own serving benchmark client (`vllm bench serve --backend openai-chat
  --max-concurrency C --num-prompts N --ignore-eos --save-detailed`, from the vLLM CPU build's
  environment); its per-request `start_times`/`ttfts`/`itls` are paired with truth lines by
  time (first and last token times, output length). The same time matcher is run on our
  client's records as a check of the method: the share of pairs where it agrees with the ids is
  reported as `time_match_agrees`.

vLLM's client stamps the role-only opening event as its first token and its first ITL entry is
the role -> first-token gap; the simulator writes both in one write, so vLLM's TTFT is compared
as it reports it and its first ITL entry (not a token gap) is left out of the ITL comparison.

Subcommands: `case` (one run), `sweep` (both clients over concurrencies, repeated, alternating
order), `scaleout` (our client with 1 and 2 worker processes), `all` (everything, writes JSON
and prints the markdown tables used in docs/performance.md).

    .venv/bin/python benchmarks/client_cost.py all --json runs/client_perf.json

Everything is bounded: each case is one closed-loop run of a fixed number of requests sized to
give about `--seconds` of steady load.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
HARNESS_PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable
VLLM_PY = str(REPO / ".venv-vllm" / "bin" / "python")
LOCUSTFILE = str(REPO / "benchmarks" / "bench_locustfile.py")
VLLM_BENCH = str(REPO / "benchmarks" / "vllm_bench_serve.py")
perf_ns = time.perf_counter_ns
WALL_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


@dataclass
class Case:
    client: str                      # "harness" or "vllm"
    concurrency: int
    profile: str = "h200-llama-3-8b-bf16"
    input_len: int = 64
    output_len: int = 128
    range_ratio: float = 0.5         # input and output lengths uniform in len*(1 +- ratio)
    seconds: float = 12.0            # steady load wanted
    step_ms_guess: float = 12.0      # to size the number of requests
    workers: int = 1                 # harness only: Locust worker processes
    server_cpu: str = "0"
    client_cpus: str = "1"
    rt: bool = False                 # run client and server at SCHED_FIFO priority
    seed: int = 0
    requests: int = 0                # 0: sized from seconds / (output_len * step_ms_guess)
    label: str = ""
    client_repo: str = ""            # harness only: run our client from this checkout
    locustfile: str = ""             # harness only: another locustfile (experiments)

    def num_requests(self) -> int:
        if self.requests:
            return self.requests
        # One simulator core writes at most ~16,000 token events/s here: above ~200 streams the
        # time between tokens grows with the concurrency.
        step_ms = max(self.step_ms_guess, self.concurrency / 16.0)
        per_req_s = self.output_len * step_ms / 1000.0
        rounds = max(3, int(self.seconds / per_req_s) + 2)
        return self.concurrency * rounds


# -- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cmd: list[str], cpus: str | None, rt_prio: int | None) -> list[str]:
    if rt_prio and shutil.which("chrt"):
        cmd = ["chrt", "-f", str(rt_prio)] + cmd
    if cpus is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpus] + cmd
    return cmd


def start_sim(case: Case, port: int, truth: Path) -> tuple[subprocess.Popen, str]:
    cmd = [HARNESS_PY, "-m", "harness.cli", "sim", "--profile", case.profile, "--port", str(port),
           "--max-num-seqs", str(max(256, case.concurrency)), "--truth-log", str(truth)]
    proc = subprocess.Popen(pinned(cmd, case.server_cpu, 20 if case.rt else None), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    while True:
        line = proc.stdout.readline()
        seen.append(line)
        if "harness sim:" in line and "serving" in line:
            break
        if not line or len(seen) > 50:
            proc.kill()
            raise RuntimeError("simulator did not start: " + "".join(seen))
    model = line.split("serving '", 1)[1].split("'", 1)[0]
    threading.Thread(target=proc.stdout.read, daemon=True).start()   # drain
    return proc, model


def client_cmd(case: Case, port: int, model: str, out: Path, tokenizer: str) -> list[str]:
    url = f"http://127.0.0.1:{port}"
    n = case.num_requests()
    if case.client == "harness":
        cmd = [HARNESS_PY, "-m", "harness.cli", "load", "--url", url, "--model", model,
               "--users", str(case.concurrency), "--num-requests", str(n),
               "--input-len", str(case.input_len), "--output-len", str(case.output_len),
               "--input-len-range", str(case.range_ratio),
               "--output-len-range", str(case.range_ratio), "--seed", str(case.seed),
               "--locustfile", case.locustfile or LOCUSTFILE, "--workers", str(case.workers),
               "--out", str(out), "--quiet"]
    elif case.client == "vllm":
        cmd = [VLLM_PY, VLLM_BENCH, "--backend", "openai-chat", "--base-url", url,
               "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", tokenizer,
               "--dataset-name", "random", "--random-input-len", str(case.input_len),
               "--random-output-len", str(case.output_len),
               "--random-range-ratio", str(case.range_ratio), "--num-prompts", str(n),
               "--max-concurrency", str(case.concurrency), "--ignore-eos", "--seed",
               str(case.seed), "--save-result", "--save-detailed", "--result-dir", str(out),
               "--result-filename", "vllm.json", "--disable-tqdm"]
    else:
        raise ValueError(case.client)
    return pinned(cmd, case.client_cpus, 10 if case.rt else None)


def client_cwd(case: Case) -> Path:
    return Path(case.client_repo) if case.client == "harness" and case.client_repo else REPO


class TreeSampler(threading.Thread):
    """Samples (perf_counter_ns, CPU seconds of a process tree, per-CPU busy seconds) at 5 Hz."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[int, float, list[float]]] = []
        self.stop = threading.Event()
        self._known: dict[int, psutil.Process] = {}

    def tree_cpu(self) -> float:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            procs = list(self._known.values())
        total = 0.0
        for p in procs:
            self._known.setdefault(p.pid, p)
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    @staticmethod
    def cpu_busy() -> list[float]:
        return [t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
                for t in psutil.cpu_times(percpu=True)]

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((perf_ns(), self.tree_cpu(), self.cpu_busy()))
            self.stop.wait(self.interval)

    def at(self, t_ns: int) -> tuple[float, list[float]]:
        """Linear interpolation of the tree CPU and per-CPU busy seconds at t_ns."""
        ts = [s[0] for s in self.samples]
        i = bisect.bisect_left(ts, t_ns)
        if i <= 0:
            return self.samples[0][1], self.samples[0][2]
        if i >= len(ts):
            return self.samples[-1][1], self.samples[-1][2]
        (t0, c0, b0), (t1, c1, b1) = self.samples[i - 1], self.samples[i]
        f = (t_ns - t0) / (t1 - t0)
        return c0 + f * (c1 - c0), [x + f * (y - x) for x, y in zip(b0, b1)]


# -- analysis --------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def steady_window(truth: list[dict], concurrency: int, trim_s: float = 0.5) -> tuple[int, int]:
    """First to last instant with >= 75% of the concurrency in flight at the server, trimmed."""
    edges = []
    for t in truth:
        if not t["stream"] or not t["event_ns"]:
            continue
        edges.append((t["received_ns"], 1))
        edges.append((t["event_ns"][-1], -1))
    edges.sort()
    need = max(1, int(0.75 * concurrency))
    n = 0
    first = last = None
    for t, d in edges:
        n += d
        if n >= need:
            if first is None:
                first = t
            last = t
    if first is None:
        raise RuntimeError(f"never {need} requests in flight (server saw {len(truth)} requests)")
    trim = int(trim_s * 1e9)
    if last - first > 4 * trim:
        first, last = first + trim, last - trim
    return first, last


@dataclass
class ClientReq:
    """One finished request as the client saw it, in absolute perf_counter ns."""
    key: str | None            # server response id when known
    start_ns: int              # the client's send stamp
    tokens_ns: list[int]       # when the client stamped each token (role event excluded)
    first_ns: int              # the stamp the client's TTFT ends at
    n_tokens: int
    itl_ms: list[float]        # the client's ITL per token gap, as it reports it


def harness_requests(out: Path) -> list[ClientReq]:
    reqs = []
    for r in read_jsonl(out / "requests.jsonl"):
        if not r.get("ok") or r.get("ttft_ms") is None:
            continue
        sent = int(round(r["sent_at"] * 1e9)) - WALL_OFFSET_NS
        first = sent + int(round(r["ttft_ms"] * 1e6))
        itl = r.get("itl_ms") or []
        times = [first]
        t = float(first)
        for g in itl:
            t += g * 1e6
            times.append(int(t))
        reqs.append(ClientReq(r["id"] if str(r["id"]).startswith(("chatcmpl-", "cmpl-")) else None,
                              sent, times, first, r.get("output_tokens") or len(times), itl))
    return reqs


def vllm_requests(out: Path) -> list[ClientReq]:
    d = json.loads((out / "vllm.json").read_text())
    reqs = []
    for st, ttft, itls, n, err in zip(d["start_times"], d["ttfts"], d["itls"], d["output_lens"],
                                      d["errors"]):
        if err or not ttft:
            continue
        start = int(round(st * 1e9))
        first = start + int(round(ttft * 1e9))
        stamps = [first]
        t = float(first)
        for g in itls:
            t += g * 1e9
            stamps.append(int(t))
        # stamps[0] is the role event, stamps[1:] the tokens (one event per token here).
        toks = stamps[1:] if len(stamps) == n + 1 else stamps
        reqs.append(ClientReq(None, start, toks, first, n, [g * 1e3 for g in itls[1:]]))
    return reqs


def match_by_time(reqs: list[ClientReq], truth: list[dict]) -> dict[int, int]:
    """Pair client requests with truth lines: same output length, server received after the
    client's send stamp and wrote the first token before the client stamped it; least
    (first-token + last-token) stamp distance first, greedily."""
    tl = [t for t in truth if t["stream"] and t["event_ns"]]
    order = sorted(range(len(tl)), key=lambda j: tl[j]["event_ns"][0])
    firsts = [tl[j]["event_ns"][0] for j in order]
    cands = []
    for i, r in enumerate(reqs):
        lo = bisect.bisect_left(firsts, r.first_ns - 2_000_000_000)
        hi = bisect.bisect_right(firsts, r.first_ns)
        for k in range(lo, hi):
            j = order[k]
            t = tl[j]
            if len(t["event_ns"]) != r.n_tokens or t["received_ns"] < r.start_ns:
                continue
            cost = (r.first_ns - t["event_ns"][0]) + abs(r.tokens_ns[-1] - t["event_ns"][-1])
            cands.append((cost, i, j))
    cands.sort()
    used_i, used_j, pairs = set(), set(), {}
    for _, i, j in cands:
        if i in used_i or j in used_j:
            continue
        used_i.add(i)
        used_j.add(j)
        pairs[i] = id(tl[j])
    return pairs


def pct(values, ps=(50, 99)) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    out = {"count": int(a.size), "mean": float(a.mean()), "max": float(a.max())}
    for p in ps:
        out[f"p{p}".replace(".", "_")] = float(np.percentile(a, p))
    return out


def fidelity(reqs: list[ClientReq], truth: list[dict], window: tuple[int, int],
             use_ids: bool) -> dict:
    t0, t1 = window
    by_obj = {id(t): t for t in truth}
    by_rid = {t["id"]: t for t in truth}
    time_pairs = match_by_time(reqs, truth)
    pairs: dict[int, dict] = {}
    agree = checked = 0
    for i, r in enumerate(reqs):
        t = by_rid.get(r.key) if (use_ids and r.key) else None
        if use_ids and r.key:
            if i in time_pairs:
                checked += 1
                agree += by_obj[time_pairs[i]] is t
        elif i in time_pairs:
            t = by_obj[time_pairs[i]]
        if t is not None:
            pairs[i] = t
    ttft_err, itl_err, transit, ttft_full = [], [], [], []
    skipped = 0
    for i, t in pairs.items():
        r = reqs[i]
        ev = t["event_ns"]
        if len(ev) != r.n_tokens or -1 in ev:
            skipped += 1
            continue
        if t0 <= ev[0] <= t1:
            ttft_err.append((r.first_ns - ev[0]) / 1e6)
            transit.append((t["received_ns"] - r.start_ns) / 1e6)
            # client TTFT minus the server's own (request read -> first token written)
            ttft_full.append(((r.first_ns - r.start_ns) - (ev[0] - t["received_ns"])) / 1e6)
        if len(r.itl_ms) == len(ev) - 1:
            for k in range(1, len(ev)):
                if t0 <= ev[k] <= t1:
                    itl_err.append(abs(r.itl_ms[k - 1] - (ev[k] - ev[k - 1]) / 1e6))
        else:
            skipped += 1
    return {"matched": len(pairs), "client_requests": len(reqs), "skipped": skipped,
            "time_match_agrees": (agree / checked) if checked else None,
            "ttft_err_ms": pct(ttft_err, (50, 90, 99, 99.9)),
            "itl_abs_err_ms": pct(itl_err, (50, 90, 99, 99.9)),
            "transit_ms": pct(transit, (50, 99)),
            "ttft_vs_server_ms": pct(ttft_full, (50, 99))}


# -- one case --------------------------------------------------------------------------------

def run_case(case: Case, tokenizer: str, keep: Path | None = None, timeout_s: float = 240.0) -> dict:
    work = Path(tempfile.mkdtemp(prefix="clientcost-"))
    truth_path = work / "truth.jsonl"
    out = work / "client"
    out.mkdir()
    port = free_port()
    load_before = os.getloadavg()[0]
    sim, model = start_sim(case, port, truth_path)
    sim_ps = psutil.Process(sim.pid)
    client = None
    try:
        cmd = client_cmd(case, port, model, out, tokenizer)
        started = time.monotonic()
        client = subprocess.Popen(cmd, cwd=client_cwd(case), stdout=open(work / "client.log", "w"),
                                  stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1",
                                                                      HF_HUB_OFFLINE="1",
                                                                      TRANSFORMERS_OFFLINE="1",
                                                                      VLLM_NO_USAGE_STATS="1",
                                                                      DO_NOT_TRACK="1"))
        sampler = TreeSampler(client.pid)
        sim_samples: list[tuple[int, float]] = []
        sampler.start()

        def sample_sim():
            while client.poll() is None:
                try:
                    c = sim_ps.cpu_times()
                    sim_samples.append((perf_ns(), c.user + c.system))
                except psutil.Error:
                    return
                time.sleep(0.2)
        threading.Thread(target=sample_sim, daemon=True).start()
        try:
            rc = client.wait(timeout_s)
        except subprocess.TimeoutExpired:
            client.send_signal(signal.SIGINT)
            rc = client.wait(30)
        wall = time.monotonic() - started
        sampler.stop.set()
        sampler.join()
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(15)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
    truth = read_jsonl(truth_path)
    window = steady_window(truth, case.concurrency)
    t0, t1 = window
    win_s = (t1 - t0) / 1e9
    cpu0, busy0 = sampler.at(t0)
    cpu1, busy1 = sampler.at(t1)
    tokens = sum(1 for t in truth if t["stream"] for e in t["event_ns"] if t0 <= e <= t1)
    gaps = [b - a for t in truth if t["stream"] for a, b in zip(t["event_ns"], t["event_ns"][1:])
            if t0 <= b <= t1]
    token_gap_ms = float(np.median(gaps)) / 1e6 if gaps else None
    client_cpu = cpu1 - cpu0
    busy = [(b - a) / win_s for a, b in zip(busy0, busy1)]
    client_cores = [int(c) for c in case.client_cpus.split(",")] if case.client_cpus else []
    sim_cpu = None
    if len(sim_samples) > 2:
        ts = np.array([s[0] for s in sim_samples], dtype=np.float64)
        cs = np.array([s[1] for s in sim_samples])
        sim_cpu = float(np.interp(t1, ts, cs) - np.interp(t0, ts, cs)) / win_s
    reqs = harness_requests(out) if case.client == "harness" else vllm_requests(out)
    fid = fidelity(reqs, truth, window, use_ids=case.client == "harness")
    res = {
        "case": asdict(case), "num_requests": case.num_requests(), "rc": rc, "wall_s": wall,
        "window_s": win_s, "tokens": tokens, "tokens_per_s": tokens / win_s,
        "token_gap_ms_p50": token_gap_ms,
        "client_cpu_s": client_cpu, "client_cores_used": client_cpu / win_s,
        "us_per_token": 1e6 * client_cpu / tokens if tokens else None,
        "server_cores_used": sim_cpu,
        "cpu_busy_frac": busy,
        "other_load_on_client_cpus": (sum(busy[c] for c in client_cores if c < len(busy))
                                      - client_cpu / win_s) if client_cores else None,
        "loadavg_before": load_before, "requests_in_truth": len(truth), "fidelity": fid,
    }
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        dest = keep / f"{case.client}-c{case.concurrency}-w{case.workers}-{int(time.time())}"
        shutil.copytree(work, dest)
        res["kept"] = str(dest)
    shutil.rmtree(work, ignore_errors=True)
    if rc not in (0, None) and case.client == "vllm":
        res["warning"] = f"client exited with {rc}"
    return res


def one_line(r: dict) -> str:
    c = r["case"]
    f = r["fidelity"]
    te, ie = f["ttft_err_ms"], f["itl_abs_err_ms"]
    return (f"{c['client']:7s} C={c['concurrency']:<4d} w={c['workers']} {r['tokens_per_s']:8,.0f} tok/s "
            f"cpu {r['client_cores_used']:.2f} cores {r['us_per_token']:6.1f} us/tok | "
            f"TTFT err p50 {te.get('p50', float('nan')):.3f} p99 {te.get('p99', float('nan')):.3f} | "
            f"ITL |err| p50 {ie.get('p50', float('nan')):.3f} p99 {ie.get('p99', float('nan')):.3f} ms | "
            f"matched {f['matched']}/{f['client_requests']} | other load on client cpu "
            f"{(r['other_load_on_client_cpus'] or 0):.2f} | sim {r['server_cores_used'] or 0:.2f} cores")


def ensure_tokenizer(path: Path) -> str:
    if not (path / "tokenizer.json").exists():
        subprocess.run([VLLM_PY, str(REPO / "tests" / "tiny_model.py"), str(path)], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
    return str(path)


def machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(),
            "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                               if l.startswith("model name")), ""),
            "python": platform.python_version(), "kernel": platform.release()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["case", "sweep", "scaleout", "all", "report"])
    ap.add_argument("--client", default="harness", choices=["harness", "vllm"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="streams (default: 8 16 32 64 128 256 512 1024 for sweep/all, "
                         "256 512 for scaleout, 256 for case)")
    ap.add_argument("--scaleout-concurrency", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", default="h200-llama-3-8b-bf16")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--client-cpus", default="1")
    ap.add_argument("--no-rt", dest="rt", action="store_false",
                    help="do not run client and server at SCHED_FIFO priority (by default they "
                         "do, when chrt works: other processes on a shared machine then cannot "
                         "preempt them in the middle of a burst)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir for vLLM's client "
                    "(default: build tests/tiny_model.py into /tmp/llm-harness-tiny)")
    ap.add_argument("--json", default=None, help="append results (JSON lines) here")
    ap.add_argument("--keep", default=None, help="keep each run's files under this folder")
    ap.add_argument("--label", default="")
    ap.add_argument("--by-label", action="store_true", help="report: one row per label")
    ap.add_argument("--locustfile", default="", help="harness client: run this locustfile "
                    "instead of benchmarks/bench_locustfile.py (experiments)")
    ap.add_argument("--client-repo", default="", help="run our client (harness load) from this "
                    "checkout, e.g. a worktree of an earlier commit, to measure before/after")
    args = ap.parse_args(argv)
    if args.what == "report":
        if not args.json:
            ap.error("report needs --json FILE (results written by an earlier run)")
        rows = [json.loads(l) for l in open(args.json) if l.strip()]
        print(report_by_label(rows) if args.by_label else report(rows))
        return 0
    if args.rt and not rt_available():
        args.rt = False
    if args.concurrency is None:
        args.concurrency = {"case": [256], "scaleout": args.scaleout_concurrency}.get(
            args.what, [8, 16, 32, 64, 128, 256, 512, 1024])

    tok = args.tokenizer or ensure_tokenizer(Path("/tmp/llm-harness-tiny"))
    keep = Path(args.keep) if args.keep else None
    # The orchestrator (sampling, analysis) stays off the client's core.
    if hasattr(os, "sched_setaffinity") and args.server_cpu:
        os.sched_setaffinity(0, {int(c) for c in args.server_cpu.split(",")})
    base = dict(profile=args.profile, input_len=args.input_len, output_len=args.output_len,
                seconds=args.seconds, server_cpu=args.server_cpu, client_cpus=args.client_cpus,
                rt=args.rt, label=args.label, client_repo=args.client_repo,
                locustfile=args.locustfile)
    cases: list[Case] = []
    if args.what == "case":
        cases = [Case(args.client, c, workers=args.workers, **base) for c in args.concurrency]
    if args.what in ("sweep", "all"):
        for c in args.concurrency:
            for rep in range(args.repeats):
                pair = ["harness", "vllm"] if rep % 2 == 0 else ["vllm", "harness"]
                cases += [Case(cl, c, seed=rep, **base) for cl in pair]
    if args.what in ("scaleout", "all"):
        for c in (args.concurrency if args.what == "scaleout" else args.scaleout_concurrency):
            for rep in range(args.repeats):
                for w in ((1, 2) if rep % 2 == 0 else (2, 1)):
                    cases.append(Case("harness", c, workers=w, seed=rep,
                                      **{**base, "label": "scaleout",
                                         "client_cpus": "1" if w == 1 else "0,1"}))
    results = []
    for case in cases:
        r = run_case(case, tok, keep)
        r["machine"] = machine()
        results.append(r)
        print(one_line(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    if len(results) > 1:
        print()
        print(report(results))
    return 0


def rt_available() -> bool:
    return bool(shutil.which("chrt")) and subprocess.run(
        ["chrt", "-f", "1", "true"], capture_output=True).returncode == 0


# -- tables --------------------------------------------------------------------------------

FIDELITY_MS = 1.0


def _med(xs):
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else float("nan")  # noqa: E501


def _f(x: float, fmt: str) -> str:
    return "–" if x != x else format(x, fmt)


def _fid(r, metric, p):
    return r["fidelity"][metric].get(p)


def report_by_label(results: list[dict]) -> str:
    """One row per label (e.g. the snapshots of benchmarks/client_steps.sh), in first-seen order."""
    labels: dict[str, list[dict]] = {}
    for r in results:
        labels.setdefault(r["case"]["label"] or "-", []).append(r)
    out = ["| label | client | streams | runs | tok/s | client CPU (cores) | us/token | TTFT err p99 | ITL err p50 | ITL err p99 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, rs in labels.items():
        out.append(
            f"| {label} | {rs[0]['case']['client']} | {rs[0]['case']['concurrency']} | {len(rs)} | "
            f"{_med([r['tokens_per_s'] for r in rs]):,.0f} | {_med([r['client_cores_used'] for r in rs]):.2f} | "
            f"{_med([r['us_per_token'] for r in rs]):.1f} | "
            f"{_med([_fid(r, 'ttft_err_ms', 'p99') for r in rs]):.3f} | "
            f"{_med([_fid(r, 'itl_abs_err_ms', 'p50') for r in rs]):.3f} | "
            f"{_med([_fid(r, 'itl_abs_err_ms', 'p99') for r in rs]):.3f} |")
    return "\n".join(out)


def report(results: list[dict]) -> str:
    """Markdown tables: cost per token (ours vs vLLM's), fidelity by load, capacity, scale-out."""
    out = []
    by: dict[tuple, list[dict]] = {}
    for r in results:
        c = r["case"]
        by.setdefault((c["client"], c["concurrency"], c["workers"]), []).append(r)
    concs = sorted({k[1] for k in by if k[2] == 1})
    m = results[0].get("machine", {})
    counts = sorted({len(v) for v in by.values()})
    out.append(f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs, Python "
               f"{m.get('python', '?')}; medians of {counts[0]}-{counts[-1]} runs per row.")
    out.append("")
    out.append("| streams | ms between tokens | ours tok/s | ours us/token | vLLM tok/s | vLLM us/token | ours / vLLM |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|")
    for c in concs:
        h, v = by.get(("harness", c, 1), []), by.get(("vllm", c, 1), [])
        if not h and not v:
            continue
        hu, vu = _med([r["us_per_token"] for r in h]), _med([r["us_per_token"] for r in v])
        out.append(f"| {c} | {_f(_med([r.get('token_gap_ms_p50') for r in h + v]), '.1f')} | "
                   f"{_f(_med([r['tokens_per_s'] for r in h]), ',.0f')} | {_f(hu, '.1f')} | "
                   f"{_f(_med([r['tokens_per_s'] for r in v]), ',.0f')} | {_f(vu, '.1f')} | "
                   f"{_f(hu / vu, '.2f')} |")
    out.append("")
    out.append("Fidelity: client minus simulator truth, ms (TTFT error: first-token stamp minus "
               "the truth write time; ITL: |client gap - truth gap|). Pass = the median over the "
               f"runs of each p99 < {FIDELITY_MS:g} ms (in brackets: runs where both were).")
    out.append("")
    out.append("| streams | client | tok/s | client CPU (cores) | TTFT err p50 | TTFT err p99 | ITL err p50 | ITL err p99 | transit p50 | transit p99 | pass |")
    out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    capacity: dict[str, tuple[float, int] | None] = {"harness": None, "vllm": None}
    for c in concs:
        for client in ("harness", "vllm"):
            rs = by.get((client, c, 1), [])
            if not rs:
                continue
            passed = [(_fid(r, "ttft_err_ms", "p99") or 1e9) < FIDELITY_MS
                      and (_fid(r, "itl_abs_err_ms", "p99") or 1e9) < FIDELITY_MS for r in rs]
            ok = (_med([_fid(r, "ttft_err_ms", "p99") for r in rs]) < FIDELITY_MS
                  and _med([_fid(r, "itl_abs_err_ms", "p99") for r in rs]) < FIDELITY_MS)
            tps = _med([r["tokens_per_s"] for r in rs])
            if ok and (capacity[client] is None or tps > capacity[client][0]):
                capacity[client] = (tps, c)
            out.append(
                f"| {c} | {'ours' if client == 'harness' else 'vLLM'} | {tps:,.0f} | "
                f"{_med([r['client_cores_used'] for r in rs]):.2f} | "
                f"{_med([_fid(r, 'ttft_err_ms', 'p50') for r in rs]):.3f} | "
                f"{_med([_fid(r, 'ttft_err_ms', 'p99') for r in rs]):.3f} | "
                f"{_med([_fid(r, 'itl_abs_err_ms', 'p50') for r in rs]):.3f} | "
                f"{_med([_fid(r, 'itl_abs_err_ms', 'p99') for r in rs]):.3f} | "
                f"{_med([_fid(r, 'transit_ms', 'p50') for r in rs]):.3f} | "
                f"{_med([_fid(r, 'transit_ms', 'p99') for r in rs]):.3f} | "
                f"{'yes' if ok else 'no'} ({sum(passed)}/{len(passed)}) |")
    out.append("")
    for client, name in (("harness", "ours"), ("vllm", "vLLM's")):
        cap = capacity[client]
        out.append(f"Fidelity capacity, {name} client (one client core): "
                   + (f"{cap[0]:,.0f} tokens/s (highest passing load: {cap[1]} streams)"
                      if cap else "no load tried passed"))
    scal = sorted({k[1] for k in by if k[0] == "harness" and k[2] > 1})
    if scal:
        out.append("")
        out.append("| streams | workers | client CPUs | tok/s | client CPU (cores) | us/token | TTFT err p99 | ITL err p99 |")
        out.append("|---:|---:|---|---:|---:|---:|---:|---:|")
        for c in scal:
            for w in sorted({k[2] for k in by if k[0] == "harness" and k[1] == c}):
                rs = [r for r in by[("harness", c, w)] if w > 1 or r["case"]["label"] == "scaleout"] \
                    or by[("harness", c, w)]
                out.append(
                    f"| {c} | {w} | {rs[0]['case']['client_cpus']} | {_med([r['tokens_per_s'] for r in rs]):,.0f} | "
                    f"{_med([r['client_cores_used'] for r in rs]):.2f} | "
                    f"{_med([r['us_per_token'] for r in rs]):.1f} | "
                    f"{_med([_fid(r, 'ttft_err_ms', 'p99') for r in rs]):.3f} | "
                    f"{_med([_fid(r, 'itl_abs_err_ms', 'p99') for r in rs]):.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
