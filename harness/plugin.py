"""The Locust plugin: our command-line/web-UI options, per-process measurement
state, exact histogram shipping from workers to the master, and the results
directory. Importing this module (every locustfile does) registers the listeners.

Each worker records into HDR histograms and ships them, encoded, inside Locust's
own stats report (`report_to_master`, every 3 s and once more on quit); the
master merges them (`worker_report`), so its percentiles are those of the union
of every worker's samples, not an average of averages or Locust's rounded buckets.
A local runner (one process) merges its histograms into the run's totals directly
(`Aggregate.merge_local`): the same sums, without the encoding and decoding, which
ran inside the event loop and delayed every token event arriving meanwhile.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable

import gevent
import gevent.event
import gevent.lock
import orjson
import psutil
from locust import events
from locust.runners import (HEARTBEAT_LIVENESS, STATE_CLEANUP, STATE_RUNNING, STATE_SPAWNING, STATE_STOPPED, LocalRunner,
                            MasterRunner, WorkerRunner)

from harness import load_options, token_bins
from harness.credentials import ApiKey
from harness.errors import TargetError, UsageError
from harness.histograms import HistogramSet
from harness.results import (REQUEST_FIELDS, STARTED_FILE, Counters, RequestLog, archive_run, build_summary,
                             read_requests, reconcile_started)
from harness.run_summary import RunSummary
from harness.slo import EXIT_BAD_INPUT, Slo, parse_slo, run_exit_code
from harness.workload import Workload, WorkloadSpec, server_token_counter


# The shortest interval a CPU sample may cover (see LLMState.sample_cpu).
MIN_CPU_SAMPLE_S = 1.0
DRAIN_POLL_S = 0.02
WINDOW_LATE_S = 0.002   # a timeseries window closes this long after its grid boundary
# How long a master waits for its workers beyond the drain timeout (their answers, their exit).
WORKER_REPLY_MARGIN_S = 5.0
SILENT_WORKER_S = 4   # heartbeats (one a second) a worker may miss before a drain stops waiting for it




# Locust listens on every interface by default (web UI, master), with no login: ours listen on
# loopback unless told otherwise (`--web-host`, `--master-bind-host`, or their LOCUST_* variables).
LOOPBACK_DEFAULTS = {"web_host": "127.0.0.1", "master_bind_host": "127.0.0.1"}


def _listen_on_loopback(parser) -> None:
    parser.set_defaults(**LOOPBACK_DEFAULTS)
    for action in parser._actions:   # keep --help true
        if action.dest in LOOPBACK_DEFAULTS:
            action.help = (f"{action.help.split('. Defaults')[0].rstrip('.')}. Defaults to "
                           f"{LOOPBACK_DEFAULTS[action.dest]} (llm-harness; '*' for all interfaces)")


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    _listen_on_loopback(parser)
    load_options.add_locust_options(parser)   # Locust shows the web-UI ones in its start form


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
        self.started_perf: float | None = None
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


class Aggregate:
    """The master's (or the local runner's) merged view of the whole run."""

    def __init__(self, state: LLMState) -> None:
        self.state = state
        # Called with each timeseries line before it is written (may add keys to it):
        # harness.server_metrics adds the server's state, harness.webui keeps it for charts.
        self.window_hooks: list[Callable[[dict], None]] = []
        # Called with a line whose output tokens grew (see `token_bins` below).
        self.revision_hooks: list[Callable[[dict], None]] = []
        self.ts_file = None   # timeseries.jsonl, open while a test runs with --llm-out
        self.reset()

    def reset(self) -> None:
        """Start from no measurement: at init, and when a test starts again in the same process
        (the web UI's start after a stop; Locust clears its own stats then too). The hooks stay."""
        self.hist = HistogramSet()
        self.counters = Counters()
        self.by_name: dict[str, HistogramSet] = {}
        self.counters_by_name: dict[str, Counters] = {}   # per endpoint, as by_name
        self.window = HistogramSet()
        self.window_counters = Counters()
        self.cpu: dict[str, list[float]] = {}
        self.requests_by_worker: dict[str, int] = {}   # every recorded request, warm-up included
        self.done_workers: set[str] = set()
        self.drained_workers: set[str] = set()
        self.lost_workers: set[str] = set()   # went silent mid-run (killed)
        self.lost_requests = 0                # sent by a worker that died before recording them
        self.stamp_delay: dict | None = None   # read-to-stamp delays, every worker's (harness.stamp_delay)
        if self.ts_file is not None:
            self.ts_file.close()
        self.ts_file = None
        self.last_window = time.time()
        # Output tokens by when they streamed (harness.token_bins). A line covers whole bins; as
        # requests finish, earlier lines gain tokens: revision hooks get the line then, and
        # timeseries.jsonl is rewritten with every line's final count at the end of the run.
        self.token_bins: token_bins.Bins = {}
        self.bin_cursor: int | None = None      # the first bin no line covers yet
        self.lines: list[tuple[dict, range]] = []
        self._line_of_bin: dict[int, int] = {}
        self._changed_bins: set[int] = set()

    def merge_token_bins(self, pairs) -> None:
        self._changed_bins |= token_bins.merge(self.token_bins, pairs or ())

    def merge_report(self, client_id: str, rep: dict[str, Any]) -> None:
        """Merge one worker's report (`LLMState.take_report`, shipped encoded)."""
        self._merge(client_id, HistogramSet.decode(rep["hist"]), Counters.from_dict(rep["counters"]),
                    {name: HistogramSet.decode(enc) for name, enc in rep.get("by_name", {}).items()},
                    {name: Counters.from_dict(d) for name, d in rep.get("counters_by_name", {}).items()},
                    HistogramSet.decode(rep["win"]), Counters.from_dict(rep["win_counters"]),
                    rep.get("cpu"), rep.get("stamp_delay"))
        self.merge_token_bins(rep.get("token_bins"))

    def merge_local(self, sample_cpu: bool = True) -> None:
        """A local runner's merge: the same as `merge_report("local", state.take_report())`,
        from the process's own histograms (no encoding and decoding), which are then emptied
        in place for the next window."""
        from harness import stamp_delay
        st = self.state
        pending, by_name, window = st._report_sets()
        counters, counters_by_name = st._report_counters()
        self.merge_token_bins(token_bins.to_pairs(st.pending_token_bins))
        self._merge("local", pending, counters, by_name, counters_by_name, window, st.window_counters,
                    st.sample_cpu() if sample_cpu else None, stamp_delay.take())
        st._reset_pending()

    def _merge(self, client_id: str, hist: HistogramSet, counters: Counters,
               by_name: dict[str, HistogramSet], counters_by_name: dict[str, Counters],
               window: HistogramSet, window_counters: Counters, cpu: float | None,
               stamp_delays: dict | None) -> None:
        from harness import stamp_delay
        self.stamp_delay = stamp_delay.merge(self.stamp_delay, stamp_delays)   # exact sums
        self.hist.merge(hist)
        self.counters.merge(counters)
        for name, hs in by_name.items():
            mine = self.by_name.get(name)
            if mine is None:
                mine = self.by_name[name] = HistogramSet()
            mine.merge(hs)
        for name, c in counters_by_name.items():
            self.counters_by_name.setdefault(name, Counters()).merge(c)
        self.window.merge(window)
        self.window_counters.merge(window_counters)
        self.requests_by_worker[client_id] = (self.requests_by_worker.get(client_id, 0)
                                              + window_counters.recorded)
        if cpu is not None:
            self.cpu.setdefault(client_id, []).append(float(cpu))

    def refresh(self) -> None:
        """Bring a local runner's view up to date now (exact: the same merge as the window
        greenlet's). A master's view is as fresh as the workers' last reports (3 s)."""
        if isinstance(self.state.env.runner, LocalRunner):
            self.merge_local(sample_cpu=False)

    def start_windows(self, started_at: float) -> None:
        self.last_window = started_at
        self.bin_cursor = token_bins.bin_of(started_at, self.state.window_s)

    def flush_window(self, users: int, final: bool = False) -> None:
        """One timeseries line: requests that finished since the last line, and the output
        tokens that streamed in its bins (those of the bin in progress too when `final`)."""
        now = time.time()
        span = max(1e-9, now - self.last_window)
        self.last_window = now
        c = self.window_counters
        width = self.state.window_s
        if self.bin_cursor is None:
            self.bin_cursor = token_bins.bin_of(now - span, width)
        end = max(token_bins.bin_of(now, width) + (1 if final else 0), self.bin_cursor + 1)
        bins = range(self.bin_cursor, end)
        self.bin_cursor = end
        tokens = token_bins.tokens_in(self.token_bins, bins)
        line = {"t": now, "window_s": span, "users": users, "target_rate": self.state.rate,
                "completed": c.completed, "failed": c.failed, "incomplete": c.incomplete,
                "errors_by_kind": c.errors_by_kind, "output_tokens": tokens,
                "output_tokens_per_s": tokens / span, "requests_per_s": c.completed / span,
                "goodput_rps": c.good / span}
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "schedule_lag_ms"):
            s = self.window.summary(key)
            line[key] = {k: s.get(k) for k in ("p50", "p90", "p99", "mean", "count")}
        self.window.reset()
        self.window_counters = Counters()
        for hook in self.window_hooks:
            try:
                hook(line)
            except Exception:  # an observer must never cost the run its timeseries
                logging.getLogger(__name__).exception("timeseries hook %r failed", hook)
        for k in bins:
            self._line_of_bin[k] = len(self.lines)
            self._changed_bins.discard(k)
        self.lines.append((line, bins))
        self._revise_lines()
        if self.ts_file is not None:
            self.ts_file.write(json.dumps(line) + "\n")
            self.ts_file.flush()

    def _revise_lines(self) -> None:
        """Lines whose bins gained tokens since they were written (requests that streamed there
        finished later) get their new count, and the revision hooks hear of it."""
        touched = {self._line_of_bin[k] for k in self._changed_bins if k in self._line_of_bin}
        self._changed_bins = {k for k in self._changed_bins if k not in self._line_of_bin}
        for i in sorted(touched):
            line, bins = self.lines[i]
            line["output_tokens"] = token_bins.tokens_in(self.token_bins, bins)
            line["output_tokens_per_s"] = line["output_tokens"] / max(1e-9, line["window_s"])
            for hook in self.revision_hooks:
                try:
                    hook(line)
                except Exception:  # an observer must never cost the run its timeseries
                    logging.getLogger(__name__).exception("revision hook %r failed", hook)

    def rewrite_timeseries(self, path: pathlib.Path) -> None:
        """timeseries.jsonl with every line's final token count (atomically replaced)."""
        self._revise_lines()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            for line, _bins in self.lines:
                f.write(json.dumps(line) + "\n")
        os.replace(tmp, path)

    def generator(self) -> dict[str, Any]:
        st = self.state
        reasons = []
        cpu_max = 0.0
        per_worker = {}
        for wid, samples in self.cpu.items():
            if not samples:
                continue
            s = sorted(samples)
            median = s[len(s) // 2]
            cpu_max = max(cpu_max, s[-1])
            per_worker[wid] = {"median": median, "max": s[-1]}
            if median > st.load.cpu_limit:
                reasons.append(f"worker {wid} CPU median {median:.0f}% > limit; add workers (--workers)")
        lag = self.hist.summary("schedule_lag_ms")
        lag_limit = st.load.lag_limit_ms
        if st.rate > 0 and lag.get("p99") is not None and lag["p99"] > lag_limit:
            reasons.append(f"schedule lag p99 {lag['p99']:.1f} ms > {lag_limit:g} ms: the load generator "
                           f"cannot keep the schedule; add workers (--workers)")
        from harness import stamp_delay
        delays = self.stamp_delay
        delay_limit = st.load.stamp_delay_limit_ms
        late = stamp_delay.verdict(delays, delay_limit)
        if late:
            reasons.append(late)
        if self.lost_workers or self.lost_requests:
            reasons.append(f"a load generator worker stopped mid-run ({len(self.lost_workers)} went silent; "
                           f"{self.lost_requests} of its requests in flight recorded as incomplete): the load "
                           f"was not what was asked for; find out why it died and run again")
        return {"valid": not reasons, "reasons": reasons, "cpu_max_pct": cpu_max,
                "cpu_by_worker": per_worker,
                "workers": max(1, len(self.cpu), len(self.requests_by_worker)),
                "requests_by_worker": dict(self.requests_by_worker),
                "stamp_delay_ms": {**stamp_delay.stats(delays), "limit": delay_limit}}


def _duration(state: LLMState, agg: Aggregate, stopped_at: float) -> float:
    c = agg.counters
    if c.first_sent is None:
        return 0.0
    start = c.first_sent
    if state.started_at is not None and state.warmup:
        start = max(start, state.started_at + state.warmup)
    end = min(stopped_at, c.last_finished or stopped_at)
    if state.cooldown and state.run_time and state.started_at is not None:
        end = min(end, state.started_at + state.run_time - state.cooldown)
    return max(0.0, end - start)


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    if environment.parsed_options is None or getattr(environment, "llm", None) is not None:
        return   # (a worker whose first spawn came before init: see _on_test_start)
    state = LLMState(environment)
    environment.llm = state
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        environment.parsed_options.llm_key_origins = state.api_key.origins   # for the workers
    try:
        state.spec.validate(prefix="--llm-")   # under plain locust too: named before any load
    except UsageError as exc:
        sys.stderr.write(f"locust: error: {exc}\n")
        raise SystemExit(EXIT_BAD_INPUT) from None
    if isinstance(runner, (MasterRunner, LocalRunner)):
        environment.llm_aggregate = Aggregate(state)
    if isinstance(runner, MasterRunner):
        def on_done(msg, **_):
            agg = environment.llm_aggregate
            agg.done_workers.add(str(msg.node_id))
            if len(agg.done_workers) >= max(1, len(runner.clients)):
                gevent.spawn_later(0.1, runner.quit)
        runner.register_message("llm_done", on_done)
        def on_fatal(msg, **_):
            state.abort(f"worker {msg.node_id}: {msg.data['reason']}")
        runner.register_message("llm_fatal", on_fatal)

        def on_drained(msg, **_):
            if msg.data.get("llm"):   # what it measured since its last report, drain included
                environment.llm_aggregate.merge_report(str(msg.node_id), msg.data["llm"])
            environment.llm_aggregate.drained_workers.add(str(msg.node_id))
        runner.register_message("llm_drained", on_drained)
    if isinstance(runner, WorkerRunner):
        def on_set_rate(msg, **_):
            state.change_rate(float(msg.data["rate"]))
        runner.register_message("llm_set_rate", on_set_rate)

        def on_drain(msg, **_):
            def drain_and_answer():
                state.drain()
                # with its measurements: the master's books are whole when the test stops (the
                # web UI writes summary.json then), not only after the next 3 s report
                runner.send_message("llm_drained", {"inflight": state.inflight,
                                                    "llm": state.take_report(sample_cpu=False)})
            gevent.spawn(drain_and_answer)   # a message handler must not block the worker
        runner.register_message("llm_drain", on_drain)


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


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    if getattr(environment, "llm", None) is None and isinstance(environment.runner, WorkerRunner):
        # Locust connects a worker to its master before it fires init, and the worker's
        # message loop may take the master's first spawn (test_start) in the same turn as the
        # connection's ack: the master starts the moment the last worker is ready. Set the
        # run up here then (init finds it done); the master's options came with the spawn.
        _on_init(environment)
    state: LLMState = environment.llm
    runner = environment.runner
    if state.started_at is not None:
        # Another test in the same process (the web UI's start after a stop): it starts from
        # nothing, as Locust's own stats do, and the earlier test's results move aside
        # (results.archive_run) so the directory again holds one run.
        state._reset_pending()
        if state.log is not None:
            state.log.close()
            state.started_log.close()
            state.log = None
        if isinstance(runner, (MasterRunner, LocalRunner)):
            environment.llm_aggregate.reset()
            if state.out:
                archive_run(pathlib.Path(state.out))
    state.started_at = time.time()
    state.started_perf = time.perf_counter()
    state.done_sent = False
    state.finished_event.clear()
    state.draining, state._drain_perf, state.drain_waited_s, state.interrupted = False, None, None, False
    # The web UI's start form (local/master) and the master's spawn message (workers)
    # update parsed_options after init; re-read what can change.
    state.reload_options()
    if isinstance(runner, MasterRunner):
        # test_start fires before the spawn messages (which carry the master's options):
        # tell the workers how many they are, so that each runs its share of the rate and
        # of --llm-num-requests, however they were started (--processes or remote).
        n = len(runner.clients.ready) + len(runner.clients.running) + len(runner.clients.spawning)
        if n:
            environment.parsed_options.llm_expected_workers = n
    state._start_quota()
    if state.out and isinstance(runner, (MasterRunner, LocalRunner)) and not getattr(state, "_files_fresh", False):
        # A results directory holds one run: start its append-only files empty (the master
        # does it before it sends the spawn messages, so before any worker appends).
        state._files_fresh = True
        pathlib.Path(state.out).mkdir(parents=True, exist_ok=True)
        for name in ("requests.jsonl", "timeseries.jsonl", STARTED_FILE):
            try:
                os.unlink(pathlib.Path(state.out) / name)
            except FileNotFoundError:
                pass
    if state.out and not isinstance(runner, MasterRunner) and state.log is None:
        state.log = RequestLog(pathlib.Path(state.out) / "requests.jsonl")
        state.started_log = RequestLog(pathlib.Path(state.out) / STARTED_FILE)
    if isinstance(runner, (MasterRunner, LocalRunner)):
        agg: Aggregate = environment.llm_aggregate
        if state.out:
            pathlib.Path(state.out).mkdir(parents=True, exist_ok=True)
            agg.ts_file = open(pathlib.Path(state.out) / "timeseries.jsonl", "a")
        agg.start_windows(state.started_at)

        def windows():
            while True:
                # wake just after the next boundary of the token-bin grid: each line covers whole
                # bins (harness.token_bins), and the windows do not drift
                w = state.window_s
                gevent.sleep(max(0.0, (math.floor(time.time() / w) + 1) * w - time.time()) + WINDOW_LATE_S)
                if isinstance(runner, LocalRunner):
                    agg.merge_local()
                agg.flush_window(runner.user_count)
                if _all_users_gone(runner, state):
                    state.abort("every Locust user has stopped (see the errors above) and nothing is "
                                "sending; fix the cause and run again")
        old = getattr(environment, "llm_window_greenlet", None)
        if old is not None:   # a second run started from the web UI
            old.kill(block=False)
        environment.llm_window_greenlet = gevent.spawn(windows)


def _all_users_gone(runner, state: LLMState) -> bool:
    """Users were asked for and none is left (each died of an error), while the run is not
    ending: nothing will ever be sent again."""
    return (runner.state == STATE_RUNNING and runner.target_user_count > 0 and runner.user_count == 0
            and not state.draining)


@events.report_to_master.add_listener
def _on_report_to_master(client_id, data, **_kw) -> None:
    from locust.env import Environment  # noqa: F401  (keeps the import cheap at module load)
    env = _ENV.get("env")
    if env is None:
        return
    data["llm"] = env.llm.take_report()


@events.worker_report.add_listener
def _on_worker_report(client_id, data, **_kw) -> None:
    env = _ENV.get("env")
    if env is None or "llm" not in data:
        return
    env.llm_aggregate.merge_report(str(client_id), data["llm"])


_ENV: dict[str, Any] = {}


@events.init.add_listener
def _remember_env(environment, **_kw) -> None:
    _ENV["env"] = environment


@events.test_stopping.add_listener
def _on_test_stopping(environment, **_kw) -> None:
    """The run is ending by its bound (--run-time, --llm-num-requests), a load shape or the web
    UI's Stop: drain before Locust stops the users. A signal (Ctrl-C, SIGTERM) stops now."""
    state: LLMState | None = getattr(environment, "llm", None)
    runner = environment.runner
    if state is None or state.interrupted or isinstance(runner, WorkerRunner):
        return
    if isinstance(runner, MasterRunner):
        state.drain_waited_s = _drain_workers(environment)
    else:
        state.drain_waited_s = state.drain()


def _drain_workers(environment) -> float:
    """Every worker drains (LLMState.drain) and answers; the master waits for the answers."""
    state: LLMState = environment.llm
    runner = environment.runner
    agg: Aggregate = environment.llm_aggregate
    agg.drained_workers = set()
    waiting = {str(c.id) for c in runner.clients.all}
    state.draining = True
    t0 = time.monotonic()
    if waiting:
        runner.send_message("llm_drain", {})
    deadline = t0 + state.drain_timeout + WORKER_REPLY_MARGIN_S
    while time.monotonic() < deadline:
        # a worker that answered, left (quit) or went silent (killed: no heartbeat for a few
        # seconds, long before Locust's own timeout calls it missing) is no longer waited for
        waiting &= {str(c.id) for c in runner.clients.all if not _silent(c)}
        waiting -= agg.drained_workers
        if not waiting:
            break
        gevent.sleep(DRAIN_POLL_S)
    return time.monotonic() - t0


def _silent(client) -> bool:
    """A worker that has missed its last heartbeats (one a second): killed, or hung."""
    return client.heartbeat <= HEARTBEAT_LIVENESS - SILENT_WORKER_S


def _quit_workers(runner: MasterRunner, timeout: float) -> None:
    """Interrupted: tell the workers to quit now -- each stops its users, recording what was in
    flight as incomplete, ships a last report and says goodbye -- and wait for them, while the
    master still listens (Locust's own quit stops listening half a second after it asks)."""
    from locust.rpc import Message

    deadline = time.monotonic() + timeout
    for client in list(runner.clients.all):
        runner.server.send_to_client(Message("quit", None, client.id))
    while any(not _silent(c) for c in runner.clients.all) and time.monotonic() < deadline:
        gevent.sleep(0.05)


def _wait_for_forked_workers(timeout: float) -> None:
    """Forked workers (--processes) exit before the master reads requests.jsonl, so that the
    file is complete when the summary is checked against it."""
    try:
        psutil.wait_procs(psutil.Process().children(), timeout=timeout)
    except psutil.Error:
        pass


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    state: LLMState = environment.llm
    state.finished_event.set()
    # requests.jsonl stays open: requests finishing during shutdown still get their line
    if getattr(environment, "web_ui", None) is not None and not state.interrupted \
            and isinstance(environment.runner, (MasterRunner, LocalRunner)):
        # A test stopped in the web UI (STOP, its run time, a load shape), and Locust stays up
        # for the next one: its results now, not only when Locust quits.
        write_run_results(environment)


def _write_final_locust_csv(environment) -> None:
    """Rewrite Locust's own `--csv` request, failure and exception tables with the final stats.

    Locust rewrites them only once a second while running and not at the end, so the
    requests of the last second would be missing; the tables must hold exactly one entry
    per LLM request. (The history file is left alone: Locust appends to it.)
    """
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if not prefix:
        return
    import csv

    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    writer = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, fill in (("_stats.csv", writer.requests_csv), ("_failures.csv", writer.failures_csv),
                         ("_exceptions.csv", writer.exceptions_csv)):
        path = f"{prefix}{suffix}"
        try:
            with open(path + ".tmp", "w", newline="") as f:
                fill(csv.writer(f))
            os.replace(path + ".tmp", path)   # Locust's open handle keeps the old file
        except OSError:
            pass


def _die_with_parent() -> None:
    """A worker forked by `--processes` gets SIGTERM (a clean shutdown) when its master
    dies, even by SIGKILL, instead of loading the server on its own until heartbeats
    time out. Linux only; elsewhere nothing changes."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        parent = os.getppid()
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:   # the master died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _worker_last_report(environment, **_kw) -> None:
    """A worker interrupted itself (SIGINT/SIGTERM, e.g. Ctrl-C reaching the whole process
    group) rather than being told to quit by the master: stop the users and ship what was
    measured since the last report. Registered after the runner's own quitting listener,
    so that (quitting listeners run in reverse) it goes out before the worker's "quit"
    message, after which a master whose last worker left stops listening."""
    runner = environment.runner
    try:
        if runner.state not in (STATE_STOPPED, STATE_CLEANUP):
            runner.stop()
        runner._send_stats()   # fires report_to_master: our histograms ride along
    except Exception:  # the master may be gone already; requests.jsonl still has it all
        pass


def _mark_interrupted(environment, **_kw) -> None:
    """Quitting while the test runs means a signal (Ctrl-C, SIGTERM), not the run's end: stop
    now, no drain. Registered at init, after the runner's own quitting listener, so that (they
    run in reverse) it comes first: the runner's listener stops the test, which would drain."""
    state: LLMState | None = getattr(environment, "llm", None)
    runner = environment.runner
    if state is not None and runner is not None and runner.state in (STATE_RUNNING, STATE_SPAWNING):
        state.interrupted = True
        if isinstance(runner, MasterRunner):
            _quit_workers(runner, WORKER_REPLY_MARGIN_S)


@events.init.add_listener
def _worker_init(environment, **_kw) -> None:
    environment.events.quitting.add_listener(_mark_interrupted)
    if isinstance(environment.runner, WorkerRunner):
        environment.events.quitting.add_listener(_worker_last_report)
        if getattr(environment.parsed_options, "processes", None):
            _die_with_parent()


def _count_lines(path: pathlib.Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def _recover_from_log(state: LLMState, agg: Aggregate):
    """The run's numbers from requests.jsonl, when it holds requests the master never got
    in a report (a worker killed, or interrupted before its last report); else None.

    The same HDR bucketing as the live path, so nothing is approximated; only the
    warm-up/cool-down cut uses the master's clock instead of each worker's."""
    if not state.out:
        return None
    path = pathlib.Path(state.out) / "requests.jsonl"
    if not path.exists() or _count_lines(path) <= sum(agg.requests_by_worker.values()):
        return None
    from urllib.parse import urlsplit

    hist, counters, by_name, counters_by_name = HistogramSet(), Counters(), {}, {}
    since = (state.started_at or 0) - 1.0
    for d in read_requests(path):
        if (d.get("sent_at") or d.get("finished_at") or 0) < since:
            continue   # an earlier run's line
        rec = _RecordView(d)
        if not state.in_window(rec):
            continue
        counters.add(d, state.slos)
        hist.add_record(d)
        name = f"{urlsplit(d.get('url') or '').path} [{d.get('model')}]"
        by_name.setdefault(name, HistogramSet()).add_record(d)
        counters_by_name.setdefault(name, Counters()).add(d, state.slos)
    return hist, counters, by_name, counters_by_name


class _RecordView:
    def __init__(self, d: dict) -> None:
        self.sent_at = d.get("sent_at")
        self.finished_at = d.get("finished_at")


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    state: LLMState | None = getattr(environment, "llm", None)
    if state is None:
        return
    runner = environment.runner
    if isinstance(runner, LocalRunner) and state.interrupted:
        runner.stop()   # interrupted: stop the users first, so the summary has all they did
    if isinstance(runner, MasterRunner):
        _wait_for_forked_workers(WORKER_REPLY_MARGIN_S)
    if state.log is not None:
        state.log.close()
        state.started_log.close()
        state.log = None
    if not isinstance(runner, (MasterRunner, LocalRunner)):
        return
    write_run_results(environment)


def run_summary(environment, stopped_at: float) -> dict[str, Any]:
    """The run's figures from the merged view as it is now: summary.json's measured part at the
    end (RunSummary), and what the web UI judges the SLOs with while the test runs."""
    state: LLMState = environment.llm
    agg: Aggregate = environment.llm_aggregate
    return build_summary(
        hist=agg.hist, counters=agg.counters, duration_s=_duration(state, agg, stopped_at),
        started_at=state.started_at or stopped_at,
        target={"url": environment.host, "model": state.load.model or
                (next(iter(state._models.values()), None))},
        workload={"input_len": state.spec.input_len, "output_len": state.spec.output_len,
                  "dataset": state.spec.dataset, "soak_mix": state.spec.soak_mix,
                  "rate": state.rate, "arrival": state.arrival if state.rate else None,
                  "burstiness": state.burstiness if state.rate else None,
                  "users": getattr(state.options, "num_users", None),
                  "num_requests": state.num_requests or None, "warmup_s": state.warmup,
                  "cooldown_s": state.cooldown, "seed": state.seed},
        slos=state.slos, generator=agg.generator(), by_name=agg.by_name)


def write_run_results(environment) -> dict[str, Any]:
    """End the run's books (master or local runner): the last timeseries window, summary.json
    and Locust's final CSVs, and the exit code. At quit, and at each test stop in the web UI
    (so its user has the results without quitting); a second call changes nothing measured."""
    state: LLMState = environment.llm
    runner = environment.runner
    agg: Aggregate = environment.llm_aggregate
    g = getattr(environment, "llm_window_greenlet", None)
    if g is not None:
        g.kill(block=False)
        environment.llm_window_greenlet = None
    if isinstance(runner, LocalRunner):
        agg.merge_local()
    stopped = time.time()
    if state.out:   # requests sent by a worker that died before it could record them
        agg.lost_requests += reconcile_started(pathlib.Path(state.out))
    if isinstance(runner, MasterRunner):
        agg.lost_workers = {str(c.id) for c in runner.clients.all if _silent(c)}
    recovered = _recover_from_log(state, agg)
    if recovered is not None:
        agg.hist, agg.counters, agg.by_name, agg.counters_by_name = recovered
    # How the run ended: the measured window (first send to last finish) includes the drain.
    summary = RunSummary(
        run_summary(environment, stopped), state.slos, interrupted=state.interrupted,
        drain={"timeout_s": state.drain_timeout, "waited_s": state.drain_waited_s,
               "interrupted": state.interrupted},
        error=state.fatal,
        recovered=None if recovered is None else (
            "requests.jsonl held requests no worker report carried (a worker was interrupted or "
            "killed); this summary was rebuilt from it"))
    _write_final_locust_csv(environment)
    if state.out:
        out = pathlib.Path(state.out)
        if agg.ts_file is not None:
            agg.flush_window(0, final=True)
            agg.ts_file.close()
            agg.ts_file = None
            agg.rewrite_timeseries(out / "timeseries.jsonl")
        if (out / "requests.jsonl").exists():
            summary.add_breakdowns(read_requests(out / "requests.jsonl"))
    if state.load.drift:
        summary.add_drift([line for line, _bins in agg.lines])
    doc = summary.write(state.out) if state.out else summary.to_dict()
    # Always set: Locust's own rule (exit 1 on any failure) does not know our SLOs.
    environment.process_exit_code = EXIT_BAD_INPUT if state.fatal else run_exit_code(doc)
    return doc


# Option ranges, the web UI's port and the targets, before any load (before `live`, which binds
# the /metrics port at init: an option out of range is named first).
from harness import start_checks  # noqa: E402,F401  (registers its listeners)
# Live progress on the terminal or in the log, and progress.json (before `live`: its quit
# listener, which may linger for a last scrape, then runs after the last progress line).
from harness import live_progress  # noqa: E402,F401  (registers its listeners)
# Live observability (web UI tab and charts, Prometheus exporter, server /metrics scraping).
from harness import live  # noqa: E402,F401  (registers its listeners)
