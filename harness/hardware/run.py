"""One hardware run end to end: inventory, topology, the checks asked for, judged, written."""
from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable, Sequence

from harness.hardware.judge import evaluate, nothing_measured, overall_status, unmeasurable
from harness.hardware.measure import Sizes, import_torch, measure_gemm, measure_hbm, measure_p2p
from harness.hardware.model import Check, HardwareReport
from harness.hardware.nvml import PowerSampler, host_info, import_nvml, inventory, nvml_try
from harness.hardware.report_io import skipped_report, write_report
from harness.hardware.summary import power_text
from harness.hardware.targets import TARGETS, find_target, thresholds_doc
from servers import topology as topo_mod


def run(
    out_dir: str | os.PathLike[str],
    gpus: Sequence[int] | None = None,
    quick: bool = False,
    target: str | None = None,
    checks: Sequence[str] = ("hbm", "gemm", "p2p"),
    log: Callable[[str], None] = print,
) -> HardwareReport:
    """Run the hardware stage and write ``hardware.json`` under ``out_dir``.

    ``gpus``: CUDA device indices (default all visible). ``quick``: smaller buffers and fewer
    repeats. ``target``: force a target key (see :data:`TARGETS`) instead of matching by name.
    Raises ``ValueError`` for GPU indices that do not exist or an unknown target.
    """
    override = find_target(target) if target else None
    t0 = time.perf_counter()
    torch, reason = import_torch()
    if reason is not None:
        report = skipped_report(reason, quick)
        report.host = host_info(torch, None)
        write_report(report, out_dir)
        return report

    count = torch.cuda.device_count()
    chosen = list(range(count)) if gpus is None else list(gpus)
    bad = [g for g in chosen if not 0 <= g < count]
    if bad:
        raise ValueError(f"no CUDA device {bad[0]}: this machine shows {count} (0-{count - 1})")
    if len(set(chosen)) != len(chosen):
        raise ValueError("a GPU is listed twice")

    report = HardwareReport(
        status="pass", quick=quick,
        started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        thresholds=thresholds_doc(),
    )
    nvml = import_nvml()
    report.host = host_info(torch, nvml)
    report.host["cuda_devices"] = count
    sizes = Sizes.for_mode(quick)
    infos, handles = inventory(torch, chosen, nvml)
    report.gpus = infos

    # Topology, in NVML numbering; translated to CUDA indices through the inventory.
    topo = topo_mod.from_nvml(nvml) if nvml is not None else None
    smi_text = topo_mod.nvidia_smi_topo_text()
    if smi_text:
        (Path(out_dir)).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "nvidia-smi-topo.txt").write_text(smi_text)
    topo, diffs = topo_mod.reconcile(topo, smi_text)
    if diffs:
        report.errors.append("NVML and nvidia-smi topology disagree: " + "; ".join(diffs))
    cuda_to_nvml = {i.index: i.nvml_index for i in infos if i.nvml_index is not None}
    if topo is not None:
        report.topology = topo.to_dict()
        for info in infos:
            k = info.nvml_index
            if k is not None and k in topo.gpus:
                info.numa_node = topo.numa(k)
                info.cpu_affinity = topo.cpu_affinity_text(k)

    def link(i: int, j: int) -> str | None:
        return topo_mod.mapped_link(topo, cuda_to_nvml, i, j)

    cuda_topo = topo_mod.renumbered(topo, cuda_to_nvml, chosen) if topo is not None else None

    for info in infos:
        log(f"GPU{info.index}: {info.name}, {info.memory_total_mib / 1024:.1f} GiB, "
            f"PCIe gen {info.pcie_gen_max or '?'} x{info.pcie_width_max or '?'}, "
            f"target {override.key if override else info.target or 'none'}")
    if topo is not None:
        log(topo.render())

    def sampler_for(gs: Sequence[int]) -> PowerSampler | None:
        hs = {g: handles[g] for g in gs if g in handles}
        limits = {i.index: i.power_limit_w for i in infos}
        return PowerSampler(nvml, hs, interval_s=0.02, limits=limits) if hs else None

    for g in chosen:
        if "hbm" in checks:
            try:
                r = measure_hbm(torch, g, sizes, sampler_for([g]))
                report.hbm.append(r)
                log(f"GPU{g} memory copy: {r.tbs:.3f} TB/s (read + write, "
                    f"{r.buffer_bytes / 2**30:.2f} GiB buffers){power_text(r.power)}")
            except Exception as exc:  # OOM, driver error: report, go on
                report.errors.append(f"hbm GPU{g}: {exc.__class__.__name__}: {exc}")
                report.checks.append(Check("hbm_bandwidth", "error", gpu=g, detail=str(exc)))
        if "gemm" in checks:
            try:
                r2 = measure_gemm(torch, g, sizes, sampler_for([g]))
                report.gemm.append(r2)
                log(f"GPU{g} BF16 GEMM {r2.m}^3: {r2.tflops:.0f} TFLOPS (repeats "
                    f"{r2.tflops_min:.0f}-{r2.tflops_max:.0f}){power_text(r2.power)}")
            except Exception as exc:
                report.errors.append(f"gemm GPU{g}: {exc.__class__.__name__}: {exc}")
                report.checks.append(Check("gemm_bf16", "error", gpu=g, detail=str(exc)))
    if "p2p" in checks and len(chosen) >= 2:
        try:
            report.p2p = measure_p2p(torch, chosen, sizes, link, sampler_for(chosen), log)
        except Exception as exc:
            report.errors.append(f"p2p: {exc.__class__.__name__}: {exc}")
            report.checks.append(Check("p2p", "error", detail=str(exc)))
    report.checks += unmeasurable(checks, chosen, count)
    report.checks += nothing_measured(checks, report)

    evaluated, _ = evaluate(infos, report.hbm, report.gemm, report.p2p, cuda_topo, override)
    report.checks = evaluated + report.checks
    report.status = overall_status(report.checks)
    used = {override.key} if override else {i.target for i in infos if i.target}
    report.targets = {k: asdict(TARGETS[k]) for k in sorted(used)}
    report.duration_s = round(time.perf_counter() - t0, 2)
    write_report(report, out_dir)
    if nvml is not None:
        nvml_try(nvml.nvmlShutdown)
    return report

