"""One capacity step on a real server: a normal `harness load` run at an open-loop rate, or
(load "users") of a closed loop of N users.

Each step is its own results directory (DIR/steps/NN-RATErps/, with summary.json,
requests.jsonl, load.log), made by `harness load --rate R --num-requests N --duration T
--drain-timeout D`: bounded in count (N, see capacity.step_plan) and time (T), and, in case
the run itself hangs, by a wall-clock limit after which it is stopped with SIGINT (Locust
writes its results) and killed 30 s later. The step is judged from its requests.jsonl
(capacity.judge_step) in the window its summary measured (compare.measured); its summary's
generator verdict makes it invalid, a run that wrote no summary is an error. A users step
is `harness load --users N`, bounded by capacity.users_step_plan; its first N requests
(every user's first, sent at once) are left out as warm-up (capacity.users_warmup).

Ctrl-C: the load runs in a session of its own (as `harness load` runs Locust), so the
terminal's SIGINT reaches this process only; `Interrupt` forwards it once to the running
step, which writes its partial results, and the step comes back `interrupted`.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.capacity import Step, judge_step, step_plan, users_step_plan, users_warmup
from harness.slo import Slo

KILL_GRACE_S = 30.0
WALL_MARGIN_S = 60.0


@dataclass
class Interrupt:
    """SIGINT/SIGTERM while a search runs: remembered, and forwarded to the running step."""

    received: list[int] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def handler(self, signum, _frame) -> None:
        self.received.append(signum)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass

    def install(self) -> dict:
        return {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def restore(previous: dict) -> None:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class LiveOptions:
    """What every step's `harness load` gets besides its rate and bounds."""

    url: str | None = None
    endpoints: str | None = None
    model: str = ""
    input_len: int = 512
    output_len: int = 128
    dataset: str = ""
    arrival: str = "poisson"
    burstiness: float = 1.0
    workers: int = 1
    seed: int = 0
    drain_s: float = 30.0
    request_timeout: float = 600.0
    endpoint: str = "chat"
    cpu_limit: float | None = None
    lag_limit_ms: float | None = None
    stamp_delay_limit_ms: float | None = None
    load: str = "rate"            # capacity.LOADS: a step's level is req/s or users


def load_argv(o: LiveOptions, rate: float, count: int, time_bound_s: float, out: Path,
              slos: list[Slo]) -> list[str]:
    """`harness load` for one step at `rate` (users when o.load is "users")."""
    if o.load == "users":
        level = ["--users", str(int(rate))]
    else:
        level = ["--rate", f"{rate:.6g}", "--arrival", o.arrival, "--burstiness", f"{o.burstiness:g}"]
    argv = [sys.executable, "-m", "harness.cli", "load",
            *(["--endpoints", o.endpoints] if o.endpoints else ["--url", str(o.url)]),
            "--out", str(out), "--quiet", *level, "--num-requests", str(count),
            "--duration", f"{max(1, math.ceil(time_bound_s))}s", "--drain-timeout", f"{o.drain_s:g}",
            "--input-len", str(o.input_len), "--output-len", str(o.output_len), "--workers", str(o.workers),
            "--seed", str(o.seed), "--timeout", f"{o.request_timeout:g}", "--endpoint", o.endpoint]
    if o.model:
        argv += ["--model", o.model]
    if o.dataset:
        argv += ["--dataset", o.dataset]
    for flag, v in (("--cpu-limit", o.cpu_limit), ("--lag-limit-ms", o.lag_limit_ms),
                    ("--stamp-delay-limit-ms", o.stamp_delay_limit_ms)):
        if v is not None:
            argv += [flag, f"{v:g}"]
    for s in slos:
        argv += ["--slo", s.text]
    return argv


def _tail(path: Path, n: int = 4) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


def measure(rate: float, slos: list[Slo], *, options: LiveOptions, out: Path, duration_s: float,
            interrupt: Interrupt, confidence: float = 0.95, resamples: int = 1000) -> Step:
    """Run one step into `out` and judge it. Raises KeyboardInterrupt when a signal came
    before the step started (nothing to keep)."""
    from harness.compare import measured
    from harness.json_io import read_jsonl
    from harness.slo import run_exit_code

    if interrupt.received:
        raise KeyboardInterrupt
    plan = users_step_plan if options.load == "users" else step_plan
    time_bound, count = plan(rate, duration_s, slos)
    out.mkdir(parents=True, exist_ok=True)
    argv = load_argv(options, rate, count, time_bound, out, slos)
    t0 = time.monotonic()
    wall = time_bound + options.drain_s + WALL_MARGIN_S
    with open(out / "load.log", "wb") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        interrupt.proc = proc
        stopped = ""
        try:
            try:
                proc.wait(wall)
            except subprocess.TimeoutExpired:
                stopped = f"the step ran past its wall-clock bound of {wall:.0f} s and was stopped"
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        finally:
            interrupt.proc = None
    wall_s = round(time.monotonic() - t0, 2)
    rel = str(out)
    summary_path, req_path = out / "summary.json", out / "requests.jsonl"
    summary: dict[str, Any] = {}
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError:
            summary = {}
    records = []
    if req_path.exists():
        try:
            records = measured(read_jsonl(req_path), summary)
        except ValueError:
            records = []
    if interrupt.received:
        step = Step(rate=rate, status="interrupted", dir=rel, wall_s=wall_s,
                    reasons=["interrupted (Ctrl-C) before the step ended: not judged"],
                    requests={"sent": len(records)})
        return step
    server: list[str] = []
    if not summary:
        server.append(f"harness load exited with {proc.returncode} and wrote no summary: "
                      f"{_tail(out / 'load.log')}")
    if stopped:
        server.append(stopped)
    gen = summary.get("generator") or {}
    gen_reasons = ([str(r) for r in gen.get("reasons") or []] or ["the load generator was invalid"]) \
        if summary and not gen.get("valid", True) else []
    if options.load == "users":
        records = users_warmup(records, int(rate))
    step = judge_step(rate, records, slos, confidence=confidence, resamples=resamples,
                      seed=options.seed, generator_reasons=gen_reasons, server_reasons=server, dir=rel)
    step.wall_s = wall_s
    if summary:
        step.requests["exit_code"] = proc.returncode
        step.requests["summary_exit_code"] = run_exit_code(summary)
    return step
