"""Each Locust process's state of the run (`environment.llm`): its options as a LoadSpec, its
quota and drain, the model and prompts, and what it measured since its last report.

Each worker records into HDR histograms and ships them, encoded, inside Locust's own stats
report (`take_report`, every 3 s and once more on quit); the master merges them
(harness.aggregate). A local runner merges its histograms into the run's totals directly
(`Aggregate.merge_local`): the same sums, without the encoding and decoding, which ran inside
the event loop and delayed every token event arriving meanwhile.

Also the process's Locust environment (`current_environment`, for listeners that Locust calls
without it) and `set_rate`, the one way to change a running test's open-loop rate.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any
from collections.abc import Callable

import gevent
import gevent.event
import gevent.lock
import orjson
import psutil
from locust.runners import MasterRunner, WorkerRunner

from harness import load_options, token_bins
from harness.credentials import ApiKey
from harness.errors import TargetError
from harness.histograms import HistogramSet
from harness.results import REQUEST_FIELDS, Counters, RequestLog
from harness.slo import Slo, parse_slo
from harness.workload import Workload, server_token_counter

# The shortest interval a CPU sample may cover (see LLMState.sample_cpu).
MIN_CPU_SAMPLE_S = 1.0
DRAIN_POLL_S = 0.02

_ENV: dict[str, Any] = {}


def remember_environment(environment) -> None:
    """Keep this process's Locust environment (at init) for `current_environment`."""
    _ENV["env"] = environment


def current_environment():
    """This process's Locust environment, or None before init (for listeners of events that
    do not pass it: quit, report_to_master, worker_report)."""
    return _ENV.get("env")


class LLMState:
    """One per Locust process (`environment.llm`)."""

    def __init__(self, environment) -> None:
        self.env = environment
        self.extra_body: dict | None = None
        self._read_options(environment.parsed_options)
        # Fixed at start, whatever a web form or a spawn message says later (harness.credentials):
        # where the key comes from and goes to, and where results are written (and deleted).
        self.api_key = ApiKey(self.load.api_key_env,
                              [getattr(environment, "host", None)]
                              + [getattr(u, "host", None) for u in getattr(environment, "user_classes", ())])
        self.out = self.load.out
        self.quota: int | None = None
        self.inflight = 0
        self.due = 0              # open-loop arrivals taken from the quota and not yet sending
        self.draining = False     # the run is ending: start nothing new (see `drain`)
        self._drain_perf: float | None = None
        self.drain_waited_s: float | None = None
        self.interrupted = False  # stopped by a signal: no drain
        self.fatal: str | None = None   # why the run could not go on (`abort`)
        self.finished_event = gevent.event.Event()
        self.done_sent = False
        self.started_at: float | None = None
        self._models: dict[str, str] = {}
        self._workloads: dict[tuple, Workload] = {}
        self._prep_lock = gevent.lock.Semaphore()
        # What this process measured since its last report (workers) or its last merge into
        # the run's totals (local). The sets are emptied in place after each report/merge
        # (`_reset_pending`), not rebuilt: a new HDR histogram costs the event loop up to ~0.1 ms.
        self.pending = HistogramSet()
        self.pending_by_name: dict[str, HistogramSet] = {}   # names recorded since the last one
        self.pending_counters_by_name: dict[str, Counters] = {}   # the same names' counts
        self._by_name_sets: dict[str, HistogramSet] = {}     # every name's set, for reuse
        self.window = HistogramSet()
        self.window_counters = Counters()
        self.pending_token_bins: token_bins.Bins = {}   # output tokens by when they streamed
        self.outside = HistogramSet()    # warm-up / cool-down records (whole window only)
        self._outside_used = False
        self.log: RequestLog | None = None
        self.started_log: RequestLog | None = None   # STARTED_FILE: one line as each request is sent
        self.cpu_samples: list[float] = []
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self._cpu_since = time.monotonic()

    def _read_options(self, o) -> None:
        from harness.arrivals import MAX_RATE
        from harness.timing import default_request_deadline

        self.options = o
        spec = self.load = load_options.from_locust(o)
        self.rate = min(spec.rate, MAX_RATE)   # (a start form's is unchecked)
        # bumped whenever the rate may have changed (set_rate, options re-read at a test
        # start): open-loop dispatchers then re-plan their next arrival at once
        self.rate_version = getattr(self, "rate_version", 0) + 1
        self.arrival, self.burstiness, self.max_concurrency = spec.arrival, spec.burstiness, spec.max_concurrency
        self.timeout = spec.timeout
        self.drain_timeout = spec.timeout if spec.drain_timeout is None else spec.drain_timeout
        self.seed = spec.seed
        self.slos: list[Slo] = [parse_slo(s) for s in spec.slo]
        self.spec = spec.workload()
        self.window_s, self.warmup, self.cooldown = spec.window, spec.warmup, spec.cooldown
        self.run_time = getattr(o, "run_time", None)
        self.num_requests = spec.num_requests
        self.request_deadline = spec.request_deadline or default_request_deadline(
            self.timeout, self.spec.output_len * (1 + self.spec.output_len_range))
        self.max_response_bytes = spec.max_response_bytes or None

    def reload_options(self) -> None:
        """Re-read the options at each test start: the web UI's start form (and a master's
        spawn message) may have changed them since init. Prompts are recalibrated only
        when the workload changed."""
        old_spec = self.spec
        o = self.env.parsed_options
        self._read_options(o)
        if self.spec != old_spec:
            self._workloads.clear()
        if isinstance(self.env.runner, WorkerRunner):
            # A worker takes these from its master, which fixed them at its own start (a web
            # form cannot set them there): the results directory, the key's variable and the
            # origins the key may go to.
            self.out = self.load.out
            env_var = self.load.api_key_env
            origins = list(self.load.key_origins or ()) or self.api_key.origins
            if (env_var, list(origins)) != (self.api_key.env_var, self.api_key.origins):
                self.api_key = ApiKey(env_var, origins)

    # -- workers and rates ------------------------------------------------------
    def worker_index(self) -> int:
        runner = self.env.runner
        if isinstance(runner, WorkerRunner):
            return max(0, int(getattr(runner, "worker_index", 0) or 0))
        return 0

    def change_rate(self, rate: float) -> None:
        self.rate = float(rate)
        self.rate_version += 1

    def workers(self) -> int:
        runner = self.env.runner
        if isinstance(runner, WorkerRunner):
            n = self.load.expected_workers or int(getattr(self.options, "expect_workers", 1) or 1)
            return max(1, n)
        return 1

    def rate_per_user(self, user) -> float:
        """This user's share of the total rate (each worker runs rate / workers)."""
        users = max(1, self.env.runner.user_count if self.env.runner else 1)
        return self.rate / self.workers() / users

    def max_concurrency_per_user(self) -> int:
        if not self.max_concurrency:
            return 0
        users = max(1, self.env.runner.user_count if self.env.runner else 1)
        return max(1, self.max_concurrency // (self.workers() * users))

    def _start_quota(self) -> None:
        if not self.num_requests:
            self.quota = None
            return
        runner = self.env.runner
        w = self.workers()
        idx = getattr(runner, "worker_index", 0) if isinstance(runner, WorkerRunner) else 0
        idx = max(0, idx) % w
        self.quota = self.num_requests // w + (1 if idx < self.num_requests % w else 0)

    def take_quota(self) -> bool:
        if self.quota is None:
            return True
        if self.quota <= 0:
            return False
        self.quota -= 1
        return True

    def abort(self, reason: str) -> None:
        """Nothing can run (the target refuses us, the workload cannot be built): end the run
        now with `reason` and exit 2, instead of idling until its time is up with dead users."""
        if self.fatal is not None:
            return
        self.fatal = reason
        logging.getLogger(__name__).error("stopping the run: %s", reason)
        runner = self.env.runner
        if isinstance(runner, WorkerRunner):
            runner.send_message("llm_fatal", {"reason": reason})
        elif runner is not None:
            gevent.spawn_later(0.1, runner.quit)

    # -- the end of a run ------------------------------------------------------------
    def scheduled_before_drain(self, t_perf: float) -> bool:
        """An open-loop arrival due before the drain began is still sent."""
        return self._drain_perf is not None and t_perf <= self._drain_perf

    def drain(self) -> float:
        """Stop starting requests and wait for those in flight (and arrivals already due) to
        finish, up to `drain_timeout`; returns the seconds waited. What is still running
        afterwards is killed by Locust's stop and recorded as incomplete (LLMUser.send)."""
        if not self.draining:
            self.draining = True
            self._drain_perf = time.perf_counter()
        t0 = time.monotonic()
        deadline = t0 + self.drain_timeout
        gevent.sleep(0)   # let a dispatcher holding a due arrival send it first
        while (self.inflight or self.due) and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL_S)
        return time.monotonic() - t0

    def wait_finished(self) -> None:
        """A user with nothing left to send parks here until the run ends."""
        self.check_finished()
        self.finished_event.wait(timeout=1.0)

    def check_finished(self) -> None:
        if self.quota == 0 and self.inflight == 0 and self.due == 0 and not self.done_sent:
            self.done_sent = True
            runner = self.env.runner
            if isinstance(runner, WorkerRunner):
                runner.send_message("llm_done", {"worker_index": getattr(runner, "worker_index", -1)})
            elif runner is not None:
                gevent.spawn_later(0.1, runner.quit)

    # -- model and prompts ---------------------------------------------------------
    def resolve_model(self, base: str, conn_factory: Callable) -> str:
        if self.load.model:
            return self.load.model
        if base not in self._models:
            conn = conn_factory()
            status, _, body = conn.request("GET", "/v1/models", None, self.api_key.headers_for(base))
            if status in (401, 403):
                key = (f"the key from ${self.api_key.env_var} was refused" if self.api_key.present else
                       f"no API key was sent: set ${self.api_key.env_var} (or name another variable "
                       f"with --llm-api-key-env)")
                raise TargetError(f"GET {base}/v1/models answered {status}: {key}")
            if status != 200:
                raise TargetError(f"GET {base}/v1/models answered {status}; pass --llm-model")
            self._models[base] = json.loads(body)["data"][0]["id"]
        return self._models[base]

    def workload_for(self, base: str, model: str, chat: bool, conn_factory: Callable) -> Workload:
        key = (base, model, chat)
        with self._prep_lock:   # the first user calibrates; the others wait for it
            if key not in self._workloads:
                counter = server_token_counter(conn_factory, model, self.api_key.headers_for(base))
                wl = Workload(self.spec, counter, chat, stream=self.worker_index())
                wl.prepare()
                self._workloads[key] = wl
        return self._workloads[key]

    # -- recording -----------------------------------------------------------------
    def in_window(self, rec) -> bool:
        if self.started_at is None:
            return True
        if self.warmup and (rec.sent_at or 0) < self.started_at + self.warmup:
            return False
        if self.cooldown and self.run_time and (rec.finished_at or 0) > self.started_at + self.run_time - self.cooldown:
            return False
        return True

    def started(self, line: dict[str, Any]) -> None:
        """A request is about to be sent: its line in STARTED_FILE, so that one in flight in a
        worker that is killed still gets its requests.jsonl line (`reconcile_started`)."""
        if self.started_log is not None:
            self.started_log.write(orjson.dumps(line) + b"\n")

    def record(self, rec, user_class: str, name: str) -> None:
        """One finished request: its requests.jsonl line, and its latencies into one histogram
        set -- its name's (measured) or the warm-up/cool-down set. The report's three views
        (all measured, per name, whole window) are put together from those once per report
        (`_report_sets`): recording each request three times cost ~30 us per request."""
        if self.log is not None:
            self.log.write(rec.to_json_line())
        d = {f: getattr(rec, f) for f in REQUEST_FIELDS}
        self.window_counters.add(d, self.slos)
        token_bins.book(self.pending_token_bins, d, self.window_s)
        if not self.in_window(rec):
            self.outside.add_record(d)
            self._outside_used = True
            return
        c = self.pending_counters_by_name.get(name)
        if c is None:
            c = self.pending_counters_by_name[name] = Counters()
        c.add(d, self.slos)
        hs = self.pending_by_name.get(name)
        if hs is None:
            hs = self._by_name_sets.get(name)
            if hs is None:
                hs = self._by_name_sets[name] = HistogramSet()
            self.pending_by_name[name] = hs
        hs.add_record(d)

    def _report_sets(self) -> tuple[HistogramSet, dict[str, HistogramSet], HistogramSet]:
        """(measured, measured per name, whole window) since the last report. With one name and
        no warm-up or cool-down records -- the usual case -- all three are the one set."""
        names = self.pending_by_name
        if len(names) == 1:
            pending = next(iter(names.values()))
        else:
            pending = self.pending
            for hs in names.values():
                pending.merge(hs)
        if not self._outside_used:
            return pending, names, pending
        window = self.window
        window.merge(pending)
        window.merge(self.outside)
        return pending, names, window

    def _report_counters(self) -> tuple[Counters, dict[str, Counters]]:
        """(measured, measured per name) counts since the last report: a request is counted
        once, in its name's counters, and the total is their sum (with one name, that name's
        own object), as `_report_sets` does for the histograms."""
        names = self.pending_counters_by_name
        if len(names) == 1:
            return next(iter(names.values())), names
        total = Counters()
        for c in names.values():
            total.merge(c)
        return total, names

    def sample_cpu(self) -> float | None:
        """This process's CPU % since the last sample; None when that was under a second ago
        (a worker's last report right after a regular one: a percentage over a few
        milliseconds is noise, and once read 1,000%+ on a busy machine, failing the run)."""
        now = time.monotonic()
        if now - self._cpu_since < MIN_CPU_SAMPLE_S:
            return None
        self._cpu_since = now
        pct = self._proc.cpu_percent(None)
        self.cpu_samples.append(pct)
        return pct

    def take_report(self, sample_cpu: bool = True) -> dict[str, Any]:
        """Everything measured since the last report, encoded for the master
        (`sample_cpu=False`: a live refresh between reports, no CPU sample)."""
        pending, by_name, window = self._report_sets()
        counters, counters_by_name = self._report_counters()
        encoded: dict[int, str] = {}   # a set that stands for several views is encoded once

        def enc(hs: HistogramSet) -> str:
            if id(hs) not in encoded:
                encoded[id(hs)] = hs.encode()
            return encoded[id(hs)]

        rep = {"hist": enc(pending), "counters": counters.to_dict(),
               "by_name": {k: enc(v) for k, v in by_name.items()},
               "counters_by_name": {k: v.to_dict() for k, v in counters_by_name.items()},
               "win": enc(window), "win_counters": self.window_counters.to_dict(),
               "token_bins": token_bins.to_pairs(self.pending_token_bins)}
        if sample_cpu:
            rep["cpu"] = self.sample_cpu()
        from harness import stamp_delay
        rep["stamp_delay"] = stamp_delay.take()   # this process's read-to-stamp delays
        self._reset_pending()
        return rep

    def _reset_pending(self) -> None:
        """Start the next report's (or local merge's) measurements: the same as new empty sets,
        at a few us per histogram instead of up to ~0.1 ms."""
        self.pending.reset()
        self.pending_counters_by_name = {}
        for hs in self.pending_by_name.values():
            hs.reset()
        self.pending_by_name = {}
        self.window.reset()
        self.window_counters = Counters()
        self.pending_token_bins = {}
        if self._outside_used:
            self.outside.reset()
            self._outside_used = False


def set_rate(environment, rate: float) -> None:
    """Change the open-loop rate (requests/s over all workers) of a running test.

    Works on a local runner and on the master (which tells every worker with an
    `llm_set_rate` message; each worker runs its share, rate / workers). Dispatchers
    re-plan their next arrival at once. 0 turns the users back into closed loops.
    Locust load shapes (locustfiles/shapes.py) and web routes call this. ValueError for a
    rate outside 0..harness.arrivals.MAX_RATE (the ceiling, and why, in its message).
    """
    from harness.arrivals import check_rate

    rate = check_rate(rate)
    state: LLMState = environment.llm
    state.change_rate(rate)
    if environment.parsed_options is not None:
        # Workers that start (or restart) later read the rate from the master's options.
        environment.parsed_options.llm_rate = rate
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.send_message("llm_set_rate", {"rate": rate})
