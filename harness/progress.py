"""Live progress of a run: the figures, how a terminal and a log show them, and the status file.

A headless run used to print nothing until its end. While it runs, the master (or the local
runner) now shows the run's merged figures -- requests done of ``--llm-num-requests`` or time
of ``--run-time``, TTFT p50, TPOT p50, output tokens/s and failed requests:

- on a terminal (stdout is a tty), a progress bar drawn by **tqdm**, redrawn every second;
- on a pipe, a file or CI, one plain line every ``--llm-progress-interval`` seconds (default
  5) and a last one at the end, ``progress: 120/500 requests, 31 s: TTFT p50 42.1 ms, ...``;
- in the results directory, ``progress.json``: the same figures, rewritten every 2 s and once
  at the end, so that another process (``harness run``'s load stages) can show them too.

Why tqdm and not rich: neither was installed with Locust; tqdm is one pure-Python package with
no dependencies of its own (rich brings pygments and markdown-it-py), it imports in a few
milliseconds, it is already in the vLLM environment, and a progress bar of N is what it does.
Its monitor thread is switched off (``monitor_interval = 0``): under gevent a thread is a
greenlet, and the bar is redrawn by our own greenlet anyway.

The figures are the run's own exact ones (the merged HDR histograms and counters of
``harness.aggregate.Aggregate``, the numbers the summary will hold), read once per tick by one
greenlet: nothing is done per request. This module does not import Locust (the runner of a
plan imports it to format the stage's lines); ``harness.live_progress`` wires it into Locust.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

from harness.json_io import write_json

SCHEMA = 1
STATUS_FILE = "progress.json"
MODES = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL_S = 5.0
BAR_REFRESH_S = 1.0      # how often the bar is redrawn
STATUS_EVERY_S = 2.0     # how often progress.json is rewritten (when no line or bar is due sooner)
MIN_INTERVAL_S = 0.5


@dataclass
class Progress:
    """One reading of a running test. Latencies and tokens/s are those of the measured requests
    (after any warm-up), as the summary will report them; ``done`` counts every recorded
    request, warm-up included, as ``--llm-num-requests`` does."""

    elapsed_s: float
    done: int
    failed: int
    ttft_p50_ms: float | None
    tpot_p50_ms: float | None
    output_tokens_per_s: float | None
    num_requests: int | None = None   # the run's request bound, when it has one
    run_time_s: float | None = None   # its time bound, when it has one
    users: int = 0
    final: bool = False
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f} ms"


def figures_text(p: Progress) -> str:
    """The figures every display shows, in the summary table's words."""
    tok = "-" if p.output_tokens_per_s is None else f"{p.output_tokens_per_s:,.1f}"
    return (f"TTFT p50 {_ms(p.ttft_p50_ms)}, TPOT p50 {_ms(p.tpot_p50_ms)}, "
            f"{tok} output tok/s, {p.failed} failed")


def format_line(p: Progress, label: str = "progress") -> str:
    """One plain line: how far the run is against its bound, then the figures."""
    if p.num_requests:
        head = f"{p.done}/{p.num_requests} requests, {p.elapsed_s:.0f} s"
    elif p.run_time_s:
        head = f"{min(p.elapsed_s, p.run_time_s):.0f}/{p.run_time_s:.0f} s, {p.done} requests"
    else:
        head = f"{p.done} requests, {p.elapsed_s:.0f} s"
    return f"{label}: {head}{' (end)' if p.final else ''}: {figures_text(p)}"


def choose_mode(option: str, stdout_isatty: bool, headless: bool, locust_prints_tables: bool) -> str:
    """What the run shows. ``auto``: nothing with a web UI (its LLM tab shows the figures); a bar
    on a terminal, unless Locust itself prints its stats table there every few seconds (plain
    ``locust --headless`` without ``--only-summary``: a bar between its tables would be torn up),
    where lines are printed instead; lines on anything else."""
    if option in ("bar", "lines", "off"):
        return option
    if not headless:
        return "off"
    return "bar" if stdout_isatty and not locust_prints_tables else "lines"


def write_status(path: Path, p: Progress) -> None:
    """``progress.json``, replaced whole (a reader never sees half of it)."""
    try:
        write_json(path, p.to_dict(), indent=None)
    except OSError:
        pass   # progress is a courtesy: a full disk must not cost the run


def read_status(path: Path) -> Progress | None:
    """The last reading a run wrote, or None (not written yet, or not ours)."""
    try:
        d = json.loads(path.read_text())
        return Progress.from_dict(d) if d.get("schema") == SCHEMA else None
    except (OSError, ValueError, TypeError):
        return None


class Lines:
    """Plain lines on a stream that is not a terminal: one every ``interval`` seconds."""

    def __init__(self, stream: IO[str], interval_s: float) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self._last = time.monotonic()

    def tick_s(self) -> float:
        return self.interval_s

    def update(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s * 0.9:   # (a tick may wake a little early)
            return
        self._last = now
        self._print(p)

    def close(self, p: Progress) -> None:
        self._print(p)

    def _print(self, p: Progress) -> None:
        try:
            self.stream.write(format_line(p) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass


class Bar:
    """A tqdm bar on a terminal: requests done of N when a request count bounds the run,
    else seconds of the run time; the figures follow in its brackets."""

    def __init__(self, stream: IO[str], first: Progress) -> None:
        from tqdm import tqdm

        tqdm.monitor_interval = 0   # no monitor thread: our greenlet redraws the bar
        self._by_requests = bool(first.num_requests)
        total = first.num_requests if self._by_requests else first.run_time_s
        # follow the terminal's width; one that reports none (a bare pty) gets 120 columns
        sized = _columns(stream) > 0
        self.bar = tqdm(total=total, desc="requests" if self._by_requests else "run",
                        unit="req" if self._by_requests else "s", file=stream, dynamic_ncols=sized, ncols=None if sized else 120,
                        nrows=None if sized else 24,
                        leave=True, mininterval=0, miniters=0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} "
                                   "[{elapsed}<{remaining}{postfix}]"
                        if total else "{desc}: {n_fmt} {unit} [{elapsed}{postfix}]")

    def tick_s(self) -> float:
        return BAR_REFRESH_S

    def update(self, p: Progress) -> None:
        if self._by_requests:
            n = p.done
            figures = figures_text(p)
        else:
            n = int(p.elapsed_s if not p.run_time_s else min(p.elapsed_s, p.run_time_s))
            figures = f"{p.done} requests, {figures_text(p)}"
        self.bar.n = n
        self.bar.set_postfix_str(figures, refresh=False)
        self.bar.refresh()

    def close(self, p: Progress) -> None:
        self.update(p)
        self.bar.close()


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0
