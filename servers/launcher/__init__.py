"""The vLLM launcher: layouts, placement on GPUs, the exact commands, lifecycle, endpoint list.

Modules, one concept each:

- :mod:`.layouts`: what to serve (built-ins ``single``, ``tp2``, ``mixed12``, ``cpu``; YAML files)
- :mod:`.placement`: which GPUs/CPUs each replica gets (uses :mod:`servers.topology`)
- :mod:`.command`: the vLLM command line and environment of one replica
- :mod:`.plan`: a whole launch plan (dry run) and the checks before a real start
- :mod:`.lifecycle`: start, health-wait and stop processes (process groups, no orphans)
- :mod:`.cluster`: run a plan and write the endpoint list
- :mod:`.endpoints`: the endpoint list file the load stage reads

The load stage reads what ``harness serve`` (or :func:`launch`) wrote::

    from servers.launcher import read_endpoints
    eps = read_endpoints("runs/serve/endpoints.json")
    for model, endpoints in eps.by_model().items():
        urls = [e.url for e in endpoints]       # "http://127.0.0.1:8000" (no /v1)

Nothing here imports Locust or ``harness``.
"""
from servers.launcher.cluster import ENDPOINTS_FILE, Cluster, launch
from servers.launcher.endpoints import (
    Endpoint,
    EndpointList,
    by_model,
    read_endpoints,
    write_endpoints,
)
from servers.launcher.errors import (
    LauncherError,
    LayoutError,
    ServerDiedError,
    ServerStartError,
)
from servers.launcher.layouts import (
    BUILTIN_LAYOUTS,
    PRECISIONS,
    Layout,
    ServerSpec,
    layout_from_dict,
    load_layout,
    parse_model_overrides,
)
from servers.launcher.lifecycle import ProcessSpec, ServerGroup, Terminated
from servers.launcher.placement import Assignment, Placement, place
from servers.launcher.plan import (
    LaunchPlan,
    ServerPlan,
    check_runnable,
    find_vllm_python,
    make_plan,
)

__all__ = [
    "ENDPOINTS_FILE", "Cluster", "launch",
    "Endpoint", "EndpointList", "by_model", "read_endpoints", "write_endpoints",
    "LauncherError", "LayoutError", "ServerDiedError", "ServerStartError",
    "BUILTIN_LAYOUTS", "PRECISIONS", "Layout", "ServerSpec", "layout_from_dict", "load_layout",
    "parse_model_overrides",
    "ProcessSpec", "ServerGroup", "Terminated",
    "Assignment", "Placement", "place",
    "LaunchPlan", "ServerPlan", "check_runnable", "find_vllm_python", "make_plan",
]
