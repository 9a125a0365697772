"""Run a launch plan: start every server, wait for health, write the endpoint list, stop all.

    plan = make_plan(load_layout("cpu", {"*": model_dir}), detect())
    with launch(plan, "runs/serve") as cluster:
        ...  # cluster.endpoints, cluster.endpoints_path ("runs/serve/endpoints.json")
    # every server is stopped here, whichever way the block was left
"""
from __future__ import annotations

import os
from collections.abc import Callable

from servers.launcher.endpoints import Endpoint, write_endpoints
from servers.launcher.lifecycle import ServerGroup
from servers.launcher.plan import LaunchPlan, check_runnable

ENDPOINTS_FILE = "endpoints.json"


class Cluster:
    def __init__(self, plan: LaunchPlan, out_dir: str, *, health_timeout: float = 900.0,
                 stop_timeout: float = 30.0, check: bool = True, handle_signals: bool = True,
                 on_progress: Callable[[str], None] | None = None) -> None:
        self.plan = plan
        self.out_dir = out_dir
        self.log_dir = os.path.join(out_dir, "logs")
        self.endpoints_path = os.path.join(out_dir, ENDPOINTS_FILE)
        self.check = check
        self.endpoints: list[Endpoint] = []
        self.group = ServerGroup(
            [s.process_spec(self.log_dir) for s in plan.servers],
            health_timeout=health_timeout, stop_timeout=stop_timeout,
            handle_signals=handle_signals, on_progress=on_progress,
        )

    def __enter__(self) -> Cluster:
        if self.check:
            check_runnable(self.plan)
        os.makedirs(self.log_dir, exist_ok=True)
        self.group.__enter__()
        try:
            self.endpoints = [
                s.endpoint(pid=srv.pid, log=srv.spec.log_path)
                for s, srv in zip(self.plan.servers, self.group.servers)
            ]
            write_endpoints(self.endpoints_path, self.endpoints, layout=self.plan.layout.name,
                            layout_source=self.plan.layout.source)
        except BaseException:
            self.group.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_report = self.group.stop()
        self.group.__exit__(*exc)

    def wait(self) -> None:
        """Block until a server dies (raises ServerDiedError) or the launcher is interrupted."""
        self.group.wait()

    def pids(self) -> list[int]:
        return self.group.all_pids()


def launch(plan: LaunchPlan, out_dir: str, **kw: object) -> Cluster:
    """A :class:`Cluster` to use as a context manager (see the module docstring)."""
    return Cluster(plan, out_dir, **kw)  # type: ignore[arg-type]
