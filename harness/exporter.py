"""Prometheus `/metrics` for a load run, served by the Locust master (or local runner).

Hooked up by `harness.live` (this module does not import Locust). Two ways to reach it:

- the web UI's own server: `http://<web-host>:<web-port>/metrics` whenever the UI runs;
- a server of its own, for headless runs (`harness load --metrics-port P`, or Locust's
  `--llm-metrics-port P`), bound to 127.0.0.1 unless `--llm-metrics-host` says otherwise.
  `--llm-metrics-linger S` keeps it answering S seconds after the run, so that the last
  scrape sees the final numbers (set it to at least the scrape interval).

Everything is built at scrape time from the run's merged, exact data (the HDR histograms
and counters `harness.plugin` merges across workers), never from Locust's rounded stats:

- `llm_harness_{ttft,tpot,itl,e2e}_seconds`: histograms per `endpoint` ("/v1/chat/completions
  [model]"); buckets seconds up to minutes for TTFT/E2E, milliseconds-scale for TPOT/ITL.
  Cumulative, with `_count` = the samples of successful requests (TTFT/E2E/TPOT: one per
  request, TPOT only where a request had 2+ tokens; ITL: one per token) and an exact `_sum`.
  A sample counts in a bucket `le` when its HDR bucket's midpoint is <= le (resolution 0.1%).
- `llm_harness_{ttft,tpot,itl,e2e}_quantile_seconds{quantile}`: p50/p90/p95/p99/p99.9 of
  the whole run (measured window), exact to 3 significant digits.
- `llm_harness_{ttft,tpot,itl,e2e}_window_quantile_seconds{quantile}`: p50/p90/p99 of the
  last timeseries window (`--llm-window`), the "now" view.
- `llm_harness_requests_total{outcome="ok"|"failed"}`, `llm_harness_requests_good_total`
  (met every SLO), `llm_harness_request_errors_total{kind}`,
  `llm_harness_{input,output}_tokens_total`.
- `llm_harness_active_users`, `llm_harness_target_rate_rps` (0 = closed loop),
  `llm_harness_generator_cpu_percent{worker}` (last sample), `llm_harness_workers`
  (connected now; 1 for a local runner), `llm_harness_running` (1 while a test runs).

Counters and histograms cover the measured window: requests inside `--llm-warmup` and
`--llm-cooldown` are left out, as in `summary.json`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator

from flask import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from harness.histograms import LatencyHistogram
from harness.metric_catalog import LATENCY, PERCENTILES

log = logging.getLogger(__name__)

PREFIX = "llm_harness_"

# Bucket upper bounds in seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
               90.0, 120.0, 180.0, 300.0, 600.0, 1200.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04,
                 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)

#: exported name -> (summary metric, buckets, help)
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...], str]] = {
    m.name: (m.field, buckets, m.help)
    for m, buckets in ((LATENCY["ttft"], TTFT_BUCKETS), (LATENCY["tpot"], TOKEN_BUCKETS),
                       (LATENCY["itl"], TOKEN_BUCKETS), (LATENCY["e2e"], E2E_BUCKETS))}
#: (quantile label, summary key): every percentile of the catalog, "0.999" for p99_9.
QUANTILES = tuple((f"{p / 100:g}", key) for key, p in PERCENTILES.items())
WINDOW_QUANTILES = tuple(q for q in QUANTILES if q[1] in ("p50", "p90", "p99"))


def histogram_buckets(hist: LatencyHistogram, bounds_s: tuple[float, ...]) -> tuple[list[tuple[str, int]], float]:
    """Cumulative Prometheus buckets (seconds) and the exact sum from one HDR histogram.

    The `+Inf` bucket equals the histogram's count, so `_count` and the buckets agree.
    """
    bounds_us = [b * 1e6 for b in bounds_s]
    per = [0] * (len(bounds_us) + 1)
    h = hist._h
    if hist.count:
        for it in h.get_recorded_iterator():
            v = it.value_iterated_to
            mid = (h.get_lowest_equivalent_value(v) + h.get_highest_equivalent_value(v)) / 2.0
            i = 0
            # few bounds: a linear scan is as quick as bisect here and obviously right
            while i < len(bounds_us) and mid > bounds_us[i]:
                i += 1
            per[i] += it.count_at_value_iterated_to
    out: list[tuple[str, int]] = []
    cum = 0
    for b, c in zip(list(bounds_s) + [math.inf], per):
        cum += c
        out.append(("+Inf" if b == math.inf else repr(b), cum))
    return out, hist._sum_us / 1e6


class LLMCollector:
    """prometheus-client collector over `environment.llm_aggregate`, read at scrape time."""

    def __init__(self, environment) -> None:
        self.env = environment

    def describe(self) -> list:
        return []   # built at scrape time; nothing to check at registration

    def collect(self) -> Iterator:
        from locust.runners import STATE_RUNNING, STATE_SPAWNING, MasterRunner

        env = self.env
        agg = getattr(env, "llm_aggregate", None)
        state = getattr(env, "llm", None)
        if agg is None or state is None:
            return
        agg.refresh()
        # Histograms per endpoint (sum over endpoints = the whole run).
        by_name = agg.by_name or {}
        for short, (metric, bounds, doc) in HISTOGRAMS.items():
            fam = HistogramMetricFamily(f"{PREFIX}{short}_seconds", doc + ", seconds.", labels=["endpoint"])
            if by_name:
                for name in sorted(by_name):
                    buckets, total = histogram_buckets(by_name[name][metric], bounds)
                    fam.add_metric([name], buckets, total)
            else:   # nothing measured yet: one empty series so dashboards find the name
                buckets, total = histogram_buckets(agg.hist[metric], bounds)
                fam.add_metric([""], buckets, total)
            yield fam
        for short, (metric, _b, doc) in HISTOGRAMS.items():
            s = agg.hist.summary(metric)
            q = GaugeMetricFamily(f"{PREFIX}{short}_quantile_seconds",
                                  f"{doc}: whole-run quantiles (exact to 3 significant digits), seconds.",
                                  labels=["quantile"])
            for label, key in QUANTILES:
                if s.get(key) is not None:
                    q.add_metric([label], s[key] / 1000.0)
            yield q
        last = getattr(env, "llm_last_window", None) or {}
        for short, (metric, _b, doc) in HISTOGRAMS.items():
            w = last.get(metric) or {}
            q = GaugeMetricFamily(f"{PREFIX}{short}_window_quantile_seconds",
                                  f"{doc}: quantiles of the last timeseries window, seconds.",
                                  labels=["quantile"])
            for label, key in WINDOW_QUANTILES:
                if w.get(key) is not None:
                    q.add_metric([label], w[key] / 1000.0)
            yield q
        c = agg.counters
        req = CounterMetricFamily(f"{PREFIX}requests", "Finished requests by outcome (measured window).",
                                  labels=["outcome"])
        req.add_metric(["ok"], c.completed)
        req.add_metric(["failed"], c.failed)
        yield req
        yield CounterMetricFamily(f"{PREFIX}requests_good", "Successful requests that met every SLO.",
                                  value=c.good)
        err = CounterMetricFamily(f"{PREFIX}request_errors", "Failed requests by error kind.", labels=["kind"])
        for kind in sorted(c.errors_by_kind):
            err.add_metric([kind], c.errors_by_kind[kind])
        yield err
        yield CounterMetricFamily(f"{PREFIX}output_tokens", "Output tokens of successful requests.",
                                  value=c.output_tokens)
        yield CounterMetricFamily(f"{PREFIX}input_tokens", "Prompt tokens of successful requests.",
                                  value=c.input_tokens)
        runner = env.runner
        yield GaugeMetricFamily(f"{PREFIX}active_users", "Locust users running now.",
                                value=runner.user_count if runner is not None else 0)
        yield GaugeMetricFamily(f"{PREFIX}target_rate_rps", "Open-loop target rate, requests/s (0 = closed loop).",
                                value=state.rate)
        yield GaugeMetricFamily(f"{PREFIX}running", "1 while a test is running or spawning.",
                                value=1 if runner is not None and runner.state in (STATE_RUNNING, STATE_SPAWNING) else 0)
        cpu = GaugeMetricFamily(f"{PREFIX}generator_cpu_percent",
                                "Load-generator CPU per Locust process, last sample, percent of one core.",
                                labels=["worker"])
        for wid in sorted(agg.cpu):
            if agg.cpu[wid]:
                cpu.add_metric([wid], agg.cpu[wid][-1])
        yield cpu
        workers = len(runner.clients) if isinstance(runner, MasterRunner) else 1
        yield GaugeMetricFamily(f"{PREFIX}workers", "Locust worker processes connected (1 for a local runner).",
                                value=workers)


def registry_for(environment) -> CollectorRegistry:
    reg = getattr(environment, "llm_metrics_registry", None)
    if reg is None:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(LLMCollector(environment))
        environment.llm_metrics_registry = reg
    return reg


def render(environment) -> bytes:
    """The text exposition (what `/metrics` answers)."""
    return generate_latest(registry_for(environment))


def serve(environment, host: str, port: int):
    """Start the standalone `/metrics` server (gevent WSGI); returns the server."""
    from gevent.pywsgi import WSGIServer

    app = make_wsgi_app(registry_for(environment))
    server = WSGIServer((host, port), app, log=None, error_log=log)
    server.start()   # binds now: a taken port fails the start, not a later scrape
    return server


def add_routes(environment, web_ui) -> None:
    """`/metrics` on the web UI's own server (under `--web-base-path`)."""
    prefix = (getattr(environment.parsed_options, "web_base_path", "") or "").rstrip("/")

    @web_ui.app.route(f"{prefix}/metrics")
    @web_ui.auth_required_if_enabled
    def _metrics() -> Response:
        return Response(render(environment), mimetype=CONTENT_TYPE_LATEST)
