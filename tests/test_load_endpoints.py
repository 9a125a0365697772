"""`harness load --endpoints`: users spread over every replica of a layout, reported
per replica and per model, adding up to the aggregate."""
import json
import subprocess
import sys

from servers.launcher.endpoints import Endpoint, write_endpoints


def _two_fleets(tmp_path, start_sim):
    small_url, _ = start_sim("--replicas", "2", "--served-model-name", "small")
    large_url, _ = start_sim("--served-model-name", "large")
    base_port = int(small_url.rsplit(":", 1)[1])
    eps = [Endpoint(name=f"small-{i}", role="small", url=f"http://127.0.0.1:{base_port + i}",
                    model="small") for i in range(2)]
    eps.append(Endpoint(name="large-0", role="large", url=large_url, model="large"))
    path = tmp_path / "endpoints.json"
    write_endpoints(str(path), eps, layout="test")
    return path


def _load(endpoints, out):
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "load", "--endpoints", str(endpoints), "--users", "6",
         "--num-requests", "36", "--input-len", "32", "--output-len", "8", "--duration", "60",
         "--out", str(out), "--quiet",
         # about spreading users over endpoints, not generator health: a busy shared machine's
         # CPU samples must not turn the exit code into 3
         "--cpu-limit", "1000"], capture_output=True, text=True, timeout=120)


def test_load_over_an_endpoint_list_reaches_every_replica_and_breaks_down_per_replica(tmp_path, start_sim):
    path = _two_fleets(tmp_path, start_sim)
    r = _load(path, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    by_endpoint = summary["by_endpoint"]
    assert len(by_endpoint) == 3 and all(row["completed"] > 0 for row in by_endpoint.values())
    assert sum(row["completed"] for row in by_endpoint.values()) == summary["requests"]["completed"]
    assert sum(row["output_tokens"] for row in by_endpoint.values()) == summary["output_tokens"]
    assert summary["by_model"]["small"]["replicas"] == 2
    assert summary["by_model"]["large"]["replicas"] == 1
    names = set(summary["by_name"])
    assert any("@small-0" in n for n in names) and any("@large-0" in n for n in names)


def test_load_with_an_unreadable_endpoint_list_says_so_in_one_line(tmp_path):
    bad = tmp_path / "endpoints.json"
    bad.write_text("{}")
    r = _load(bad, tmp_path / "run")
    assert r.returncode == 2
    assert "endpoint list" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_open_loop_over_an_endpoint_list_offers_every_replica_its_share(tmp_path, start_sim):
    path = _two_fleets(tmp_path, start_sim)
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "harness.cli", "load", "--endpoints", str(path), "--rate", "6",
         "--arrival", "constant", "--num-requests", "18", "--input-len", "32", "--output-len", "8",
         "--duration", "60", "--out", str(out), "--quiet",
         "--cpu-limit", "1000", "--lag-limit-ms", "1000000", "--stamp-delay-limit-ms", "0"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    by_endpoint = json.loads((out / "summary.json").read_text())["by_endpoint"]
    # one dispatcher per replica, each at a third of the rate (before, one dispatcher: one replica)
    assert len(by_endpoint) == 3, by_endpoint
    assert all(5 <= row["completed"] <= 7 for row in by_endpoint.values()), by_endpoint
