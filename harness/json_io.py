"""The harness's JSON files on disk: one atomic writer, one JSONL reader.

Every JSON document the harness writes (summary.json, result.json, run.json, capacity.json,
hardware.json, progress.json, a perplexity worker's results) is replaced whole by
``write_json``, so a reader, a resumed run or a run killed mid-write never sees half a
file.

Every JSONL file it reads back (requests.jsonl, started.jsonl, timeseries.jsonl) is read by
``read_jsonl``, with one rule for a line that is not a whole JSON value:

* a **last line without its newline** is a write in progress (the writer is still appending,
  or was killed mid-line): it is skipped. The writers end every line with one ``write()``
  that includes the newline, so a line that has its newline is whole;
* a **malformed line anywhere else** is an error (``JsonlError``, naming the file and line):
  the writers never leave one, so it means the file was damaged or is not what it claims to
  be, and quietly dropping it (or everything after it) would report figures from part of a
  run as the whole;
* blank lines are skipped.

Standard library only: the perplexity worker imports it inside lm-eval's Python.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Callable


class JsonlError(ValueError):
    """A malformed line inside a JSONL file (not its torn last line)."""


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] = str) -> None:
    """Write ``obj`` as JSON (one trailing newline) to ``path`` by replacing it whole: a
    temporary file beside it (named per process, so two writers never share one) is renamed
    over it. Missing parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_jsonl(path: str | os.PathLike[str], *, missing_ok: bool = False) -> list[Any]:
    """Every whole line of a JSONL file, parsed (the rule for torn and malformed lines is in
    the module docstring). A missing file is ``[]`` with ``missing_ok``, else an OSError."""
    out: list[Any] = []
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        if missing_ok:
            return out
        raise
    with f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break   # the last line, still being written (or cut by a kill)
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise JsonlError(f"{path}:{n}: not a JSON line ({exc})") from None
    return out
