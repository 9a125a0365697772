"""What the plugin checks before any load under plain Locust (`locust -f locustfiles/chat.py`):
the count-like `--llm-*` options (their ranges in harness.load_options), the ports it was told to listen
on, and every target (harness.preflight: it answers /v1/models, takes the key, serves the model).

`harness load` makes the same checks itself before it starts Locust; without these, plain
Locust took `--llm-num-requests -3` as it came, ran a whole load at a dead URL to exit 4, and
answered a taken `--web-port` with a traceback.

- Headless: at init, before any user exists -- one line on stderr, exit 2, nothing sent and no
  results written (an earlier run's files in `--llm-out` are left as they were).
- Web UI: its start form may change the host, the model, the lengths and the rate, so each
  new test is checked when it is started (the form, --autostart, a load shape). A failure is
  logged as one line (the terminal and the UI's log view), the start form is answered with
  it (success false, as Locust answers a form it refuses), and that start does not happen:
  no test_start, no user, nothing sent, no results moved or written; the UI stays up for
  the next try. The check wraps the runner's `start`, which every start path calls.
- With `--processes N` the workers are forked before these checks: when the master exits
  at one, each of them also logs that it could not connect to it.

`--llm-no-preflight` skips the target check (a server that comes up during the run).
Imported by harness.plugin after its own listeners (the run's state exists by then).
"""
from __future__ import annotations

import logging
import sys
from typing import Any
from collections.abc import Callable

import gevent
from gevent.event import AsyncResult
from locust import events
from locust.runners import STATE_RUNNING, STATE_SPAWNING, STATE_STOPPED, LocalRunner, MasterRunner

from harness import load_options
from harness.errors import UsageError
from harness.preflight import TIMEOUT_S

log = logging.getLogger(__name__)

NOT_STARTED = "test not started: "
# How long the start form's answer waits for its test's checks (the preflight's own timeout, and some).
VERDICT_WAIT_S = TIMEOUT_S + 2.0


def check_options(o: Any) -> None:
    """A one-line UsageError for the first count-like `--llm-*` option out of its range
    (argparse's types cannot see the web UI's start form, which sets values as they come)."""
    from harness.arrivals import check_rate

    spec = load_options.from_locust(o)
    load_options.check_ranges(spec, "--llm-")
    try:
        check_rate(spec.rate)
    except ValueError as exc:
        raise UsageError(f"--llm-rate {exc}") from None


def targets(environment) -> list[tuple[str, str | None, str, str]]:
    """(url, model or None, the option that set the url, the one that set the model) for
    every LLM user class that will run, as LLMUser resolves them: Locust's `--host` overrides
    a class's own host; a class's `model` comes before `--llm-model`."""
    from harness.llm_user import LLMUser

    o = environment.parsed_options
    opt_model = load_options.from_locust(o).model or None
    out: list[tuple[str, str | None, str, str]] = []
    for cls in environment.user_classes or ():
        if not (isinstance(cls, type) and issubclass(cls, LLMUser)):
            continue
        url = environment.host or getattr(cls, "host", None)
        if not url:
            continue   # (LLMUser says so when it starts)
        own_model = getattr(cls, "model", None)
        target = (url.rstrip("/"), own_model or opt_model,
                  "--host" if environment.host else f"{cls.__name__}.host",
                  f"{cls.__name__}.model" if own_model else "--llm-model")
        if all(t[:2] != target[:2] for t in out):
            out.append(target)
    return out


def preflight(environment) -> None:
    """Every target answers /v1/models, takes the key and serves its model, or a UsageError."""
    from harness.preflight import check_target

    for url, model, url_option, model_option in targets(environment):
        check_target(url, model, environment.llm.api_key, url_option, model_option)


def _checks_a_run(environment) -> bool:
    o = environment.parsed_options
    return (o is not None and getattr(environment, "llm", None) is not None
            and isinstance(environment.runner, (MasterRunner, LocalRunner)))
    # (a worker takes its options and targets from its master, which checked them)


@events.init.add_listener
def _check_at_init(environment, web_ui=None, **_kw) -> None:
    if not _checks_a_run(environment):
        return
    o = environment.parsed_options
    try:
        check_options(o)
        if web_ui is not None and getattr(o, "web_port", None):
            # Locust binds it after init, and answers a taken one with a traceback
            from harness.ports import require_free
            host = getattr(o, "web_host", "") or ""
            require_free("" if host == "*" else host, int(o.web_port), "--web-port")
        if getattr(o, "headless", False):
            users = getattr(o, "num_users", None)
            if users is not None and users < 1 and environment.shape_class is None:
                # (Locust would spawn nobody and idle until --run-time)
                raise UsageError(f"-u/--users must be at least 1 concurrent user, not {users}")
            if not environment.llm.load.no_preflight:
                preflight(environment)   # (the lengths: harness.plugin validated them at init)
        else:
            environment.runner.start = _checked_start(environment, environment.runner.start)
            if web_ui is not None:
                _answer_refused_starts(environment, web_ui)
    except UsageError as exc:
        sys.stderr.write(f"locust: error: {exc}\n")
        raise SystemExit(2) from None


def check_new_test(environment) -> None:
    """What a test started from the web UI is checked for: its form may have changed the
    host, model, lengths, rate or SLOs since init (a UsageError names the first wrong one)."""
    o = environment.parsed_options
    check_options(o)
    environment.llm.reload_options()   # the form's values, as the test start will read them
    environment.llm.spec.validate(prefix="--llm-")
    if not environment.llm.load.no_preflight:
        preflight(environment)


def _checked_start(environment, start: Callable[..., None]) -> Callable[..., None]:
    runner = environment.runner

    def checked_start(user_count: int, spawn_rate: float, *args: Any, **kwargs: Any) -> None:
        verdict = getattr(environment, "llm_start_verdict", None) or AsyncResult()
        environment.llm_start_verdict = None   # (one start form, one answer)
        if runner.state not in (STATE_SPAWNING, STATE_RUNNING):   # a new test, not a new user count
            try:
                check_new_test(environment)
            except UsageError as exc:
                log.error("%s%s", NOT_STARTED, exc)
                verdict.set(str(exc))
                if runner.shape_greenlet is not None:   # a load shape's first tick: end its loop
                    runner.shape_greenlet, runner.shape_last_tick = None, None
                    runner.update_state(STATE_STOPPED)
                return
        verdict.set("")
        start(user_count, spawn_rate, *args, **kwargs)

    return checked_start


def _answer_refused_starts(environment, web_ui) -> None:
    """The start form's answer says when its test was refused (Locust's own answer, sent
    before the start it spawned has run, is always "Swarming started"): the form shows the
    line instead of a test that never runs, and the run time it set is cancelled."""
    from flask import g, jsonify, request

    prefix = (getattr(environment.parsed_options, "web_base_path", "") or "").rstrip("/")

    def starting() -> bool:
        return request.method == "POST" and request.path == f"{prefix}/swarm"

    @web_ui.app.before_request
    def _expect_verdict():
        if starting():
            g.llm_start_verdict = environment.llm_start_verdict = AsyncResult()

    @web_ui.app.after_request
    def _refused(response):
        if not starting() or not (response.is_json and (response.get_json(silent=True) or {}).get("success")):
            return response
        try:   # the spawned start runs now: its checks (a /v1/models request or none) answer
            refused = g.llm_start_verdict.get(timeout=VERDICT_WAIT_S)
        except gevent.Timeout:
            return response
        if not refused:
            return response
        cancel = getattr(web_ui, "_cancel_run_time_timer", None)
        if cancel is not None:
            cancel()   # (its stop would end a test that never started)
        answer = jsonify({"success": False, "message": NOT_STARTED + refused, "host": environment.host})
        return answer   # (200 and success false: how Locust's UI is told of a start it refused)
