"""Plan files: load a YAML plan and validate every field, naming the bad one.

A plan (see ``plans/*.yaml``)::

    name: l40s-x12                     # required
    description: ...
    gpu: l40s                          # the card the physics check and the cost use
    gpu_count: 12
    gpu_overrides: {bf16_tflops: 183}  # any GpuSpec field (servers/simulator/gpus.py)
    tolerance: 0.1                     # bare-number targets may miss by this fraction
    on_failure: continue               # stop (default) | continue, per stage too
    on_invalid: invalid                # invalid (default) | fail | pass, per stage too: what a
                                       # stage whose figures cannot be trusted counts as
    system: {total_memory_gb: 576, ...}  # the comparison table's system figures (targets)
    cost: {...}                        # prices and layouts (harness/stages/cost.py)
    stages:
      - name: throughput-8b-bf16       # unique; the stage's folder in the run directory
        stage: throughput              # a module of harness/stages/ with run_stage (contract.py)
        table: single GPU              # optional: the seed table and row it fills in the report
        row: Llama-3 8B BF16
        expect: {output_tokens_per_s: 4500}
        on_failure: continue
        on_invalid: pass               # e.g. a laptop whose load generator cannot keep up
        skip: "reason"                 # optional: listed but not run
        ...                            # the stage's own keys (each stage module's PARAMS)

Errors are :class:`PlanError` with one line: ``plans/x.yaml: stages[2] (name).num_prompts:
expected an integer, got 'abc'``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from harness.stages.base import ON_INVALID, Field
from harness.stages.contract import kinds, stage_module

COMMON = {
    "name": Field("str", required=True),
    "stage": Field("str", required=True),  # one of contract.kinds(), checked in validate_stage
    "description": Field("str", ""),
    "table": Field("str", None),
    "row": Field("str", None),
    "expect": Field("dict", {}),
    "on_failure": Field("str", None, choices=("stop", "continue")),
    "on_invalid": Field("str", None, choices=ON_INVALID),
    "skip": Field("any", False),
}
TOP = {
    "name": Field("str", required=True),
    "description": Field("str", ""),
    "gpu": Field("str", None),
    "gpu_count": Field("int", None, minimum=1),
    "gpu_overrides": Field("dict", {}),
    "tolerance": Field("float", 0.0, minimum=0),
    "on_failure": Field("str", "stop", choices=("stop", "continue")),
    "on_invalid": Field("str", "invalid", choices=ON_INVALID),
    "system": Field("dict", {}),
    "cost": Field("dict", {}),
    "stages": Field("list", required=True),
    "notes": Field("list", []),
}
SYSTEM_KEYS = ("total_memory_gb", "total_bandwidth_tbs", "power_w", "tokens_per_s_per_gpu_7b",
               "interconnect")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PlanError(ValueError):
    """A plan that cannot run; the message is one line naming the field."""


def _typename(kind: str) -> str:
    return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
            "list": "a list", "dict": "a mapping", "str|dict": "a string or a mapping"}.get(kind, kind)


def check_field(where: str, f: Field, value: Any) -> Any:
    """Type-check (and coerce int -> float) one value; raises PlanError naming ``where``."""
    if value is None:
        if f.required:
            raise PlanError(f"{where}: is required")
        return None
    k = f.kind
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
        "str|dict": isinstance(value, (str, dict)),
        "any": True,
    }[k]
    if not ok:
        raise PlanError(f"{where}: expected {_typename(k)}, got {value!r}")
    if f.choices and value not in f.choices:
        raise PlanError(f"{where}: {value!r} is not one of {', '.join(map(str, f.choices))}")
    if f.minimum is not None and isinstance(value, (int, float)) and value < f.minimum:
        raise PlanError(f"{where}: {value!r} is below the minimum {f.minimum:g}")
    return float(value) if k == "float" else value


def _close(name: str, known: list[str]) -> str:
    import difflib

    m = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


def validate_stage(i: int, raw: Any, where: str) -> dict[str, Any]:
    from harness.stages import expect

    if not isinstance(raw, dict):
        raise PlanError(f"{where}stages[{i}]: expected a mapping with name: and stage:, got {raw!r}")
    label = f"{where}stages[{i}]" + (f" ({raw['name']})" if isinstance(raw.get("name"), str) else "")
    out: dict[str, Any] = {}
    for key in ("name", "stage"):
        out[key] = check_field(f"{label}.{key}", COMMON[key], raw.get(key))
    if not _NAME.match(out["name"]):
        raise PlanError(f"{label}.name: {out['name']!r} must be letters, digits, '.', '_' or '-' "
                        "(it names the stage's folder)")
    if out["stage"] not in kinds():
        raise PlanError(f"{label}.stage: {out['stage']!r} is not one of {', '.join(kinds())}")
    mod = stage_module(out["stage"])
    fields: dict[str, Field] = {**COMMON, **mod.PARAMS}
    for key in raw:
        if key not in fields:
            raise PlanError(f"{label}.{key}: unknown key for a {out['stage']} stage"
                            f"{_close(str(key), list(fields))}; known: {', '.join(fields)}")
    for key, f in fields.items():
        if key in ("name", "stage"):
            continue
        value = check_field(f"{label}.{key}", f, raw.get(key, f.default))
        out[key] = value if value is not None else f.default
    metrics = getattr(mod, "METRICS", {})
    for metric, target in (out.get("expect") or {}).items():
        base = str(metric).rsplit(".", 1)[-1]
        if metrics and base not in metrics:
            raise PlanError(f"{label}.expect.{metric}: a {out['stage']} stage measures no "
                            f"{base!r}{_close(base, list(metrics))}; it measures {', '.join(metrics)}")
        try:
            expect.parse_target(str(metric), target)
        except expect.TargetError as exc:
            raise PlanError(f"{label}.expect.{metric}: {exc}") from None
    validator = getattr(mod, "validate_params", None)
    if validator is not None:
        try:
            validator(out)
        except ValueError as exc:
            raise PlanError(f"{label}.{exc}") from None
    return out


def validate(doc: Any, source: str = "plan") -> dict[str, Any]:
    where = f"{source}: "
    if not isinstance(doc, dict):
        raise PlanError(f"{where}a plan is a mapping with name: and stages:, got {type(doc).__name__}")
    for key in doc:
        if key not in TOP:
            raise PlanError(f"{where}{key}: unknown top-level key{_close(str(key), list(TOP))}; "
                            f"known: {', '.join(TOP)}")
    plan: dict[str, Any] = {}
    for key, f in TOP.items():
        v = check_field(f"{where}{key}", f, doc.get(key, f.default))
        plan[key] = v if v is not None else f.default
    if plan.get("gpu"):
        from servers.simulator.gpus import GPUS

        if plan["gpu"].lower() not in GPUS:
            raise PlanError(f"{where}gpu: unknown GPU {plan['gpu']!r}; known: {', '.join(GPUS)}")
    if plan["gpu_overrides"]:
        from dataclasses import fields as dc_fields

        from servers.simulator.gpus import GpuSpec

        known = [f.name for f in dc_fields(GpuSpec)]
        for k in plan["gpu_overrides"]:
            if k not in known:
                raise PlanError(f"{where}gpu_overrides.{k}: not a GPU spec field; known: {', '.join(known)}")
    for k in plan["system"]:
        if k not in SYSTEM_KEYS:
            raise PlanError(f"{where}system.{k}: unknown{_close(str(k), list(SYSTEM_KEYS))}; "
                            f"known: {', '.join(SYSTEM_KEYS)}")
    if plan["cost"]:
        from harness.stages import cost

        try:
            cost.validate(plan["cost"])
        except ValueError as exc:
            raise PlanError(f"{where}cost.{exc}") from None
    if not plan["stages"]:
        raise PlanError(f"{where}stages: a plan needs at least one stage")
    stages = [validate_stage(i, s, where) for i, s in enumerate(plan["stages"])]
    seen: dict[str, int] = {}
    for i, s in enumerate(stages):
        if s["name"] in seen:
            raise PlanError(f"{where}stages[{i}].name: {s['name']!r} is already the name of "
                            f"stages[{seen[s['name']]}]")
        seen[s["name"]] = i
    for layout in (plan["cost"] or {}).get("layouts") or []:
        for key in ("stage", "capacity_stage"):
            st = layout.get(key)
            if st and st not in seen:
                raise PlanError(f"{where}cost.layouts ({layout.get('name')}).{key}: no stage named {st!r}")
    plan["stages"] = stages
    return plan


def load(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"{path}: cannot read the plan ({exc.strerror})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PlanError(f"{path}: not valid YAML{at}: {problem}") from None
    plan = validate(doc, str(path))
    plan["_source"] = str(path)
    return plan
