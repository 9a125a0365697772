"""A launch plan: every replica of a layout with its GPUs, port, command and environment.

:func:`make_plan` needs no vLLM and starts nothing (``harness serve --dry-run`` prints it);
:func:`check_runnable` adds the checks that only matter before a real start (vLLM installed,
model folders present, ports free).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from servers.launcher.command import is_local_model, render_command, server_env, vllm_argv
from servers.launcher.endpoints import Endpoint
from servers.launcher.errors import LayoutError
from servers.launcher.layouts import Layout, ServerSpec
from servers.launcher.lifecycle import ProcessSpec, check_ports, port_in_use
from servers.launcher.placement import Assignment, pinnable, place
from servers.topology import Topology, format_cpu_list

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VLLM_EXTRA_HINT = ("install the harness's 'vllm' extra on a GPU machine (pip install -e '.[vllm]'), "
                   "or build the CPU build with `bash tests/vllm_env.sh` and pass "
                   "--vllm-python .venv-vllm/bin/python")


@dataclass
class ServerPlan:
    """One replica, ready to start."""

    assignment: Assignment
    port: int
    host: str
    argv: list[str]
    env: dict[str, str]

    @property
    def name(self) -> str:
        return self.assignment.name

    @property
    def spec(self) -> ServerSpec:
        return self.assignment.spec

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def cpus(self) -> tuple[int, ...]:
        return self.assignment.cpus

    def command_line(self) -> str:
        return render_command(self.argv, self.env, self.assignment.cpus)

    def process_spec(self, log_dir: str) -> ProcessSpec:
        return ProcessSpec(name=self.name, argv=list(self.argv), port=self.port, host=self.host,
                           env=dict(self.env), log_path=os.path.join(log_dir, f"{self.name}.log"),
                           cpus=tuple(pinnable(self.assignment.cpus)))

    def endpoint(self, pid: int | None = None, log: str = "") -> Endpoint:
        a, s = self.assignment, self.spec
        return Endpoint(
            name=self.name, role=s.role, url=self.url, api_base=self.url + "/v1",
            metrics_url=self.url + "/metrics", model=s.served_model_name, model_path=s.model,
            precision=s.precision, quantization=s.vllm_quantization, dtype=s.vllm_dtype,
            tensor_parallel_size=s.tensor_parallel_size, gpus=a.gpus, link=a.link, numa=a.numa,
            cpus=format_cpu_list(a.cpus), device=s.device, port=self.port, pid=pid, log=log,
        )


@dataclass
class LaunchPlan:
    layout: Layout
    servers: list[ServerPlan]
    python: str
    topology: Topology | None = None
    gpus_present: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The dry-run text: GPU assignment, ports and the exact command of every server."""
        topo = self.topology
        src = f"topology from {topo.source}" if topo is not None else "no GPU topology"
        used = sorted({g for s in self.servers for g in s.assignment.gpus})
        lines = [
            f"layout {self.layout.name} ({self.layout.source}): {len(self.servers)} server(s)"
            + (f" on {len(used)} of {len(self.gpus_present)} GPUs" if self.layout.needs_gpus
               else " on CPU")
            + f"; {src}",
        ]
        if self.layout.description:
            lines.append(f"  {self.layout.description}")
        rows = [("server", "model", "prec", "TP", "GPUs", "link", "NUMA", "CPUs", "url")]
        for s in self.servers:
            a = s.assignment
            rows.append((
                s.name, s.spec.served_model_name, s.spec.precision,
                str(s.spec.tensor_parallel_size) if s.spec.device == "cuda" else "-",
                ",".join(map(str, a.gpus)) or "cpu", a.link or "-",
                "-" if a.numa is None else str(a.numa), format_cpu_list(a.cpus) or "-", s.url,
            ))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines.append("")
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                  for r in rows]
        lines.append("")
        lines.append("commands:")
        for s in self.servers:
            lines.append(f"  # {s.name}")
            lines.append(f"  {s.command_line()}")
        if self.warnings:
            lines.append("")
            lines += self.warnings
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.layout.name,
            "layout_source": self.layout.source,
            "python": self.python,
            "topology": self.topology.to_dict() if self.topology is not None else None,
            "warnings": list(self.warnings),
            "servers": [{**s.endpoint().to_dict(), "argv": s.argv, "env": s.env,
                         "command": s.command_line()} for s in self.servers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def make_plan(layout: Layout, topology: Topology | None = None, *,
              gpus: Sequence[int] | None = None, python: str | None = None,
              base_port: int | None = None, host: str | None = None,
              allow_cross_switch: bool | None = None) -> LaunchPlan:
    """Place ``layout`` on ``topology`` and give every replica its port and command."""
    from servers.launcher.placement import visible_gpus

    pool = visible_gpus(topology, gpus) if layout.needs_gpus else []
    placement = place(layout, topology, pool, allow_cross_switch=allow_cross_switch)
    host = host or layout.host
    port = layout.base_port if base_port is None else base_port
    python = python or sys.executable
    servers = []
    for k, a in enumerate(placement.assignments):
        p = port + k
        if p > 65535:
            raise LayoutError(f"ports run past 65535 from base port {port}: pick a lower "
                              "--base-port")
        servers.append(ServerPlan(
            assignment=a, port=p, host=host,
            argv=vllm_argv(a.spec, python=python, host=host, port=p),
            env=server_env(a.spec, a.gpus, local_model=is_local_model(a.spec.model)),
        ))
    return LaunchPlan(layout=layout, servers=servers, python=python, topology=topology,
                      gpus_present=placement.gpus_present, warnings=list(placement.warnings))


# -- checks before a real start ----------------------------------------------------------------


def find_vllm_python(explicit: str | None = None) -> str:
    """The Python to run vLLM with: ``explicit``, ``$HARNESS_VLLM_PYTHON``, this Python where
    it has vLLM, else the repository's ``.venv-vllm`` (built by ``tests/vllm_env.sh``)."""
    if explicit:
        return explicit
    env = os.environ.get("HARNESS_VLLM_PYTHON")
    if env:
        return env
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    for venv in (os.environ.get("HARNESS_VLLM_VENV"), os.path.join(REPO_ROOT, ".venv-vllm")):
        if venv and os.path.exists(os.path.join(venv, "bin", "python")):
            return os.path.join(venv, "bin", "python")
    return sys.executable


def check_vllm(python: str) -> None:
    if not (os.path.isfile(python) or os.path.sep not in python):
        raise LayoutError(f"the Python for vLLM, {python}, does not exist: {VLLM_EXTRA_HINT}")
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise LayoutError(f"cannot run {python} to look for vLLM ({exc}): {VLLM_EXTRA_HINT}") from None
    if r.returncode != 0:
        raise LayoutError(f"vLLM is not installed for {python}: {VLLM_EXTRA_HINT}")


def check_model(spec: ServerSpec) -> None:
    """A local model folder must exist with a config.json; TP must divide its attention heads."""
    if not is_local_model(spec.model):
        return
    path = os.path.expanduser(spec.model)
    if not os.path.isdir(path):
        raise LayoutError(f"model folder {spec.model} (role {spec.role!r}) does not exist")
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise LayoutError(f"model folder {spec.model} (role {spec.role!r}) has no config.json: "
                          "not a Hugging Face model folder")
    try:
        with open(cfg) as f:
            conf = json.load(f)
    except (OSError, ValueError):
        return
    conf = conf.get("text_config", conf)
    heads = conf.get("num_attention_heads")
    tp = spec.tensor_parallel_size
    if isinstance(heads, int) and heads % tp:
        raise LayoutError(f"tensor parallel size {tp} does not divide the {heads} attention heads "
                          f"of {spec.model} (role {spec.role!r})")


def check_runnable(plan: LaunchPlan, *, check_vllm_installed: bool = True) -> None:
    """Everything a real start needs that a dry run does not; raises :class:`LayoutError`."""
    for spec in plan.layout.servers:
        check_model(spec)
    check_ports(plan.servers)
    if check_vllm_installed:
        check_vllm(plan.python)


def dry_run_notes(plan: LaunchPlan) -> list[str]:
    """What :func:`check_runnable` would refuse, as warnings (a dry run may plan elsewhere)."""
    notes = []
    for spec in plan.layout.servers:
        try:
            check_model(spec)
        except LayoutError as exc:
            notes.append(f"note: {exc}")
    for s in plan.servers:
        try:
            if port_in_use(s.port, s.host):
                notes.append(f"note: port {s.port} is in use here now")
        except OSError:
            pass
    return notes
