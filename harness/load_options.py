"""Every load option, declared once: name, type, default, help, web-UI flag and range.

A load option crosses three places as strings: a plan's stage params (harness.stages.serving),
`harness load --NAME` and Locust's `--llm-NAME` (the plugin, which a plain `locust -f
locustfiles/chat.py` loads too). Each is a field of :class:`LoadSpec` here; from those fields
this module builds both parsers (:func:`add_load_options`, :func:`add_locust_options`), the
argv for the process boundaries (:func:`harness_argv` for a plan's `harness load`,
:func:`locust_argv` for `harness load`'s Locust), the spec on either side (:func:`from_args`,
:func:`from_locust`) and the plan fields (:func:`plan_field`). The boundary itself stays (it
keeps gevent out of the plan runner and plain `locust -f` working); what crosses it is a
LoadSpec, written as the `--llm-*` flags of the values that are not the default.

Imports nothing of Locust: `harness load` and the plan runner use it without its monkey-patching.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterable

from harness.errors import UsageError

from harness.arrivals import ARRIVALS
from harness.credentials import DEFAULT_ENV_VAR as API_KEY_ENV
from harness.progress import DEFAULT_INTERVAL_S as PROGRESS_INTERVAL_S
from harness.progress import MIN_INTERVAL_S as MIN_PROGRESS_INTERVAL_S
from harness.progress import MODES as PROGRESS_MODES
from harness.stamp_delay import DEFAULT_LIMIT_MS as STAMP_DELAY_LIMIT_MS
from harness.timing import MAX_RESPONSE_BYTES

METRICS_HOST = "127.0.0.1"   # /metrics listens on loopback unless told otherwise


@dataclass(frozen=True)
class Option:
    """One load option: `harness load --NAME`, Locust's `--llm-NAME`, the LoadSpec field NAME (with _)."""

    name: str                 # "output-len"
    kind: type                # int, float, str, bool (a flag), tuple (repeatable; comma-joined for Locust)
    default: Any
    help: str
    web_ui: bool = False      # shown in Locust's start form (which may then change it per test)
    # Range, checked before any load by both sides (check_ranges): None = not checked here,
    # False = must be > 0, True = must be >= 0 (0 then means what `unit` says).
    zero_ok: bool | None = None
    unit: str = ""
    choices: tuple[str, ...] = ()
    harness: bool = True      # also `harness load --NAME` (False: the plugin's alone)
    hidden: bool = False      # not in Locust's --help (set by the master for its workers)
    strict: str = ""          # Locust's argparse type: "rate", "at_least_0", "interval" (else `kind`)
    env_var: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--llm-" + self.name


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A LoadSpec field and its option (the rest of the Option is read from the field)."""
    return field(default=default, metadata={"option": kw | {"help": help}})


@dataclass(frozen=True)
class LoadSpec:
    """One load run's options, typed: what `harness load` hands its Locust and what the plugin
    reads from Locust's parsed options (a web start form may change the web-UI ones per test)."""

    model: str = _opt("", "served model name (default: the server's first /v1/models entry)", web_ui=True)
    input_len: int = _opt(512, "prompt tokens, calibrated with the server's /tokenize", web_ui=True)
    output_len: int = _opt(128, "output tokens (max_tokens, with ignore_eos + min_tokens)", web_ui=True)
    input_len_range: float = _opt(0.0, "+- fraction, uniform")
    output_len_range: float = _opt(0.0, "+- fraction, uniform")
    shared_prefix_len: int = _opt(0, "tokens shared by every prompt")
    dataset: str = _opt("", "ShareGPT JSON or JSONL prompts file", web_ui=True)
    soak_mix: bool = _opt(False, "the seed plan's three prompts (128 tokens out)")
    rate: float = _opt(0.0, "open loop: requests/s across all workers (0 = closed loop, one request per "
                            "user at a time; at most {MAX_RATE:g})", web_ui=True, strict="rate")
    arrival: str = _opt("poisson", "open-loop arrival process", choices=ARRIVALS)
    burstiness: float = _opt(1.0, "gamma shape (1 = Poisson)", zero_ok=False, unit="(the gamma shape; 1 is Poisson)")
    max_concurrency: int = _opt(0, "open-loop in-flight cap (0 = none)", zero_ok=True,
                                unit="requests in flight (0: no cap)")
    num_requests: int = _opt(0, "stop after this many requests (0 = no limit)", zero_ok=True,
                             unit="requests (0: no limit)")
    warmup: float = _opt(0.0, "seconds excluded from the summary at the start", zero_ok=True, unit="seconds")
    cooldown: float = _opt(0.0, "seconds excluded at the end (needs a run time)", zero_ok=True, unit="seconds")
    out: str = _opt("", "results directory (summary.json, requests.jsonl, timeseries.jsonl)", harness=False)
    slo: tuple[str, ...] = _opt((), "comma-separated SLOs, e.g. 'ttft_p99_ms<=200,tpot_p99_ms<=30,"
                                    "error_rate<=0.01' (repeatable with harness load)", web_ui=True)
    timeout: float = _opt(600.0, "read timeout per request: the longest silence, seconds", zero_ok=False,
                          unit="seconds (the longest silence a request may have)")
    request_deadline: float = _opt(0.0, "whole-request deadline, seconds from the send, however the bytes "
                                        "trickle (0 = the timeout plus a second per output token)",
                                   strict="at_least_0")
    max_response_bytes: int = _opt(MAX_RESPONSE_BYTES, "cap on the bytes read for one response (0 = no cap)",
                                   zero_ok=True, unit="bytes (0: no cap)", strict="at_least_0")
    drain_timeout: float | None = _opt(None, "when the run ends, wait up to this many seconds for the requests "
                                             "in flight (default: the timeout); what is still unfinished is "
                                             "recorded as incomplete", zero_ok=True,
                                       unit="seconds (0: no wait for requests in flight)")
    seed: int = _opt(0, "random seed of the prompts and arrivals")
    drift: bool = _opt(False, "at the end, the drift of TTFT/TPOT per hour over the timeseries (summary.json's "
                              "drift block; harness load --soak or a drift SLO sets it)", harness=False)
    window: float = _opt(10.0, "timeseries window, seconds", zero_ok=False, unit="seconds (one timeseries line each)")
    cpu_limit: float = _opt(90.0, "generator invalid when a worker's median CPU %% exceeds this", zero_ok=True,
                            unit="% (a worker's median CPU; 0: any use makes the generator invalid)")
    lag_limit_ms: float = _opt(10.0, "generator invalid when open-loop schedule lag p99 exceeds this",
                               zero_ok=True, unit="ms (open-loop schedule lag p99; 0: any lag makes it invalid)")
    stamp_delay_limit_ms: float = _opt(STAMP_DELAY_LIMIT_MS,
                                       "generator invalid when the p99 of its read-to-stamp delay (kernel "
                                       "receive time to its timestamp, harness.stamp_delay) exceeds this; "
                                       "0 = not judged", zero_ok=True, unit="ms (0: not judged)",
                                       env_var="LOCUST_LLM_STAMP_DELAY_LIMIT_MS")
    api_key_env: str = _opt(API_KEY_ENV, "environment variable holding the API key (never logged)", harness=False)
    expected_workers: int = _opt(0, "", harness=False, hidden=True)
    # set by the master at its start, for its workers: where the API key may be sent
    key_origins: tuple[str, ...] | None = _opt(None, "", harness=False, hidden=True)
    metrics_port: int = _opt(0, "serve Prometheus /metrics on this port (0 = off; the web UI always "
                                "serves /metrics too)")
    metrics_host: str = _opt(METRICS_HOST, f"address the /metrics server binds (default {METRICS_HOST})",
                             harness=False)
    metrics_linger: float = _opt(0.0, "keep /metrics up this many seconds after the run, for a last scrape",
                                 zero_ok=True, unit="seconds")
    server_metrics: str = _opt("auto", "server state in timeseries.jsonl: 'auto' scrapes <host>/metrics, "
                                       "'off', or comma-separated /metrics URLs", harness=False)
    no_preflight: bool = _opt(False, "skip the check that every target answers /v1/models, takes the key and "
                                     "serves the model before any load (e.g. a server that comes up during "
                                     "the run)", harness=False)
    progress: str = _opt("auto", "live progress of a headless run: 'auto' (a bar on a terminal, plain lines "
                                 "on a pipe or with Locust's periodic tables), 'bar', 'lines' or 'off'",
                         choices=PROGRESS_MODES, harness=False)
    progress_interval: float = _opt(PROGRESS_INTERVAL_S, "seconds between plain progress lines when not on a "
                                                         "terminal (default 5)", strict="interval")

    def workload(self):
        """The prompts' spec (harness.workload) these options ask for."""
        from harness.workload import WorkloadSpec

        return WorkloadSpec(input_len=self.input_len, output_len=self.output_len, dataset=self.dataset or None,
                            soak_mix=self.soak_mix, input_len_range=self.input_len_range,
                            output_len_range=self.output_len_range, shared_prefix_len=self.shared_prefix_len,
                            seed=self.seed)

    def replace(self, **changes: Any) -> LoadSpec:
        return dataclasses.replace(self, **changes)


def _options() -> tuple[Option, ...]:
    import typing

    hints = typing.get_type_hints(LoadSpec)
    out = []
    for f in dataclasses.fields(LoadSpec):
        kind = hints[f.name]
        kind = {int: int, float: float, str: str, bool: bool}.get(kind, tuple if "tuple" in str(kind) else float)
        out.append(Option(f.name.replace("_", "-"), kind, f.default, **f.metadata["option"]))
    return tuple(out)


OPTIONS: tuple[Option, ...] = _options()
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def default(name: str) -> Any:
    """The one default of option `name` ("output-len")."""
    return BY_NAME[name].default


# -- the two parsers --------------------------------------------------------------

def _help(o: Option) -> str:
    from harness.arrivals import MAX_RATE

    return o.help.replace("{MAX_RATE:g}", f"{MAX_RATE:g}")


def add_load_options(parser: argparse.ArgumentParser, groups: dict[str, Any] | None = None) -> None:
    """`harness load`'s options. Each defaults to None (not given): :func:`from_args` fills in
    the one default, and the command can tell what was given (e.g. --soak's window)."""
    for o in OPTIONS:
        if not o.harness:
            continue
        where = (groups or {}).get(o.name, parser)
        shown = o.default not in (None, "", False, ()) and "default" not in o.help
        kw: dict[str, Any] = {"help": _help(o) + (f" (default {text(o.default)})" if shown else "")}
        if o.kind is bool:
            where.add_argument("--" + o.name, action="store_true", default=None, **kw)
        elif o.kind is tuple:
            where.add_argument("--" + o.name, action="append", default=None, **kw)
        else:
            where.add_argument("--" + o.name, type=o.kind, default=None,
                               **({"choices": list(o.choices)} if o.choices else {}), **kw)


def _strict(o: Option) -> Callable[[str], Any]:
    """Locust's argparse type for `o`: its error says what is wrong, in one line (plain Locust
    checks nothing later for these)."""
    if o.strict == "rate":
        from harness.arrivals import check_rate

        def rate(text: str) -> float:
            try:
                return check_rate(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return rate
    low, unit = ((MIN_PROGRESS_INTERVAL_S, "seconds") if o.strict == "interval"
                 else (0, "seconds" if o.kind is float else "bytes"))

    def convert(text: str):
        try:
            value = o.kind(text)
        except ValueError:
            value = -1
        if not low <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"give {unit} >= {low:g}, not {text!r}")
        return value
    return convert


def add_locust_options(parser) -> None:
    """Locust's `--llm-*` options (its configargparse parser, at `init_command_line_parser`);
    the web-UI ones appear in its start form."""
    for o in OPTIONS:
        kw: dict[str, Any] = {"include_in_web_ui": o.web_ui,
                              "help": argparse.SUPPRESS if o.hidden else _help(o)}
        if o.env_var:
            kw["env_var"] = o.env_var
        if o.kind is bool:
            parser.add_argument(o.flag, action="store_true", default=False, **kw)
        elif o.kind is tuple and o.hidden:
            parser.add_argument(o.flag, nargs="*", default=None, **kw)
        elif o.kind is tuple:   # a string in Locust's options (its start form sets it as text)
            parser.add_argument(o.flag, default=",".join(o.default), **kw)
        else:
            if o.choices:
                kw["choices"] = list(o.choices)
            parser.add_argument(o.flag, type=_strict(o) if o.strict else o.kind, default=o.default, **kw)


# -- the two specs ------------------------------------------------------------------

def _value(o: Option, v: Any) -> Any:
    """A parsed (or web-form) value as LoadSpec holds it."""
    if v is None:
        return None
    if o.kind is tuple:
        parts = v.split(",") if isinstance(v, str) else list(v)
        return tuple(s.strip() for s in parts if s.strip())
    if o.kind is bool:
        return bool(v)
    return o.kind(v)


def from_locust(parsed: Any) -> LoadSpec:
    """The spec from Locust's parsed options (an option Locust lacks keeps its default)."""
    values = {}
    for o in OPTIONS:
        v = getattr(parsed, "llm_" + o.dest, o.default) if parsed is not None else o.default
        values[o.dest] = _value(o, v) if v is not None or o.default is None else o.default
    return LoadSpec(**values)


def from_args(args: argparse.Namespace, **over: Any) -> LoadSpec:
    """`harness load`'s spec: what was given on its command line (`over` wins), else the defaults."""
    values = {}
    for o in OPTIONS:
        v = getattr(args, o.dest, None) if o.harness else None
        if v is not None:
            values[o.dest] = _value(o, v)
    return LoadSpec(**(values | over))


def given(args: argparse.Namespace, name: str) -> bool:
    """Whether `harness load --NAME` was on the command line."""
    return getattr(args, BY_NAME[name].dest, None) is not None


# -- the argv for the process boundaries -----------------------------------------------

def text(v: Any) -> str:
    """A value as a flag's text: 1000.0 -> "1000", 0.5 -> "0.5" (exact, unlike :g)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return str(v)


def _flags(spec: LoadSpec, prefix: str, only: Iterable[Option]) -> list[str]:
    argv: list[str] = []
    for o in only:
        v = getattr(spec, o.dest)
        if v == o.default or v is None:
            continue
        if o.kind is bool:
            argv.append(prefix + o.name)
        elif o.kind is tuple and prefix == "--":
            for item in v:
                argv += [prefix + o.name, item]
        elif o.kind is tuple and o.hidden:
            argv += [prefix + o.name, *v]
        elif o.kind is tuple:
            argv += [prefix + o.name, ",".join(v)]
        else:
            argv += [prefix + o.name, text(v)]
    return argv


def locust_argv(spec: LoadSpec) -> list[str]:
    """The `--llm-*` flags that carry `spec` to Locust: those whose value is not the default."""
    return _flags(spec, "--llm-", OPTIONS)


def harness_argv(values: dict[str, Any]) -> list[str]:
    """`harness load` flags for plan values named as the options' dests (`input_len`; absent or
    None: the default), those whose value is not the default."""
    known = {o.dest: o for o in OPTIONS if o.harness}
    spec = LoadSpec(**{k: _value(known[k], v) for k, v in values.items() if k in known and v is not None})
    return _flags(spec, "--", (known[k] for k in values if k in known))


def plan_field(name: str, default: Any = ..., **over: Any):
    """A plan stage's param for option `name` (harness.stages.base.Field): its type, default and
    help from here, unless the stage gives its own (`default`, `over`: the seed's 20 req/s)."""
    from harness.stages.base import Field

    o = BY_NAME[name]
    if default is not ...:
        over["default"] = default
    kind = {int: "int", float: "float", str: "str", bool: "bool", tuple: "list"}[o.kind]
    kw: dict[str, Any] = {"help": o.help}
    if o.choices:
        kw["choices"] = o.choices
    if o.zero_ok is not None:
        kw["minimum"] = 0
    return Field(kind, **({"default": o.default} | kw | over))


# -- ranges -----------------------------------------------------------------------------

def check_ranges(spec: LoadSpec, prefix: str) -> None:
    """A one-line UsageError for the first option out of its range (argparse's types cannot see
    the web UI's start form, which sets values as they come; a zero or negative count used to
    be taken as it came). `prefix` is "--" (harness load) or "--llm-" (the plugin), so that
    the line names the flag the user typed."""
    for o in OPTIONS:
        v = getattr(spec, o.dest)
        if o.zero_ok is None or v is None or isinstance(v, bool):
            continue
        if not ((0 <= v) if o.zero_ok else (0 < v)) or not math.isfinite(v):
            raise UsageError(f"{prefix}{o.name} must be {'>= 0' if o.zero_ok else '> 0'} {o.unit}, "
                             f"not {v:g}")
    port = spec.metrics_port
    if not 0 <= port <= 65535:
        raise UsageError(f"{prefix}metrics-port must be a port in 1..65535 (0: off), not {port}")
