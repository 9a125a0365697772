"""Output tokens booked to the time window in which they streamed, not the one their request
finished in.

A request's tokens arrive over seconds; booking them all when it finishes draws a saw-tooth
of throughput over time (a steady closed loop of long requests swings between about half and
twice the run's rate). The record has the stamps: the first token at `sent_at + ttft`, each
later one an ITL further on. Each of a request's `output_tokens` is spread over those arrival
points (evenly: when the stream carried fewer events than tokens, each event stands for the
same share), and added to the bin of `window_s` seconds it fell in.

Bins are aligned to the epoch (bin k is [k*w, (k+1)*w)), so every worker books into the same
grid and the master only adds them up; each timeseries line covers whole bins.
The sum over all bins equals the sum of the requests' output tokens, up to float rounding.
"""
from __future__ import annotations

import bisect
import itertools
import math
from typing import Any
from collections.abc import Iterable, Mapping

Bins = dict[int, float]


def bin_of(t: float, width: float) -> int:
    return math.floor(t / width)


def book(bins: Bins, rec: Mapping[str, Any], width: float) -> None:
    """Add one finished request's output tokens to `bins` by when they streamed."""
    tokens = rec.get("output_tokens") or 0
    sent, ttft = rec.get("sent_at"), rec.get("ttft_ms")
    if not rec.get("ok") or tokens <= 0 or sent is None or ttft is None or not math.isfinite(sent + ttft):
        return
    first = sent + ttft / 1000.0
    k0 = bin_of(first, width)
    e2e = rec.get("e2e_ms")
    itl = rec.get("itl_ms") or []
    if e2e is None or not itl or not math.isfinite(e2e) or bin_of(sent + e2e / 1000.0, width) == k0:
        bins[k0] = bins.get(k0, 0.0) + tokens   # every token streamed in one bin
        return
    # arrival of each point after the first, in seconds after the first token (a gap that is
    # not a finite positive number counts as none: the points stay in order)
    offsets = list(itertools.accumulate(v / 1000.0 if v > 0 and math.isfinite(v) else 0.0 for v in itl))
    share = tokens / (len(offsets) + 1)
    done = 0   # points booked so far (the first token is point 0, at offset 0)
    k = k0
    while done <= len(offsets):
        edge = (k + 1) * width - first          # the next bin boundary, relative to the first token
        upto = bisect.bisect_left(offsets, edge) + 1   # points before that boundary
        if upto > done:
            bins[k] = bins.get(k, 0.0) + (upto - done) * share
            done = upto
            k += 1
        else:   # no point in this bin: go to the next point's bin
            k = max(k + 1, bin_of(first + offsets[done - 1], width))


def to_pairs(bins: Bins) -> list[list[float]]:
    """Bins as [k, tokens] pairs, for a worker's report (msgpack maps want string keys)."""
    return [[k, v] for k, v in bins.items()]


def merge(into: Bins, pairs: Iterable[Iterable[float]]) -> set[int]:
    """Add a report's [k, tokens] pairs into `into`; returns the bins that changed."""
    changed = set()
    for k, v in pairs:
        k = int(k)
        into[k] = into.get(k, 0.0) + v
        changed.add(k)
    return changed


def tokens_in(bins: Mapping[int, float], ks: Iterable[int]) -> float:
    return sum(bins.get(k, 0.0) for k in ks)
