"""Specification of the simulator's `/metrics`: Prometheus text under vLLM's metric names,
parsed with prometheus-client's own parser, and counting exactly what clients were sent.
"""
from __future__ import annotations

import http.client
import threading
import time
from urllib.parse import urlsplit

import openai
from prometheus_client.parser import text_string_to_metric_families

FAST = ("--profile", "h200-llama-3-8b-awq")
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"

GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
COUNTERS = ["vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
            "vllm:num_preemptions"]
HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]


def scrape(base_url: str) -> tuple[str, dict]:
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200
    ctype, text = resp.getheader("content-type"), resp.read().decode()
    conn.close()
    return ctype, {fam.name: fam for fam in text_string_to_metric_families(text)}


def value(families: dict, sample: str, **labels: str) -> float:
    family = families[sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    return sum(s.value for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)


def send_mixed_traffic(base: str) -> list:
    """Stream and non-stream, chat and completions, forced and natural lengths: their usages."""
    c = client(base)
    msgs = [{"role": "user", "content": "Describe the weather on the island."}]
    usages = []
    for i in range(4):
        chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=40 + i,
                                                seed=i, stream=True,
                                                stream_options={"include_usage": True}))
        usages.append((chunks[-1].usage, [ch for ch in chunks if ch.choices][-1]
                       .choices[0].finish_reason))
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=17,
                                  extra_body={"ignore_eos": True})
    usages.append((r.usage, r.choices[0].finish_reason))
    r = c.completions.create(model=MODEL, prompt="The island weather", max_tokens=300, seed=3)
    usages.append((r.usage, r.choices[0].finish_reason))
    chunks = list(c.completions.create(model=MODEL, prompt="and then", max_tokens=9,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True}))
    usages.append((chunks[-1].usage, "length"))
    return usages


def test_metrics_use_vllm_names_and_types(start_sim):
    base, _ = start_sim(*FAST)
    send_mixed_traffic(base)
    ctype, fams = scrape(base)
    assert ctype.startswith("text/plain")
    for name in GAUGES:
        assert fams[name].type == "gauge", name
    for name in COUNTERS:
        assert fams[name].type == "counter", name
        assert any(s.name == name + "_total" for s in fams[name].samples), name
    for name in HISTOGRAMS:
        fam = fams[name]
        assert fam.type == "histogram", name
        names = {s.name for s in fam.samples}
        assert {name + "_bucket", name + "_count", name + "_sum"} <= names
        buckets = [s for s in fam.samples if s.name == name + "_bucket"]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts)  # cumulative
        assert buckets[-1].labels["le"] == "+Inf" and counts[-1] == value(fams, name + "_count")
    for fam in fams.values():
        for s in fam.samples:
            assert s.labels.get("model_name") == MODEL, s


def test_token_and_request_counters_equal_what_the_clients_were_told(start_sim):
    base, _ = start_sim(*FAST)
    usages = send_mixed_traffic(base)
    _, fams = scrape(base)
    assert value(fams, "vllm:generation_tokens_total") == sum(u.completion_tokens for u, _ in usages)
    assert value(fams, "vllm:prompt_tokens_total") == sum(u.prompt_tokens for u, _ in usages)
    reasons = [r for _, r in usages]
    assert "stop" in reasons and "length" in reasons  # both kinds of ending were exercised
    for reason in ("stop", "length"):
        assert value(fams, "vllm:request_success_total", finished_reason=reason) == reasons.count(reason)
    n = len(usages)
    assert value(fams, "vllm:time_to_first_token_seconds_count") == n
    assert value(fams, "vllm:e2e_request_latency_seconds_count") == n
    assert value(fams, "vllm:request_queue_time_seconds_count") == n
    assert value(fams, "vllm:inter_token_latency_seconds_count") == sum(
        u.completion_tokens - 1 for u, _ in usages)
    assert value(fams, "vllm:num_preemptions_total") == 0


def test_gauges_show_running_and_waiting_requests_and_return_to_zero(start_sim):
    base, _ = start_sim(*FAST, "--max-num-seqs", "2")
    c = client(base)
    done = []

    def one() -> None:
        chunks = list(c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "long"}], max_tokens=250,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        done.append(chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    seen = []
    deadline = time.monotonic() + 10
    while len(done) < 5 and time.monotonic() < deadline:
        _, fams = scrape(base)
        seen.append((value(fams, "vllm:num_requests_running"),
                     value(fams, "vllm:num_requests_waiting"),
                     value(fams, "vllm:kv_cache_usage_perc")))
        time.sleep(0.05)
    for t in threads:
        t.join(20)
    assert done == [250] * 5
    assert max(r for r, _, _ in seen) == 2  # max_num_seqs
    assert any(r == 2 and w >= 1 for r, w, _ in seen)  # the rest wait
    assert all(0.0 <= kv <= 1.0 for _, _, kv in seen) and max(kv for _, _, kv in seen) > 0
    _, fams = scrape(base)
    assert [value(fams, g) for g in GAUGES] == [0, 0, 0]
