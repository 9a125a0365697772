"""Live progress (harness.progress) wired into Locust: its two options and one greenlet.

The greenlet runs on the master or the local runner only -- where the run's merged figures
live (`environment.llm_aggregate`) -- from each test start to the end of the run. Each tick
(1 s with a bar, else the line interval, at most 2 s apart while a results directory wants
`progress.json`) it takes one reading: on a local runner the same exact merge of the users'
histograms that the timeseries window does (`Aggregate.refresh`, ~0.1 ms), then two p50s.
Nothing is done per request. On a master the figures are those of the workers' last reports
(every 3 s), so `--workers N` shows the merged run.

The last reading is taken at Locust's `quit` event, after the summary was built, so the last
line (or the bar's last state) holds every worker's last report.
"""
from __future__ import annotations

import pathlib
import sys
import time

import gevent
from locust import events
from locust.runners import LocalRunner, MasterRunner

from harness import progress


def reading(environment, final: bool = False) -> progress.Progress:
    """The run's figures now, from its merged aggregate."""
    agg = environment.llm_aggregate
    state = environment.llm
    agg.refresh()
    now = time.time()
    duration = agg.measured_window(now)
    c = agg.counters
    run_time = getattr(state.options, "run_time", None)
    return progress.Progress(
        elapsed_s=max(0.0, now - (state.started_at or now)),
        done=sum(agg.requests_by_worker.values()),
        failed=c.failed,
        ttft_p50_ms=agg.hist.summary("ttft_ms")["p50"],
        tpot_p50_ms=agg.hist.summary("tpot_ms")["p50"],
        output_tokens_per_s=c.output_tokens / duration if duration > 0 else None,
        num_requests=state.num_requests or None,
        run_time_s=float(run_time) if run_time else None,
        users=int(getattr(environment.runner, "user_count", 0) or 0),
        final=final)


class _Progress:
    """One run's display and status file, and the greenlet that feeds them."""

    def __init__(self, environment) -> None:
        self.env = environment
        o = environment.parsed_options
        mode = progress.choose_mode(
            environment.llm.load.progress, _isatty(sys.stdout),
            bool(getattr(o, "headless", False)),
            bool(getattr(o, "headless", False)) and not getattr(o, "only_summary", False))
        out = environment.llm.out
        self.status = pathlib.Path(out) / progress.STATUS_FILE if out else None
        interval = environment.llm.load.progress_interval
        first = reading(environment)
        if self.status is not None:   # at once: a reader must not take an earlier run's file for this one
            progress.write_status(self.status, first)
        self.display = (progress.Bar(sys.stdout, first) if mode == "bar" else
                        progress.Lines(sys.stdout, interval) if mode == "lines" else None)
        ticks = [d for d in (self.display.tick_s() if self.display else None,
                             progress.STATUS_EVERY_S if self.status else None) if d]
        self.tick_s = min(ticks) if ticks else None
        self.greenlet = gevent.spawn(self._run) if self.tick_s else None

    def _run(self) -> None:
        while True:
            gevent.sleep(self.tick_s)
            self.show(reading(self.env))

    def show(self, p: progress.Progress) -> None:
        if self.status is not None:
            progress.write_status(self.status, p)
        if self.display is not None and not p.final:
            self.display.update(p)

    def finish(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
        if self.tick_s is None:
            return
        p = reading(self.env, final=True)
        self.show(p)
        if self.display is not None:
            self.display.close(p)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    if (getattr(environment, "llm_aggregate", None) is None
            or not isinstance(environment.runner, (MasterRunner, LocalRunner))):
        return
    old = getattr(environment, "llm_progress", None)
    if old is not None:   # a second test started from the web UI
        old.finish()
    environment.llm_progress = _Progress(environment)


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw) -> None:
    """A headless run ends at `quit` (its workers' last reports come after this); a test the
    web UI stops ends here, and the next may start."""
    p = getattr(environment, "llm_progress", None)
    if p is not None and not getattr(environment.parsed_options, "headless", False):
        environment.llm_progress = None
        p.finish()


@events.quit.add_listener
def _on_quit(**_kw) -> None:
    from harness.run_state import current_environment

    env = current_environment()
    p = getattr(env, "llm_progress", None) if env is not None else None
    if p is not None:
        env.llm_progress = None
        p.finish()
