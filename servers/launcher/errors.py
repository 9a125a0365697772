"""Errors the launcher raises; the CLI prints each as one line (plus a log tail where one exists).

Nothing in ``servers/`` imports ``harness`` (the arrows point one way), so these are the
launcher's own classes; ``harness serve`` turns :class:`LayoutError` into ``UsageError``.
"""
from __future__ import annotations


class LauncherError(Exception):
    """Base class: the message is meant for the user as it stands."""


class LayoutError(LauncherError):
    """Bad input the user can fix: unknown layout, too many GPUs, bad YAML, port in use, ..."""


class ServerStartError(LauncherError):
    """A server died or did not become healthy during start-up; the message quotes its log tail."""

    def __init__(self, message: str, *, name: str = "", log_path: str | None = None,
                 log_tail: str = "") -> None:
        super().__init__(message)
        self.name = name
        self.log_path = log_path
        self.log_tail = log_tail


class ServerDiedError(LauncherError):
    """A server that had started exited while it should have been serving."""
