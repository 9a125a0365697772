"""``hardware.json`` in and out: write a report atomically, read one back to judge it again."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

from harness.hardware.model import (
    SCHEMA, Check, GemmResult, GpuInfo, HardwareReport, HbmResult, P2PResult, PowerStats,
)
from harness.hardware.targets import thresholds_doc
from harness.json_io import write_json


def write_report(report: HardwareReport, out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "hardware.json"
    write_json(path, report.to_dict(), default=_json_default)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    return str(o)


def _power_from(d: dict[str, Any] | None) -> PowerStats | None:
    return PowerStats(**d) if d else None


def report_from_dict(d: dict[str, Any]) -> HardwareReport:
    """Rebuild a :class:`HardwareReport` from ``hardware.json`` (to re-judge recorded numbers)."""
    if d.get("schema") != SCHEMA:
        raise ValueError(f"hardware.json schema {d.get('schema')!r}, expected {SCHEMA}")
    hbm = [HbmResult(**{**r, "power": _power_from(r.get("power"))}) for r in d.get("hbm") or []]
    gemm = [GemmResult(**{**r, "power": _power_from(r.get("power"))}) for r in d.get("gemm") or []]
    p2p = None
    if d.get("p2p"):
        p = dict(d["p2p"])
        p["power"] = {k: PowerStats(**v) for k, v in (p.get("power") or {}).items()}
        p2p = P2PResult(**p)
    return HardwareReport(
        status=d["status"], skipped_reason=d.get("skipped_reason"),
        started_at=d.get("started_at", ""), duration_s=d.get("duration_s", 0.0),
        quick=d.get("quick", False), host=d.get("host") or {},
        gpus=[GpuInfo(**g) for g in d.get("gpus") or []], topology=d.get("topology"),
        hbm=hbm, gemm=gemm, p2p=p2p, checks=[Check(**c) for c in d.get("checks") or []],
        targets=d.get("targets") or {}, thresholds=d.get("thresholds") or {},
        errors=d.get("errors") or [],
    )


def load_report(path: str | os.PathLike[str]) -> HardwareReport:
    return report_from_dict(json.loads(Path(path).read_text()))


def skipped_report(reason: str, quick: bool = False) -> HardwareReport:
    return HardwareReport(
        status="skipped", skipped_reason=reason, quick=quick,
        started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        thresholds=thresholds_doc(),
    )

