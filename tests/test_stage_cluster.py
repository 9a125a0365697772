"""The cluster stage against an endpoint list (what `harness serve` writes): every endpoint
loaded at once, the aggregate equal to the sum of the endpoints' own summaries, per role."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.stages.cluster import aggregate
from servers.launcher import Endpoint, write_endpoints

REPO = Path(__file__).resolve().parents[1]


def test_aggregate_sums_rates_and_keeps_roles():
    per = {"a": {"output_tokens_per_s": 10.0, "total_tokens_per_s": 50.0, "requests_per_s": 1.0,
                 "requests": {"completed": 4, "failed": 0}, "ttft_ms": {"p50": 30.0}},
           "b": {"output_tokens_per_s": 5.0, "total_tokens_per_s": 20.0, "requests_per_s": 0.5,
                 "requests": {"completed": 3, "failed": 1}, "ttft_ms": {"p50": 90.0}}}
    agg = aggregate(per, {"a": "small", "b": "large"})
    assert agg["output_tokens_per_s"] == 15.0 and agg["small.output_tokens_per_s"] == 10.0
    assert agg["large.replicas"] == 1 and agg["replicas"] == 2
    assert agg["error_rate"] == pytest.approx(1 / 8) and agg["ttft_p50_ms"] == 90.0


@pytest.mark.timeout(300)
def test_cluster_over_an_endpoint_list(start_sim, tmp_path):
    base, _ = start_sim("--profile", "h100-llama-3-8b-bf16", "--replicas", "2")
    port = int(base.rsplit(":", 1)[1])
    model = "meta-llama/Meta-Llama-3-8B-Instruct"
    eps = [Endpoint(name=f"small-{i}", role="small", url=f"http://127.0.0.1:{port + i}", model=model, gpus=(i,))
           for i in range(2)]
    path = write_endpoints(str(tmp_path / "endpoints.json"), eps, layout="test")
    plan = tmp_path / "p.yaml"
    plan.write_text(f"""
name: cluster-endpoints
gpu: h100
stages:
  - name: cluster
    stage: cluster
    table: cluster aggregate
    row: 2 x 8B BF16 (simulated H100)
    target: {{endpoints: {path}}}
    users: 4
    num_requests: 8
    input_len: 128
    output_len: 16
    physics: {{model: llama-3-8b, precision: bf16}}
    expect: {{output_tokens_per_s: ">= 1", small.output_tokens_per_s: 100000}}
""")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(plan), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=250)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # the 100,000 tok/s target fails
    doc = json.loads((out / "cluster" / "result.json").read_text())
    assert doc["status"] == "fail"
    summaries = [json.loads((out / "cluster" / e.name / "summary.json").read_text()) for e in eps]
    assert [s["target"]["url"] for s in summaries] == [e.url for e in eps]
    assert all(s["requests"]["completed"] == 8 for s in summaries)
    m = doc["measured"]
    assert m["output_tokens_per_s"] == pytest.approx(sum(s["output_tokens_per_s"] for s in summaries))
    assert m["small.output_tokens_per_s"] == pytest.approx(m["output_tokens_per_s"]) and m["replicas"] == 2
    checks = {c["metric"]: c["passed"] for c in doc["checks"]}
    assert checks == {"output_tokens_per_s": True, "small.output_tokens_per_s": False}
    marks = {(p["metric"], p["source"]): p for p in doc["physics"]}
    # two H100 replicas' summed hardware ceiling is far below 100,000 tok/s: impossible target
    assert marks[("small.output_tokens_per_s", "target")]["mark"] == "impossible"
    assert marks[("output_tokens_per_s", "measured")]["mark"] == "ok"
