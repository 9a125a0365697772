"""Exact-to-3-significant-digits latency percentiles, mergeable across Locust workers.

Why not Locust's statistics: Locust rounds response times into coarse buckets (1 ms under 100 ms,
10 ms under 1 s, ...), so a 7.4 ms TPOT shows as 7. HdrHistogram keeps every value to 3
significant digits at about 1.7 us per record, and its compressed encoding ships worker -> master
in well under a millisecond; merged histograms give exactly the percentiles one histogram of all
samples would give.

Values are milliseconds (floats) recorded as integer microseconds in the range 0 .. 1 hour.
Values outside it (negative durations from a clock anomaly, anything above an hour, NaN) are
clamped to the range (NaN is dropped) and counted in ``out_of_range`` rather than raising, so one
bad sample cannot crash a load run. Values below 1 us, e.g. the 0 ms ITL of tokens that arrive in
the same event as the first token, are recorded as 0 and are not out of range.

Percentile definition (documented because every tool picks a different one): the p-th percentile
is the nearest-rank order statistic ``sorted(samples)[max(1, floor(p/100 * N + 0.5)) - 1]``,
reported as the upper edge of its HDR bucket (at most 1/1024 above the sample) and clamped to the
exact max. For p >= 50 this lies between numpy's ``method="lower"`` and ``method="higher"``
percentiles of the raw samples, and equals numpy's ``method="closest_observation"`` except at exact
half-rank ties. ``mean``, ``min`` and ``max`` are exact (from the microsecond samples), not
bucket-based.
"""

from __future__ import annotations

import ctypes
import math
import sys
from typing import Any
from collections.abc import Iterable, Mapping

import numpy as np
import orjson
from hdrh.histogram import HdrHistogram

from harness.metric_catalog import LATENCIES, PERCENTILES

__all__ = ["LatencyHistogram", "HistogramSet", "METRICS"]

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour
SIGNIFICANT_DIGITS = 3

#: Metrics a HistogramSet keeps, named as in summary.json and requests.jsonl.
METRICS: tuple[str, ...] = tuple(m.field for m in LATENCIES)
_LIST_METRICS = frozenset(m.field for m in LATENCIES if m.per_token)


class LatencyHistogram:
    """One latency distribution in milliseconds (stored as integer microseconds).

    The HdrHistogram behind it (a 188 KB counts array, ~0.1 ms to build) is created on the first
    value recorded or merged, not with the object: the load generator makes many sets that
    stay empty (metrics a closed loop never fills, empty shipped encodings) and must not pay for
    them inside its event loop. ``reset`` empties one in place for reuse, cheaper again.
    """

    __slots__ = ("_hdr", "out_of_range", "_sum_us", "_min_us", "_max_us", "_view")

    def __init__(self) -> None:
        self._hdr: HdrHistogram | None = None  # created by the first value (``_h``)
        self._view = None  # (the HdrHistogram, a numpy view of its counts) for record_many
        self.out_of_range = 0
        self._sum_us = 0
        self._min_us: int | None = None
        self._max_us: int | None = None

    @property
    def _h(self) -> HdrHistogram:
        """The HdrHistogram, created (empty) on first use."""
        h = self._hdr
        if h is None:
            h = self._hdr = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        return h

    @property
    def count(self) -> int:
        """Number of values recorded (clamped values included, NaN excluded)."""
        h = self._hdr
        return 0 if h is None else h.get_total_count()

    def reset(self) -> None:
        """Empty this histogram in place, keeping its counts array for reuse (a few us, against
        ~0.1 ms for a new one). Afterwards it reports, encodes and records exactly as a new one."""
        h = self._hdr
        if h is not None:
            arr = self._counts_view()
            if arr is None:   # not a full-size array: let the next value rebuild it
                self._hdr = self._view = None
            else:
                n = _used_len(h, arr)   # only the used part (ms values leave most of it untouched)
                ctypes.memset(h.counts, 0, n * arr.itemsize)
                # the values HdrHistogram.__init__ starts with
                h.total_count = 0
                h.min_value = sys.maxsize
                h.max_value = 0
                h.start_time_stamp_msec = 0
                h.end_time_stamp_msec = 0
        self.out_of_range = 0
        self._sum_us = 0
        self._min_us = None
        self._max_us = None

    def _counts_view(self):
        """A numpy view of the HdrHistogram's counts (kept), or None when there is none or it is
        shorter than the layout's (possible for a decoded histogram in some hdrh versions)."""
        h = self._hdr
        if h is None:
            return None
        view = self._view
        if view is None or view[0] is not h:
            view = self._view = (h, np.ctypeslib.as_array(h.counts))
        return view[1] if view[1].size >= h.counts_len else None

    def record(self, ms: float) -> None:
        """Record one duration in milliseconds."""
        us = ms * 1000.0
        if not 0.0 <= us <= HIGHEST_US:
            if math.isnan(us):
                self.out_of_range += 1
                return
            self.out_of_range += 1
            us = 0.0 if us < 0.0 else HIGHEST_US
        v = int(us + 0.5)
        if v > HIGHEST_US:
            v = HIGHEST_US
        h = self._hdr
        if h is None:
            h = self._h
        h.record_value(v)
        self._sum_us += v
        if self._min_us is None or v < self._min_us:
            self._min_us = v
        if self._max_us is None or v > self._max_us:
            self._max_us = v

    def record_many(self, values: Iterable[float]) -> None:
        """Record several durations in milliseconds (e.g. a request's ITL list).

        Same result as ``record`` on each value, computed for the whole list at once: the load
        generator records every token's ITL and ICL, each into three sets per request, and one
        ``HdrHistogram.record_value`` call per value was its largest CPU cost per token. The
        bucket counts of the last list are kept (``_prepared``): the same values recorded into
        the next histogram -- the same list into another set, or ICL equal to ITL -- reuse them.
        """
        if not isinstance(values, (list, tuple)):
            values = list(values)
        if len(values) < 16:
            for ms in values:
                self.record(ms)
            return
        p = _prepared(values, _LAYOUT)
        if not p.count:
            self.out_of_range += p.bad
            return
        h = self._h
        arr = self._counts_view()
        if arr is None or _layout(h) != _LAYOUT:   # e.g. a decoded histogram with a short array
            for ms in values:
                self.record(ms)
            return
        self.out_of_range += p.bad
        arr[p.index] += p.counts if arr.dtype == p.counts.dtype else p.counts.astype(arr.dtype)
        h.total_count += p.count
        if p.lo < h.min_value:
            h.min_value = p.lo
        if p.hi > h.max_value:
            h.max_value = p.hi
        self._sum_us += p.sum
        if self._min_us is None or p.lo < self._min_us:
            self._min_us = p.lo
        if self._max_us is None or p.hi > self._max_us:
            self._max_us = p.hi

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s samples into this histogram (exact: same buckets)."""
        if other.count:
            h, oh = self._h, other._hdr
            mine, theirs = self._counts_view(), other._counts_view()
            if (mine is not None and theirs is not None and mine.size == theirs.size
                    and mine.dtype == theirs.dtype and h.counts_len == oh.counts_len
                    and h.bucket_count == oh.bucket_count and h.sub_bucket_count == oh.sub_bucket_count
                    and h.unit_magnitude == oh.unit_magnitude and h.word_size == oh.word_size):
                # What HdrHistogram.add does for equal layouts, in the same order, with the
                # counts added by numpy (~4 us) instead of its ctypes helper and its Python
                # bookkeeping (~30 us): the local runner merges ~21 of these every window.
                n = _used_len(oh, theirs)
                mine[:n] += theirs[:n]
                h.total_count += oh.get_total_count()
                h.max_value = max(h.max_value, oh.get_max_value())
                h.min_value = min(h.get_min_value(), oh.get_min_value())
                h.start_time_stamp_msec = min(h.start_time_stamp_msec, oh.start_time_stamp_msec)
                h.end_time_stamp_msec = max(h.end_time_stamp_msec, oh.end_time_stamp_msec)
            else:
                h.add(oh)
            self._sum_us += other._sum_us
            if self._min_us is None or (other._min_us is not None and other._min_us < self._min_us):
                self._min_us = other._min_us
            if self._max_us is None or (other._max_us is not None and other._max_us > self._max_us):
                self._max_us = other._max_us
        self.out_of_range += other.out_of_range

    def encode(self) -> str:
        """Compact text form for shipping worker -> master (see ``decode``)."""
        if not self.count:
            return f"0,{self.out_of_range}"
        hdr = self._h.encode().decode("ascii")
        return f"1,{self.out_of_range},{self._sum_us},{self._min_us},{self._max_us},{hdr}"

    @classmethod
    def decode(cls, text: str) -> LatencyHistogram:
        """Rebuild a histogram from ``encode()`` output."""
        parts = text.split(",", 5)
        if parts[0] == "0":
            hist = cls()
        elif parts[0] == "1":
            # Not cls(): its empty HdrHistogram (a 188 KB counts array) would be replaced at once,
            # and a load generator decodes 21 of these every few seconds inside its event loop.
            hist = cls.__new__(cls)
            hist._view = None
            hist._sum_us = int(parts[2])
            hist._min_us = int(parts[3])
            hist._max_us = int(parts[4])
            hist._hdr = HdrHistogram.decode(parts[5].encode("ascii"))
        else:
            raise ValueError(f"unknown histogram encoding {parts[0]!r}")
        hist.out_of_range = int(parts[1])
        return hist

    def percentile(self, p: float) -> float | None:
        """The p-th percentile in ms (definition in the module docstring); None when empty."""
        if not self.count:
            return None
        q = min(p, 100.0)   # as hdrh's get_value_at_percentile
        values = _percentile_values(self._h, self._counts_view(), [q])
        return self._clamp(values[q] if values is not None
                           else self._h.get_value_at_percentile(p)) / 1000.0

    def summary(self) -> dict[str, float | int | None]:
        """``{mean, p50, p90, p95, p99, p99_9, min, max, count}`` in ms; values None when empty."""
        n = self.count
        if not n:
            out: dict[str, float | int | None] = {"mean": None}
            out.update({k: None for k in PERCENTILES})
            out.update({"min": None, "max": None, "count": 0})
            return out
        values = (_percentile_values(self._h, self._counts_view(), _PERCENTILE_LIST)
                  or self._h.get_percentile_to_value_dict(_PERCENTILE_LIST))
        out = {"mean": self._sum_us / n / 1000.0}
        for key, p in PERCENTILES.items():
            out[key] = self._clamp(values[p]) / 1000.0
        out["min"] = self._min_us / 1000.0  # type: ignore[operator]
        out["max"] = self._max_us / 1000.0  # type: ignore[operator]
        out["count"] = n
        return out

    def _clamp(self, us: int) -> int:
        # HDR reports a bucket's upper edge; never report beyond the exact extremes.
        if self._max_us is not None and us > self._max_us:
            return self._max_us
        if self._min_us is not None and us < self._min_us:
            return self._min_us
        return us


def _layout(h: HdrHistogram) -> tuple:
    return (h.unit_magnitude, h.sub_bucket_half_count_magnitude, h.sub_bucket_mask,
            h.sub_bucket_half_count)


#: The bucket layout every LatencyHistogram has (what ``_prepared`` needs to index values).
_LAYOUT = _layout(HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS))
_PERCENTILE_LIST = list(PERCENTILES.values())


def _percentile_values(h: HdrHistogram, counts, percentiles: list[float]) -> dict[float, int] | None:
    """What ``h.get_percentile_to_value_dict(percentiles)`` returns, computed with numpy; None
    when it cannot be (no numpy view ``counts`` of ``h.counts``, or counts that never reach a
    target): the caller then asks hdrh itself.

    hdrh walks the counts array in Python (0.6-1.7 ms per histogram: a window's summaries cost
    the load generator's event loop ~4 ms). Here the running total is one ``cumsum``, and each
    percentile's index the first whose running total reaches hdrh's own target count
    (``searchsorted``), turned into a value by hdrh's own methods.
    """
    if counts is None:
        return None
    result: dict[float, int] = {}
    cum = None
    for p in sorted(set(percentiles)):
        if p > 100:   # as hdrh: no value for it
            break
        target = h.get_target_count_at_percentile(p)
        if cum is None:
            cum = np.cumsum(counts[:_used_len(h, counts)], dtype=np.uint64)
        i = int(cum.searchsorted(np.uint64(target), side="left"))
        if i >= cum.size:
            return None
        v = h.get_value_from_index(i)
        result[p] = h.get_highest_equivalent_value(v) if p else h.get_lowest_equivalent_value(v)
    return result


def _used_len(h: HdrHistogram, counts) -> int:
    """How many leading entries of ``counts`` (a numpy view of ``h.counts``) hold every count:
    up to the index of ``h.max_value``, as ``HdrHistogram.encode`` ships them; the whole array
    when those do not add up to ``h.total_count``."""
    if not h.total_count:
        return 0 if not counts.any() else counts.size
    n = h.get_counts_array_index(h.max_value) + 1
    if n > counts.size or int(counts[:n].sum()) != h.total_count:
        return counts.size
    return n


class _Prepared:
    """A list of ms values as HDR bucket counts: distinct counts indices and how many of each."""

    __slots__ = ("key", "layout", "index", "counts", "count", "lo", "hi", "sum", "bad")


_last: list[_Prepared | None] = [None]


def _prepared(values: list | tuple, layout: tuple) -> _Prepared:
    """The bucket counts of ``values`` for histograms laid out as ``layout`` (the last one is kept).

    Per value this is what ``record`` does -- clamp, round to microseconds, and
    ``HdrHistogram._counts_index_for`` with ``int.bit_length`` for its leading-zero count -- in
    one Python loop (a numpy pipeline was tried: its per-call overheads, with the caches cold
    between requests, cost more than this loop for a request's few hundred values); adding the
    counts into each histogram is one numpy fancy-index add (a ctypes item loop cost ~10x more).
    """
    key = tuple(values)
    last = _last[0]
    if last is not None and last.key == key and last.layout == layout:
        return last
    unit, half_mag, mask, half = layout
    off = unit + half_mag + 1
    counts: dict[int, int] = {}
    get = counts.get
    bad = count = total = 0
    lo, hi = HIGHEST_US + 1, -1
    for ms in key:
        us = ms * 1000.0
        if not 0.0 <= us <= HIGHEST_US:
            bad += 1
            if us != us:   # NaN: dropped
                continue
            us = 0.0 if us < 0.0 else float(HIGHEST_US)
        v = int(us + 0.5)
        if v > HIGHEST_US:
            v = HIGHEST_US
        bucket = (v | mask).bit_length() - off
        index = ((bucket + 1) << half_mag) + (v >> (bucket + unit)) - half
        counts[index] = get(index, 0) + 1
        count += 1
        total += v
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    p = _Prepared()
    p.key, p.layout, p.count, p.lo, p.hi, p.sum, p.bad = key, layout, count, lo, hi, total, bad
    p.index = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
    p.counts = np.fromiter(counts.values(), dtype=np.uint64, count=len(counts))
    _last[0] = p
    return p


class HistogramSet:
    """One ``LatencyHistogram`` per metric (``METRICS``), fed from request records.

    Only successful requests contribute: a failed request's latencies do not exist (README,
    "Metric definitions"), and a fast failure must not make the latency percentiles look better.
    """

    __slots__ = ("hists",)

    def __init__(self, metrics: Iterable[str] = METRICS) -> None:
        self.hists: dict[str, LatencyHistogram] = {m: LatencyHistogram() for m in metrics}

    def __getitem__(self, metric: str) -> LatencyHistogram:
        return self.hists[metric]

    def add_record(self, rec: Any) -> None:
        """Add one request: a ``RequestRecord`` or a ``requests.jsonl`` dict."""
        get = rec.get if isinstance(rec, Mapping) else (lambda k, _r=rec: getattr(_r, k, None))
        if not get("ok"):
            return
        for name, hist in self.hists.items():
            value = get(name)
            if value is None:
                continue
            if name in _LIST_METRICS:
                hist.record_many(value)
            else:
                hist.record(value)

    def reset(self) -> None:
        """Empty every histogram in place (see ``LatencyHistogram.reset``)."""
        for hist in self.hists.values():
            hist.reset()

    def merge(self, other: HistogramSet) -> None:
        """Add another set's samples (e.g. a worker's report) metric by metric."""
        for name, hist in other.hists.items():
            mine = self.hists.get(name)
            if mine is None:
                mine = self.hists[name] = LatencyHistogram()
            mine.merge(hist)

    def encode(self) -> str:
        """One JSON string carrying every metric's encoded histogram."""
        return orjson.dumps({name: h.encode() for name, h in self.hists.items()}).decode("ascii")

    @classmethod
    def decode(cls, text: str | bytes) -> HistogramSet:
        """Rebuild a set from ``encode()`` output."""
        data = orjson.loads(text)
        hs = cls(metrics=())
        hs.hists = {name: LatencyHistogram.decode(enc) for name, enc in data.items()}
        return hs

    def summary(self, metric: str | None = None) -> dict[str, Any]:
        """One metric's summary, or ``{metric: summary}`` for all of them when none is named."""
        if metric is not None:
            hist = self.hists.get(metric)
            return (hist or LatencyHistogram()).summary()
        return {name: h.summary() for name, h in self.hists.items()}
