"""Every seed row through its simulator profile, held against physics."""
import pathlib

import pytest

from servers.simulator.calibration import SEED_ROWS, check_row, markdown_table

CHECKS = {(r.model, r.precision, r.tp): check_row(r) for r in SEED_ROWS}


def _id(row):
    return f"{row.model}-{row.precision}-tp{row.tp}"


@pytest.mark.parametrize("row", SEED_ROWS, ids=_id)
def test_simulated_throughput_is_within_15_percent_of_every_reachable_seed_row(row):
    c = CHECKS[(row.model, row.precision, row.tp)]
    if c.throughput_possible:
        assert abs(c.error) <= 0.15, f"{c.simulated:.0f} vs seed {row.throughput}"
    else:
        assert c.simulated < row.throughput


@pytest.mark.parametrize("row", SEED_ROWS, ids=_id)
def test_simulated_throughput_never_beats_the_ideal_engine_or_the_hardware_ceiling(row):
    c = CHECKS[(row.model, row.precision, row.tp)]
    assert c.simulated <= c.ideal_engine <= c.hardware_ceiling * 1.001


@pytest.mark.parametrize("row", [r for r in SEED_ROWS if CHECKS[(r.model, r.precision, r.tp)].fits],
                         ids=_id)
def test_simulated_ttft_and_tpot_at_concurrency_32_are_never_below_the_roofline(row):
    c = CHECKS[(row.model, row.precision, row.tp)]
    assert c.tpot_p50_ms >= c.tpot_floor_ms
    assert c.ttft_p50_ms >= c.ttft_floor_ms


def test_llama3_8b_bf16_tpot_of_12ms_on_an_l40s_is_flagged_below_the_bandwidth_floor():
    c = CHECKS[("llama-3-8b", "bf16", 1)]
    # 16 GB of weights at 864 GB/s: no decode step is faster than 18.6 ms.
    assert c.tpot_floor_ms >= 18.6
    assert c.row.tpot_p50_ms < c.tpot_floor_ms


def test_llama3_70b_bf16_tp2_does_not_fit_a_48gb_card():
    c = CHECKS[("llama-3-70b", "bf16", 2)]
    assert not c.fits and not c.vram_possible
    assert c.verdict.startswith("impossible")


def test_calibration_doc_table_matches_the_code():
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "simulator-calibration.md").read_text()
    assert markdown_table(list(CHECKS.values())) in doc
