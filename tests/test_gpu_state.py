"""The benchmark's GPU-state monitor (benchmarks/gpu_state.py): the arithmetic on NVML's counters without a
GPU, and the counters themselves on one."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_state  # noqa: E402
from gpu_state import Reading  # noqa: E402


def _reading(wall_ns, energy_mj, power_ns, thermal_ns, any_ns, temperature=None):
    return Reading(wall_ns, energy_mj, {"held_power": power_ns, "held_thermal": thermal_ns, "held_any": any_ns},
                   temperature)


def test_summarize_turns_counters_into_power_and_fractions():
    start = _reading(1_000_000_000, 5_000_000, 10, 0, 10)
    end = _reading(1_250_000_000, 5_000_000 + 125_000, 10 + 50_000_000, 0, 10 + 75_000_000, 71)
    assert gpu_state.summarize(start, end) == pytest.approx({
        "interval_ms": 250.0, "power_w": 500.0, "held_power": 0.2, "held_thermal": 0.0, "held_any": 0.3,
        "temperature_c": 71.0,
    })


def test_summarize_leaves_out_what_it_cannot_tell():
    start = _reading(0, None, 5, None, 100, 50)
    end = _reading(100_000_000, 7, 3, 4, 100 + 200_000_000, None)  # energy unsupported at the start,
    # power counter ran backwards, thermal unsupported at the start, the held time longer than the interval
    assert gpu_state.summarize(start, end) == {"interval_ms": 100.0, "held_any": 1.0}
    assert gpu_state.summarize(end, start) == {}  # no time between them
    assert gpu_state.summarize(start, start) == {}


def test_held_note_only_past_the_threshold():
    assert gpu_state.held_note(None) == ""
    assert gpu_state.held_note({}) == ""
    assert gpu_state.held_note({"held_any": gpu_state.HELD_NOTE_FRACTION * 0.99, "power_w": 700.0}) == ""
    assert gpu_state.held_note({"held_any": 0.5, "held_power": 0.25, "held_thermal": 0.125, "power_w": 699.6}) == (
        "clocks held down 50% of the time (power 25%, thermal 12%) at 700 W")
    assert gpu_state.held_note({"held_any": 0.06}) == "clocks held down 6% of the time"


def test_open_monitor_says_why_without_nvml():
    monitor, status = gpu_state.open_monitor(0, library_name="libnvidia-ml-not-here.so.1")
    assert monitor is None
    assert status.startswith("n/a: NVML not loaded")


@pytest.mark.gpu
def test_monitor_reads_the_device_under_load():
    monitor, status = gpu_state.open_monitor(torch.cuda.current_device())
    assert monitor is not None, status
    assert status.startswith("NVML (")
    a, b = torch.randn(8192, 8192, device="cuda"), torch.randn(8192, 8192, device="cuda")
    c = torch.empty_like(a)
    torch.cuda.synchronize()
    start = monitor.read()
    began = time.perf_counter()
    while time.perf_counter() - began < 0.5:
        for _ in range(10):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
    summary = gpu_state.summarize(start, monitor.read())
    assert summary["interval_ms"] >= 500.0
    assert 30.0 < summary["power_w"] < 2000.0  # a busy Hopper board, well above idle
    assert 5.0 < summary["temperature_c"] < 120.0
    for key in gpu_state.POLICIES:
        assert 0.0 <= summary[key] <= 1.0
