"""Before any load: is the server there, does it take our key, does it serve the model?

A dead URL or a wrong model name used to run the whole load and end in a page of failures
(exit 4) with the server's own message never shown. One `GET /v1/models` with a short timeout
answers all three, and its failure is one line naming what to fix (exit 2, nothing run).
"""
from __future__ import annotations

import http.client
import json
from typing import cast
from urllib.parse import SplitResult, urlsplit

from harness.credentials import ApiKey
from harness.errors import UsageError

TIMEOUT_S = 5.0


def check_url(url: str, option: str = "--url") -> SplitResult:
    """`url`'s parts, or a one-line UsageError naming `option` unless it is http://HOST[:PORT]
    (checked before anything is sent: harness load's flags, a locustfile's or the web form's host)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"{option} {url!r} must be http://HOST:PORT (https is not supported yet)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:   # (None: no port given, 80)
        raise UsageError(f"{option} {url!r}: the port must be a number in 1..65535")
    return parts


def served_models(base_url: str, key: ApiKey, option: str = "--url", timeout: float = TIMEOUT_S) -> list[str]:
    """The model ids `base_url` serves; a UsageError naming `option` when it cannot tell."""
    parts = urlsplit(base_url)
    try:
        # (check_url has made sure the URL names a host)
        conn = http.client.HTTPConnection(cast(str, parts.hostname), parts.port or 80,
                                          timeout=timeout)
        try:
            conn.request("GET", "/v1/models", headers={"Accept": "application/json",
                                                       **key.headers_for(base_url)})
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as e:
        raise UsageError(f"{option} {base_url}: no server answers ({e.__class__.__name__}: {e}); start "
                         f"one (e.g. `harness sim --port {parts.port or 80}`) or fix the URL") from None
    if status in (401, 403):
        why = (f"the key from ${key.env_var} was refused" if key.present else
               f"no API key was sent: set ${key.env_var}")
        raise UsageError(f"{option} {base_url}: GET /v1/models answered {status}: {why}")
    if status != 200:
        raise UsageError(f"{option} {base_url}: GET /v1/models answered {status} "
                         f"({body[:200].decode(errors='replace').strip()}); is this an OpenAI-compatible server?")
    try:
        return [m["id"] for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{option} {base_url}: GET /v1/models did not answer a model list; "
                         f"is this an OpenAI-compatible server?") from None


def check_target(base_url: str, model: str | None, key: ApiKey, option: str = "--url",
                 model_option: str = "--model") -> None:
    """Raise a one-line UsageError unless `base_url` answers and serves `model` (any, if None);
    `option` and `model_option` are what the user set them with (harness load's flags, the
    plugin's `--host`/`--llm-model`, or a user class's attribute)."""
    check_url(base_url, option)
    models = served_models(base_url, key, option)
    if not models:
        raise UsageError(f"{option} {base_url} serves no model")
    if model and model not in models:
        raise UsageError(f"{model_option} {model!r} is not served by {base_url}; it serves: {', '.join(models)}")
