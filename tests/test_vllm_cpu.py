"""Real vLLM (its CPU build) started through the launcher's `cpu` layout, serving a tiny
random-weight model built here; checked with raw HTTP, then with `harness load` against vLLM's
own counters; stopped with no process left behind.

Runs when the vLLM environment exists (``tests/vllm_env.sh`` builds ``.venv-vllm``), or when
``HARNESS_VLLM_VENV`` is set: then a missing environment is built first (about 100-150 s,
2.5-3.5 GB). Otherwise the module is skipped. Startup of vLLM takes about 45 s on 2 cores.
Timing on 2 shared cores is bursty: the checks are structure and agreement between independent
counts, never latency thresholds.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers.launcher import read_endpoints
from servers.launcher.lifecycle import _alive, descendants

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("HARNESS_VLLM_VENV") or REPO / ".venv-vllm")
BUILT = (VENV / ".harness-vllm-built").exists() and (VENV / "bin" / "python").exists()
START_TIMEOUT_S = 300

pytestmark = [
    pytest.mark.skipif(not BUILT and not os.environ.get("HARNESS_VLLM_VENV"),
                       reason="no vLLM CPU environment: run `bash tests/vllm_env.sh` "
                              "(or set HARNESS_VLLM_VENV to build one)"),
    pytest.mark.timeout(900),
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if not BUILT:
        r = subprocess.run(["bash", str(REPO / "tests" / "vllm_env.sh"), str(VENV)],
                           capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, f"tests/vllm_env.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return str(VENV / "bin" / "python")


@pytest.fixture(scope="module")
def tiny_model(vllm_python, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tiny-model")
    r = subprocess.run([vllm_python, str(REPO / "tests" / "tiny_model.py"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    return str(out)


class Served:
    def __init__(self, proc: subprocess.Popen, out: Path):
        self.proc = proc
        self.out = out
        eps = read_endpoints(str(out / "endpoints.json"))
        (self.endpoint,) = eps.endpoints
        self.url = self.endpoint.url
        self.model = self.endpoint.model
        self.host, port = self.url.removeprefix("http://").split(":")
        self.port = int(port)

    def pids(self) -> list[int]:
        pid = self.endpoint.pid
        return [pid, *descendants(pid)] if pid and _alive(pid) else []

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(vllm_python, tiny_model, tmp_path_factory):
    """`harness serve --layout cpu` as a user runs it; stopped with SIGTERM at the end."""
    out = tmp_path_factory.mktemp("serve")
    port = free_port()
    stderr = open(out / "serve.stderr", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "serve", "--layout", "cpu", "--model", tiny_model,
         "--out", str(out), "--base-port", str(port), "--vllm-python", vllm_python,
         "--health-timeout", str(START_TIMEOUT_S), "--stop-timeout", "20"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    served = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S + 30
        while not (out / "endpoints.json").exists():
            if proc.poll() is not None:
                stderr.seek(0)
                pytest.fail(f"harness serve exited with {proc.returncode}:\n{stderr.read()}")
            assert time.monotonic() < deadline, "harness serve did not become ready"
            time.sleep(0.5)
        served = Served(proc, out)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        # last resort, only what this test started: the server's own process group
        if served is not None and served.endpoint.pid and _alive(served.endpoint.pid):
            try:
                os.killpg(served.endpoint.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stderr.close()


def sse_events(body: bytes) -> list[dict | str]:
    events: list[dict | str] = []
    for block in body.decode().split("\n\n"):
        block = block.strip()
        if not block.startswith("data:"):
            continue
        data = block[len("data:"):].strip()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def chat(served: Served, max_tokens: int) -> list[dict | str]:
    body = {"model": served.model, "stream": True, "max_tokens": max_tokens,
            "ignore_eos": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Explain what NVLink is."}]}
    conn = http.client.HTTPConnection(served.host, served.port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()[:500]
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        return sse_events(resp.read())
    finally:
        conn.close()


def metric_totals(served: Served) -> dict[str, float]:
    """Sum of every sample per sample name (labels summed), from vLLM's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = served.get("/metrics")
    assert status == 200
    totals: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
            if s.name == "vllm:time_to_first_token_seconds_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    totals["_ttft_buckets"] = buckets  # type: ignore[assignment]
    return totals


def wait_for_counted(served: Served, before: dict[str, float], requests: int, tokens: int,
                     timeout: float = 60.0) -> dict[str, float]:
    """Scrape /metrics until vLLM's counters have grown by at least `requests` finished
    requests, `tokens` generated tokens and `requests` TTFT observations since `before`, or
    until `timeout`; returns the last scrape (the caller asserts the exact figures)."""
    inf = float("inf")

    def grown(after: dict[str, float], name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def ttft_observed(after: dict) -> float:  # the +Inf bucket: every observation
        return after["_ttft_buckets"].get(inf, 0.0) - before["_ttft_buckets"].get(inf, 0.0)

    deadline = time.monotonic() + timeout
    while True:
        after = metric_totals(served)
        if (grown(after, "vllm:request_success_total") >= requests
                and grown(after, "vllm:generation_tokens_total") >= tokens
                and ttft_observed(after) >= requests):
            return after
        if time.monotonic() > deadline:
            return after
        time.sleep(0.2)


def histogram_p50(before: dict[float, float], after: dict[float, float]) -> float:
    """Median of the observations between two scrapes of a cumulative histogram (linear
    interpolation inside the bucket, as Prometheus' histogram_quantile does)."""
    edges = sorted(after)
    counts = [after[e] - before.get(e, 0.0) for e in edges]
    total = counts[-1]
    assert total > 0
    rank = total / 2
    prev_edge, prev_count = 0.0, 0.0
    for edge, c in zip(edges, counts):
        if c >= rank:
            if edge == float("inf"):
                return prev_edge
            return prev_edge + (edge - prev_edge) * (rank - prev_count) / max(c - prev_count, 1e-9)
        prev_edge, prev_count = edge, c
    return edges[-2]


# -- tests (in file order; the last one stops the server) --------------------------------------


def test_endpoint_list_and_health(served):
    ep = served.endpoint
    assert ep.role == "cpu" and ep.device == "cpu" and ep.gpus == ()
    assert ep.api_base == served.url + "/v1" and ep.metrics_url == served.url + "/metrics"
    assert Path(ep.log).exists()
    status, _ = served.get("/health")
    assert status == 200
    status, body = served.get("/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [served.model]


def test_streaming_chat_completion_with_usage(served):
    events = chat(served, max_tokens=24)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    first = chunks[0]["choices"][0]["delta"]
    assert first.get("role") == "assistant" and not first.get("content")  # role-only opening
    usage_events = [c for c in chunks if c.get("usage")]
    assert len(usage_events) == 1 and usage_events[0] is chunks[-1]
    assert usage_events[0]["choices"] == []
    usage = usage_events[0]["usage"]
    assert usage["completion_tokens"] == 24  # ignore_eos: exactly max_tokens
    assert usage["prompt_tokens"] > 0
    token_events = [c for c in chunks[1:-1] if c["choices"]]
    # one event per token when unloaded (partial UTF-8 tokens arrive as empty text)
    assert 1 <= len(token_events) <= 24
    assert token_events[-1]["choices"][0]["finish_reason"] == "length"


def test_harness_load_agrees_with_vllm_counters(served, tmp_path):
    before = metric_totals(served)
    out = tmp_path / "load"
    n, out_len = 24, 16
    r = subprocess.run(
        [sys.executable, "-m", "harness.cli", "load", "--url", served.url, "--model", served.model,
         "--users", "4", "--num-requests", str(n), "--input-len", "32", "--output-len",
         str(out_len), "--out", str(out), "--quiet", "--timeout", "120"],
        cwd=REPO, capture_output=True, text=True, timeout=400)
    summary_path = out / "summary.json"
    assert summary_path.exists(), f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    # vLLM records a finished request's stats after it has handed the last chunk to the client,
    # so the last requests may not be counted yet: scrape until they are (bounded), then compare.
    after = wait_for_counted(served, before, requests=n, tokens=n * out_len)
    summary = json.loads(summary_path.read_text())
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    ok = [x for x in recs if x["ok"]]

    assert summary["requests"]["failed"] == 0, summary["requests"]
    assert summary["requests"]["completed"] == len(ok) == n
    # our usage-based token total == growth of vLLM's generation counter
    ours_tokens = sum(x["output_tokens"] for x in ok)
    assert not any(x["tokens_estimated"] for x in ok)
    vllm_tokens = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert ours_tokens == vllm_tokens == n * out_len
    # our request count == growth of vLLM's finished-request counter
    vllm_ok = after["vllm:request_success_total"] - before["vllm:request_success_total"]
    assert vllm_ok == n
    # our TTFT p50 is within a sane factor of vLLM's own (ours adds the client and HTTP)
    ours_p50_s = summary["ttft_ms"]["p50"] / 1000.0
    vllm_p50_s = histogram_p50(before["_ttft_buckets"], after["_ttft_buckets"])  # type: ignore[arg-type]
    assert summary["ttft_ms"]["count"] == n
    print(f"TTFT p50: ours {ours_p50_s * 1000:.1f} ms, vLLM's histogram {vllm_p50_s * 1000:.1f} ms; "
          f"tokens {ours_tokens} = vLLM {vllm_tokens:.0f}; requests {len(ok)} = vLLM {vllm_ok:.0f}")
    assert vllm_p50_s / 4 <= ours_p50_s <= vllm_p50_s * 4 + 0.25, (ours_p50_s, vllm_p50_s)


def test_sigterm_stops_vllm_with_no_orphans(served):
    pids = served.pids()
    assert len(pids) >= 2  # the API server and its engine core (plus workers)
    served.proc.send_signal(signal.SIGTERM)
    rc = served.proc.wait(90)
    assert rc == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert [p for p in pids if _alive(p)] == []
    status = None
    try:
        status, _ = served.get("/health")
    except OSError:
        pass
    assert status is None
