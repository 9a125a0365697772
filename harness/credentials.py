"""The API key: read once, sent only where the command line pointed.

The key's environment variable is named on the command line (`--llm-api-key-env`) and read
once when Locust starts. Nothing that arrives later -- the web UI's start form, a master's
spawn message -- can name another variable, and the key goes only to the targets configured
at start (Locust's `--host` and the user classes' own `host`): a form that points the test at
another host sends it there without the key. Otherwise anyone who can reach the web UI could
make the harness send any of its environment's secrets, as a Bearer token, to a host of their
choosing.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_ENV_VAR = "OPENAI_API_KEY"   # the openai client's own, and --llm-api-key-env's default


def origin(url: str) -> str | None:
    """'http://HOST:PORT' of a URL (port 80 when absent), or None when it names no host."""
    parts = urlsplit(url or "")
    if not parts.scheme or not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


class ApiKey:
    """The key (or none) and the origins it may be sent to."""

    def __init__(self, env_var: str | None, targets: Iterable[str | None]) -> None:
        self.env_var = env_var or None
        self._key = os.environ.get(env_var) if env_var else None
        self._origins = frozenset(o for o in (origin(t or "") for t in targets) if o)
        self._warned: set[str] = set()

    @property
    def origins(self) -> list[str]:
        return sorted(self._origins)

    @property
    def present(self) -> bool:
        return bool(self._key)

    def headers_for(self, base_url: str) -> dict[str, str]:
        """The Authorization header for a request to `base_url`, or none: the key goes only to
        the origins configured at start."""
        if not self._key:
            return {}
        o = origin(base_url)
        if o in self._origins:
            return {"Authorization": f"Bearer {self._key}"}
        if o not in self._warned:
            self._warned.add(o or "")
            log.warning("not sending the API key from $%s to %s: it is not a target given at start "
                        "(%s)", self.env_var, o, ", ".join(sorted(self._origins)) or "none")
        return {}

    def __repr__(self) -> str:   # never the key itself
        return f"ApiKey(env_var={self.env_var!r}, present={self.present}, origins={sorted(self._origins)})"
