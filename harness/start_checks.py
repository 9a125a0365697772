"""What the plugin checks before any load under plain Locust (`locust -f locustfiles/chat.py`):
count-like `--llm-*` options, the web UI's port and every target (harness.preflight).

`harness load` makes the same checks itself before it starts Locust; without these, plain
Locust took `--llm-num-requests -3` as it came, ran a whole load at a dead URL to exit 4, and
answered a taken `--web-port` with a traceback and exit 4 ("requests failed").

- Headless: at init, before any user exists -- one line on stderr, exit 2, nothing sent and no
  results written (an earlier run's files in `--llm-out` are left as they were).
- Web UI: the form may change the host, model and lengths, so the options and the targets are
  checked at each test start. A failure logs the one line (Locust's log, the UI's log view)
  and stops that test; no user sends anything (they see `llm_preflight_failed` in the options,
  which the master's spawn messages carry to its workers); the UI stays up for the next try.

`--llm-no-preflight` skips the target check (a server that comes up during the run).
Imported by harness.plugin after its own listeners (the run's state exists by then).
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Any

import gevent
from locust import events
from locust.runners import STATE_RUNNING, STATE_SPAWNING, LocalRunner, MasterRunner

from harness.errors import UsageError

log = logging.getLogger(__name__)

# The option a blocked test start leaves set (its one line), for users here and on workers.
BLOCKED = "llm_preflight_failed"
# How long a blocked test start may take to reach a state Locust's stop() acts on.
STOP_WAIT_S = 10.0

# (option's dest, the least value, what it counts) -- lengths and prompts are WorkloadSpec's
# (harness.workload), the rate is harness.arrivals'.
AT_LEAST_0 = (("llm_num_requests", "requests (0: no limit)"),
              ("llm_max_concurrency", "requests in flight (0: no cap)"),
              ("llm_warmup", "seconds"), ("llm_cooldown", "seconds"),
              ("llm_stamp_delay_limit_ms", "ms (0: not judged)"),
              ("llm_metrics_linger", "seconds"))
ABOVE_0 = (("llm_timeout", "seconds (the longest silence a request may have)"),
           ("llm_window", "seconds (one timeseries line each)"),
           ("llm_burstiness", "(the gamma shape; 1 is Poisson)"),
           ("llm_cpu_limit", "% (a worker's median CPU)"),
           ("llm_lag_limit_ms", "ms (open-loop schedule lag p99)"))


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--llm-no-preflight", action="store_true", default=False, include_in_web_ui=False,
                        help="skip the check that every target answers /v1/models, takes the key "
                             "and serves the model before any load (e.g. a server that comes up "
                             "during the run)")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_options(o: Any) -> None:
    """A one-line UsageError for the first count-like `--llm-*` option out of its range
    (argparse's types cannot see the web UI's start form, which sets values as they come)."""
    from harness.arrivals import check_rate

    def value(dest: str):
        v = getattr(o, dest, None)
        return None if v is None or isinstance(v, bool) else v

    for dest, unit in AT_LEAST_0:
        v = value(dest)
        if v is not None and not 0 <= v < math.inf:
            raise UsageError(f"{_flag(dest)} must be >= 0 {unit}, not {v:g}")
    for dest, unit in ABOVE_0:
        v = value(dest)
        if v is not None and not 0 < v < math.inf:
            raise UsageError(f"{_flag(dest)} must be > 0 {unit}, not {v:g}")
    drain = value("llm_drain_timeout")
    if drain is not None and drain != -1.0 and not 0 <= drain < math.inf:   # (-1: the default)
        raise UsageError(f"--llm-drain-timeout must be >= 0 seconds (0: no wait), not {drain:g}")
    port = value("llm_metrics_port")
    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"--llm-metrics-port must be a port in 1..65535 (0: off), not {port}")
    try:
        check_rate(value("llm_rate") or 0.0)
    except ValueError as exc:
        raise UsageError(f"--llm-rate {exc}") from None


def targets(environment) -> list[tuple[str, str | None, str, str]]:
    """(url, model or None, the option that set the url, the one that set the model) for
    every LLM user class that will run, as LLMUser resolves them: Locust's `--host` overrides
    a class's own host; a class's `model` comes before `--llm-model`."""
    from harness.llm_user import LLMUser

    o = environment.parsed_options
    opt_model = getattr(o, "llm_model", "") or None
    seen: set[tuple[str, str | None]] = set()
    out = []
    for cls in environment.user_classes or ():
        if not (isinstance(cls, type) and issubclass(cls, LLMUser)):
            continue
        url = environment.host or getattr(cls, "host", None)
        if not url:
            continue   # (LLMUser says so when it starts)
        url_option = "--host" if environment.host else f"{cls.__name__}.host"
        model = getattr(cls, "model", None) or opt_model
        model_option = f"{cls.__name__}.model" if getattr(cls, "model", None) else "--llm-model"
        key = (url.rstrip("/"), model)
        if key not in seen:
            seen.add(key)
            out.append((url.rstrip("/"), model, url_option, model_option))
    return out


def preflight(environment) -> None:
    """Every target answers /v1/models, takes the key and serves its model, or a UsageError."""
    from harness.preflight import check_target

    key = environment.llm.api_key
    for url, model, url_option, model_option in targets(environment):
        check_target(url, model, key, url_option, model_option)


def _before_load(environment) -> None:
    """Everything a test start checks (init, when headless; each start from the web UI)."""
    o = environment.parsed_options
    check_options(o)
    environment.llm.spec.validate(prefix="--llm-")
    if not getattr(o, "llm_no_preflight", False):
        preflight(environment)


def _web_address(o: Any) -> tuple[str, int] | None:
    port = getattr(o, "web_port", None)
    if not port:
        return None
    host = getattr(o, "web_host", "") or ""
    return ("" if host == "*" else host), int(port)


@events.init.add_listener
def _check_at_init(environment, web_ui=None, **_kw) -> None:
    o = environment.parsed_options
    if o is None or getattr(environment, "llm", None) is None:
        return
    if not isinstance(environment.runner, (MasterRunner, LocalRunner)):
        return   # (a worker takes its options and targets from its master, which checked them)
    try:
        check_options(o)
        address = _web_address(o) if web_ui is not None else None
        if address is not None:   # Locust binds it after init, answering a taken one with a traceback
            from harness.ports import require_free
            require_free(address[0], address[1], "--web-port")
        if getattr(o, "headless", False):
            _before_load(environment)
    except UsageError as exc:
        sys.stderr.write(f"locust: error: {exc}\n")
        raise SystemExit(2) from None


@events.test_start.add_listener
def _check_at_test_start(environment, **_kw) -> None:
    """A test started from the web UI (or --autostart): check it, or stop it unsent."""
    o = environment.parsed_options
    runner = environment.runner
    if (o is None or getattr(o, "headless", False) or getattr(environment, "llm", None) is None
            or not isinstance(runner, (MasterRunner, LocalRunner))):
        return
    setattr(o, BLOCKED, "")
    try:
        _before_load(environment)
    except UsageError as exc:
        setattr(o, BLOCKED, str(exc))   # read by LLMUser.on_start, here and (spawn message) on workers
        log.error("test not started: %s", exc)
        gevent.spawn(_stop_when_started, runner)


def _stop_when_started(runner) -> None:
    """Locust's stop() does nothing until the start it interrupts has set the runner spawning."""
    waited = 0.0
    while runner.state not in (STATE_SPAWNING, STATE_RUNNING) and waited < STOP_WAIT_S:
        gevent.sleep(0.02)
        waited += 0.02
    runner.stop()


def blocked(environment) -> str:
    """The one line that stopped this test at its start ("" when none did)."""
    o = environment.parsed_options
    return (getattr(o, BLOCKED, "") or "") if o is not None else ""
