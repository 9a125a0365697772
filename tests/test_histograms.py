"""Specification of harness.histograms: HDR percentiles checked against numpy on raw samples."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from harness.histograms import METRICS, HistogramSet, LatencyHistogram
from harness.metric_catalog import PERCENTILES
from harness.timing import RequestRecord

REL = 2 ** -10  # 3 significant digits: HDR buckets are at most 1/1024 of the value wide


def hist_of(values) -> LatencyHistogram:
    h = LatencyHistogram()
    h.record_many(values)
    return h


def nearest_rank(samples: np.ndarray, p: float) -> float:
    s = np.sort(samples)
    return float(s[max(1, math.floor(p / 100 * len(s) + 0.5)) - 1])


def lognormal_ms(n: int, seed: int) -> np.ndarray:
    """TTFT-like samples: log-normal around 50 ms, rounded to the microsecond."""
    rng = np.random.default_rng(seed)
    return np.round(rng.lognormal(mean=math.log(50), sigma=1.0, size=n), 3)


def test_percentiles_lie_between_numpy_lower_and_higher_within_hdr_precision():
    samples = lognormal_ms(20_000, 1)
    s = hist_of(samples.tolist()).summary()
    for key, p in PERCENTILES.items():
        lo = np.percentile(samples, p, method="lower")
        hi = np.percentile(samples, p, method="higher")
        assert lo * (1 - 1e-9) <= s[key] <= hi * (1 + REL), key


def test_percentiles_are_the_nearest_rank_sample_to_three_significant_digits():
    samples = lognormal_ms(5_001, 2)
    s = hist_of(samples.tolist()).summary()
    for key, p in PERCENTILES.items():
        exact = nearest_rank(samples, p)
        assert exact <= s[key] <= exact * (1 + REL) + 0.001, key


def test_values_below_2048_us_are_stored_exactly_so_percentiles_equal_the_samples():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 10, 99, 1000):
        samples = rng.integers(0, 2048, n) / 1000.0  # 0 .. 2.047 ms in whole microseconds
        s = hist_of(samples.tolist()).summary()
        for key, p in PERCENTILES.items():
            assert s[key] == nearest_rank(samples, p), (n, key)


def test_mean_min_max_and_count_are_exact():
    samples = lognormal_ms(3_000, 4)
    s = hist_of(samples.tolist()).summary()
    assert s["count"] == 3_000
    assert s["mean"] == pytest.approx(samples.mean(), abs=1e-9)
    assert (s["min"], s["max"]) == (samples.min(), samples.max())


def test_summary_of_an_empty_histogram_has_null_values_and_zero_count():
    s = LatencyHistogram().summary()
    assert s == {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None,
                 "p99_9": None, "min": None, "max": None, "count": 0}


def test_summary_keys_are_the_contract_keys():
    assert list(hist_of([1.0]).summary()) == ["mean", "p50", "p90", "p95", "p99", "p99_9",
                                              "min", "max", "count"]


def test_out_of_range_values_are_clamped_and_counted_not_raised():
    h = hist_of([-5.0, 5_000_000.0, float("inf"), float("nan"), 10.0])
    assert h.out_of_range == 4
    s = h.summary()
    assert s["count"] == 4  # NaN is dropped; the others are clamped
    assert (s["min"], s["max"]) == (0.0, 3_600_000.0)


def test_zero_duration_is_a_valid_sample():
    h = hist_of([0.0, 0.0, 20.0])
    assert h.out_of_range == 0
    assert (h.summary()["min"], h.summary()["p50"]) == (0.0, 0.0)


def test_merged_histograms_equal_one_histogram_of_all_samples():
    a, b = lognormal_ms(4_000, 5), lognormal_ms(3_000, 6)
    merged = hist_of(a.tolist())
    merged.merge(hist_of(b.tolist()))
    assert merged.summary() == hist_of(np.concatenate([a, b]).tolist()).summary()


def test_merging_into_an_empty_histogram_and_merging_an_empty_one_are_harmless():
    full = hist_of([1.5, 2.5, 30.0])
    empty = LatencyHistogram()
    empty.merge(full)
    full.merge(LatencyHistogram())
    assert empty.summary() == full.summary() == hist_of([1.5, 2.5, 30.0]).summary()


def test_encode_decode_round_trip_keeps_the_summary():
    h = hist_of(lognormal_ms(2_000, 7).tolist() + [-1.0])
    text = h.encode()
    assert isinstance(text, str)
    back = LatencyHistogram.decode(text)
    assert back.summary() == h.summary()
    assert back.out_of_range == 1


def test_empty_histogram_round_trips():
    back = LatencyHistogram.decode(LatencyHistogram().encode())
    assert back.count == 0 and back.summary()["p50"] is None


def test_decoded_worker_histograms_merge_exactly():
    parts = [lognormal_ms(1_000, s) for s in (8, 9, 10)]
    master = LatencyHistogram()
    for p in parts:
        master.merge(LatencyHistogram.decode(hist_of(p.tolist()).encode()))
    assert master.summary() == hist_of(np.concatenate(parts).tolist()).summary()


# -- HistogramSet ------------------------------------------------------------------------------


def record(ok: bool = True, **kw) -> RequestRecord:
    base = dict(id="r", user_class="U", url="u", model="m", scheduled_at=None, sent_at=1.0,
                ok=ok, status=200 if ok else 500, error_kind=None if ok else "http_500",
                input_tokens=10, output_tokens=4, tokens_estimated=False, ttft_ms=100.0,
                tpot_ms=20.0, e2e_ms=160.0, itl_ms=[20.0, 20.0, 20.0], icl_ms=[20.0, 20.0, 20.0],
                schedule_lag_ms=0.5, ttft_from_schedule_ms=100.5)
    base.update(kw)
    return RequestRecord(**base)


def test_set_has_one_histogram_per_metric():
    assert set(HistogramSet().hists) == set(METRICS) == {
        "ttft_ms", "tpot_ms", "itl_ms", "icl_ms", "e2e_ms", "schedule_lag_ms",
        "ttft_from_schedule_ms"}


def test_successful_record_adds_scalars_once_and_itl_per_token():
    hs = HistogramSet()
    hs.add_record(record())
    assert hs["ttft_ms"].count == 1 and hs["e2e_ms"].count == 1
    assert hs["itl_ms"].count == 3 and hs["icl_ms"].count == 3
    assert hs.summary("ttft_ms")["p50"] == 100.0


def test_failed_record_contributes_nothing():
    hs = HistogramSet()
    hs.add_record(record(ok=False))
    assert all(h.count == 0 for h in hs.hists.values())


def test_null_values_are_skipped():
    hs = HistogramSet()
    hs.add_record(record(tpot_ms=None, schedule_lag_ms=None, ttft_from_schedule_ms=None))
    assert hs["tpot_ms"].count == 0 and hs["ttft_ms"].count == 1


def test_requests_jsonl_dicts_are_accepted_like_records():
    a, b = HistogramSet(), HistogramSet()
    rec = record()
    a.add_record(rec)
    b.add_record(orjson.loads(rec.to_json_line()))
    assert a.summary() == b.summary()


def test_set_encode_decode_merge_equals_one_set_of_all_records():
    recs = [record(ttft_ms=float(i), itl_ms=[i / 10, i / 5]) for i in range(1, 50)]
    whole = HistogramSet()
    w1, w2 = HistogramSet(), HistogramSet()
    for i, r in enumerate(recs):
        whole.add_record(r)
        (w1 if i % 2 else w2).add_record(r)
    master = HistogramSet()
    for w in (w1, w2):
        master.merge(HistogramSet.decode(w.encode()))
    assert master.summary() == whole.summary()


def test_summary_without_a_metric_name_covers_every_metric():
    s = HistogramSet().summary()
    assert set(s) == set(METRICS) and s["ttft_ms"]["count"] == 0
