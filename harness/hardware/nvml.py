"""NVML: power, SM clock and temperature sampled during a check, and the GPU inventory.

``pynvml`` is imported lazily (:func:`import_nvml`); without it there are no power figures and
the inventory holds what torch knows.
"""
from __future__ import annotations

import os
import platform
import statistics
import threading
from typing import Any
from collections.abc import Callable, Sequence

from harness.hardware.model import GpuInfo, PowerStats
from harness.hardware.targets import target_for
from servers import topology as topo_mod


def import_nvml() -> Any:
    """pynvml, initialised; ``None`` without it or without a driver (no power figures then)."""
    try:
        import pynvml  # noqa: PLC0415
        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


# nvmlClocksEventReason* / nvmlClocksThrottleReason* bits
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
    0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting",
}


def clock_reason_names(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]


class PowerSampler:
    """Samples power, SM clock and temperature of some GPUs through NVML in a thread."""

    def __init__(self, nvml: Any, handles: dict[int, Any], interval_s: float = 0.05,
                 limits: dict[int, float | None] | None = None):
        self.nvml, self.handles, self.interval = nvml, handles, interval_s
        self.limits = dict(limits or {})
        self.samples: dict[int, list[tuple[float, float | None, float | None]]] = {
            g: [] for g in handles}
        self.reasons: dict[int, int] = {g: 0 for g in handles}
        self.instant: bool | None = None  # NVML_FI_DEV_POWER_INSTANT works (None: not tried)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _watts(self, h: Any) -> float | None:
        """Instantaneous board power where the driver offers it, else NVML's averaged reading.

        ``nvmlDeviceGetPowerUsage`` is a one-second average on recent GPUs (Ampere, Hopper):
        a check shorter than that would report the previous check's draw.
        """
        n = self.nvml
        field_id = getattr(n, "NVML_FI_DEV_POWER_INSTANT", None)
        if self.instant is not False and field_id is not None:
            try:
                fv = n.nvmlDeviceGetFieldValues(h, [field_id])[0]
                if int(fv.nvmlReturn) == 0:
                    self.instant = True
                    return float(fv.value.uiVal) / 1000.0
            except Exception:
                pass
            self.instant = False
        try:
            return n.nvmlDeviceGetPowerUsage(h) / 1000.0
        except Exception:
            return None

    def _sample(self) -> None:
        n = self.nvml
        for g, h in self.handles.items():
            w = self._watts(h)
            if w is None:
                continue
            try:
                clk = float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM))
            except Exception:
                clk = None
            try:
                temp = float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
            except Exception:
                temp = None
            self.samples[g].append((w, clk, temp))
            get = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                n, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
            if get is not None:
                try:
                    self.reasons[g] |= int(get(h))
                except Exception:
                    pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PowerSampler:
        if self.nvml is not None and self.handles:
            self._thread = threading.Thread(target=self._run, name="nvml-power", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self._sample()

    def stats(self, gpu: int) -> PowerStats | None:
        s = self.samples.get(gpu) or []
        if not s:
            return None
        watts = [x[0] for x in s]
        clocks = [x[1] for x in s if x[1] is not None]
        temps = [x[2] for x in s if x[2] is not None]
        return PowerStats(
            samples=len(s), avg_w=round(statistics.fmean(watts), 1), peak_w=round(max(watts), 1),
            sm_clock_avg_mhz=round(statistics.fmean(clocks), 0) if clocks else None,
            sm_clock_min_mhz=min(clocks) if clocks else None,
            temp_max_c=max(temps) if temps else None,
            clock_event_reasons=clock_reason_names(self.reasons.get(gpu, 0) & ~0x1),
            power_reading="instant" if self.instant else "1s-average",
            limit_w=self.limits.get(gpu),
        )


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def nvml_try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:
        return None


def inventory(torch: Any, gpus: Sequence[int], nvml: Any) -> tuple[list[GpuInfo], dict[int, Any]]:
    """Per-GPU facts from torch and NVML; also the NVML handle for each CUDA index."""
    nvml_by_uuid: dict[str, int] = {}
    nvml_by_bus: dict[str, int] = {}
    if nvml is not None:
        for k in range(nvml_try(nvml.nvmlDeviceGetCount) or 0):
            h = nvml.nvmlDeviceGetHandleByIndex(k)
            u = nvml_try(lambda: _s(nvml.nvmlDeviceGetUUID(h)))
            if u:
                nvml_by_uuid[u.lower().removeprefix("gpu-")] = k
            b = nvml_try(lambda: _s(nvml.nvmlDeviceGetPciInfo(h).busId))
            if b:
                nvml_by_bus[topo_mod.sysfs_pci_id(b)] = k
    infos: list[GpuInfo] = []
    handles: dict[int, Any] = {}
    for g in gpus:
        p = torch.cuda.get_device_properties(g)
        free, total = torch.cuda.mem_get_info(g)
        info = GpuInfo(
            index=g, name=p.name, memory_total_mib=round(total / 2**20, 1),
            memory_free_mib=round(free / 2**20, 1), sm_count=p.multi_processor_count,
            compute_capability=f"{p.major}.{p.minor}",
        )
        uuid = str(getattr(p, "uuid", "") or "").lower().removeprefix("gpu-")
        k = nvml_by_uuid.get(uuid) if uuid else None
        if k is None and hasattr(p, "pci_bus_id"):
            bus = f"{getattr(p, 'pci_domain_id', 0):04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
            k = nvml_by_bus.get(bus)
        if k is None and nvml is not None and not os.environ.get("CUDA_VISIBLE_DEVICES") \
                and len(nvml_by_uuid) == torch.cuda.device_count() \
                and os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
            k = g
        if k is not None and nvml is not None:
            h = nvml.nvmlDeviceGetHandleByIndex(k)
            handles[g] = h
            info.nvml_index = k
            info.uuid = nvml_try(lambda: _s(nvml.nvmlDeviceGetUUID(h)))
            info.pci_bus_id = nvml_try(lambda: _s(nvml.nvmlDeviceGetPciInfo(h).busId))
            info.name = nvml_try(lambda: _s(nvml.nvmlDeviceGetName(h))) or info.name
            info.sm_clock_max_mhz = nvml_try(lambda: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM))
            info.mem_clock_max_mhz = nvml_try(lambda: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_MEM))
            info.sm_clock_mhz = nvml_try(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM))
            info.mem_clock_mhz = nvml_try(lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM))
            pl = nvml_try(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
            info.power_limit_w = round(pl / 1000, 1) if pl else None
            info.pcie_gen = nvml_try(lambda: nvml.nvmlDeviceGetCurrPcieLinkGeneration(h))
            info.pcie_width = nvml_try(lambda: nvml.nvmlDeviceGetCurrPcieLinkWidth(h))
            info.pcie_gen_max = nvml_try(lambda: nvml.nvmlDeviceGetMaxPcieLinkGeneration(h))
            info.pcie_width_max = nvml_try(lambda: nvml.nvmlDeviceGetMaxPcieLinkWidth(h))
            mem = nvml_try(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
            if mem is not None:
                info.memory_total_mib = round(mem.total / 2**20, 1)
        t = target_for(info.name)
        info.target = t.key if t else None
        infos.append(info)
    return infos, handles


def host_info(torch: Any, nvml: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"hostname": platform.node(), "python": platform.python_version()}
    if torch is not None:
        d["torch"] = getattr(torch, "__version__", None)
        d["torch_cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    if nvml is not None:
        d["driver"] = nvml_try(lambda: _s(nvml.nvmlSystemGetDriverVersion()))
        v = nvml_try(nvml.nvmlSystemGetCudaDriverVersion)
        d["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}" if v else None
    d["nvml"] = nvml is not None
    d["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return d

