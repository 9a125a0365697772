"""Pass, fail or warn, with the known remedy: pure functions of recorded numbers (no GPU needed)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from harness.hardware.model import Check, GemmResult, GpuInfo, HardwareReport, HbmResult, P2PResult
from harness.hardware.targets import (
    NVLINK_FRACTION, NVLINK_LINK_GBS_PER_DIR, P2P_POOR_GBS, PCIE_P2P_FRACTION, GpuTarget,
    find_target, pcie_gbs, target_for, thresholds_doc,
)
from servers import topology as topo_mod

REMEDY_HBM = (
    "memory bandwidth below target: look for another process on the GPU (nvidia-smi), clock or "
    "power capping (nvidia-smi -q -d PERFORMANCE,CLOCK: thermal/power slowdown), ECC or "
    "row-remapping errors (nvidia-smi -q -d ECC,ROW_REMAPPER); a card that stays low needs "
    "vendor diagnostics (dcgmi diag -r 3)"
)
REMEDY_GEMM = (
    "BF16 GEMM below target: check throttle reasons and clocks (nvidia-smi -q -d PERFORMANCE,"
    "CLOCK), the power limit (nvidia-smi -q -d POWER), temperature and airflow, application "
    "clocks not lowered, persistence mode on, and no other process on the GPU"
)
REMEDY_NVLINK = (
    "NVLink pair below target: check `nvidia-smi nvlink --status` for links down or at reduced "
    "speed and `nvidia-smi nvlink -e` for errors; on NVSwitch systems check the fabric manager "
    "(systemctl status nvidia-fabricmanager); reseat or RMA a card whose links stay down"
)
REMEDY_PCIE_SWITCH = (
    "same-switch PCIe pair below target: check each card's link generation and width "
    "(nvidia-smi -q -d PCI: a card trained below Gen4/Gen5 x16 needs reseating or a BIOS slot "
    "setting), and that ACS/IOMMU does not force P2P through the root complex (disable ACS on "
    "the switch, iommu=pt)"
)
REMEDY_REARRANGE_HOST = (
    "this pair's traffic crosses the CPU host bridge (PHB/NODE): rearrange GPU assignments so "
    "tensor-parallel pairs sit under one PCIe switch (PIX/PXB) or on NVLink"
)
REMEDY_REARRANGE_NUMA = (
    "cross-NUMA pair (SYS): rearrange GPU assignments - keep tensor-parallel groups on one NUMA "
    "node, under one PCIe switch"
)
REMEDY_NO_PEER = (
    "peer access unavailable (can_device_access_peer is false): copies are staged through host "
    "memory; enable P2P (ACS off / IOMMU passthrough in BIOS and kernel, a driver with P2P "
    "support, not a VM without P2P) or pair GPUs that have it"
)


def _frac(value: float | None, peak: float | None) -> float | None:
    if value is None or not peak:
        return None
    return round(value / peak, 4)


def judge_hbm(gpu: int, tbs: float, target: GpuTarget | None) -> Check:
    if target is None:
        return Check("hbm_bandwidth", "no-target", gpu=gpu, value=round(tbs, 4), unit="TB/s",
                     detail="no datasheet target for this GPU model: figure reported only")
    ok = tbs >= target.bw_pass_tbs
    return Check(
        "hbm_bandwidth", "pass" if ok else "fail", gpu=gpu, value=round(tbs, 4), unit="TB/s",
        threshold=target.bw_pass_tbs, peak=target.mem_bw_tbs,
        fraction_of_peak=_frac(tbs, target.mem_bw_tbs),
        detail=f"{tbs:.3f} TB/s vs > {target.bw_pass_tbs} TB/s ({target.key}, peak "
               f"{target.mem_bw_tbs} TB/s)",
        remedy=None if ok else REMEDY_HBM,
    )


def judge_gemm(gpu: int, tflops: float, target: GpuTarget | None) -> Check:
    if target is None:
        return Check("gemm_bf16", "no-target", gpu=gpu, value=round(tflops, 1), unit="TFLOPS",
                     detail="no datasheet target for this GPU model: figure reported only")
    ok = tflops >= target.gemm_pass_tflops
    return Check(
        "gemm_bf16", "pass" if ok else "fail", gpu=gpu, value=round(tflops, 1), unit="TFLOPS",
        threshold=target.gemm_pass_tflops, peak=target.bf16_dense_tflops,
        fraction_of_peak=_frac(tflops, target.bf16_dense_tflops),
        detail=f"{tflops:.0f} TFLOPS vs > {target.gemm_pass_tflops:g} ({target.key}, dense peak "
               f"{target.bf16_dense_tflops:g})",
        remedy=None if ok else REMEDY_GEMM,
    )


def link_class(label: str | None) -> str:
    """``nvlink`` | ``switch`` (PIX/PXB) | ``host`` (PHB/NODE) | ``numa`` (SYS) | ``unknown``."""
    if not label:
        return "unknown"
    try:
        s = topo_mod.normalize_label(label)
    except ValueError:
        return "unknown"
    if topo_mod.is_nvlink(s):
        return "nvlink"
    return {"PIX": "switch", "PXB": "switch", "PHB": "host", "NODE": "host", "SYS": "numa"}.get(
        s, "unknown")


def p2p_expectation(label: str | None, src: GpuInfo | None, dst: GpuInfo | None,
                    target: GpuTarget | None) -> tuple[float | None, float | None]:
    """(rate per direction in GB/s, pass threshold) for a pair, from link and PCIe facts."""
    if label and topo_mod.nvlink_count(label):
        rate = topo_mod.nvlink_count(label) * NVLINK_LINK_GBS_PER_DIR
        if target and target.nvlink_gbs:
            rate = min(rate, target.nvlink_gbs / 2)
        return rate, round(NVLINK_FRACTION * rate, 1)
    # PCIe: the slower of the two cards' maximum link, else the datasheet's.
    rates = []
    for g in (src, dst):
        if g is not None:
            r = pcie_gbs(g.pcie_gen_max, g.pcie_width_max)
            if r:
                rates.append(r)
    rate = min(rates) if rates else (pcie_gbs(target.pcie_gen, target.pcie_width)
                                     if target else None)
    if target and target.p2p_pcie_pass_gbs is not None:
        return rate, target.p2p_pcie_pass_gbs
    if rate is None:
        return None, None
    return rate, round(PCIE_P2P_FRACTION * rate, 1)


def judge_pair(src: int, dst: int, gbs: float, label: str | None, can_peer: bool | None,
               rate: float | None, threshold: float | None) -> Check:
    cls = link_class(label)
    base = dict(name="p2p_pair", pair=[src, dst], value=round(gbs, 2), unit="GB/s",
                threshold=threshold, peak=rate, fraction_of_peak=_frac(gbs, rate))
    where = f"GPU{src}->GPU{dst} over {label or 'unknown link'}"
    if threshold is None:
        return Check(status="no-target", detail=f"{where}: {gbs:.1f} GB/s, no target", **base)
    if gbs >= threshold:
        return Check(status="pass", detail=f"{where}: {gbs:.1f} GB/s > {threshold:g}", **base)
    remedies = []
    if cls == "nvlink":
        status, remedies = "fail", [REMEDY_NVLINK]
    elif cls in ("switch", "unknown"):
        status, remedies = "fail", [REMEDY_PCIE_SWITCH]
    elif cls == "host":
        status, remedies = "warn", [REMEDY_REARRANGE_HOST]
    else:
        status, remedies = "warn", [REMEDY_REARRANGE_NUMA]
    if can_peer is False:
        remedies.append(REMEDY_NO_PEER)
    poor = " (poor: < 10 GB/s)" if gbs < P2P_POOR_GBS else ""
    return Check(status=status, detail=f"{where}: {gbs:.1f} GB/s < {threshold:g}{poor}",
                 remedy="; ".join(remedies), **base)


def judge_p2p(p2p: P2PResult, infos: dict[int, GpuInfo], targets: dict[int, GpuTarget | None],
              topology: topo_mod.Topology | None = None) -> list[Check]:
    """Per ordered pair checks, then the overall ``p2p`` check.

    Pairs on NVLink or one PCIe switch (or of unknown link) must meet their target: below it they
    fail. Pairs across a host bridge or NUMA nodes below target are warnings, since a launcher
    need not pair them; but when the best possible pairing of these GPUs still needs such a
    pair, the overall check fails with "rearrange GPU assignments".
    """
    checks: list[Check] = []
    by_pair: dict[tuple[int, int], Check] = {}
    for a, src in enumerate(p2p.gpus):
        for b, dst in enumerate(p2p.gpus):
            if a == b or p2p.gbs[a][b] is None:
                continue
            label = p2p.links[a][b]
            rate, thr = p2p_expectation(label, infos.get(src), infos.get(dst),
                                        targets.get(src) or targets.get(dst))
            c = judge_pair(src, dst, float(p2p.gbs[a][b]), label, p2p.can_access_peer[a][b],
                           rate, thr)
            checks.append(c)
            by_pair[(src, dst)] = c
    if not by_pair:
        return checks
    failed = [c for c in checks if c.status == "fail"]
    # The pairing a TP=2 launcher would choose among these GPUs.
    pairing: list[tuple[int, int]] = []
    if topology is not None and all(g in topology.gpus for g in p2p.gpus) and len(p2p.gpus) >= 2:
        pairing = topology.best_pairs(p2p.gpus)
    elif len(p2p.gpus) == 2:
        pairing = [(p2p.gpus[0], p2p.gpus[1])]
    bad_best = [
        c for (i, j) in pairing for c in (by_pair.get((i, j)), by_pair.get((j, i)))
        if c is not None and c.status == "warn"
    ]
    warned = [c for c in checks if c.status == "warn"]
    values = [c.value for c in checks if c.value is not None]
    summary = (f"{len(checks)} directed pairs, {min(values):.1f}-{max(values):.1f} GB/s; "
               f"{len(failed)} failed, {len(warned)} below target on host/NUMA links")
    if pairing:
        summary += "; best pairs " + ", ".join(f"{i}+{j}" for i, j in pairing)
    if failed:
        remedy = "; ".join(dict.fromkeys(c.remedy for c in failed if c.remedy))
        checks.append(Check("p2p", "fail", detail=summary, remedy=remedy,
                            value=min(values), unit="GB/s"))
    elif bad_best:
        remedy = ("no good pairing among these GPUs: rearrange GPU assignments "
                  "(choose GPUs that share a PCIe switch or NVLink, on one NUMA node); "
                  + "; ".join(dict.fromkeys(c.remedy for c in bad_best if c.remedy)))
        checks.append(Check("p2p", "fail", detail=summary, remedy=remedy,
                            value=min(values), unit="GB/s"))
    elif all(c.status == "no-target" for c in checks):
        checks.append(Check("p2p", "no-target", detail=summary, value=min(values), unit="GB/s"))
    else:
        checks.append(Check("p2p", "warn" if warned else "pass", detail=summary,
                            value=min(values), unit="GB/s",
                            remedy="; ".join(dict.fromkeys(c.remedy for c in warned if c.remedy))
                            or None))
    return checks


def evaluate(
    gpus: Sequence[GpuInfo],
    hbm: Iterable[HbmResult] = (),
    gemm: Iterable[GemmResult] = (),
    p2p: P2PResult | None = None,
    topology: topo_mod.Topology | None = None,
    target_override: GpuTarget | None = None,
) -> tuple[list[Check], str]:
    """All checks from recorded results, and the overall status (``pass`` or ``fail``)."""
    infos = {g.index: g for g in gpus}
    targets: dict[int, GpuTarget | None] = {
        g.index: target_override or target_for(g.name) for g in gpus
    }
    checks: list[Check] = []
    for r in hbm:
        checks.append(judge_hbm(r.gpu, r.tbs, targets.get(r.gpu)))
    for r in gemm:
        checks.append(judge_gemm(r.gpu, r.tflops, targets.get(r.gpu)))
    if p2p is not None:
        checks.extend(judge_p2p(p2p, infos, targets, topology))
    return checks, overall_status(checks)


def overall_status(checks: Iterable[Check]) -> str:
    """``fail`` when a check failed or errored; else ``invalid`` when something asked for could
    not be measured (a run that measured nothing it was asked for must not read as a pass);
    else ``pass``. A failure outranks invalid: what was measured stands on its own."""
    statuses = {c.status for c in checks}
    if statuses & {"fail", "error"}:
        return "fail"
    return "invalid" if "invalid" in statuses else "pass"


def unmeasurable(asked: Sequence[str], chosen: Sequence[int], visible: int) -> list[Check]:
    """An ``invalid`` check for each measurement asked for that this machine cannot make:
    P2P with fewer than two GPUs (the one there is; or the ones ``--gpus`` chose)."""
    if "p2p" not in asked or len(chosen) >= 2:
        return []
    have = (f"this machine has {visible}" if len(chosen) == visible
            else f"{len(chosen)} of this machine's {visible} chosen (--gpus)")
    return [Check("p2p", "invalid", detail=f"p2p needs at least 2 GPUs; {have}",
                  remedy="run on a machine with two or more GPUs, or leave p2p out of --checks")]


def nothing_measured(asked: Sequence[str], report: HardwareReport) -> list[Check]:
    """One ``invalid`` check when no figure at all came out and no check says why."""
    if report.hbm or report.gemm or report.p2p is not None or report.checks:
        return []
    return [Check("measurements", "invalid", detail=f"nothing measured (asked: {', '.join(asked)})")]


def exit_code(report: HardwareReport) -> int:
    """0 when every check passed (warnings and no-target included) or the stage was skipped,
    1 when one failed, 3 (as ``harness load`` for an invalid generator) when it was invalid."""
    from harness.stages.base import EXIT_FAILED, EXIT_INVALID

    return {"fail": EXIT_FAILED, "invalid": EXIT_INVALID}.get(report.status, 0)


def rejudge(report: HardwareReport, target: str | None = None) -> HardwareReport:
    """The same measurements judged again with this code's targets (e.g. after a table change)."""
    topo = topo_mod.Topology.from_dict(report.topology) if report.topology else None
    cuda_topo = None
    if topo is not None and report.p2p is not None:
        cuda_topo = topo_mod.renumbered(topo, {g.index: g.nvml_index for g in report.gpus},
                                        report.p2p.gpus)
    override = find_target(target) if target else None
    checks, _ = evaluate(report.gpus, report.hbm, report.gemm, report.p2p, cuda_topo, override)
    carried = [c for c in report.checks if c.status in ("skipped", "error", "invalid")]
    if report.p2p is None and any(c.name == "p2p" and c.status == "skipped" for c in carried):
        # recorded before a P2P check that could not run made the run invalid: it was asked
        gpus = [g.index for g in report.gpus]
        carried = [c for c in carried if c.name != "p2p"] + unmeasurable(
            ["p2p"], gpus, int(report.host.get("cuda_devices") or len(gpus)))
    report.checks = checks + carried
    if report.status != "skipped":
        report.status = overall_status(report.checks)
    report.thresholds = thresholds_doc()
    return report

