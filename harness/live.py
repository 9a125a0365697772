"""Live observability, wired into Locust: the options and listeners that hook up
`harness.webui` (the LLM tab, charts page and rate control), `harness.exporter`
(Prometheus `/metrics`) and `harness.server_metrics` (the server's state in each
`timeseries.jsonl` line). `harness.plugin` imports this module; the three modules
themselves do not import Locust, so they can be tested without its monkey-patching.

All of it runs on the master or the local runner (where `environment.llm_aggregate`,
the merged view of the run, lives), never on workers.
"""
from __future__ import annotations

import logging
import sys

import gevent
from locust import events
from locust.runners import LocalRunner, MasterRunner

from harness import exporter, server_metrics, webui

log = logging.getLogger(__name__)


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--llm-metrics-port", type=int, default=0, include_in_web_ui=False,
                        help="serve Prometheus /metrics on this port (0 = off; the web UI "
                             "always serves /metrics too)")
    parser.add_argument("--llm-metrics-host", default=exporter.DEFAULT_HOST, include_in_web_ui=False,
                        help="address the /metrics server binds (default 127.0.0.1)")
    parser.add_argument("--llm-metrics-linger", type=float, default=0.0, include_in_web_ui=False,
                        help="keep /metrics up this many seconds after the run, for a last scrape")
    parser.add_argument("--llm-server-metrics", default="auto", include_in_web_ui=False,
                        help="server state in timeseries.jsonl: 'auto' scrapes <host>/metrics, "
                             "'off', or comma-separated /metrics URLs")


@events.init.add_listener
def _on_init(environment, web_ui=None, **_kw) -> None:
    agg = getattr(environment, "llm_aggregate", None)
    if agg is None or not isinstance(environment.runner, (MasterRunner, LocalRunner)):
        return
    # Timeseries hooks, in order: the server's state joins the line, then the readers.
    scraper = server_metrics.ServerScraper(environment)
    environment.llm_server_scraper = scraper
    agg.window_hooks.insert(0, scraper)
    environment.llm_last_window = None
    agg.window_hooks.append(lambda line: setattr(environment, "llm_last_window", line))
    if web_ui is not None:
        webui.install(environment, web_ui)
        exporter.add_routes(environment, web_ui)
    o = environment.parsed_options
    port = int(getattr(o, "llm_metrics_port", 0) or 0)
    if port:
        host = getattr(o, "llm_metrics_host", exporter.DEFAULT_HOST) or exporter.DEFAULT_HOST
        try:
            environment.llm_metrics_server = exporter.serve(environment, host, port)
        except OSError as exc:   # a taken port: one line and exit 2, not a traceback and exit 4
            from harness.ports import bind_error
            sys.stderr.write(f"locust: error: {bind_error('--llm-metrics-port', host, port, exc)}\n")
            raise SystemExit(2) from None
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)


@events.quit.add_listener
def _on_quit(**_kw) -> None:
    from harness.plugin import _ENV

    env = _ENV.get("env")
    server = getattr(env, "llm_metrics_server", None) if env is not None else None
    if server is None:
        return
    linger = float(getattr(env.parsed_options, "llm_metrics_linger", 0.0) or 0.0)
    if linger > 0:
        gevent.sleep(linger)   # the server's greenlet keeps answering scrapes meanwhile
    server.stop(timeout=1)
