"""The endpoint list: where the launched servers are, written for the load stage.

``endpoints.json``::

    {"schema": 1, "layout": "mixed12", "layout_source": "built-in", "written_at": "...Z",
     "launcher_pid": 1234,
     "endpoints": [
       {"name": "small-0", "role": "small", "url": "http://127.0.0.1:8000",
        "api_base": "http://127.0.0.1:8000/v1", "metrics_url": "http://127.0.0.1:8000/metrics",
        "model": "llama-3-8b-instruct", "model_path": "meta-llama/Meta-Llama-3-8B-Instruct",
        "precision": "bf16", "quantization": null, "dtype": "bfloat16",
        "tensor_parallel_size": 1, "gpus": [0], "link": null, "numa": 0, "cpus": "0-31",
        "device": "cuda", "port": 8000, "pid": 5678, "log": "runs/serve/logs/small-0.log"},
       ...]}

``model`` is the served model name: what a client puts in a request's ``"model"``. The load
stage spreads users over the endpoints of each model (:func:`by_model`) and reports per
endpoint (``name``) and in aggregate.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = 1


@dataclass(frozen=True)
class Endpoint:
    name: str
    role: str
    url: str
    model: str
    gpus: tuple[int, ...] = ()
    port: int = 0
    pid: int | None = None
    api_base: str = ""
    metrics_url: str = ""
    model_path: str = ""
    precision: str = ""
    quantization: str | None = None
    dtype: str = ""
    tensor_parallel_size: int = 1
    link: str | None = None
    numa: int | None = None
    cpus: str = ""
    device: str = "cuda"
    log: str = ""
    node: str = ""   # the Ray node it runs on (harness serve --ray); empty on one host

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = list(self.gpus)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Endpoint:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["gpus"] = tuple(int(g) for g in d.get("gpus") or ())
        url = str(d["url"]).rstrip("/")
        kw["url"] = url
        kw.setdefault("api_base", url + "/v1")
        kw.setdefault("metrics_url", url + "/metrics")
        return cls(**kw)


@dataclass
class EndpointList:
    endpoints: list[Endpoint]
    layout: str = ""
    layout_source: str = ""
    written_at: str = ""
    launcher_pid: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def by_model(self) -> dict[str, list[Endpoint]]:
        return by_model(self.endpoints)


def by_model(endpoints: Iterable[Endpoint]) -> dict[str, list[Endpoint]]:
    """Served model name -> its endpoints, in file order."""
    out: dict[str, list[Endpoint]] = {}
    for e in endpoints:
        out.setdefault(e.model, []).append(e)
    return out


def write_endpoints(path: str, endpoints: Sequence[Endpoint], *, layout: str = "",
                    layout_source: str = "", extra: dict[str, Any] | None = None) -> str:
    """Write atomically (a reader never sees half a file); returns ``path``."""
    doc = {
        "schema": SCHEMA,
        "layout": layout,
        "layout_source": layout_source,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "launcher_pid": os.getpid(),
        **(extra or {}),
        "endpoints": [e.to_dict() for e in endpoints],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_endpoints(path: str) -> EndpointList:
    """Read an endpoint list written by :func:`write_endpoints` (``harness serve``)."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        raise ValueError(f"{path} is not an endpoint list (no 'endpoints' array)")
    if int(doc.get("schema", 0)) > SCHEMA:
        raise ValueError(f"{path} has endpoint-list schema {doc['schema']}; this harness reads "
                         f"up to {SCHEMA}")
    known = {"schema", "layout", "layout_source", "written_at", "launcher_pid", "endpoints"}
    return EndpointList(
        endpoints=[Endpoint.from_dict(e) for e in doc["endpoints"]],
        layout=str(doc.get("layout", "")),
        layout_source=str(doc.get("layout_source", "")),
        written_at=str(doc.get("written_at", "")),
        launcher_pid=doc.get("launcher_pid"),
        extra={k: v for k, v in doc.items() if k not in known},
    )
