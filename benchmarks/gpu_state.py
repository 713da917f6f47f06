"""What the GPU's power and clock limiters did while a point was timed (a benchmarking aid, not part of the
package).

The same kernel has timed several percent apart on two machines of one kind while the other implementation
in the same runs moved by 1%, and an H200 runs the large grids at its 700 W cap with its SM clock held at
1.2-1.9 GHz (NOTES v51). To tell a machine's state from a kernel's, the bench reads NVML's cumulative
counters (through ctypes: the driver's libnvidia-ml, no extra package) before a point's warm-up and after
its samples, and keeps per timing:

- ``power_w``: the board's mean power, from the energy counter;
- ``held_power`` / ``held_thermal`` / ``held_any``: the fraction of the interval the clocks were held below
  the application clocks by the power limit, by a thermal limit, or by any limiter (NVML's violation
  counters for PERF_POLICY_POWER, PERF_POLICY_THERMAL and PERF_POLICY_TOTAL_APP_CLOCKS);
- ``temperature_c``: the GPU temperature at the end.

A counter the device does not support is left out of the summary; where NVML cannot be loaded or does not
know the device, `open_monitor` says why and the bench records no GPU state.

Read them as coarse (H200, driver 580, NOTES v51): the energy counter advanced in steps, so 100 ms windows
of one steady load read 60-150 J, and a point's ~260 ms interval can be off by a quarter; the power limiter
answers the last few hundred ms, so a small point timed after a large one can start held down (0.3 s seen).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

# nvmlPerfPolicyType_t
POLICIES = {"held_power": 0, "held_thermal": 1, "held_any": 10}
_NVML_SUCCESS = 0
_NVML_TEMPERATURE_GPU = 0
HELD_NOTE_FRACTION = 0.05  # a timing held down for at least this share of its interval gets a table note


class _ViolationTime(ctypes.Structure):
    _fields_ = [("referenceTime", ctypes.c_ulonglong), ("violationTime", ctypes.c_ulonglong)]


@dataclass(frozen=True)
class Reading:
    """Cumulative counters at one moment: wall clock (ns), energy (mJ, None if unsupported) and, per policy
    name, the time held below the application clocks (ns; None if unsupported)."""

    wall_ns: int
    energy_mj: int | None
    held_ns: dict[str, int | None]
    temperature_c: int | None = None


def summarize(start: Reading, end: Reading) -> dict[str, float]:
    """Mean power and the held fractions between two readings (counters that either reading lacks, or
    that ran backwards, are left out)."""
    elapsed_ns = end.wall_ns - start.wall_ns
    if elapsed_ns <= 0:
        return {}
    summary: dict[str, float] = {"interval_ms": elapsed_ns / 1e6}
    if start.energy_mj is not None and end.energy_mj is not None and end.energy_mj >= start.energy_mj:
        summary["power_w"] = (end.energy_mj - start.energy_mj) * 1e-3 / (elapsed_ns * 1e-9)
    for name in POLICIES:
        before, after = start.held_ns.get(name), end.held_ns.get(name)
        if before is not None and after is not None and after >= before:
            summary[name] = min(1.0, (after - before) / elapsed_ns)
    if end.temperature_c is not None:
        summary["temperature_c"] = float(end.temperature_c)
    return summary


def held_note(summary: dict[str, float] | None) -> str:
    """A short reason when a timing's clocks were held down for HELD_NOTE_FRACTION of its interval or more,
    else ""."""
    if not summary or summary.get("held_any", 0.0) < HELD_NOTE_FRACTION:
        return ""
    parts = [f"clocks held down {summary['held_any']:.0%} of the time"]
    limits = [f"{what} {summary[key]:.0%}" for key, what in (("held_power", "power"), ("held_thermal", "thermal"))
              if summary.get(key, 0.0) > 0.0]
    if limits:
        parts.append("(" + ", ".join(limits) + ")")
    if "power_w" in summary:
        parts.append(f"at {summary['power_w']:.0f} W")
    return " ".join(parts)


class Monitor:
    """NVML counters of one device."""

    def __init__(self, library: ctypes.CDLL, handle: ctypes.c_void_p) -> None:
        self._nvml = library
        self._handle = handle
        self._supported = {name: True for name in (*POLICIES, "energy", "temperature")}

    def _energy(self) -> int | None:
        if not self._supported["energy"]:
            return None
        value = ctypes.c_ulonglong()
        if self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(value)) != _NVML_SUCCESS:
            self._supported["energy"] = False
            return None
        return value.value

    def _held(self, name: str) -> int | None:
        if not self._supported[name]:
            return None
        value = _ViolationTime()
        if self._nvml.nvmlDeviceGetViolationStatus(self._handle, POLICIES[name], ctypes.byref(value)) != _NVML_SUCCESS:
            self._supported[name] = False
            return None
        return value.violationTime

    def _temperature(self) -> int | None:
        if not self._supported["temperature"]:
            return None
        value = ctypes.c_uint()
        result = self._nvml.nvmlDeviceGetTemperature(self._handle, _NVML_TEMPERATURE_GPU, ctypes.byref(value))
        if result != _NVML_SUCCESS:
            self._supported["temperature"] = False
            return None
        return value.value

    def read(self) -> Reading:
        return Reading(time.perf_counter_ns(), self._energy(), {name: self._held(name) for name in POLICIES},
                       self._temperature())


def _pci_bus_id(device_index: int) -> bytes:
    """The PCI bus id of CUDA device `device_index` (as torch numbers it: CUDA_VISIBLE_DEVICES applies)."""
    from cuda.bindings import driver as cu

    (result,) = cu.cuInit(0)
    if result != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuInit: {result}")
    result, device = cu.cuDeviceGet(device_index)
    if result != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuDeviceGet({device_index}): {result}")
    result, bus_id = cu.cuDeviceGetPCIBusId(32, device)
    if result != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuDeviceGetPCIBusId: {result}")
    return bytes(bus_id).split(b"\0", 1)[0]


def open_monitor(device_index: int, library_name: str = "libnvidia-ml.so.1") -> tuple[Monitor | None, str]:
    """A Monitor of CUDA device `device_index`, or None and why not."""
    try:
        library = ctypes.CDLL(library_name)
    except OSError as error:
        return None, f"n/a: NVML not loaded ({error})"
    library.nvmlDeviceGetHandleByPciBusId_v2.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    library.nvmlDeviceGetTotalEnergyConsumption.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulonglong)]
    library.nvmlDeviceGetViolationStatus.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_ViolationTime)]
    library.nvmlDeviceGetTemperature.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint)]
    result = library.nvmlInit_v2()
    if result != _NVML_SUCCESS:
        return None, f"n/a: nvmlInit_v2 returned {result}"
    try:
        bus_id = _pci_bus_id(device_index)
    except Exception as error:  # noqa: BLE001 - reported, the bench runs without GPU state
        return None, f"n/a: no PCI bus id for device {device_index} ({error})"
    handle = ctypes.c_void_p()
    result = library.nvmlDeviceGetHandleByPciBusId_v2(bus_id, ctypes.byref(handle))
    if result != _NVML_SUCCESS:
        return None, f"n/a: NVML does not know {bus_id.decode(errors='replace')} (error {result})"
    return Monitor(library, handle), f"NVML ({bus_id.decode(errors='replace')})"
