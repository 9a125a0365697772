"""harness.hardware: targets, pass/fail/remedy from recorded numbers, the no-GPU skip."""
from __future__ import annotations

import argparse
import builtins
import json
from pathlib import Path

import pytest

from harness.commands import hw as hw_cmd
from harness.errors import UsageError
from harness.hardware import run as hw_run
from harness.hardware.judge import evaluate, exit_code, p2p_expectation, rejudge
from harness.hardware.measure import Sizes, buffer_bytes
from harness.hardware.model import GemmResult, GpuInfo, HbmResult, P2PResult
from harness.hardware.nvml import PowerSampler
from harness.hardware.report_io import load_report
from harness.hardware.summary import format_summary
from harness.hardware.targets import (
    BW_FRACTION,
    GEMM_FRACTION,
    TARGETS,
    find_target,
    pcie_gbs,
    target_for,
)
from harness.parsing import parse_gpus
from servers import topology as T

DATA = Path(__file__).parent / "data"


def gpu(index, name="NVIDIA L40S", gen=4, width=16):
    return GpuInfo(index=index, name=name, nvml_index=index, pcie_gen_max=gen,
                     pcie_width_max=width)


def hbm(g, tbs):
    return HbmResult(gpu=g, buffer_bytes=1 << 30, tbs=tbs, tbs_min=tbs, tbs_max=tbs,
                       warmup=1, iters=1, repeats=1)


def gemm(g, tflops):
    return GemmResult(gpu=g, m=8192, n=8192, k=8192, dtype="bfloat16", tflops=tflops,
                        tflops_min=tflops, tflops_max=tflops, warmup=1, iters=1, repeats=1)


def p2p(gpus, gbs, links, peer=True):
    n = len(gpus)
    return P2PResult(
        gpus=list(gpus), buffer_bytes=1 << 28,
        gbs=[[None if a == b else gbs(gpus[a], gpus[b]) for b in range(n)] for a in range(n)],
        gbs_min=[[None] * n for _ in range(n)],
        can_access_peer=[[None if a == b else peer for b in range(n)] for a in range(n)],
        links=[["X" if a == b else links(gpus[a], gpus[b]) for b in range(n)] for a in range(n)],
        warmup=1, iters=1, repeats=1)


def by(checks, name, gpu=None):
    return [c for c in checks if c.name == name and (gpu is None or c.gpu == gpu)]


# -- the target table ----------------------------------------------------------------------


def test_target_matching_by_device_name():
    assert target_for("NVIDIA L40S").key == "L40S"
    assert target_for("NVIDIA H100 80GB HBM3").key == "H100-SXM5-80GB"
    assert target_for("NVIDIA H200").key == "H200-SXM-141GB"
    assert target_for("NVIDIA A100-SXM4-80GB").key == "A100-SXM4-80GB"
    assert target_for("NVIDIA H100 PCIe") is None  # other SKU: figures only, no verdict
    assert target_for("NVIDIA H200 NVL") is None
    assert target_for("Tesla T4") is None
    assert find_target("h100").key == "H100-SXM5-80GB"
    with pytest.raises(KeyError):
        find_target("B200")


def test_targets_name_their_datasheet_and_thresholds():
    l40s = TARGETS["L40S"]
    # The seed's own targets are the L40S pass thresholds.
    assert (l40s.bw_pass_tbs, l40s.gemm_pass_tflops, l40s.p2p_pcie_pass_gbs) == (0.72, 150.0, 25.0)
    assert (l40s.mem_bw_tbs, l40s.bf16_dense_tflops, l40s.memory_gb) == (0.864, 362.05, 48)
    h100, h200, a100 = (TARGETS[k] for k in ("H100-SXM5-80GB", "H200-SXM-141GB", "A100-SXM4-80GB"))
    assert (h100.mem_bw_tbs, h100.bf16_dense_tflops, h100.nvlink_gbs) == (3.35, 989.4, 900.0)
    assert (h200.mem_bw_tbs, h200.bf16_dense_tflops, h200.memory_gb) == (4.8, 989.4, 141)
    assert (a100.mem_bw_tbs, a100.bf16_dense_tflops) == (2.039, 312.0)
    # one datasheet table: the simulator's roofline starts from the very peaks judged here
    from servers.simulator.gpus import GPUS

    for key, t in zip(("l40s", "h100", "h200", "a100"), (l40s, h100, h200, a100)):
        assert (GPUS[key].bf16_tflops, GPUS[key].mem_bandwidth_gbs / 1000) == (t.bf16_dense_tflops, t.mem_bw_tbs)
        assert GPUS[key].name == t.model and GPUS[key].source == t.source
    for t in (h100, h200, a100):
        assert t.bw_pass_tbs == pytest.approx(BW_FRACTION * t.mem_bw_tbs, abs=1e-3)
        assert t.gemm_pass_tflops == pytest.approx(GEMM_FRACTION * t.bf16_dense_tflops, abs=0.1)
    for t in TARGETS.values():
        assert "datasheet" in t.source


# -- HBM and GEMM --------------------------------------------------------------------------


def test_l40s_seed_thresholds_pass_and_fail_with_remedy():
    gpus = [gpu(0), gpu(1)]
    checks, status = evaluate(gpus, [hbm(0, 0.78), hbm(1, 0.70)], [gemm(0, 160), gemm(1, 140)])
    assert status == "fail"
    ok_bw, bad_bw = by(checks, "hbm_bandwidth", 0)[0], by(checks, "hbm_bandwidth", 1)[0]
    assert ok_bw.status == "pass" and ok_bw.remedy is None and ok_bw.threshold == 0.72
    assert bad_bw.status == "fail" and "nvidia-smi" in bad_bw.remedy
    assert bad_bw.fraction_of_peak == pytest.approx(0.70 / 0.864, abs=1e-3)
    ok_mm, bad_mm = by(checks, "gemm_bf16", 0)[0], by(checks, "gemm_bf16", 1)[0]
    assert ok_mm.status == "pass" and bad_mm.status == "fail"
    assert "power limit" in bad_mm.remedy and bad_mm.threshold == 150.0


def test_recorded_h100_runs_pass_and_a_degraded_card_fails():
    # hardware-h100x1.json asked for P2P on one GPU: invalid (tests/test_stage_invalid.py)
    for name in ("hardware-h100x2.json", "hardware-h100x4.json", "hardware-h200x2.json"):
        report = rejudge(load_report(DATA / "hw" / name))
        assert report.status == "pass", format_summary(report)
        assert report.schema == 1
        assert {g.target for g in report.gpus} <= {"H100-SXM5-80GB", "H200-SXM-141GB"}
    report = load_report(DATA / "hw" / "hardware-h100x4.json")
    report.hbm[2].tbs = 2.5  # 75% of 3.35
    report.gemm[3].tflops = 550.0  # a throttled card
    report = rejudge(report)
    assert report.status == "fail"
    assert by(report.checks, "hbm_bandwidth", 2)[0].status == "fail"
    assert by(report.checks, "gemm_bf16", 3)[0].status == "fail"
    assert by(report.checks, "gemm_bf16", 0)[0].status == "pass"
    assert exit_code(report) == 1


def test_unknown_model_reports_figures_without_verdict():
    checks, status = evaluate([gpu(0, "Tesla T4")], [hbm(0, 0.25)], [gemm(0, 50)])
    assert status == "pass"
    assert {c.status for c in checks} == {"no-target"}
    checks, status = evaluate([gpu(0, "Tesla T4")], [hbm(0, 0.25)], [], target_override=TARGETS["L40S"])
    assert status == "fail"


# -- P2P -----------------------------------------------------------------------------------


def test_nvlink_pairs_recorded_and_a_weak_link():
    report = load_report(DATA / "hw" / "hardware-h100x2.json")
    assert report.p2p.links[0][1] == "NV18" and report.p2p.can_access_peer[0][1] is True
    report.p2p.gbs[1][0] = 150.0  # one direction of NV18 far below 70% of 450
    report = rejudge(report)
    pair = [c for c in report.checks if c.name == "p2p_pair" and c.pair == [1, 0]][0]
    assert pair.status == "fail" and pair.threshold == pytest.approx(315.0)
    assert "nvlink" in pair.remedy.lower()
    overall = by(report.checks, "p2p")[0]
    assert overall.status == "fail" and report.status == "fail"


def test_l40s_same_switch_pcie():
    gpus = [gpu(0), gpu(1)]
    good = p2p([0, 1], lambda i, j: 26.0, lambda i, j: "PIX")
    checks, status = evaluate(gpus, p2p=good)
    assert status == "pass" and by(checks, "p2p")[0].status == "pass"
    assert all(c.threshold == 25.0 for c in by(checks, "p2p_pair"))
    slow = p2p([0, 1], lambda i, j: 20.0, lambda i, j: "PXB")
    checks, status = evaluate(gpus, p2p=slow)
    assert status == "fail"
    assert all(c.status == "fail" and "ACS" in c.remedy for c in by(checks, "p2p_pair"))


def test_two_gpus_across_numa_fail_with_rearrange():
    gpus = [gpu(0), gpu(1)]
    res = p2p([0, 1], lambda i, j: 8.0, lambda i, j: "SYS", peer=False)
    checks, status = evaluate(gpus, p2p=res)
    pair = by(checks, "p2p_pair")[0]
    assert pair.status == "warn" and "poor" in pair.detail
    assert "rearrange GPU assignments" in pair.remedy and "peer access" in pair.remedy
    overall = by(checks, "p2p")[0]
    assert overall.status == "fail" and status == "fail"
    assert "rearrange GPU assignments" in overall.remedy


def twelve_l40s():
    def link(i, j):
        if i // 2 == j // 2:
            return "PIX"
        return "NODE" if i // 6 == j // 6 else "SYS"

    topo = T.Topology(gpus=list(range(12)),
                      matrix=[["X" if i == j else link(i, j) for j in range(12)] for i in range(12)],
                      numa_nodes={i: i // 6 for i in range(12)})

    def gbs(i, j):
        return {"PIX": 26.5, "NODE": 18.0, "SYS": 9.0}[link(i, j)]

    return [gpu(i) for i in range(12)], topo, p2p(list(range(12)), gbs, link)


def test_twelve_l40s_good_pairs_pass_cross_numa_warns():
    gpus, topo, res = twelve_l40s()
    checks, status = evaluate(gpus, p2p=res, topology=topo)
    pairs = by(checks, "p2p_pair")
    assert len(pairs) == 132
    assert sum(c.status == "pass" for c in pairs) == 12
    assert all(c.status == "warn" for c in pairs if c.status != "pass")
    cross = [c for c in pairs if c.pair == [0, 6]][0]
    assert "cross-NUMA" in cross.remedy and "poor" in cross.detail
    node = [c for c in pairs if c.pair == [0, 2]][0]
    assert "host bridge" in node.remedy
    overall = by(checks, "p2p")[0]
    assert overall.status == "warn" and status == "pass"
    assert "0+1" in overall.detail and "10+11" in overall.detail


def test_twelve_l40s_a_slow_switch_pair_fails():
    gpus, topo, res = twelve_l40s()
    res.gbs[4][5] = 12.0  # GPU4 -> GPU5 on one switch
    checks, status = evaluate(gpus, p2p=res, topology=topo)
    assert status == "fail"
    bad = [c for c in by(checks, "p2p_pair") if c.status == "fail"]
    assert [c.pair for c in bad] == [[4, 5]]


def test_pcie_expectation_from_link_facts():
    assert pcie_gbs(4, 16) == pytest.approx(31.5, abs=0.1)
    assert pcie_gbs(5, 16) == pytest.approx(63.0, abs=0.1)
    assert pcie_gbs(None, 16) is None
    # No model target: threshold from the cards' PCIe link (Gen5 x16 -> 79% of 63).
    rate, thr = p2p_expectation("PIX", gpu(0, "X", 5, 16), gpu(1, "X", 5, 8), None)
    assert rate == pytest.approx(31.5, abs=0.1) and thr == pytest.approx(24.9, abs=0.1)
    rate, thr = p2p_expectation("NV4", None, None, TARGETS["A100-SXM4-80GB"])
    assert (rate, thr) == (100.0, 70.0)


# -- buffer sizing -------------------------------------------------------------------------


def test_buffers_fit_free_memory():
    free = 79 * 2**30  # an 80 GB card: the seed's 2 x 40 GB would not fit
    full, quick = Sizes.for_mode(False), Sizes.for_mode(True)
    b = buffer_bytes(free, full.hbm_fraction, full.hbm_cap_bytes)
    assert b == 8 << 30 and 2 * b < free
    assert buffer_bytes(free, quick.hbm_fraction, quick.hbm_cap_bytes) == 1 << 30
    small = buffer_bytes(6 * 2**30, 1 / 8, 8 << 30)
    assert small == 768 << 20 and small % (1 << 20) == 0


# -- no GPU ----------------------------------------------------------------------------------


def test_no_torch_skips_with_one_line(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    args = argparse.Namespace(out=str(tmp_path / "hw"), gpus="0,1", quick=True, target=None,
                              checks="hbm,gemm,p2p", json=False)
    assert hw_cmd.handle(args) == 0
    err = capsys.readouterr().err
    assert "skipped: no CUDA GPU" in err
    data = json.loads((tmp_path / "hw" / "hardware.json").read_text())
    assert data["schema"] == 1 and data["status"] == "skipped"
    assert data["skipped_reason"].startswith("no CUDA GPU")
    assert load_report(tmp_path / "hw" / "hardware.json").status == "skipped"


def test_cuda_unavailable_skips(tmp_path, monkeypatch):
    class FakeCuda:
        @staticmethod
        def is_available():
            return False

        @staticmethod
        def device_count():
            return 0

    class FakeTorch:
        cuda = FakeCuda()
        __version__ = "0.0+cpu"

    monkeypatch.setattr(hw_run, "import_torch", lambda: (FakeTorch, "no CUDA GPU (torch.cuda.is_available() is False)"))
    report = hw_run.run(tmp_path, quick=True, log=lambda m: None)
    assert report.status == "skipped" and "is_available" in report.skipped_reason
    assert exit_code(report) == 0


def test_cli_arguments():
    assert parse_gpus("0,1") == [0, 1]
    assert parse_gpus("0-3") == [0, 1, 2, 3]
    assert parse_gpus(None) is None and parse_gpus("all") is None
    for bad in ("a,b", "1,1", "3-1"):
        with pytest.raises(UsageError):
            parse_gpus(bad)
    parser = argparse.ArgumentParser()
    hw_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["hw", "--out", "x", "--gpus", "0,1", "--quick"])
    assert (args.out, args.gpus, args.quick, args.func) == ("x", "0,1", True, hw_cmd.handle)
    assert hw_cmd.main(["--checks", "nope"]) == 2


# -- power sampling through NVML (fake pynvml) -----------------------------------------------


class FakePowerNvml:
    NVML_CLOCK_SM = 0
    NVML_TEMPERATURE_GPU = 0
    NVML_FI_DEV_POWER_INSTANT = 186

    def __init__(self, instant):
        self.instant, self.k = instant, 0

    def nvmlDeviceGetFieldValues(self, h, ids):
        from types import SimpleNamespace

        if not self.instant:
            return [SimpleNamespace(nvmlReturn=2, value=SimpleNamespace(uiVal=0))]
        self.k += 1
        return [SimpleNamespace(nvmlReturn=0, value=SimpleNamespace(uiVal=300_000 + 100_000 * (self.k % 2)))]

    def nvmlDeviceGetPowerUsage(self, h):
        return 250_000

    def nvmlDeviceGetClockInfo(self, h, clk):
        return 1500

    def nvmlDeviceGetTemperature(self, h, kind):
        return 50

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return 0x4 | 0x1


@pytest.mark.parametrize("instant", [True, False])
def test_power_sampler(instant):
    s = PowerSampler(FakePowerNvml(instant), {0: "h0"}, interval_s=0.001)
    for _ in range(4):
        s._sample()
    st = s.stats(0)
    assert st.samples == 4 and st.sm_clock_avg_mhz == 1500 and st.temp_max_c == 50
    assert st.clock_event_reasons == ["sw_power_cap"]  # gpu_idle dropped
    if instant:
        assert (st.avg_w, st.peak_w, st.power_reading) == (350.0, 400.0, "instant")
    else:
        assert (st.avg_w, st.peak_w, st.power_reading) == (250.0, 250.0, "1s-average")
    assert s.stats(1) is None
