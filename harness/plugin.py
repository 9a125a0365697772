"""The Locust plugin: its options (harness.load_options) and its listeners. Importing this module
(every locustfile does) registers them.

The listeners set up each process's state of the run (harness.run_state, `environment.llm`)
and, on the master or the local runner, the run's merged view (harness.aggregate,
`environment.llm_aggregate`); they ship each worker's histograms to the master inside Locust's
own stats report (`report_to_master`, every 3 s and once more on quit) and merge them there
(`worker_report`), so that its percentiles are those of the union of every worker's samples,
not an average of averages or Locust's rounded buckets; they drain the run at its end, and
write its results (`write_run_results`): the last timeseries window, summary.json
(harness.run_summary), Locust's final CSVs and the exit code.
"""
from __future__ import annotations

import math
import os
import pathlib
import sys
import time
from typing import Any

import gevent
import psutil
from locust import events
from locust.runners import (HEARTBEAT_LIVENESS, STATE_CLEANUP, STATE_RUNNING, STATE_SPAWNING, STATE_STOPPED, LocalRunner,
                            MasterRunner, WorkerRunner)

from harness import load_options
from harness.aggregate import Aggregate
from harness.errors import UsageError
from harness.json_io import read_jsonl
from harness.results import STARTED_FILE, RequestLog, archive_run, reconcile_started
from harness.run_state import DRAIN_POLL_S, LLMState, current_environment, remember_environment
from harness.run_summary import RunSummary
from harness.slo import EXIT_BAD_INPUT, run_exit_code

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


@events.init.add_listener
def _remember_env(environment, **_kw) -> None:
    remember_environment(environment)


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
    env = current_environment()
    if env is None:
        return
    data["llm"] = env.llm.take_report()


@events.worker_report.add_listener
def _on_worker_report(client_id, data, **_kw) -> None:
    env = current_environment()
    if env is None or "llm" not in data:
        return
    env.llm_aggregate.merge_report(str(client_id), data["llm"])


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
    recovered = agg.recover_from_log()
    # How the run ended: the measured window (first send to last finish) includes the drain.
    summary = RunSummary(
        agg.figures(stopped), state.slos, interrupted=state.interrupted,
        drain={"timeout_s": state.drain_timeout, "waited_s": state.drain_waited_s,
               "interrupted": state.interrupted},
        error=state.fatal,
        recovered=None if not recovered else (
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
            summary.add_breakdowns(read_jsonl(out / "requests.jsonl"))
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
