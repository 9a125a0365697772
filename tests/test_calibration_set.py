"""The calibration set (docs/data/calibration-points.json) is well formed: every point says
where it came from and what was published, and names hardware, model and precisions the
simulator knows, so a replay of it is not a guess about what was measured."""
from __future__ import annotations

import json
import pathlib

from servers.simulator.gpus import GPUS
from servers.simulator.models import KV_CACHE_DTYPES, MODELS, PRECISIONS

POINTS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "data" / "calibration-points.json"
METRICS = {"output_tokens_per_s", "total_tokens_per_s", "ttft_ms_p50", "ttft_ms_mean",
           "tpot_ms_mean", "tpot_ms_p50", "itl_ms_p50", "itl_ms_mean"}
REGIMES = {"light", "saturated", "knee"}


def _points() -> list[dict]:
    doc = json.loads(POINTS.read_text())
    assert doc["schema_version"] == 1
    return doc["points"]


def test_every_point_has_a_source_and_a_quote():
    for p in _points():
        src = p["source"]
        assert src.get("url") or (src.get("repo") and src.get("path") and src.get("commit")), p["id"]
        assert p["quote"].strip(), p["id"]


def test_point_ids_are_unique():
    ids = [p["id"] for p in _points()]
    assert len(ids) == len(set(ids))


def test_every_point_names_known_hardware_model_and_precisions():
    for p in _points():
        assert p["gpu"] in GPUS, (p["id"], p["gpu"])
        assert p["model"] in MODELS, (p["id"], p["model"])
        assert p["weights_dtype"] in PRECISIONS, (p["id"], p["weights_dtype"])
        assert p["kv_cache_dtype"] in KV_CACHE_DTYPES, (p["id"], p["kv_cache_dtype"])
        assert p["tp"] >= 1 and p["gpu_count"] >= p["tp"], p["id"]


def test_every_point_pins_its_workload_metric_and_regime():
    for p in _points():
        w = p["workload"]
        assert w["input_len"] > 0 and w["output_len"] > 0, p["id"]
        loads = [k for k in ("concurrency", "request_rate", "max_throughput") if k in w]
        assert len(loads) == 1, (p["id"], loads)
        assert p["metric"] in METRICS, (p["id"], p["metric"])
        assert p["regime"] in REGIMES, (p["id"], p["regime"])
        assert isinstance(p["value"], (int, float)) and p["value"] > 0, p["id"]


def test_committed_published_calibration_table_is_current():
    """The doc's simulated-vs-published table is what the simulator gives now (rerun
    benchmarks/calibration_published.py after changing the simulator or the points)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "calibration_published", POINTS.parents[2] / "benchmarks" / "calibration_published.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    committed = mod.current_table(mod.DOC.read_text())
    assert committed is not None, "no published-calibration table in docs/simulator-calibration.md"
    assert committed == mod.render(), "stale: run benchmarks/calibration_published.py"
