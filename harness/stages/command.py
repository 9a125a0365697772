"""A plan step that runs one command (a setup step such as building the tiny local model).

    - name: tiny-model
      stage: command
      argv: ["{vllm_python}", tests/tiny_model.py, runs/tiny-model]
      requires: ["{vllm_python}"]      # skipped (not failed) when one of these is missing
      timeout_s: 300

``{vllm_python}`` is the Python that has vLLM (``$HARNESS_VLLM_PYTHON``, else ``.venv-vllm``),
``{python}`` this harness's Python, ``{run_dir}`` the run directory. The command runs in the
repository root; its output goes to ``NAME/command.log``. A non-zero exit is an error.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from harness.stages.base import Field, StageContext, StageResult, StageSkipped, repo_root

PARAMS: dict[str, Field] = {
    "argv": Field("list", required=True),
    "requires": Field("list", []),
    "timeout_s": Field("float", 3600.0, minimum=1),
    "env": Field("dict", {}),
}
METRICS = {"duration_s": "<="}


def validate_params(p: dict[str, Any]) -> None:
    if not p.get("argv"):
        raise ValueError("argv: a non-empty list of strings")
    for i, a in enumerate(p["argv"]):
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise ValueError(f"argv[{i}]: expected a string, got {a!r} (quote it in YAML)")


def expand(text: str, ctx: StageContext) -> str:
    from servers.launcher.plan import find_vllm_python

    subs = {"{python}": sys.executable, "{run_dir}": str(ctx.run_dir)}
    if "{vllm_python}" in text:
        subs["{vllm_python}"] = find_vllm_python(None)
    for k, v in subs.items():
        text = text.replace(k, v)
    return text


def run_stage(params: dict[str, Any], ctx: StageContext) -> StageResult:
    import time

    argv = [expand(str(a), ctx) for a in params["argv"]]
    for req in params.get("requires") or []:
        path = expand(str(req), ctx)
        full = path if os.path.isabs(path) else str(repo_root() / path)
        if not os.path.exists(full):
            raise StageSkipped(f"{path} is not there")
    ctx.log("command: " + " ".join(argv))
    t0 = time.monotonic()
    env = dict(os.environ, **{str(k): str(v) for k, v in (params.get("env") or {}).items()})
    with open(ctx.out_dir / "command.log", "wb") as log:
        r = subprocess.run(argv, cwd=str(repo_root()), stdout=log, stderr=subprocess.STDOUT, env=env,
                           timeout=float(params.get("timeout_s") or 3600))
    if r.returncode != 0:
        tail = "\n".join((ctx.out_dir / "command.log").read_text(errors="replace").strip().splitlines()[-5:])
        raise RuntimeError(f"{argv[0]} exited with {r.returncode}:\n{tail}")
    return StageResult(name=ctx.name, stage="command", status="pass",
                       measured={"duration_s": round(time.monotonic() - t0, 2)},
                       params={"argv": argv}, detail=" ".join(argv))
