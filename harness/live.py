"""Live observability, wired into Locust: the listeners that hook up
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

from harness import exporter, load_options, server_metrics, webui

log = logging.getLogger(__name__)


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
    spec = environment.llm.load
    port = spec.metrics_port
    if port:
        host = spec.metrics_host or load_options.METRICS_HOST
        try:
            environment.llm_metrics_server = exporter.serve(environment, host, port)
        except OSError as exc:   # a taken port: one line and exit 2, not a traceback and exit 4
            from harness.ports import bind_error
            sys.stderr.write(f"locust: error: {bind_error('--llm-metrics-port', host, port, exc)}\n")
            raise SystemExit(2) from None
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)


@events.quit.add_listener
def _on_quit(**_kw) -> None:
    from harness.run_state import current_environment

    env = current_environment()
    server = getattr(env, "llm_metrics_server", None) if env is not None else None
    if server is None:
        return
    linger = env.llm.load.metrics_linger
    if linger > 0:
        gevent.sleep(linger)   # the server's greenlet keeps answering scrapes meanwhile
    server.stop(timeout=1)
