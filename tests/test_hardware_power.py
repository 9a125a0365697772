"""Board power in the hardware stage: the samples NVML gives (instantaneous where the driver
has the field) are labelled as samples, the average over the run is reported beside the
highest one, and the card's power limit is named with them, so 893 W on a 700 W H200 reads as
the millisecond spike it is. NVML itself cannot run here: a fake NVML hands the sampler
recorded-looking readings, and recorded hardware.json files stand in for whole runs."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from harness import plan as plan_mod
from harness import runner
from harness.hardware.judge import rejudge
from harness.hardware.model import PowerStats
from harness.hardware.nvml import PowerSampler
from harness.hardware.report_io import load_report
from harness.hardware.summary import format_summary, power_figures, run_power

REPO = Path(__file__).resolve().parents[1]


class FakeNvml:
    """Enough of pynvml for PowerSampler: the instantaneous power field reads ``watts`` in turn."""
    NVML_FI_DEV_POWER_INSTANT = 186
    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, watts: list[float]):
        self.watts = list(watts)

    def nvmlDeviceGetFieldValues(self, h, ids):
        return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(uiVal=int(self.watts.pop(0) * 1000)))]

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1500

    def nvmlDeviceGetTemperature(self, h, kind):
        return 60

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x4  # sw_power_cap


def sampled(watts: list[float], limit: float | None = 700.0) -> PowerStats:
    sampler = PowerSampler(FakeNvml(watts), {0: object()}, limits={0: limit})
    for _ in watts:
        sampler._sample()
    return sampler.stats(0)


def test_samples_above_the_limit_are_labelled_instantaneous_beside_the_average_and_the_limit():
    st = sampled([600, 612, 893, 640, 615])
    assert (st.samples, st.peak_w, st.limit_w, st.power_reading) == (5, 893.0, 700.0, "instant")
    assert power_figures(st) == ("avg 672 W, peak sample 893 W (instantaneous; limit 700 W - "
                                   "short spikes above the limit are normal)")


def test_samples_within_the_limit_name_it_without_the_spike_note():
    assert power_figures(sampled([500, 520, 690])) == "avg 570 W, peak sample 690 W (instantaneous; limit 700 W)"


def test_an_unknown_limit_says_so():
    assert power_figures(sampled([500, 900], limit=None)).endswith("(instantaneous; limit unknown)")


def test_a_one_second_average_above_the_limit_is_not_called_a_spike():
    st = PowerStats(samples=3, avg_w=720.0, peak_w=760.0, power_reading="1s-average", limit_w=700.0)
    text = power_figures(st)
    assert "NVML 1 s average" in text and "spikes" not in text and "above the limit" in text


def test_the_run_average_weights_every_check_by_its_samples_and_keeps_the_highest_sample():
    # recorded 2 x H200: GPU1's P2P check sampled 742.9 W and its GEMM 779.5 W on a 700 W card
    report = load_report(REPO / "tests" / "data" / "hw" / "hardware-h200x2.json")
    per = run_power(report)
    checks = [r.power for r in (*report.hbm, *report.gemm) if r.gpu == 1] + [report.p2p.power["1"]]
    n = sum(p.samples for p in checks)
    assert per[1].samples == n
    assert per[1].avg_w == round(sum(p.avg_w * p.samples for p in checks) / n, 1)
    assert per[1].peak_w == max(p.peak_w for p in checks) == 779.5
    assert per[1].limit_w == 700.0  # from the inventory: the recording predates limit_w in the samples
    summary = format_summary(rejudge(report))
    assert (f"power     GPU1 over the run: avg {per[1].avg_w:.0f} W, peak sample 780 W (instantaneous; "
            "limit 700 W - short spikes above the limit are normal)") in summary


def test_the_hardware_stage_reports_power_per_gpu_in_its_result_and_the_report(tmp_path):
    plan = plan_mod.validate({"name": "hw", "stages": [{
        "name": "hardware", "stage": "hardware",
        "result": str(REPO / "tests" / "data" / "hw" / "hardware-h200x2.json")}]}, "hw.yaml")
    lines: list[str] = []
    runner.run_plan(plan, tmp_path / "run", lines.append)
    doc = json.loads((tmp_path / "run" / "hardware" / "result.json").read_text())
    p1 = doc["data"]["power"]["1"]
    assert (p1["peak_sample_w"], p1["limit_w"], p1["power_reading"]) == (779.5, 700.0, "instant")
    assert p1["text"].startswith(f"avg {p1['avg_w']:.0f} W, peak sample 780 W (instantaneous; limit 700 W")
    assert any(f"GPU1 power over the run: {p1['text']}" in ln for ln in lines)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Hardware power" in md and f"| hardware | GPU1 | {p1['text']} |" in md
    assert 'id="hardware-power"' in (tmp_path / "run" / "report.html").read_text()
