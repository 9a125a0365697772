"""The simulator's `/metrics`, under vLLM's metric names so the same dashboards,
scrapers and agreement checks work against it and against real vLLM.

Counting is plain integer arithmetic on the hot path; prometheus-client only
renders the text when someone scrapes.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

# vLLM's own bucket boundaries (seconds), so histograms line up with real servers.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


class FastHistogram:
    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: list[float]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.total += value * n
        self.count += n

    def family(self, name: str, doc: str, labels: dict[str, str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=list(labels))
        cum = 0
        buckets = []
        for bound, c in zip(self.bounds + [float("inf")], self.counts):
            cum += c
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
        fam.add_metric(list(labels.values()), buckets, self.total)
        return fam


class ServerMetrics:
    def __init__(self, model_name: str):
        self.labels = {"model_name": model_name, "engine": "0"}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success_by_reason = {"stop": 0, "length": 0, "abort": 0}
        self.preemptions = 0
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.ttft = FastHistogram(TTFT_BUCKETS)
        self.itl = FastHistogram(ITL_BUCKETS)
        self.tpot = FastHistogram(ITL_BUCKETS)
        self.e2e = FastHistogram(REQUEST_BUCKETS)
        self.queue = FastHistogram(REQUEST_BUCKETS)
        self.prefill = FastHistogram(REQUEST_BUCKETS)
        self.decode = FastHistogram(REQUEST_BUCKETS)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def collect(self) -> Iterator[Metric]:
        lv = list(self.labels.values())
        ln = list(self.labels)
        for name, doc, value in [
            ("vllm:num_requests_running", "Number of requests in model execution batches.", self.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", self.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", self.kv_usage),
        ]:
            g = GaugeMetricFamily(name, doc, labels=ln)
            g.add_metric(lv, value)
            yield g
        for name, doc, value in [
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens),
            ("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", self.preemptions),
        ]:
            c = CounterMetricFamily(name, doc, labels=ln)
            c.add_metric(lv, value)
            yield c
        c = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                labels=ln + ["finished_reason"])
        for reason, value in self.success_by_reason.items():
            c.add_metric(lv + [reason], value)
        yield c
        for name, doc, hist in [
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl),
            ("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.", self.tpot),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", self.queue),
            ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", self.prefill),
            ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", self.decode),
        ]:
            yield hist.family(name, doc, self.labels)

    def render(self) -> bytes:
        return generate_latest(self._registry)
