"""`LatencyHistogram.record_many` (vectorised) gives exactly what `record` per value gives."""
from __future__ import annotations

import math
import random

from harness.histograms import HIGHEST_US, HistogramSet, LatencyHistogram


def _pair(values):
    one, many = LatencyHistogram(), LatencyHistogram()
    for v in values:
        one.record(v)
    many.record_many(values)
    return one, many


def _same(a: LatencyHistogram, b: LatencyHistogram) -> None:
    assert a.count == b.count
    assert a.out_of_range == b.out_of_range
    assert a.summary() == b.summary()
    assert list(a._h.counts) == list(b._h.counts)
    assert (a._h.min_value, a._h.max_value, a._h.total_count) == \
        (b._h.min_value, b._h.max_value, b._h.total_count)
    assert a.encode() == b.encode()


def test_record_many_matches_record_over_the_whole_range():
    rng = random.Random(7)
    values = [rng.uniform(0, 0.002) for _ in range(200)]            # below 1 us .. 2 us
    values += [rng.lognormvariate(2, 1.5) for _ in range(5000)]    # typical ITLs, ms
    values += [rng.uniform(0, HIGHEST_US / 1000) for _ in range(500)]  # up to an hour
    values += [0.0, 0.0005, 0.001, 1.0, 2.047, 2.048, 2.049, 1e3, HIGHEST_US / 1000]
    rng.shuffle(values)
    for chunk in (values[:16], values[:17], values[:1000], values):
        _same(*_pair(chunk))


def test_record_many_out_of_range_and_nan_like_record():
    values = [5.0] * 20 + [-1.0, float("nan"), HIGHEST_US / 1000 * 2, math.inf, -math.inf, 3.5]
    one, many = _pair(values)
    _same(one, many)
    assert many.out_of_range == 5


def test_record_many_small_lists_iterables_and_after_decode_and_merge():
    one, many = _pair([1.5, 2.5])
    _same(one, many)
    gen_one, gen_many = LatencyHistogram(), LatencyHistogram()
    vals = [0.1 * i for i in range(40)]
    for v in vals:
        gen_one.record(v)
    gen_many.record_many(v for v in vals)
    _same(gen_one, gen_many)
    # A decoded histogram (shipped from a worker) and a merged one keep recording correctly.
    dec = LatencyHistogram.decode(gen_many.encode())
    ref = LatencyHistogram.decode(gen_one.encode())
    more = [7.0 + 0.01 * i for i in range(50)]
    dec.record_many(more)
    for v in more:
        ref.record(v)
    _same(ref, dec)
    dec.merge(gen_many)
    ref.merge(gen_one)
    dec.record_many(more)
    for v in more:
        ref.record(v)
    _same(ref, dec)


def test_histogram_set_list_metrics_use_record_many():
    rec = {"ok": True, "ttft_ms": 12.0, "itl_ms": [10.0 + i * 0.01 for i in range(100)],
           "icl_ms": [10.0] * 100}
    hs = HistogramSet()
    hs.add_record(rec)
    assert hs["itl_ms"].count == 100 and hs["icl_ms"].count == 100
    assert hs["itl_ms"].summary()["max"] == 10.99


def test_prepared_counts_are_reused_only_for_equal_values():
    vals = [1.0 + 0.013 * i for i in range(100)]
    a, b, ref = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    a.record_many(vals)
    b.record_many(list(vals))          # equal values, another list: reused
    for v in vals:
        ref.record(v)
    _same(a, ref)
    _same(b, ref)
    vals[5] = 99.0                     # the same list object, changed: recomputed
    c, ref2 = LatencyHistogram(), LatencyHistogram()
    c.record_many(vals)
    for v in vals:
        ref2.record(v)
    _same(c, ref2)
    bad = vals + [float("nan"), -1.0]  # out-of-range counts come with the reuse too
    d, e = LatencyHistogram(), LatencyHistogram()
    d.record_many(bad)
    e.record_many(bad)
    assert d.out_of_range == e.out_of_range == 2
    _same(d, e)
