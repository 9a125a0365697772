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

**Scale-out on a many-core machine** (`scaleout --streams-per-worker ...`, weak scaling): S
simulators, each pinned to its own core with its own truth log, listed in an endpoints.json for
`harness load --endpoints` (users spread evenly over them, `benchmarks/bench_locustfile_endpoints.py`);
`harness load --workers W` with the Locust master (and this orchestrator) on the first client
core and each worker process pinned to its own further core (every thread, re-checked while it
runs); W x streams-per-worker streams. Per W: tokens/s, client CPU, us/token, TTFT/ITL errors
(records paired with the merged truth logs by response id: uuid4 ids, duplicates are counted),
each simulator's and each worker's CPU use, and the scaling efficiency
tokens/s(W) / (W x tokens/s(1)), also at the same token gap (the simulated engine steps more
slowly with a larger batch, which is not the client's doing). Without --sim-cpus/--client-cpus
the layout is derived from the machine's CPUs (see `auto_layout`). The vLLM client, its
environment and its tokenizer are not needed for it; `--python` picks the interpreter of the
simulators and of `harness load` (e.g. `python3` with PYTHONPATH pointing at installed wheels,
see benchmarks/device_scaleout.sh).

    python3 benchmarks/client_cost.py scaleout --streams-per-worker 48 128 --workers-list 1 2 4 8 \
        --seconds 10 --json runs/scaleout.jsonl

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
HARNESS_PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable
VLLM_PY = str(REPO / ".venv-vllm" / "bin" / "python")
LOCUSTFILE = str(REPO / "benchmarks" / "bench_locustfile.py")
LOCUSTFILE_ENDPOINTS = str(REPO / "benchmarks" / "bench_locustfile_endpoints.py")
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
    sims: int = 1                    # simulator processes; sim i on server_cpu's i-th CPU
    endpoints: bool = False          # harness only: --endpoints list of the sims (scale-out)
    pin_workers: bool = False        # harness only: master on client_cpus[0], worker i on [1+i]
    streams_per_worker: int = 0      # scale-out: concurrency = workers x this

    def num_requests(self) -> int:
        if self.requests:
            return self.requests
        # One simulator core writes at most ~16,000 token events/s here: above ~200 streams the
        # time between tokens grows with the concurrency.
        step_ms = max(self.step_ms_guess, self.concurrency / max(1, self.sims) / 16.0)
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


def cpu_list(spec: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8] (taskset's list syntax, order kept)."""
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def cpu_spec(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def spawn_sim(case: Case, port: int, truth: Path, cpu: str | None) -> subprocess.Popen:
    cmd = [HARNESS_PY, "-m", "harness.cli", "sim", "--profile", case.profile, "--port", str(port),
           "--max-num-seqs", str(max(256, case.concurrency)), "--truth-log", str(truth)]
    pre = None
    if cpu is not None and not shutil.which("taskset") and hasattr(os, "sched_setaffinity"):
        cpus = set(cpu_list(cpu))
        pre = lambda: os.sched_setaffinity(0, cpus)   # noqa: E731  (no taskset here)
    return subprocess.Popen(pinned(cmd, cpu, 20 if case.rt else None), cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=pre)


def wait_sim(proc: subprocess.Popen) -> str:
    """Wait for the simulator's 'serving' line; returns the served model name."""
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
    return model


def start_sim(case: Case, port: int, truth: Path) -> tuple[subprocess.Popen, str]:
    proc = spawn_sim(case, port, truth, case.server_cpu)
    return proc, wait_sim(proc)


def start_sims(case: Case, work: Path) -> tuple[list[subprocess.Popen], list[int], list[Path], str]:
    """case.sims simulators, sim i pinned to the i-th CPU of case.server_cpu (cycling), each
    with its own port and truth log; started together, then waited for."""
    cpus = cpu_list(case.server_cpu) or [None]
    procs, ports, truths = [], [], []
    try:
        for i in range(case.sims):
            ports.append(free_port())
            truths.append(work / f"truth-{i}.jsonl")
            cpu = cpus[i % len(cpus)]
            procs.append(spawn_sim(case, ports[-1], truths[-1], None if cpu is None else str(cpu)))
        models = [wait_sim(p) for p in procs]
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        raise
    return procs, ports, truths, models[0]


def write_sim_endpoints(path: Path, ports: list[int], model: str, case: Case) -> Path:
    cpus = cpu_list(case.server_cpu) or [None]
    eps = [{"name": f"sim-{i}", "role": "sim", "url": f"http://127.0.0.1:{p}", "model": model,
            "port": p, "cpus": "" if cpus[i % len(cpus)] is None else str(cpus[i % len(cpus)]),
            "device": "cpu"} for i, p in enumerate(ports)]
    path.write_text(json.dumps({"schema": 1, "layout": f"client_cost-{len(ports)}-sims",
                                "layout_source": "benchmarks/client_cost.py",
                                "endpoints": eps}, indent=2) + "\n")
    return path


def client_cmd(case: Case, port: int, model: str, out: Path, tokenizer: str | None,
               endpoints: Path | None = None) -> list[str]:
    url = f"http://127.0.0.1:{port}"
    n = case.num_requests()
    if case.client == "harness":
        target = ["--endpoints", str(endpoints)] if endpoints else ["--url", url, "--model", model]
        cmd = [HARNESS_PY, "-m", "harness.cli", "load", *target,
               "--users", str(case.concurrency), "--num-requests", str(n),
               "--input-len", str(case.input_len), "--output-len", str(case.output_len),
               "--input-len-range", str(case.range_ratio),
               "--output-len-range", str(case.range_ratio), "--seed", str(case.seed),
               "--locustfile", case.locustfile or (LOCUSTFILE_ENDPOINTS if endpoints else LOCUSTFILE),
               "--workers", str(case.workers),
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
    """Samples (perf_counter_ns, CPU seconds of a process tree, per-CPU busy seconds, CPU seconds
    per process of the tree) at 5 Hz."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[int, float, list[float]]] = []
        self.per_pid: list[tuple[int, dict[int, float]]] = []
        self.stop = threading.Event()
        self._known: dict[int, psutil.Process] = {}
        self._last_per_pid: dict[int, float] = {}

    def tree_cpu(self) -> float:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            procs = list(self._known.values())
        total = 0.0
        mine: dict[int, float] = {}
        for p in procs:
            self._known.setdefault(p.pid, p)
            try:
                t = p.cpu_times()
                total += t.user + t.system
                mine[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        self._last_per_pid = mine
        return total

    @staticmethod
    def cpu_busy() -> list[float]:
        return [t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
                for t in psutil.cpu_times(percpu=True)]

    def run(self) -> None:
        while not self.stop.is_set():
            t = perf_ns()
            self.samples.append((t, self.tree_cpu(), self.cpu_busy()))
            self.per_pid.append((t, self._last_per_pid))
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

    def pid_cores(self, pid: int, t0: int, t1: int) -> float | None:
        """CPU cores one process of the tree used between t0 and t1 (interpolated)."""
        pts = [(t, d[pid]) for t, d in self.per_pid if pid in d]
        if len(pts) < 2:
            return None
        ts = np.array([p[0] for p in pts], dtype=np.float64)
        cs = np.array([p[1] for p in pts])
        return float(np.interp(t1, ts, cs) - np.interp(t0, ts, cs)) / ((t1 - t0) / 1e9)


class Pinner(threading.Thread):
    """Pins the client's processes, every thread of each, while it runs: `harness load` and the
    Locust master on cpus[0]; with one worker (Locust's local runner, no master) that process on
    cpus[1]; worker i (by pid order) on cpus[1 + i % (len - 1)]. Locust forks its workers and
    they start threads (ZeroMQ's I/O thread) after the fork, so the tree is re-checked every
    100 ms and any thread on another CPU set is moved."""

    def __init__(self, pid: int, cpus: list[int], workers: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.cpus = cpus
        self.workers = workers
        self.stop = threading.Event()
        self.roles: dict[int, str] = {}
        self.placed: dict[int, int] = {}
        self.threads: dict[int, int] = {}
        self.moves = 0

    def plan(self) -> dict[int, tuple[str, int]]:
        c = self.cpus
        wc = c[1:] or c[:1]
        out = {self.root.pid: ("wrapper", c[0])}
        try:
            kids = self.root.children()
        except psutil.Error:
            return out
        for k in kids:
            try:
                grand = sorted(k.children(), key=lambda p: p.pid)
            except psutil.Error:
                grand = []
            if self.workers > 1:
                out[k.pid] = ("master", c[0])
                for i, g in enumerate(grand):
                    out[g.pid] = ("worker", wc[i % len(wc)])
            else:
                out[k.pid] = ("local", wc[0])
        return out

    def apply(self) -> None:
        for pid, (role, cpu) in self.plan().items():
            self.roles[pid] = role
            self.placed[pid] = cpu
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            self.threads[pid] = max(self.threads.get(pid, 0), len(tids))
            for tid in tids:
                try:
                    if os.sched_getaffinity(int(tid)) != {cpu}:
                        os.sched_setaffinity(int(tid), {cpu})
                        self.moves += 1
                except OSError:
                    pass

    def run(self) -> None:
        while not self.stop.is_set():
            self.apply()
            self.stop.wait(0.1)


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
             use_ids: bool, time_check: bool = True) -> dict:
    """time_check=False: pair by ids only (the time matcher, a check of the method, is
    quadratic-ish in the requests in flight and pointless across several simulators)."""
    t0, t1 = window
    by_obj = {id(t): t for t in truth}
    by_rid = {t["id"]: t for t in truth}
    time_pairs = match_by_time(reqs, truth) if (time_check or not use_ids) else {}
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

def run_case(case: Case, tokenizer: str | None, keep: Path | None = None,
             timeout_s: float = 240.0) -> dict:
    work = Path(tempfile.mkdtemp(prefix="clientcost-"))
    try:
        return _run_case(case, tokenizer, keep, timeout_s, work)
    except Exception as e:
        try:
            tail = (work / "client.log").read_text()[-2000:]
        except OSError:
            tail = ""
        if keep is not None and work.exists():
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copytree(work, keep / f"failed-{case.client}-c{case.concurrency}-w{case.workers}-"
                                         f"{int(time.time())}")
        raise RuntimeError(f"{e}" + (f"\n--- client log, last 2000 characters:\n{tail}" if tail
                                    else "")) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_case(case: Case, tokenizer: str | None, keep: Path | None, timeout_s: float,
              work: Path) -> dict:
    out = work / "client"
    out.mkdir()
    load_before = os.getloadavg()[0]
    endpoints = None
    if case.sims > 1 or case.endpoints:
        if case.client != "harness":
            raise ValueError("several simulators: our client only (harness load --endpoints)")
        sims, ports, truth_paths, model = start_sims(case, work)
        port = ports[0]
        endpoints = write_sim_endpoints(work / "endpoints.json", ports, model, case)
    else:
        port = free_port()
        truth_paths = [work / "truth.jsonl"]
        sim, model = start_sim(case, port, truth_paths[0])
        sims = [sim]
    sim_ps = [psutil.Process(p.pid) for p in sims]
    client = None
    pinner = None
    try:
        cmd = client_cmd(case, port, model, out, tokenizer, endpoints)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        if case.client == "harness" and case.workers > 1:
            # Locust's master binds *:5557 by default: a free port instead, so that another
            # Locust run on the machine does not stop this one.
            with socket.socket() as sk:
                sk.bind(("", 0))
                mport = str(sk.getsockname()[1])
            env.update(LOCUST_MASTER_BIND_PORT=mport, LOCUST_MASTER_NODE_PORT=mport)
        started = time.monotonic()
        client = subprocess.Popen(cmd, cwd=client_cwd(case), stdout=open(work / "client.log", "w"),
                                  stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
        if case.pin_workers and hasattr(os, "sched_setaffinity"):
            pinner = Pinner(client.pid, cpu_list(case.client_cpus), case.workers)
            pinner.start()
        sampler = TreeSampler(client.pid)
        sim_samples: list[tuple[int, list[float]]] = []
        sampler.start()

        def sample_sim():
            while client.poll() is None:
                row = []
                for sp in sim_ps:
                    try:
                        c = sp.cpu_times()
                        row.append(c.user + c.system)
                    except psutil.Error:
                        row.append(float("nan"))
                sim_samples.append((perf_ns(), row))
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
        if pinner is not None:
            pinner.stop.set()
            pinner.join()
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        for sim in sims:
            if sim.poll() is None:
                sim.send_signal(signal.SIGINT)
        for sim in sims:
            try:
                sim.wait(15)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()
    truth = []
    per_sim_truth = []
    for tp in truth_paths:
        lines = read_jsonl(tp)
        per_sim_truth.append(lines)
        truth += lines
    ids = [t["id"] for t in truth]
    duplicate_ids = len(ids) - len(set(ids))
    window = steady_window(truth, case.concurrency)
    t0, t1 = window
    win_s = (t1 - t0) / 1e9
    cpu0, busy0 = sampler.at(t0)
    cpu1, busy1 = sampler.at(t1)

    def window_tokens(lines):
        return sum(1 for t in lines if t["stream"] for e in t["event_ns"] if t0 <= e <= t1)
    tokens = window_tokens(truth)
    gaps = [b - a for t in truth if t["stream"] for a, b in zip(t["event_ns"], t["event_ns"][1:])
            if t0 <= b <= t1]
    token_gap_ms = float(np.median(gaps)) / 1e6 if gaps else None
    client_cpu = cpu1 - cpu0
    busy = [(b - a) / win_s for a, b in zip(busy0, busy1)]
    client_cores = cpu_list(case.client_cpus) if case.client_cpus else []
    sim_cores: list[float | None] = [None] * len(sims)
    if len(sim_samples) > 2:
        ts = np.array([s[0] for s in sim_samples], dtype=np.float64)
        for i in range(len(sims)):
            cs = np.array([s[1][i] for s in sim_samples])
            sim_cores[i] = float(np.interp(t1, ts, cs) - np.interp(t0, ts, cs)) / win_s
    known_sim = [c for c in sim_cores if c is not None and c == c]
    sim_cpu = sum(known_sim) if known_sim else None
    reqs = harness_requests(out) if case.client == "harness" else vllm_requests(out)
    gen = {}
    if case.client == "harness":
        try:
            gen = json.loads((out / "summary.json").read_text()).get("generator") or {}
        except (OSError, ValueError):
            pass
    fid = fidelity(reqs, truth, window, use_ids=case.client == "harness",
                   time_check=len(sims) == 1 and not case.pin_workers)
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
        "python": HARNESS_PY,
        # the generator's own check on its stamps (harness.stamp_delay), to set beside the truth
        "stamp_delay_ms": gen.get("stamp_delay_ms"), "generator_valid": gen.get("valid"),
        "generator_reasons": gen.get("reasons"),
    }
    if len(sims) > 1 or case.endpoints:
        res["sim_cores_used"] = sim_cores
        res["sim_cores_max"] = max(known_sim) if known_sim else None
        res["sim_tokens_per_s"] = [window_tokens(lines) / win_s for lines in per_sim_truth]
        res["duplicate_ids"] = duplicate_ids
    if pinner is not None:
        roles = dict(pinner.roles)
        res["pinning"] = {str(pid): [role, pinner.placed.get(pid), pinner.threads.get(pid)]
                          for pid, role in roles.items()}   # role, CPU, threads seen
        res["pin_moves"] = pinner.moves
        wk = [sampler.pid_cores(pid, t0, t1) for pid, r in roles.items() if r in ("worker", "local")]
        wk = [w for w in wk if w is not None]
        res["worker_cores_used"] = sorted(wk, reverse=True)
        res["worker_cores_max"] = max(wk) if wk else None
        ms = [sampler.pid_cores(pid, t0, t1) for pid, r in roles.items() if r == "master"]
        res["master_cores_used"] = ms[0] if ms and ms[0] is not None else None
        res["workers_seen"] = sum(1 for r in roles.values() if r in ("worker", "local"))
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
    return ((f"[{c['label']}] " if c.get("label") else "")
            + f"{c['client']:7s} C={c['concurrency']:<4d} w={c['workers']} {r['tokens_per_s']:8,.0f} tok/s "
            f"cpu {r['client_cores_used']:.2f} cores {r['us_per_token']:6.1f} us/tok | "
            f"TTFT err p50 {te.get('p50', float('nan')):.3f} p99 {te.get('p99', float('nan')):.3f} | "
            f"ITL |err| p50 {ie.get('p50', float('nan')):.3f} p99 {ie.get('p99', float('nan')):.3f} ms | "
            f"matched {f['matched']}/{f['client_requests']} | "
            + (f"stamp delay p50 {sd.get('p50') or 0:.3f} p99 {sd.get('p99') or 0:.3f} ms "
               f"({sd.get('count')} reads) | " if (sd := r.get("stamp_delay_ms")) else "")
            + f"other load on client cpu "
            f"{(r['other_load_on_client_cpus'] or 0):.2f} | sim {r['server_cores_used'] or 0:.2f} cores"
            + (f" ({c.get('sims')} sims, busiest {r.get('sim_cores_max') or 0:.2f})"
               if r.get("sim_cores_used") else "")
            + (f" | busiest worker {r.get('worker_cores_max') or 0:.2f} cores, master "
               f"{r.get('master_cores_used') or 0:.2f}, {r.get('workers_seen')} worker procs pinned"
               if "worker_cores_used" in r else ""))


def ensure_tokenizer(path: Path) -> str:
    if not (path / "tokenizer.json").exists():
        subprocess.run([VLLM_PY, str(REPO / "tests" / "tiny_model.py"), str(path)], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
    return str(path)


def machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(),
            "cpu_model": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                               if ln.startswith("model name")), ""),
            "python": platform.python_version(), "kernel": platform.release()}


def cpu_order(cpus: list[int]) -> list[int]:
    """CPUs with one hardware thread of every physical core first (then the second threads),
    so that the first processes placed do not share a core with each other's sibling."""
    def key(c: int):
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            sib = cpu_list(open(base + "thread_siblings_list").read().strip())
            pkg = int(open(base + "physical_package_id").read().strip())
        except (OSError, ValueError):
            return (0, 0, c)
        return (sib.index(c) if c in sib else 0, pkg, min(sib), c)
    return sorted(cpus, key=key)


def cgroup_cpus() -> float | None:
    """The cgroup v2 CPU quota in CPUs (cpu.max), None when there is none."""
    try:
        q, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if q == "max" else int(q) / int(period)
    except (OSError, ValueError):
        return None


def auto_layout(workers_max: int | None = None, sims: int | None = None) -> dict:
    """The scale-out layout from this process's CPUs: the first CPU (in cpu_order) for the
    Locust master, `harness load` and this orchestrator, the next workers_max CPUs one per
    worker, every other CPU one simulator each (or `sims` simulators on them, cycling).
    workers_max defaults to the largest power of two <= 5/8 of the CPUs less one (8 of 16, 32
    of 64); with fewer than 3 CPUs everything shares."""
    cpus = cpu_order(sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else list(range(os.cpu_count() or 1)))
    quota = cgroup_cpus()
    if quota and quota < len(cpus):   # a CPU quota smaller than the CPUs we may run on
        cpus = cpus[:max(1, int(quota))]
    n = len(cpus)
    if workers_max is None:
        workers_max = 1
        while workers_max * 2 <= max(1, (n - 1) * 5 // 8):
            workers_max *= 2
    if n < 3:
        return {"client_cpus": cpus[:2] if n > 1 else cpus, "sim_cpus": cpus[:1],
                "sims": sims or 1, "workers_max": workers_max}
    client = cpus[:min(n - 1, 1 + workers_max)]
    rest = cpus[len(client):]
    return {"client_cpus": client, "sim_cpus": rest, "sims": sims or len(rest),
            "workers_max": workers_max}


def main(argv=None) -> int:
    global HARNESS_PY
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
    ap.add_argument("--server-cpu", default=None,
                    help="the simulator's CPU (default 0); scale-out: alias of --sim-cpus")
    ap.add_argument("--client-cpus", default=None,
                    help="the client's CPUs (default 1); scale-out: the first for the Locust "
                         "master (and this orchestrator), one more per worker (default: auto)")
    g = ap.add_argument_group("scale-out over many cores (scaleout with any of these)")
    g.add_argument("--streams-per-worker", type=int, nargs="+", default=None,
                   help="weak scaling: W x this many streams with W workers (e.g. 48 128)")
    g.add_argument("--workers-list", type=int, nargs="+", default=None,
                   help="worker processes to try (default: powers of two up to the auto "
                        "layout's, e.g. 1 2 4 8 on 16 CPUs)")
    g.add_argument("--sims", type=int, default=None,
                   help="simulator processes (default: one per --sim-cpus CPU)")
    g.add_argument("--sim-cpus", default=None, help="CPU list for the simulators, one each "
                   "(e.g. 9-15; default: the CPUs the client does not use)")
    g.add_argument("--deadline-s", type=float, default=0.0,
                   help="start no case once this many seconds have passed, or when the last "
                        "case's time would overrun it (0: no limit)")
    ap.add_argument("--python", default=None,
                    help="interpreter for the simulators and `harness load` (default: "
                         ".venv/bin/python if present, else this one)")
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
    ap.add_argument("--variants", nargs="+", default=None, metavar="LABEL=DIR",
                    help="A/B: run every case once per variant, interleaved (order reversed in "
                         "every second round), our client from DIR ('.' = this checkout) and the "
                         "results labelled LABEL; e.g. before=/tmp/snap-before after=.")
    args = ap.parse_args(argv)
    if args.what == "report":
        if not args.json:
            ap.error("report needs --json FILE (results written by an earlier run)")
        rows = [json.loads(ln) for ln in open(args.json) if ln.strip()]
        print(report_by_label(rows) if args.by_label else report(rows))
        return 0
    if args.python:
        HARNESS_PY = shutil.which(args.python) or args.python
    multi = args.what == "scaleout" and any(
        x is not None for x in (args.streams_per_worker, args.workers_list, args.sims,
                                args.sim_cpus))
    if args.rt and not rt_available():
        args.rt = False
    if args.concurrency is None:
        args.concurrency = {"case": [256], "scaleout": args.scaleout_concurrency}.get(
            args.what, [8, 16, 32, 64, 128, 256, 512, 1024])

    layout = None
    if multi:
        sim_spec = args.sim_cpus or args.server_cpu
        auto = auto_layout(max(args.workers_list) if args.workers_list else None, args.sims)
        client_all = cpu_list(args.client_cpus) if args.client_cpus else auto["client_cpus"]
        sim_all = cpu_list(sim_spec) if sim_spec else (
            auto["sim_cpus"] if args.client_cpus is None
            else [c for c in cpu_order(sorted(os.sched_getaffinity(0))) if c not in client_all]
            or client_all[:1])
        nsims = args.sims or len(sim_all)
        workers_list = args.workers_list or [w for w in (1, 2, 4, 8, 16, 32, 64, 128)
                                             if w <= max(1, len(client_all) - 1)]
        spw = args.streams_per_worker or [48, 128]
        layout = {"client_cpus": cpu_spec(client_all), "sim_cpus": cpu_spec(sim_all),
                  "sims": nsims, "workers": workers_list, "streams_per_worker": spw,
                  "cpus": os.cpu_count(), "cgroup_cpu_quota": cgroup_cpus(),
                  "python": HARNESS_PY, "rt": args.rt}
        print(f"scale-out layout: {nsims} simulator(s) on CPUs {layout['sim_cpus']}; Locust "
              f"master + orchestrator on CPU {client_all[0]}, workers on "
              f"{cpu_spec(client_all[1:]) or cpu_spec(client_all)}; workers {workers_list}, "
              f"streams per worker {spw}; python {HARNESS_PY}; real-time priority "
              f"{'on' if args.rt else 'off'}", flush=True)
        if max(workers_list) > max(1, len(client_all) - 1):
            print(f"note: {max(workers_list)} workers on {len(client_all) - 1} worker CPUs: "
                  f"some share a CPU", flush=True)
    else:
        args.server_cpu = args.server_cpu or "0"
        args.client_cpus = args.client_cpus or "1"

    needs_vllm = args.what in ("sweep", "all") or (args.what == "case" and args.client == "vllm")
    tok = (args.tokenizer or ensure_tokenizer(Path("/tmp/llm-harness-tiny"))) if needs_vllm \
        else args.tokenizer
    keep = Path(args.keep) if args.keep else None
    # The orchestrator (sampling, analysis) stays off the client's worker cores and, in the
    # scale-out, off the simulators' cores (it shares the Locust master's).
    orch = cpu_list(layout["client_cpus"])[:1] if multi else cpu_list(args.server_cpu)
    if hasattr(os, "sched_setaffinity") and orch:
        for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
            try:   # every thread (numpy's BLAS threads were started at import)
                os.sched_setaffinity(int(tid), set(orch))
            except OSError:
                pass
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
    if multi:
        client_all = cpu_list(layout["client_cpus"])
        for n in layout["streams_per_worker"]:
            for rep in range(args.repeats):
                ws = layout["workers"] if rep % 2 == 0 else layout["workers"][::-1]
                for w in ws:
                    cases.append(Case(
                        "harness", w * n, workers=w, seed=rep, sims=layout["sims"],
                        endpoints=True, pin_workers=True, streams_per_worker=n,
                        **{**base, "label": args.label or f"scaleout-{layout['sims']}sims",
                           "server_cpu": layout["sim_cpus"],
                           "client_cpus": cpu_spec(client_all[:1 + w] if len(client_all) > 1
                                                   else client_all)}))
    elif args.what in ("scaleout", "all"):
        for c in (args.concurrency if args.what == "scaleout" else args.scaleout_concurrency):
            for rep in range(args.repeats):
                for w in ((1, 2) if rep % 2 == 0 else (2, 1)):
                    cases.append(Case("harness", c, workers=w, seed=rep,
                                      **{**base, "label": "scaleout",
                                         "client_cpus": "1" if w == 1 else "0,1"}))
    if args.variants:
        variants = []
        for v in args.variants:
            label, sep, path = v.partition("=")
            if not sep or not label:
                ap.error(f"--variants takes LABEL=DIR, got {v!r}")
            path = "" if path in ("", ".") else str(Path(path).resolve())
            variants.append((label, path))
        expanded = []
        for k, case in enumerate(cases):
            for label, path in (variants if k % 2 == 0 else variants[::-1]):
                expanded.append(Case(**{**asdict(case), "label": label, "client_repo": path}))
        cases = expanded
    results = []
    failed = 0
    began = time.monotonic()
    last_s = 0.0
    for k, case in enumerate(cases):
        elapsed = time.monotonic() - began
        if args.deadline_s and elapsed + 1.2 * last_s > args.deadline_s:
            print(f"deadline: {elapsed:.0f} s gone, {len(cases) - k} case(s) not run: "
                  + ", ".join(f"{c.streams_per_worker or c.concurrency}x{c.workers}w"
                              for c in cases[k:]), flush=True)
            break
        t_case = time.monotonic()
        try:
            r = run_case(case, tok, keep)
        except Exception as e:   # one broken case must not lose the others' results
            failed += 1
            print(f"case {case.client} C={case.concurrency} w={case.workers} failed: "
                  f"{type(e).__name__}: {e}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"case": asdict(case), "error": f"{type(e).__name__}: {e}",
                                        "machine": machine()}) + "\n")
            last_s = time.monotonic() - t_case
            continue
        last_s = time.monotonic() - t_case
        r["case_s"] = last_s
        r["machine"] = machine()
        if layout:
            r["layout"] = layout
        results.append(r)
        print(one_line(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    if len(results) > 1:
        print()
        print(report(results))
    return 1 if failed else 0


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
    for r in (r for r in results if "tokens_per_s" in r):   # not the failed cases
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
    """Markdown tables: cost per token (ours vs vLLM's), fidelity by load, capacity, scale-out;
    and the many-core scale-out (rows with streams_per_worker) in tables of their own."""
    results = [r for r in results if "tokens_per_s" in r]
    multi = [r for r in results if r["case"].get("streams_per_worker")]
    rest = [r for r in results if not r["case"].get("streams_per_worker")]
    parts = []
    if rest:
        parts.append(report_classic(rest))
    if multi:
        parts.append(report_scaleout(multi))
    return "\n\n".join(parts)


TARGET_TOKENS_S = 54_000


def report_scaleout(results: list[dict]) -> str:
    """Weak scaling over worker processes with several simulators (scaleout --streams-per-worker)."""
    out = []
    m = results[0].get("machine", {})
    by: dict[tuple, list[dict]] = {}
    for r in results:
        c = r["case"]
        by.setdefault((c.get("label") or "-", c["streams_per_worker"], c["workers"],
                       c.get("sims", 1)), []).append(r)
    counts = sorted({len(v) for v in by.values()})
    out.append(f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs, Python "
               f"{m.get('python', '?')}; {results[0]['case'].get('sims', 1)} simulator(s) on CPUs "
               f"{results[0]['case']['server_cpu']}, Locust master on CPU "
               f"{cpu_list(results[0]['case']['client_cpus'])[0]}, one worker per further CPU; "
               f"real-time priority {'on' if results[0]['case'].get('rt') else 'off'}; "
               f"{'median of ' if counts[-1] > 1 else ''}{counts[0]}"
               f"{'-' + str(counts[-1]) if counts[-1] != counts[0] else ''} run(s) per row.")
    out.append("")
    out.append("Efficiency = tok/s(W) / (W x tok/s(1)); at same gap: the same with each side's "
               "tok/s times its median truth token gap (slot use: how much of the time each stream "
               "had a token coming), which takes out the simulated engine stepping more slowly with "
               "a larger batch per simulator. Pass = TTFT and ITL error p99 < "
               f"{FIDELITY_MS:g} ms (median over runs). Stamp delay: the generator's own check "
               "(harness.stamp_delay: kernel receive time to its stamp, sampled reads), p50 / p99; "
               "valid: runs its verdict passed at its default limit.")
    out.append("")
    out.append("| variant | streams/worker | workers | streams | streams/sim | tok/s | efficiency | eff. at same gap | "
               "ms between tokens | client CPU (cores) | busiest worker (cores) | us/token | "
               "busiest sim (cores) | TTFT err p50 | TTFT err p99 | ITL err p50 | ITL err p99 | pass | "
               "stamp delay p50 / p99 | valid |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    best: dict[tuple, tuple] = {}
    sim_max = 0.0
    labels = list(dict.fromkeys(k[0] for k in by))
    for key in sorted(by, key=lambda k: (k[3], k[1], k[2], labels.index(k[0]))):
        label, spw, w, sims = key
        rs = by[key]
        tps = _med([r["tokens_per_s"] for r in rs])
        gap = _med([r.get("token_gap_ms_p50") for r in rs])
        one = by.get((label, spw, 1, sims), [])
        tps1 = _med([r["tokens_per_s"] for r in one])
        gap1 = _med([r.get("token_gap_ms_p50") for r in one])
        eff = tps / (w * tps1) if one else float("nan")
        eff_gap = (tps * gap) / (w * tps1 * gap1) if one else float("nan")
        sm = _med([r.get("sim_cores_max") for r in rs])
        sim_max = max(sim_max, sm) if sm == sm else sim_max
        ttft99 = _med([_fid(r, "ttft_err_ms", "p99") for r in rs])
        itl99 = _med([_fid(r, "itl_abs_err_ms", "p99") for r in rs])
        ok = ttft99 < FIDELITY_MS and itl99 < FIDELITY_MS
        # per streams/worker: the most workers that passed (else the most workers tried)
        bk = (label, sims, spw)
        if bk not in best or (ok, w) > (best[bk][4], best[bk][0]):
            best[bk] = (w, tps, _med([r["us_per_token"] for r in rs]),
                        _med([r.get("worker_cores_max") for r in rs]), ok)
        sd50 = _med([(r.get("stamp_delay_ms") or {}).get("p50") for r in rs])
        sd99 = _med([(r.get("stamp_delay_ms") or {}).get("p99") for r in rs])
        valid = [r.get("generator_valid") for r in rs if r.get("generator_valid") is not None]
        out.append(
            f"| {label} | {spw} | {w} | {spw * w} | {spw * w / sims:.0f} | {_f(tps, ',.0f')} | {_f(eff, '.2f')} | "
            f"{_f(eff_gap, '.2f')} | {_f(gap, '.1f')} | "
            f"{_f(_med([r['client_cores_used'] for r in rs]), '.2f')} | "
            f"{_f(_med([r.get('worker_cores_max') for r in rs]), '.2f')} | "
            f"{_f(_med([r['us_per_token'] for r in rs]), '.1f')} | {_f(sm, '.2f')} | "
            f"{_f(_med([_fid(r, 'ttft_err_ms', 'p50') for r in rs]), '.3f')} | {_f(ttft99, '.3f')} | "
            f"{_f(_med([_fid(r, 'itl_abs_err_ms', 'p50') for r in rs]), '.3f')} | {_f(itl99, '.3f')} | "
            f"{'yes' if ok else 'no'} | {_f(sd50, '.3f')} / {_f(sd99, '.3f')} | "
            f"{f'{sum(map(bool, valid))}/{len(valid)}' if valid else '–'} |")
    out.append("")
    dup = sum(r.get("duplicate_ids") or 0 for r in results)
    matched = sum(r["fidelity"]["matched"] for r in results)
    creq = sum(r["fidelity"]["client_requests"] for r in results)
    out.append(f"Busiest simulator core: {sim_max:.0%} of a core (one process each; "
               f"{'well below saturation' if sim_max < 0.7 else 'near saturation: tokens/s may be the simulators, not the client'}). "
               f"Records paired with truth lines by response id: {matched:,} of {creq:,}; "
               f"duplicate ids across the simulators: {dup}.")
    for (label, sims, spw), (w, tps, us, wmax, ok) in sorted(best.items()):
        per = tps / w
        need = -(-TARGET_TOKENS_S // int(per)) if per >= 1 else float("nan")
        out.append(f"{'' if label == '-' else f'[{label}] '}At {spw} streams per worker ({sims} sims): {per:,.0f} tokens/s per worker with {w} workers "
                   f"(busiest worker {wmax:.2f} cores, {us:.1f} us/token, fidelity "
                   f"{'passed' if ok else 'not passed'}) -> {TARGET_TOKENS_S:,} tokens/s needs "
                   f"{need} worker cores + 1 for the master; by CPU alone "
                   f"{TARGET_TOKENS_S * us / 1e6:.2f} cores.")
    return "\n".join(out)


def report_classic(results: list[dict]) -> str:
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
