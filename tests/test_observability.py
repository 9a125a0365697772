"""Unit tests of the live-observability pieces: the exporter's histogram buckets built from
HDR data, the server `/metrics` parser, the rate control's validation and the charts'
timeline. The real browser and the real Prometheus are in test_webui_browser.py and
test_prometheus.py."""
from __future__ import annotations

import math
import random
import socket
import time

import pytest

from harness.exporter import E2E_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS, histogram_buckets
from harness.histograms import LatencyHistogram
from harness.server_metrics import combine, parse_server_metrics, scrape
from harness.webui import Timeline, parse_rate

VLLM_V1 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 5.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 4.0
vllm:num_preemptions_created{engine="0",model_name="m"} 1.7e9
vllm:num_preemptions_total{engine="1",model_name="m"} 1.0
"""

VLLM_V0 = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.125
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{model_name="m"} 2.0
"""


def test_server_metrics_v1_engines_add_up_and_kv_is_the_highest():
    assert parse_server_metrics(VLLM_V1) == {"num_requests_running": 7.0, "num_requests_waiting": 3.0,
                                             "kv_cache_usage_perc": 0.5, "num_preemptions_total": 5.0}


def test_server_metrics_older_vllm_names():
    assert parse_server_metrics(VLLM_V0) == {"num_requests_running": 1.0, "num_requests_waiting": 0.0,
                                             "kv_cache_usage_perc": 0.125, "num_preemptions_total": 2.0}


def test_server_metrics_absent_values_are_none():
    assert parse_server_metrics("# nothing\n") == dict.fromkeys(
        ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total"))


def test_scrape_of_a_closed_port_records_the_error_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed again when the block ends
    t0 = time.monotonic()
    r = scrape(f"http://127.0.0.1:{port}/metrics", timeout=1.0)
    assert time.monotonic() - t0 < 2.0
    assert r["error"] and r["num_requests_running"] is None


def test_combine_several_servers():
    a = {"num_requests_running": 2.0, "num_requests_waiting": 1.0, "kv_cache_usage_perc": 0.3,
         "num_preemptions_total": 0.0, "error": None, "scrape_ms": 1.0}
    b = dict.fromkeys(a, None) | {"error": "ConnectionRefusedError", "scrape_ms": 0.5}
    c = dict(a, kv_cache_usage_perc=0.6, num_requests_running=1.0)
    out = combine({"http://a/metrics": a, "http://b/metrics": b, "http://c/metrics": c})
    assert out["num_requests_running"] == 3.0 and out["kv_cache_usage_perc"] == 0.6
    assert out["servers"] == 3 and "http://b/metrics" in out["error"]


@pytest.mark.parametrize("bounds,scale_ms", [(TTFT_BUCKETS, 300.0), (TOKEN_BUCKETS, 20.0),
                                              (E2E_BUCKETS, 5000.0)])
def test_histogram_buckets_are_cumulative_and_agree_with_the_samples(bounds, scale_ms):
    rng = random.Random(7)
    values = [rng.lognormvariate(math.log(scale_ms), 1.0) for _ in range(5000)] + [0.0, 3_600_000.0]
    h = LatencyHistogram()
    h.record_many(values)
    buckets, total = histogram_buckets(h, bounds)
    assert [b[0] for b in buckets] == [repr(b) for b in bounds] + ["+Inf"]
    counts = [c for _le, c in buckets]
    assert counts == sorted(counts) and counts[-1] == len(values) == h.count
    assert math.isclose(total, sum(round(v * 1000) for v in values) / 1e6, rel_tol=1e-12)
    for (le, c), bound in zip(buckets, bounds):
        below = sum(1 for v in values if v / 1000.0 <= bound * 0.999)
        at_most = sum(1 for v in values if v / 1000.0 <= bound * 1.001)
        assert below <= c <= at_most, (le, c, below, at_most)


def test_histogram_buckets_of_an_empty_histogram():
    buckets, total = histogram_buckets(LatencyHistogram(), TTFT_BUCKETS)
    assert all(c == 0 for _le, c in buckets) and total == 0.0


@pytest.mark.parametrize("bad", [None, "", "abc", "-1", "nan", "inf", -0.5])
def test_rate_control_refuses_bad_values(bad):
    with pytest.raises((TypeError, ValueError)):
        parse_rate(bad)


def test_rate_control_accepts_zero_and_numbers():
    assert parse_rate("0") == 0.0 and parse_rate("2.5") == 2.5 and parse_rate(7) == 7.0


def test_timeline_keeps_frozen_copies_and_filters_by_time():
    tl = Timeline(maxlen=3)
    line = {"t": 1.0, "ttft_ms": {"p50": 5.0}}
    tl(line)
    line["ttft_ms"]["p50"] = 99.0      # the writer's dict changing later does not leak in
    for t in (2.0, 3.0, 4.0):
        tl({"t": t})
    assert [ln["t"] for ln in tl.since(0)] == [2.0, 3.0, 4.0]   # bounded
    assert [ln["t"] for ln in tl.since(2.5)] == [3.0, 4.0]


TRICKY = """\
# HELP vllm:num_requests_running a help text with vllm:num_requests_waiting 99 in it
vllm:num_requests_running{model_name="a b",note="has } and \\" and {"} 4 1700000000000
vllm:num_requests_running 2.5
vllm:num_requests_running_other{model_name="m"} 100
vllm:num_requests_waiting{model_name="m"}\t+Inf
vllm:kv_cache_usage_perc{model_name="m"} NaN
vllm:kv_cache_usage_perc{model_name="n"} 0.75
vllm:num_preemptions_total{model_name="m"} 1e3
vllm:num_preemptions_created{model_name="m"} 1.7e9
"""


@pytest.mark.parametrize("text", [VLLM_V1, VLLM_V0, TRICKY], ids=["v1", "v0", "tricky"])
def test_server_metrics_line_reader_agrees_with_prometheus_clients_parser(text):
    from prometheus_client.parser import text_string_to_metric_families

    from harness.server_metrics import _samples

    full: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            full.setdefault(s.name, []).append(float(s.value))
    mine = _samples(text)
    names = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "vllm:gpu_cache_usage_perc", "vllm:num_preemptions_total", "vllm:num_preemptions"}
    assert set(mine) == {n for n in full if n in names}
    for name, values in mine.items():
        assert [repr(v) for v in values] == [repr(v) for v in full[name]], name


def test_scraper_keeps_one_connection_per_server_between_windows(start_sim):
    from types import SimpleNamespace

    from harness.server_metrics import ServerScraper

    url, _ = start_sim()
    env = SimpleNamespace(parsed_options=SimpleNamespace(llm_server_metrics="auto"), host=url,
                          user_classes=[])
    scraper = ServerScraper(env)
    lines = [{}, {}, {}]
    for line in lines:
        scraper(line)
    assert all(line["server"]["error"] is None for line in lines), lines
    assert all(line["server"]["num_requests_running"] == 0.0 for line in lines), lines
    (conn,) = scraper._conns.values()
    assert conn.connects == 1
    conn.close()
