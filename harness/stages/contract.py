"""What a stage kind is: a module of ``harness/stages/`` named after its kind, with ``PARAMS``
and ``run_stage``, and optional hooks the plan, the runner and the report call when present.

The kind is the module's name (``stage: hardware`` runs :mod:`harness.stages.hardware`), and
the kinds are the modules here that define ``run_stage``, so a new kind is one new module: no
table to register it in, and no ``if kind == ...`` in the runner, the physics check or the
report. What a kind adds to those it says through a hook (:class:`StageHooks`).
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast, runtime_checkable
from collections.abc import Callable

from harness.stages.base import Field, StageContext, StageResult


@runtime_checkable
class Stage(Protocol):
    """Every stage module: its plan keys and how it runs."""

    PARAMS: dict[str, Field]

    def run_stage(self, params: dict[str, Any], ctx: StageContext) -> StageResult: ...


class StageHooks(Protocol):
    """Optional members of a stage module, each used only where defined. Beside these, plan
    validation reads ``METRICS`` (the figures ``expect:`` may name) and calls
    ``validate_params(params)`` (raising ``ValueError`` for a bad combination)."""

    def target_marks(self, stage: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
        """The physics marks of one validated plan stage's targets, from the plan alone
        (before anything runs): each target held against the hardware ceiling."""

    def run_environment(self, result: dict[str, Any], env: dict[str, Any]) -> None:
        """Add what this stage's result knows of the machine (GPUs, driver, the vLLM Python)
        to ``run.json``'s environment."""

    def report_tables(self, name: str, result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
        """Extra report sections of this stage: ``(title, head, rows)``, in HTML and Markdown."""

    def report_charts(self, run_dir: Path, name: str, result: dict[str, Any]) -> list[str]:
        """Inline SVG charts of this stage for ``report.html``."""


def vllm_python_environment(result: dict[str, Any], env: dict[str, Any]) -> None:
    """The ``run_environment`` hook of the stages that run vLLM (throughput, perplexity): the first
    one's Python, from which ``run.json`` reads the vLLM and lm-eval versions."""
    python = (result.get("data") or {}).get("python")
    if python:
        env.setdefault("vllm_python", python)


@lru_cache(maxsize=1)
def kinds() -> tuple[str, ...]:
    """Every stage kind: the modules of :mod:`harness.stages` that define ``run_stage``."""
    import harness.stages as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if hasattr(importlib.import_module(f"harness.stages.{info.name}"), "run_stage"):
            found.append(info.name)
    return tuple(sorted(found))


def stage_module(kind: str) -> Stage:
    """The module of a stage kind (``KeyError`` for one that is not a kind)."""
    if kind not in kinds():
        raise KeyError(kind)
    return cast(Stage, importlib.import_module(f"harness.stages.{kind}"))


def hook(kind: str, name: str) -> Callable[..., Any] | None:
    """A stage kind's hook (see :class:`StageHooks`), ``None`` where it has none or the kind is
    unknown (a result from an older harness)."""
    if kind not in kinds():
        return None
    module: ModuleType = importlib.import_module(f"harness.stages.{kind}")
    return getattr(module, name, None)
