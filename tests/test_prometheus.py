"""A real Prometheus scrapes `harness load`'s `/metrics` during a live run.

Debian's `prometheus` package (installed by the project's setup; the system service is
never started): the test runs `prometheus` itself on loopback with a generated config
that scrapes our exporter every second, runs a short `harness load --metrics-port P`
against the simulator, and asks Prometheus's HTTP API what it stored: the TTFT histogram's
`_count` must equal the successful requests in `requests.jsonl`, its buckets must be
cumulative and end at that count, and the counters must match the request log.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port_block

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
FAST = ("--profile", "h200-llama-3-8b-awq")
N_REQUESTS = 40

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed "
                       "(apt-get install -y prometheus); this test runs the real server"),
]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started (its id is the PID), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus scraping 127.0.0.1:<metrics port> every 1 s; yields (api, metrics_port,
    sim_port). The three ports come from one block: separate free_port_block(1) calls may
    return the same port twice (nothing holds the first until the load run binds it)."""
    port = free_port_block(3)
    metrics_port, sim_port = port + 1, port + 2
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: llm-harness\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not http_ok(api + "/-/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("prometheus did not become ready:\n"
                                     + (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        # Ready is not scraping: Prometheus hands targets to its scrape loop only after
        # service discovery's first update (up to ~5 s later). A short run that ends before
        # then is never scraped, so wait for the first scrape (up == 0: nothing listens yet).
        while not query(api, 'up{job="llm-harness"}'):
            if proc.poll() is not None or time.monotonic() > deadline + 30:
                raise AssertionError("prometheus never scraped its target:\n"
                                     + (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        yield api, metrics_port, sim_port
    finally:
        stop(proc)
        log.close()


def query(api: str, promql: str) -> list[dict]:
    url = api + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(api: str, promql: str) -> float | None:
    res = query(api, promql)
    return float(res[0]["value"][1]) if res else None


def test_prometheus_scrapes_ttft_histogram_with_the_right_count(prometheus, start_sim, tmp_path):
    api, metrics_port, sim_port = prometheus
    sim_url, _ = start_sim(*FAST, "--port", str(sim_port))   # never the metrics port
    out = tmp_path / "run"
    log = open(tmp_path / "load.log", "wb")
    load = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "load", "--url", sim_url, "--users", "4",
         "--num-requests", str(N_REQUESTS), "--input-len", "32", "--output-len", "16",
         "--metrics-port", str(metrics_port), "--metrics-linger", "4", "--out", str(out), "--quiet"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        rc = load.wait(120)
    finally:
        stop(load)
        log.close()
    output = (tmp_path / "load.log").read_text(errors="replace")
    assert rc == 0, output[-4000:]

    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    ok = [r for r in records if r["ok"]]
    assert len(records) == N_REQUESTS and len(ok) == N_REQUESTS, output[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    # The server's state (scraped from the simulator's /metrics) is in every window line.
    windows = [json.loads(line) for line in (out / "timeseries.jsonl").read_text().splitlines()]
    assert windows
    for w in windows:
        s = w["server"]
        assert s["error"] is None, s
        assert s["num_requests_running"] is not None and s["num_requests_waiting"] is not None, s
        assert 0.0 <= s["kv_cache_usage_perc"] <= 1.0 and s["num_preemptions_total"] >= 0, s

    # Prometheus saw the target up, and its last stored values are the run's final ones
    # (range functions skip the staleness markers written once the target went away).
    assert scalar(api, 'max_over_time(up{job="llm-harness"}[5m])') == 1.0
    last = "last_over_time({}[5m])"
    count = scalar(api, "sum(" + last.format("llm_harness_ttft_seconds_count") + ")")
    assert count == len(ok)
    assert scalar(api, "sum(" + last.format('llm_harness_requests_total{outcome="ok"}') + ")") == len(ok)
    assert scalar(api, "sum(" + last.format('llm_harness_requests_total{outcome="failed"}') + ")") == 0
    assert scalar(api, "sum(" + last.format("llm_harness_output_tokens_total") + ")") == \
        sum(r["output_tokens"] for r in ok)
    assert scalar(api, "sum(" + last.format("llm_harness_e2e_seconds_count") + ")") == len(ok)
    assert scalar(api, "sum(" + last.format("llm_harness_itl_seconds_count") + ")") == \
        sum(len(r["itl_ms"]) for r in ok)
    ttft_sum = scalar(api, "sum(" + last.format("llm_harness_ttft_seconds_sum") + ")")
    assert math.isclose(ttft_sum, sum(r["ttft_ms"] for r in ok) / 1000.0, rel_tol=1e-3)

    # Cumulative buckets, ending (+Inf) at the count.
    # Scrapes before the first request finished stored the exporter's empty placeholder
    # series (endpoint="", all zeros); the run's histogram is the one named after the endpoint.
    buckets = query(api, last.format('llm_harness_ttft_seconds_bucket{endpoint!=""}'))
    assert len({b["metric"]["endpoint"] for b in buckets}) == 1, buckets
    by_le = sorted((float(b["metric"]["le"]), float(b["value"][1])) for b in buckets)
    assert by_le[-1] == (math.inf, len(ok))
    values = [v for _le, v in by_le]
    assert values == sorted(values), by_le
    # Each finite bucket holds exactly the requests whose TTFT is at most its bound (HDR
    # resolution: 0.1%, so compare away from the edges).
    for le, v in by_le[:-1]:
        below = sum(1 for r in ok if r["ttft_ms"] / 1000.0 <= le * 0.999)
        at_most = sum(1 for r in ok if r["ttft_ms"] / 1000.0 <= le * 1.001)
        assert below <= v <= at_most, (le, v, below, at_most)

    # Prometheus's own estimate lands in the same bucket as our exact p50. Over the run's
    # series only: the empty placeholder's quantile is NaN, and it may come first.
    est = scalar(api, "histogram_quantile(0.5, "
                 + last.format('llm_harness_ttft_seconds_bucket{endpoint!=""}') + ")")
    assert est is not None and not math.isnan(est), est
    p50 = summary["ttft_ms"]["p50"] / 1000.0
    bounds = [0.0] + [le for le, _v in by_le]
    i = next(k for k in range(1, len(bounds)) if est <= bounds[k])
    assert bounds[i - 1] * 0.999 <= p50 <= bounds[i] * 1.001, (est, p50, bounds[i - 1], bounds[i])

    # The whole-run quantile gauges equal summary.json's (same merged histograms).
    q99 = scalar(api, last.format('llm_harness_ttft_quantile_seconds{quantile="0.99"}'))
    assert math.isclose(q99, summary["ttft_ms"]["p99"] / 1000.0, rel_tol=1e-6)
