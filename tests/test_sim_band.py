"""Every simulated figure carries the calibration's error band for its regime (issue #16,
"Uncertainty"): the band is read from docs/simulator-calibration.md's error-band section, one
clause per regime, and shown by `harness sim replay` and by the run report for stages whose
target is the simulator."""
from __future__ import annotations

import json
import subprocess
import sys

from harness import capacity
from harness.report import _measured_cell
from harness.sim_band import band_for, short_band
from loadrun import REPO
from servers.simulator.calibration_set import regime_of_metric

DOC = """# Calibration

### Error band per regime

Simulated figures are the model's, not measurements. Against 9 published runs (10th-90th
percentile of published/simulated): saturated throughput: real typically -4%..+12% of simulated
(5 published runs, median simulated/published 0.95); light TTFT: real typically -10%..+30% of
simulated (2 published runs, median simulated/published 0.90); light TPOT/ITL/latency: real
typically +2%..+20% of simulated (2 published runs, median simulated/published 0.88).
"""


def test_error_band_gives_one_regimes_clause_with_where_it_is_stated(tmp_path):
    doc = tmp_path / "simulator-calibration.md"
    doc.write_text(DOC)
    band = capacity.error_band(doc, regime="light TTFT")
    assert band.startswith("light TTFT: real typically -10%..+30% of simulated")
    assert "saturated" not in band and "TPOT" not in band
    assert band.endswith('(docs/simulator-calibration.md, "Error band per regime")')
    assert capacity.error_band(doc, regime="light TPOT/ITL/latency").startswith(
        "light TPOT/ITL/latency: real typically +2%..+20%")


def test_error_band_without_a_regime_or_for_an_unknown_one_is_the_whole_paragraph(tmp_path):
    doc = tmp_path / "simulator-calibration.md"
    doc.write_text(DOC)
    whole = capacity.error_band(doc)
    assert whole.startswith("Simulated figures are the model's") and "light TTFT" in whole
    assert capacity.error_band(doc, regime="knee") == whole


def test_the_committed_doc_states_a_band_for_every_regime_of_the_calibration_set():
    for regime in ("saturated throughput", "light TTFT", "light TPOT/ITL/latency"):
        band = capacity.error_band(regime=regime)
        assert band.startswith(f"{regime}: real typically "), band
        assert "published runs" in band


def test_metrics_map_to_the_regime_whose_points_calibrate_them():
    assert regime_of_metric("output_tokens_per_s") == "saturated throughput"
    assert regime_of_metric("small.output_tokens_per_s") == "saturated throughput"
    assert regime_of_metric("ttft_p50_ms") == "light TTFT"
    assert regime_of_metric("tpot_ms") == regime_of_metric("itl_ms") == "light TPOT/ITL/latency"
    assert regime_of_metric("e2e_p99") == "light TPOT/ITL/latency"
    assert regime_of_metric("error_rate") is None and band_for("error_rate") is None


def test_report_marks_figures_from_a_simulator_target_with_their_band_and_real_ones_not():
    sim = {"name": "s", "target": {"simulator": "l40s-llama-3-8b-bf16"}}
    real = {"name": "r", "target": {"url": "http://10.0.0.1:8000"}}
    cell = _measured_cell(sim, "output_tokens_per_s", 2663.0)
    assert cell.startswith("2,663 (simulated; saturated throughput: real typically ")
    assert _measured_cell(sim, "error_rate", 0.0) == f"{__import__('harness.report', fromlist=['fmt']).fmt(0.0)} (simulated)"
    assert _measured_cell(real, "output_tokens_per_s", 2663.0) == "2,663"
    assert short_band("ttft_ms") in _measured_cell(sim, "ttft_p50_ms", 41.0)


def test_sim_replay_prints_and_returns_the_band_of_each_figure(tmp_path):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("".join(json.dumps({"arrival_s": i * 0.1, "input_len": 128, "output_len": 16}) + "\n"
                            for i in range(10)))
    base = [sys.executable, "-m", "harness.cli", "sim", "replay", "--profile", "h100-llama-3-8b-bf16",
            "--requests", str(reqs)]
    text = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "simulated, not measured" in text.stdout
    assert short_band("ttft_ms") in text.stdout and short_band("output_tokens_per_s") in text.stdout
    js = subprocess.run(base + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    bands = json.loads(js.stdout)["error_band"]
    assert bands["ttft_ms"] == short_band("ttft_ms")
    assert bands["tpot_ms"] == bands["itl_ms"] == short_band("tpot_ms")
