"""The cheap window cycle's histogram pieces report exactly what the plain HdrHistogram paths do:
a lazily-created histogram vs one built eagerly, `reset` vs a new histogram, the numpy merge vs
`HdrHistogram.add`, the numpy percentiles vs `get_percentile_to_value_dict` /
`get_value_at_percentile`."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from harness.histograms import (
    HIGHEST_US,
    HistogramSet,
    LatencyHistogram,
    _percentile_values,
    _used_len,
)
from harness.metric_catalog import PERCENTILES
from harness.timing import RequestRecord

PLIST = list(PERCENTILES.values())


def _values(seed: int, n: int = 3000) -> list[float]:
    rng = random.Random(seed)
    vals = [rng.lognormvariate(2.0, 0.6) for _ in range(n)]          # token gaps, ms
    vals += [rng.lognormvariate(7.0, 0.8) for _ in range(n // 10)]  # e2e-like, ms
    vals += [0.0, 0.0004, 1.0, 2.048, HIGHEST_US / 1000, -3.0, float("nan"), 5e9]
    rng.shuffle(vals)
    return vals


def _fill(h: LatencyHistogram, values: list[float], many: bool) -> LatencyHistogram:
    if many:
        for i in range(0, len(values), 128):
            h.record_many(values[i:i + 128])
    else:
        for v in values:
            h.record(v)
    return h


def _eager() -> LatencyHistogram:
    h = LatencyHistogram()
    _ = h._h   # builds the HdrHistogram now, as the constructor did before
    assert h._hdr is not None
    return h


def _state(h: LatencyHistogram) -> tuple:
    """Everything observable about a histogram, internal HDR state included."""
    hdr = h._hdr
    inner = None if hdr is None else (list(hdr.counts), hdr.total_count, hdr.min_value,
                                      hdr.max_value, hdr.start_time_stamp_msec,
                                      hdr.end_time_stamp_msec)
    return (h.count, h.out_of_range, h._sum_us, h._min_us, h._max_us, h.summary(), h.encode(),
            inner)


def _same(a: LatencyHistogram, b: LatencyHistogram) -> None:
    assert _state(a) == _state(b)
    for p in (0.0, 1.0, 25.0, 50.0, 99.99, 100.0, 150.0, -5.0):
        assert a.percentile(p) == b.percentile(p)


@pytest.mark.parametrize("many", [False, True])
def test_lazy_histogram_reports_like_an_eager_one(many):
    lazy = LatencyHistogram()
    assert lazy._hdr is None and lazy.count == 0
    _fill(lazy, _values(1), many)
    _same(lazy, _fill(_eager(), _values(1), many))


def test_empty_lazy_histogram_is_an_empty_histogram_and_stays_unbuilt():
    lazy, eager = LatencyHistogram(), _eager()
    for h in (lazy, eager):
        h.record(float("nan"))                      # dropped: counted, nothing recorded
        h.record_many([float("nan")] * 20)
        h.merge(LatencyHistogram())
    assert lazy._hdr is None
    assert lazy.out_of_range == eager.out_of_range == 21
    assert lazy.summary() == eager.summary() and lazy.summary()["p50"] is None
    assert lazy.encode() == eager.encode() == "0,21"
    assert lazy.percentile(50) is None
    back = LatencyHistogram.decode(lazy.encode())
    assert back._hdr is None and back.out_of_range == 21
    s = HistogramSet()
    assert all(h._hdr is None for h in s.hists.values())
    assert s.summary() == {m: LatencyHistogram().summary() for m in s.hists}
    assert s.summary("no_such_metric")["count"] == 0
    # what harness.exporter reads (`hist._h`) still works on an empty one
    assert lazy._h.get_total_count() == 0


def test_merge_into_a_lazy_histogram_equals_merge_into_an_eager_one():
    src = _fill(LatencyHistogram(), _values(2), True)
    lazy, eager = LatencyHistogram(), _eager()
    lazy.merge(src)
    eager.merge(src)
    _same(lazy, eager)
    # the merged one reports what its source does (its HDR's own min/max are bucket edges, as
    # after HdrHistogram.add)
    assert lazy.summary() == src.summary() and list(lazy._h.counts) == list(src._h.counts)


def _hdrh_merge(a: LatencyHistogram, b: LatencyHistogram) -> None:
    """The merge as it was: HdrHistogram.add."""
    if b.count:
        a._h.add(b._h)
        a._sum_us += b._sum_us
        if a._min_us is None or (b._min_us is not None and b._min_us < a._min_us):
            a._min_us = b._min_us
        if a._max_us is None or (b._max_us is not None and b._max_us > a._max_us):
            a._max_us = b._max_us
    a.out_of_range += b.out_of_range


def test_numpy_merge_equals_hdrhistogram_add():
    parts = [_values(s, n) for s, n in ((3, 2000), (4, 10), (5, 500), (6, 1))]
    parts.append([0.0] * 5)                        # counts[0] > 0 changes get_min_value
    parts.append([HIGHEST_US / 1000] * 3)
    ours, ref = LatencyHistogram(), _eager()
    for i, vals in enumerate(parts):
        src = _fill(LatencyHistogram(), vals, bool(i % 2))
        ours.merge(src)
        _hdrh_merge(ref, src)
        _same(ours, ref)
        # a decoded (shipped) histogram merges the same way
        dec = LatencyHistogram.decode(src.encode())
        ours.merge(dec)
        _hdrh_merge(ref, LatencyHistogram.decode(src.encode()))
        _same(ours, ref)


def test_reset_histogram_is_a_new_histogram():
    h = _fill(LatencyHistogram(), _values(7), True)
    h.reset()
    assert h._hdr is not None                       # its counts array is kept for reuse
    _same(h, _eager())
    for many in (False, True):
        _fill(h, _values(8, 500), many)
        _same(h, _fill(LatencyHistogram(), _values(8, 500), many))
        h.reset()
    lazy = LatencyHistogram()
    lazy.out_of_range = 3
    lazy.reset()
    assert lazy._hdr is None and lazy.out_of_range == 0
    # a reset decoded histogram, refilled, encodes as a new one does
    d = LatencyHistogram.decode(_fill(LatencyHistogram(), _values(9, 300), False).encode())
    d.reset()
    _fill(d, _values(10, 300), True)
    _same(d, _fill(LatencyHistogram(), _values(10, 300), True))


@pytest.mark.parametrize("seed", range(12))
def test_numpy_percentiles_equal_hdrhistogram_s(seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, 7, 100, 1001, 20000])
    shape = rng.choice(["lognormal", "uniform", "constant", "spread"])
    if shape == "lognormal":
        vals = [rng.lognormvariate(rng.uniform(-2, 9), rng.uniform(0.1, 2)) for _ in range(n)]
    elif shape == "uniform":
        vals = [rng.uniform(0, 100) for _ in range(n)]
    elif shape == "constant":
        vals = [rng.uniform(0, 5000)] * n
    else:
        vals = [10 ** rng.uniform(-3, 6.5) for _ in range(n)]
    h = _fill(LatencyHistogram(), vals, n >= 16)
    hdr = h._h
    plist = PLIST + [0.0, 0.1, 1.0, 33.3, 99.99, 99.999, 100.0]
    assert _percentile_values(hdr, h._counts_view(), plist) == hdr.get_percentile_to_value_dict(plist)
    assert _percentile_values(hdr, h._counts_view(), [150.0, 50.0]) == \
        hdr.get_percentile_to_value_dict([150.0, 50.0])
    for p in plist + [150.0, -1.0]:
        assert h.percentile(p) == h._clamp(hdr.get_value_at_percentile(p)) / 1000.0
    ref = {"mean": h._sum_us / h.count / 1000.0}
    values = hdr.get_percentile_to_value_dict(PLIST)
    ref.update({k: h._clamp(values[p]) / 1000.0 for k, p in PERCENTILES.items()})
    ref.update({"min": h._min_us / 1000.0, "max": h._max_us / 1000.0, "count": h.count})
    assert h.summary() == ref


def test_percentiles_fall_back_to_hdrh_without_a_numpy_view():
    h = _fill(LatencyHistogram(), _values(11, 200), False)
    assert _percentile_values(h._h, None, PLIST) is None
    view = h._counts_view()
    short = view[:10]                               # counts that never reach the targets
    assert _percentile_values(h._h, short, PLIST) is None


def _rec(i: int, rng: random.Random) -> RequestRecord:
    itl = [rng.lognormvariate(2.0, 0.3) for _ in range(rng.randint(1, 200))]
    ok = rng.random() > 0.05
    return RequestRecord(id=str(i), user_class="U", url="u", model="m", scheduled_at=None,
                         sent_at=1.0 + i, ok=ok, status=200 if ok else 500,
                         error_kind=None if ok else "http_500", input_tokens=10,
                         output_tokens=len(itl) + 1, tokens_estimated=False,
                         ttft_ms=rng.lognormvariate(3, 0.5), tpot_ms=sum(itl) / len(itl),
                         e2e_ms=sum(itl) + 20, itl_ms=itl, icl_ms=itl,
                         schedule_lag_ms=rng.choice([None, rng.uniform(0, 2)]),
                         ttft_from_schedule_ms=None)


def test_sets_reset_and_merged_directly_equal_sets_shipped_encoded():
    """Per window: encode/decode/merge into a total plus new sets (the distributed path) vs a
    direct merge plus the same sets reset in place (the local path)."""
    rng = random.Random(12)
    recs = [_rec(i, rng) for i in range(600)]
    whole, shipped, direct = HistogramSet(), HistogramSet(), HistogramSet()
    reused = HistogramSet()
    for w in range(0, len(recs), 97):
        fresh = HistogramSet()
        for r in recs[w:w + 97]:
            whole.add_record(r)
            fresh.add_record(r)
            reused.add_record(r)
        shipped.merge(HistogramSet.decode(fresh.encode()))
        direct.merge(reused)
        assert reused.encode() == fresh.encode()
        reused.reset()
    for m in whole.hists:
        assert direct[m].summary() == shipped[m].summary() == whole[m].summary(), m
        assert direct.encode() == shipped.encode()
        assert list(direct[m]._h.counts) == list(shipped[m]._h.counts) == list(whole[m]._h.counts)
    assert not math.isnan(direct["itl_ms"].summary()["p99"])
    assert np.all(reused["itl_ms"]._counts_view() == 0)


def test_used_part_of_the_counts_falls_back_to_the_whole_array_when_it_does_not_add_up():
    h = _fill(LatencyHistogram(), _values(13, 400), True)
    view = h._counts_view()
    n = _used_len(h._h, view)
    assert 0 < n < view.size and int(view[:n].sum()) == h.count
    assert int(view[n:].sum()) == 0
    ref = _fill(LatencyHistogram(), _values(13, 400), True)
    h._h.max_value = 1        # a wrong (too low) max: merge, reset and percentiles stay exact
    assert _used_len(h._h, view) == view.size
    assert h.summary() == ref.summary()
    total = LatencyHistogram()
    total.merge(h)
    assert list(total._h.counts) == list(ref._h.counts)
    h.reset()
    assert not view.any()
    assert _used_len(LatencyHistogram()._h, view) == 0   # empty: nothing is used
