"""The server's side of each timeseries window: scrape vLLM's (or the simulator's)
Prometheus `/metrics` when a window closes and put its engine state into that
`timeseries.jsonl` line, next to the client-side latency of the same window:

    "server": {"num_requests_running": 7, "num_requests_waiting": 2,
               "kv_cache_usage_perc": 0.41, "num_preemptions_total": 0,
               "scrape_ms": 1.8, "error": null}

Values come from `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` (vLLM before V1: `vllm:gpu_cache_usage_perc`; a fraction,
1 = full) and `vllm:num_preemptions_total`. Several label sets (models, engines) and
several servers (user classes with their own `host`) are added up; KV-cache usage is
the highest of them. A server that does not answer gives `null` values and the error.

`--llm-server-metrics auto` (default) scrapes `<host>/metrics` of every host the users
target; `off` disables it; a comma-separated list of URLs scrapes those instead.
Runs on the master (or the local runner) only (hooked up by `harness.live`).
"""
from __future__ import annotations

import logging
import math
import time
import urllib.error
import urllib.request
from typing import Any
from collections.abc import Iterable
from urllib.parse import urlsplit

from harness.http_stream import HTTPClientError, StreamingConnection

log = logging.getLogger(__name__)

#: timeseries key -> vLLM sample names, first found wins (newer names first).
SERVER_METRICS: dict[str, tuple[str, ...]] = {
    "num_requests_running": ("vllm:num_requests_running",),
    "num_requests_waiting": ("vllm:num_requests_waiting",),
    "kv_cache_usage_perc": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "num_preemptions_total": ("vllm:num_preemptions_total", "vllm:num_preemptions"),
}
_MAX_KEYS = frozenset({"kv_cache_usage_perc"})   # combined by max, the others by sum
_WANTED = tuple(n for names in SERVER_METRICS.values() for n in names)


def _samples(text: str) -> dict[str, list[float]]:
    """The values of the wanted sample names in a Prometheus text exposition.

    Why not prometheus_client's parser: it builds every family of the exposition (vLLM exports
    hundreds of histogram buckets), which took 8 ms of the load generator's event loop per window
    on a lent machine, for four numbers. This reads only the lines of those names: ``name``,
    optional ``{labels}`` (quoted values may hold spaces, braces and escapes), a value, and an
    optional timestamp.
    """
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        for name in _WANTED:
            if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ", "\t"):
                break
        else:
            continue
        rest = line[len(name):]
        if rest.startswith("{"):
            i, quoted, n = 1, False, len(rest)
            while i < n:
                ch = rest[i]
                if quoted:
                    if ch == "\\":
                        i += 1
                    elif ch == '"':
                        quoted = False
                elif ch == '"':
                    quoted = True
                elif ch == "}":
                    break
                i += 1
            rest = rest[i + 1:]
        parts = rest.split()
        if not parts:
            continue
        try:
            value = float(parts[0])
        except ValueError:
            continue
        out.setdefault(name, []).append(value)
    return out


def parse_server_metrics(text: str) -> dict[str, float | None]:
    """The four engine-state values from a Prometheus text exposition (None when absent)."""
    samples = _samples(text)
    out: dict[str, float | None] = {}
    for key, names in SERVER_METRICS.items():
        vals = next((samples[n] for n in names if n in samples), None)
        if not vals:
            out[key] = None
        else:
            out[key] = max(vals) if key in _MAX_KEYS else math.fsum(vals)
    return out


def _fetch(url: str, timeout: float, conn: StreamingConnection | None,
           headers: dict[str, str] | None = None) -> str:
    if conn is None:
        # https, or a caller without a connection: urllib (it builds an SSL context each time,
        # tens of milliseconds, which is why the scraper keeps plain-http connections open).
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (our target)
            return resp.read().decode("utf-8", errors="replace")
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    status, _, body = conn.request("GET", path, None, headers)
    if status != 200:
        raise ValueError(f"HTTP {status}")
    return body.decode("utf-8", errors="replace")


def scrape(url: str, timeout: float = 1.0, conn: StreamingConnection | None = None,
           headers: dict[str, str] | None = None) -> dict[str, Any]:
    """GET one `/metrics` URL (over ``conn`` when given, with ``headers``: the API key of a
    key-protected target); the parsed values plus `scrape_ms` and `error`."""
    t0 = time.perf_counter()
    try:
        out: dict[str, Any] = dict(parse_server_metrics(_fetch(url, timeout, conn, headers)))
        out["error"] = None
    except (OSError, urllib.error.URLError, ValueError, HTTPClientError) as exc:
        if conn is not None:
            conn.close()
        out = {k: None for k in SERVER_METRICS}
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
    out["scrape_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
    return out


def combine(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several servers' values -> one (sums; KV usage: the highest)."""
    if len(results) == 1:
        return dict(next(iter(results.values())))
    out: dict[str, Any] = {}
    for key in SERVER_METRICS:
        vals = [r[key] for r in results.values() if r.get(key) is not None]
        out[key] = (max(vals) if key in _MAX_KEYS else sum(vals)) if vals else None
    errors = {u: r["error"] for u, r in results.items() if r.get("error")}
    out["error"] = "; ".join(f"{u}: {e}" for u, e in errors.items()) or None
    out["scrape_ms"] = max((r.get("scrape_ms") or 0.0) for r in results.values())
    out["servers"] = len(results)
    return out


def _base(url: str | None) -> str | None:
    if not url:
        return None
    return url.rstrip("/")


def metrics_urls(environment) -> list[str]:
    """What to scrape now, from `--llm-server-metrics` and the hosts the users target."""
    from harness.load_options import from_locust

    opt = (from_locust(environment.parsed_options).server_metrics or "auto").strip()
    if opt == "off":
        return []
    if opt != "auto":
        return [u.strip() for u in opt.split(",") if u.strip()]
    # --host (or the web UI's host field) overrides every user class's own host.
    candidates: Iterable[str | None] = ([environment.host] if environment.host else
                                        [getattr(c, "host", None) for c in (environment.user_classes or [])])
    hosts: list[str] = []
    for h in candidates:
        b = _base(h)
        if b and b.startswith("http") and b not in hosts:
            hosts.append(b)
    return [h + "/metrics" for h in hosts]


class ServerScraper:
    """A timeseries hook: adds `server` to each window line."""

    def __init__(self, environment, timeout: float = 1.0) -> None:
        self.env = environment
        self.timeout = timeout
        self._warned: set[str] = set()
        self._conns: dict[str, StreamingConnection] = {}   # kept alive between windows

    def _conn(self, url: str) -> StreamingConnection | None:
        if not url.startswith("http://"):
            return None
        conn = self._conns.get(url)
        if conn is None:
            conn = self._conns[url] = StreamingConnection.from_url(url, timeout=self.timeout)
        return conn

    def __call__(self, line: dict[str, Any]) -> None:
        urls = metrics_urls(self.env)
        if not urls:
            return
        key = getattr(getattr(self.env, "llm", None), "api_key", None)   # sent to targets only
        results = {u: scrape(u, self.timeout, self._conn(u), key.headers_for(u) if key else None)
                   for u in urls}
        for u, r in results.items():
            if r["error"] and u not in self._warned:
                self._warned.add(u)
                log.warning("server metrics: %s: %s (recorded as null; --llm-server-metrics off "
                            "to stop trying)", u, r["error"])
        line["server"] = combine(results)
