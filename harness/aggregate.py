"""The master's (or the local runner's) merged view of the whole run (`environment.llm_aggregate`):
every worker's histograms and counts merged exactly, the timeseries windows, the generator's
verdict, the measured window, and the run's figures as they stand (`figures`: summary.json's
measured part, and what the web UI judges the SLOs with while the test runs).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

from locust.runners import LocalRunner

from harness import token_bins
from harness.histograms import HistogramSet
from harness.json_io import read_jsonl
from harness.results import Counters, build_summary

if TYPE_CHECKING:
    from harness.run_state import LLMState


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

    def measured_window(self, stopped_at: float) -> float:
        """Seconds measured: the first send (after the warm-up) to the last finish (before the
        cool-down), up to `stopped_at`; 0 before any request."""
        st, c = self.state, self.counters
        if c.first_sent is None:
            return 0.0
        start = c.first_sent
        if st.started_at is not None and st.warmup:
            start = max(start, st.started_at + st.warmup)
        end = min(stopped_at, c.last_finished or stopped_at)
        if st.cooldown and st.run_time and st.started_at is not None:
            end = min(end, st.started_at + st.run_time - st.cooldown)
        return max(0.0, end - start)

    def figures(self, stopped_at: float) -> dict[str, Any]:
        """The run's figures from the merged view as it is now (results.build_summary)."""
        st = self.state
        return build_summary(
            hist=self.hist, counters=self.counters, duration_s=self.measured_window(stopped_at),
            started_at=st.started_at or stopped_at,
            target={"url": st.env.host, "model": st.load.model or (next(iter(st._models.values()), None))},
            workload={"input_len": st.spec.input_len, "output_len": st.spec.output_len,
                      "dataset": st.spec.dataset, "soak_mix": st.spec.soak_mix,
                      "rate": st.rate, "arrival": st.arrival if st.rate else None,
                      "burstiness": st.burstiness if st.rate else None,
                      "users": getattr(st.options, "num_users", None),
                      "num_requests": st.num_requests or None, "warmup_s": st.warmup,
                      "cooldown_s": st.cooldown, "seed": st.seed},
            slos=st.slos, generator=self.generator(), by_name=self.by_name)

    def recover_from_log(self) -> bool:
        """Rebuild the run's numbers from requests.jsonl when it holds requests the master never
        got in a report (a worker killed, or interrupted before its last report); whether it did.

        The same HDR bucketing as the live path, so nothing is approximated; only the
        warm-up/cool-down cut uses the master's clock instead of each worker's."""
        st = self.state
        if not st.out:
            return False
        path = pathlib.Path(st.out) / "requests.jsonl"
        if not path.exists() or _count_lines(path) <= sum(self.requests_by_worker.values()):
            return False
        from urllib.parse import urlsplit

        hist, counters, by_name, counters_by_name = HistogramSet(), Counters(), {}, {}
        since = (st.started_at or 0) - 1.0
        for d in read_jsonl(path):
            if (d.get("sent_at") or d.get("finished_at") or 0) < since:
                continue   # an earlier run's line
            if not st.in_window(_RecordView(d)):
                continue
            counters.add(d, st.slos)
            hist.add_record(d)
            name = f"{urlsplit(d.get('url') or '').path} [{d.get('model')}]"
            by_name.setdefault(name, HistogramSet()).add_record(d)
            counters_by_name.setdefault(name, Counters()).add(d, st.slos)
        self.hist, self.counters, self.by_name, self.counters_by_name = hist, counters, by_name, counters_by_name
        return True


def _count_lines(path: pathlib.Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


class _RecordView:
    """A requests.jsonl line as `LLMState.in_window` reads a record."""

    def __init__(self, d: dict) -> None:
        self.sent_at = d.get("sent_at")
        self.finished_at = d.get("finished_at")
