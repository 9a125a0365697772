"""Run a cluster plan on its nodes' agents: start, health-wait, endpoint list, watch, stop, logs.

    session, plan = plan_on_ray(layout, "auto", python=...)
    with RayCluster(plan, session, "runs/serve") as cluster:
        cluster.wait()      # until a server dies (ServerDiedError naming its node) or Ctrl-C
    # every server on every node is stopped here, logs are in runs/serve/logs/

The one-host :class:`servers.launcher.cluster.Cluster` with agents in place of local processes:
the same endpoints.json (each endpoint's url is its node's address; ``node`` says which node),
the same stop on exit, error, Ctrl-C, SIGTERM and SIGHUP (:class:`Terminated`). Logs are copied
from the nodes into ``DIR/logs/`` while the servers run (every poll) and once more after they
stop. A SIGKILL of this process is covered by Ray itself: the agents are owned by this driver
and die with it, taking their servers along.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from servers.cluster.plan import (
    ArgvBuilder,
    ClusterPlan,
    NodeServer,
    make_cluster_plan,
    node_dict,
    vllm_builder,
)
from servers.cluster.session import RaySession, connect
from servers.launcher.cluster import ENDPOINTS_FILE
from servers.launcher.endpoints import Endpoint, write_endpoints
from servers.launcher.errors import LayoutError, ServerDiedError, ServerStartError
from servers.launcher.layouts import Layout
from servers.launcher.lifecycle import LOG_TAIL_LINES, StopsOnExit, _cause, _quote


def plan_on_ray(layout: Layout, address: str, *, python: str, argv_for: ArgvBuilder = vllm_builder,
                kind: str = "vllm", base_port: int | None = None, host: str | None = None,
                allow_cross_switch: bool | None = None, health_timeout: float = 900.0,
                stop_timeout: float = 30.0) -> tuple[RaySession, ClusterPlan]:
    """Join the cluster at ``address``, put an agent on each node and place ``layout`` there.

    One-line :class:`LayoutError` for what the user must fix (no Ray, unreachable, too few GPUs,
    a TP group larger than any node); on any error the agents are let go again."""
    session = connect(address)
    try:
        nodes = session.probe(need_gpus=layout.needs_gpus, health_timeout=health_timeout,
                              stop_timeout=stop_timeout)
        plan = make_cluster_plan(layout, nodes, python=python, base_port=base_port, host=host,
                                 allow_cross_switch=allow_cross_switch, address=address,
                                 argv_for=argv_for, kind=kind)
    except BaseException:
        session.close()
        raise
    return session, plan


class RayCluster(StopsOnExit):
    def __init__(self, plan: ClusterPlan, session: RaySession, out_dir: str, *,
                 health_timeout: float = 900.0, stop_timeout: float = 30.0,
                 poll_interval: float = 1.0, handle_signals: bool = True,
                 on_progress: Callable[[str], None] | None = None) -> None:
        self.plan = plan
        self.session = session
        self.out_dir = out_dir
        self.log_dir = os.path.join(out_dir, "logs")
        self.endpoints_path = os.path.join(out_dir, ENDPOINTS_FILE)
        self.health_timeout = health_timeout
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self.handle_signals = handle_signals
        self.on_progress = on_progress or (lambda msg: None)
        self.endpoints: list[Endpoint] = []
        self.stop_report: list[str] = []
        self._offsets: dict[str, int] = {}
        self._old_handlers: dict[int, object] = {}
        self._stopping = False

    # start ----------------------------------------------------------------------------------
    def _agent(self, node_id: str) -> Any:
        return self.session.agents[node_id]

    def start(self) -> None:
        ray = self.session.ray
        os.makedirs(self.log_dir, exist_ok=True)
        by_node = self.plan.by_node()
        self.session.release({n.node_id for n, _ in by_node})
        refs = {}
        for node, servers in by_node:
            specs = [s.process_spec(self.log_dir) for s in servers]
            refs[node.node_id] = (node, self._agent(node.node_id).start.remote(specs))
            self.on_progress(f"node {node.label}: starting {', '.join(s.name for s in servers)}")
        pids: dict[str, int] = {}
        failure: LayoutError | ServerStartError | None = None
        for node, ref in refs.values():
            try:
                r = ray.get(ref, timeout=self.health_timeout + 60)
            except Exception as exc:
                failure = failure or ServerStartError(
                    f"the agent on node {node.label} did not report its servers started "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
                continue
            if r["ok"]:
                pids.update(r["pids"])
                self.on_progress(f"node {node.label}: {len(r['pids'])} server(s) healthy")
            elif failure is None or (r.get("usage") and not isinstance(failure, LayoutError)):
                msg = f"on node {node.label}: {r['error']}"
                failure = LayoutError(msg) if r.get("usage") else ServerStartError(msg, name=r["name"])
        self.sync_logs()
        if failure is not None:
            raise failure
        self.endpoints = [s.endpoint(pid=pids.get(s.name), log=self._log_path(s))
                          for s in self.plan.servers]
        write_endpoints(self.endpoints_path, self.endpoints, layout=self.plan.layout.name,
                        layout_source=self.plan.layout.source,
                        extra={"ray": {"address": self.plan.address, "kind": self.plan.kind,
                                       "nodes": [node_dict(n, used=n in self.plan.placement.used_nodes)
                                                 for n in self.plan.placement.nodes]}})

    def _log_path(self, s: NodeServer) -> str:
        return os.path.join(self.log_dir, f"{s.name}.log")

    # running --------------------------------------------------------------------------------
    def poll(self) -> None:
        """Copy new log bytes home; raise :class:`ServerDiedError` if a server (or a node's
        agent) is gone."""
        ray = self.session.ray
        refs = {node.node_id: (node, self._agent(node.node_id).poll.remote(dict(self._offsets)))
                for node, _ in self.plan.by_node()}
        for node, ref in refs.values():
            try:
                r = ray.get(ref, timeout=60)
            except Exception as exc:
                raise ServerDiedError(
                    f"the agent on node {node.label} is gone ({type(exc).__name__}): the node "
                    "was lost or its Ray worker was killed, and its servers with it") from None
            self._append_logs(r["logs"])
            if r["dead"]:
                d = r["dead"][0]
                tail = "\n".join(d["tail"].splitlines()[-LOG_TAIL_LINES:])
                cause = _cause(tail)
                raise ServerDiedError(
                    f"{d['name']} (pid {d['pid']}) on node {node.label} exited with code "
                    f"{d['code']} while serving" + (f": {cause}" if cause else "")
                    + f"\nlast lines of {os.path.join(self.log_dir, d['name'] + '.log')}:\n"
                    + _quote(tail))

    def wait(self) -> None:
        """Block until a server dies (raises) or a signal/Ctrl-C interrupts."""
        while True:
            self.poll()
            time.sleep(self.poll_interval)

    def sync_logs(self) -> None:
        ray = self.session.ray
        refs = [self.session.agents[n].poll.remote(dict(self._offsets))
                for n in list(self.session.agents)]
        for ref in refs:
            try:
                self._append_logs(ray.get(ref, timeout=30)["logs"])
            except Exception:
                pass

    def _append_logs(self, logs: dict[str, bytes]) -> None:
        for name, data in logs.items():
            if not data:
                continue
            with open(os.path.join(self.log_dir, f"{name}.log"), "ab") as f:
                f.write(data)
            self._offsets[name] = self._offsets.get(name, 0) + len(data)

    # stop -----------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Stop every server on every node, copy the logs home, let the agents go. Idempotent."""
        if self._stopping:
            return self.stop_report
        self._stopping = True
        old_int = None
        if threading.current_thread() is threading.main_thread():
            old_int = signal.signal(signal.SIGINT, lambda s, f: None)  # a 2nd Ctrl-C waits
        try:
            ray = self.session.ray
            refs = [(n, h.stop.remote()) for n, h in self.session.agents.items()]
            for node_id, ref in refs:
                try:
                    self.stop_report += ray.get(ref, timeout=self.stop_timeout + 30)
                except Exception as exc:
                    self.stop_report.append(f"agent on node {node_id[:8]} did not answer stop "
                                            f"({type(exc).__name__}); Ray kills it and its "
                                            "servers get SIGTERM")
            self.sync_logs()
            for h in self.session.agents.values():
                try:
                    ray.get(h.cleanup.remote(), timeout=10)
                except Exception:
                    pass
        finally:
            self.session.close()
            if old_int is not None:
                signal.signal(signal.SIGINT, old_int)
        return self.stop_report
