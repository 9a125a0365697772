"""The ranges of the count-like options `harness load` and the plugin share, declared once.

Each option here is `--NAME` to `harness load` and `--llm-NAME` to the plugin under plain
Locust (`harness load` passes one to the other). A zero or negative value used to be taken
as it came (a negative request count, a zero timeout); now it is one line naming the option,
its range and the value, before any load. (--request-deadline is not here: 0 is refused by
`harness load` but is the plugin's default, "--llm-timeout plus a second per output token".) Imports nothing of Locust: `harness load` checks
its own flags with it before it starts Locust, the plugin (harness.start_checks) its own.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

from harness.errors import UsageError


class Range(NamedTuple):
    name: str       # without its prefix: "num-requests" is --num-requests and --llm-num-requests
    zero_ok: bool   # 0 allowed (it then means what `unit` says)
    unit: str


RANGES = (
    Range("timeout", False, "seconds (the longest silence a request may have)"),
    Range("max-response-bytes", True, "bytes (0: no cap)"),
    Range("max-concurrency", True, "requests in flight (0: no cap)"),
    Range("num-requests", True, "requests (0: no limit)"),
    Range("burstiness", False, "(the gamma shape; 1 is Poisson)"),
    Range("warmup", True, "seconds"),
    Range("cooldown", True, "seconds"),
    Range("drain-timeout", True, "seconds (0: no wait for requests in flight)"),
    Range("window", False, "seconds (one timeseries line each)"),
    Range("cpu-limit", True, "% (a worker's median CPU; 0: any use makes the generator invalid)"),
    Range("lag-limit-ms", True, "ms (open-loop schedule lag p99; 0: any lag makes it invalid)"),
    Range("stamp-delay-limit-ms", True, "ms (0: not judged)"),
    Range("metrics-linger", True, "seconds"),
)
PORT = "metrics-port"   # 0: off


def check_ranges(value: Callable[[str], float | int | None], prefix: str) -> None:
    """Raise a one-line UsageError for the first option out of its range. `value(name)` is
    the option's value, None where it was not given; `prefix` is "--" (harness load) or
    "--llm-" (the plugin), so that the line names the flag the user typed."""
    for r in RANGES:
        v = value(r.name)
        if v is None:
            continue
        if not ((0 <= v) if r.zero_ok else (0 < v)) or not math.isfinite(v):
            raise UsageError(f"{prefix}{r.name} must be {'>= 0' if r.zero_ok else '> 0'} {r.unit}, "
                             f"not {v:g}")
    port = value(PORT)
    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"{prefix}{PORT} must be a port in 1..65535 (0: off), not {port}")
