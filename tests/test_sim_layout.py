"""`harness sim --layout`: the seed's mixed cluster on simulated replicas, loaded
through the same endpoint list real vLLM servers would write."""
import json
import subprocess
import sys

from conftest import free_port_block, launch_sim, stop_process


def test_sim_layout_mixed12_serves_four_8b_and_four_tp2_70b_replicas_and_load_reaches_them(tmp_path):
    port = free_port_block(8)
    url, proc = launch_sim("--layout", "mixed12", "--port", str(port), "--replicas", "8",
                           "--out", str(tmp_path / "cluster"))
    try:
        doc = json.loads((tmp_path / "cluster" / "endpoints.json").read_text())
        roles = [(e["role"], e["tensor_parallel_size"], tuple(e["gpus"])) for e in doc["endpoints"]]
        assert sorted({r[:2] for r in roles}) == [("large", 2), ("small", 1)]
        assert sum(len(r[2]) for r in roles) == 12
        r = subprocess.run(
            [sys.executable, "-m", "harness.cli", "load", "--endpoints",
             str(tmp_path / "cluster" / "endpoints.json"), "--users", "16", "--num-requests", "64",
             "--input-len", "64", "--output-len", "16", "--duration", "90",
             "--out", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, timeout=150)
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        by_model = summary["by_model"]
        assert by_model["llama-3-8b-instruct"]["replicas"] == 4
        assert by_model["llama-3-70b-instruct-awq"]["replicas"] == 4
        tpot = {name.split("@")[1]: v["tpot_ms"]["p50"] for name, v in summary["by_name"].items()}
        # a 70B AWQ decode step on two PCIe L40S reads more per token than an 8B on one
        assert min(tpot[k] for k in tpot if k.startswith("large")) > max(
            tpot[k] for k in tpot if k.startswith("small"))
    finally:
        stop_process(proc)
        proc.log.close()


def test_sim_layout_that_needs_more_gpus_than_given_is_one_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness.cli", "sim", "--layout", "mixed12",
                        "--gpus", "4", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "more than the 4 GPUs" in r.stderr and len(r.stderr.strip().splitlines()) == 1
