"""Roofline benchmark of gated_delta_rule_mtp, with FlashInfer and FLA side by side when they import.

Every time is per call, from CUDA-graph replay with a cold L2: one graph holds R calls whose
inputs, pool slots, buffers and scatter slots are all disjoint (about 1 GB of distinct state per
replay), replayed many times. The floor of a call is the fewest bytes it must move divided by
the measured device-to-device copy bandwidth:

    state = B * HV * V * K * 4                                   (fp32 pool, read once)
    bytes = state + (state if update) + (T * state if buffer or scatter)
          + (2*B*T*H*K + 2*B*T*HV*V + 2*B*T*HV) * 2               (bf16 q, k, v, output, a, b)

Modes: update (final state written back to the read slot), buffer (disable_state_update=True
with an intermediate_states_buffer) and scatter (one pool slot per token, vLLM-style).

    python benchmarks/bench_mtp.py --quick
    python benchmarks/bench_mtp.py --modes update --T 2 4 --B 8 32 --heads 16,32
    python -m gdn_nvrtc bench --quick --json /tmp/run.json

The JSON is rewritten after every point ("complete": false until the grid is done), so a run that
dies keeps what it measured; --resume continues it, or adds another grid to the same file, keeping
the points already there (same card, method and peers; their floors keep the file's bandwidth).
Each timing also keeps the GPU's mean power and how long its clocks were held down by a power or
thermal limit over the point's warm-up and samples (`gpu`, from NVML: gpu_state.py).
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gpu_state
import torch

MODES = ("update", "buffer", "scatter")
K = V = 128
STATE_BYTES = 4  # fp32 state pool
IO_BYTES = 2  # bf16 q, k, v, a, b and output
GRID: dict[str, tuple] = {
    "modes": MODES,
    "T": (2, 4, 8),
    "B": (1, 8, 32, 64, 128, 256, 512),
    "heads": ((16, 32), (16, 64), (4, 8)),
}
QUICK_GRID: dict[str, tuple] = {"modes": MODES, "T": (2, 8), "B": (8, 256), "heads": ((16, 32),)}
HOST_SHAPE = {"B": 8, "T": 4, "H": 16, "HV": 32}  # host overhead and first call: a prebuilt shape
HOST_CALLS = 2000
HOST_BATCH = 50  # calls per timed batch, far fewer than the launch queue holds
COPY_BYTES = 2 << 30
COPY_ALLOCATIONS = 5  # buffers the copy bandwidth is measured on (copy_medians)
COPY_GAP = 3 << 20  # bytes between the copy's source and target (copy_medians)
MEMORY_FRACTION = 0.6  # of free GPU memory a grid point may fill; the rest is for the peers' graph pools
IMPLEMENTATIONS = ("ours", "flashinfer", "fla")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def moved_bytes(mode: str, B: int, T: int, H: int, HV: int) -> int:
    """The fewest bytes one call must move: the floor's numerator."""
    state = B * HV * V * K * STATE_BYTES
    written = state if mode == "update" else T * state
    io = (2 * B * T * H * K + 2 * B * T * HV * V + 2 * B * T * HV) * IO_BYTES
    return state + written + io


def footprint_bytes(mode: str, B: int, T: int, H: int, HV: int) -> int:
    """Distinct memory one call touches: its pool slots, its buffer or scatter slots, its inputs and output.

    An update writes the slots it read, so it touches its state once; the others touch T more states.
    """
    return moved_bytes(mode, B, T, H, HV) - (B * HV * V * K * STATE_BYTES if mode == "update" else 0)


def calls_per_replay(footprint: int, target_bytes: float, budget_bytes: float) -> int:
    """R: enough disjoint calls for target_bytes of distinct data per replay, within the memory budget.

    0 means that not even one call fits.
    """
    return min(max(1, int(target_bytes // footprint)), int(budget_bytes // footprint))


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass
class Timing:
    us: float | None = None  # median time per call; None when not measured
    samples_us: list[float] = field(default_factory=list)
    method: str = "n/a"  # "graph" (graph replay), "eager" (capture failed) or "n/a"
    note: str = ""  # why n/a, or why eager
    gpu: dict[str, float] | None = None  # power and clock limiters over warm-up and samples (gpu_state.summarize)


@dataclass
class Row:
    mode: str
    T: int
    B: int
    H: int
    HV: int
    floor_us: float
    floor_bytes: int
    calls_per_replay: int = 0
    timings: dict[str, Timing] = field(default_factory=dict)


def _us(timing: Timing) -> str:
    if timing.us is None:
        return "n/a"
    return f"{timing.us:.1f}" + ("*" if timing.method == "eager" else "")


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "n/a" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def _spread(timing: Timing) -> str:
    if timing.us is None or len(timing.samples_us) < 2:
        return "n/a"
    return f"{(max(timing.samples_us) - min(timing.samples_us)) / timing.us:.1%}"


TABLE_COLUMNS = (
    "mode", "T", "B", "H", "HV", "floor_us", "ours_us", "ours/floor", "spread",
    "fi_us", "fi/floor", "fla_us", "fla/floor", "ours/fi",
)


def format_table(rows: Sequence[Row]) -> str:
    """One line per row, columns right-aligned; n/a where an implementation was not measured."""
    lines = [list(TABLE_COLUMNS)]
    for row in rows:
        ours, fi, fla = (row.timings.get(name, Timing()) for name in IMPLEMENTATIONS)
        lines.append([
            row.mode, str(row.T), str(row.B), str(row.H), str(row.HV), f"{row.floor_us:.1f}",
            _us(ours), _ratio(ours.us, row.floor_us), _spread(ours),
            _us(fi), _ratio(fi.us, row.floor_us), _us(fla), _ratio(fla.us, row.floor_us),
            _ratio(ours.us, fi.us),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_COLUMNS))]

    def aligned(line: list[str]) -> str:  # the mode left, the numbers right
        cells = [cell.rjust(width) for cell, width in zip(line, widths, strict=True)]
        return "  ".join([line[0].ljust(widths[0]), *cells[1:]])

    return "\n".join(aligned(line) for line in lines)


def table_notes(rows: Sequence[Row]) -> list[str]:
    """Why a cell is n/a or eager, once per implementation and reason; then, per implementation, how many
    of its timings a limiter held down (gpu_state.held_note) and the one held down the most."""
    notes: dict[str, set[str]] = {}
    monitored: dict[str, int] = {}
    held: dict[str, list[tuple[float, str]]] = {}
    for row in rows:
        for name, timing in row.timings.items():
            if timing.note:
                notes.setdefault(f"{name} ({timing.method})", set()).add(timing.note)
            if timing.gpu:
                monitored[name] = monitored.get(name, 0) + 1
                reason = gpu_state.held_note(timing.gpu)
                if reason:
                    point = f"{row.mode} T={row.T} B={row.B} H={row.H} HV={row.HV}"
                    held.setdefault(name, []).append((timing.gpu["held_any"], f"{point}: {reason}"))
    lines = [f"{who}: {note}" for who, reasons in notes.items() for note in sorted(reasons)]
    for name, timings in held.items():
        most = max(timings)[1]
        lines.append(f"{name}: clocks held down for {gpu_state.HELD_NOTE_FRACTION:.0%} or more of the interval at "
                     f"{len(timings)} of {monitored[name]} timings (JSON: gpu); the most at {most}")
    return lines


# ---------------------------------------------------------------- GPU measurements


def copy_medians(max_bytes: int = COPY_BYTES, repeats: int = 10, allocations: int = COPY_ALLOCATIONS) -> list[float]:
    """Device-to-device copy bandwidth in bytes per second, counting bytes read plus bytes written: the
    median of `repeats` copies on each of `allocations` fresh buffers. Source and target are two parts of
    one buffer, the target COPY_GAP bytes after the source's end: two buffers exactly their size apart
    (what two allocations of 2 GB usually are) copied 2-5% slower than at any gap of 1 MiB to 512 MiB on an
    H200. The caching allocator gives each buffer's memory back to the driver before the next is made:
    some allocations copied up to 11% slower than others in the same process (NOTES v52)."""
    medians = []
    for _ in range(allocations):
        free, _ = torch.cuda.mem_get_info()
        nbytes = min(max_bytes, free // 4) // 16 * 16
        buffer = torch.randn((2 * nbytes + COPY_GAP) // 4, device="cuda")
        source, target = buffer[: nbytes // 4], buffer[(nbytes + COPY_GAP) // 4 :]
        for _ in range(2):
            target.copy_(source)
        samples = [_elapsed_ms(partial(target.copy_, source), 1) for _ in range(repeats)]
        medians.append(2 * nbytes / (statistics.median(samples) * 1e-3))
        del buffer, source, target
        torch.cuda.empty_cache()
    return medians


def copy_bandwidth(max_bytes: int = COPY_BYTES, repeats: int = 10, allocations: int = COPY_ALLOCATIONS) -> float:
    """The floor's denominator: the highest of copy_medians, so that a buffer that copied slowly does not
    lower the floor's bandwidth (and the kernels' ratios to the floor with it)."""
    return max(copy_medians(max_bytes, repeats, allocations))


def _elapsed_ms(run: Callable[[], object], n: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _brief(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160] if lines else ''}"


def time_calls(
    calls: Sequence[Callable[[], object]], repeats: int, min_ms: float, *, peer: bool,
    monitor: gpu_state.Monitor | None = None,
) -> Timing:
    """Time per call of `calls` captured back to back in one CUDA graph.

    A peer that fails is reported, not fatal; a peer that cannot be captured is timed eagerly.
    Our own function must run and capture, so its errors propagate. With a monitor, the timing keeps
    what the GPU's power and clock limiters did over its warm-up and samples.
    """
    try:
        calls[0]()  # JIT peers compile here, outside capture and timing
        torch.cuda.synchronize()
    except Exception as error:
        if not peer:
            raise
        return Timing(note=f"failed: {_brief(error)}")

    def eager() -> None:
        for call in calls:
            call()

    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        run, method, note = graph.replay, "graph", ""
    except Exception as error:
        if not peer:
            raise
        torch.cuda.synchronize()
        run, method, note = eager, "eager", f"graph capture failed ({_brief(error)}); timed eager calls with events"

    samples, gpu = replay_samples(run, len(calls), repeats, min_ms, monitor)
    return Timing(statistics.median(samples), samples, method, note, gpu)


WARMUP_MS = 200.0  # untimed replays before a point's samples (replay_samples)


def replay_samples(
    run: Callable[[], object], calls: int, repeats: int, min_ms: float, monitor: gpu_state.Monitor | None = None
) -> tuple[list[float], dict[str, float] | None]:
    """us per call: `repeats` timings of enough replays of `run` (which makes `calls` calls) to last min_ms,
    after untimed replays for WARMUP_MS: at a new point's first replays the GPU ran up to 10% slower for
    40-60 ms (v50, H200: the first one or two of three 20 ms samples at B = 32 after a larger point, and
    still the first after one untimed 20 ms batch). With a monitor, also the GPU state over the warm-up
    and the samples (gpu_state.summarize; else None)."""
    run()
    run()
    torch.cuda.synchronize()
    replay_ms = max(_elapsed_ms(run, 1), 1e-3)
    replays = max(2, math.ceil(min_ms / replay_ms))
    start = monitor.read() if monitor is not None else None
    _elapsed_ms(run, max(replays, math.ceil(WARMUP_MS / replay_ms)))
    samples = [_elapsed_ms(run, replays) * 1e3 / (replays * calls) for _ in range(repeats)]
    gpu = gpu_state.summarize(start, monitor.read()) if monitor is not None and start is not None else None
    return samples, gpu


def pool_slots_per_call(mode: str, B: int, T: int) -> int:
    """Pool slots one call owns: its B read slots, and in scatter mode one more per token."""
    return B * (1 + T) if mode == "scatter" else B


SLOT_ORDERS = ("random", "sequential", "pages", "sorted")
PAGE_BYTES = 2 << 20  # the GPU's large page


def call_slots(
    count: int, slot_bytes: int, order: str, generator: torch.Generator, *, per_call: int = 1,
) -> torch.Tensor:
    """The order in which build_calls hands out `count` pool slots of slot_bytes each (int32, on the generator's
    device): "random", a random permutation (the bench's); "sequential", the pool's order; "pages", runs of
    consecutive slots that fill PAGE_BYTES (one slot where a slot is that large or larger), the runs in a random
    order (which tells a per-page cost from a finer one, NOTES v55); "sorted", the random permutation with each
    call's per_call slots in ascending order (the same scattered places, visited in address order: NOTES v56)."""
    if order not in SLOT_ORDERS:
        raise ValueError(f"slot order must be one of {SLOT_ORDERS}, got {order!r}")
    if per_call < 1:
        raise ValueError(f"per_call must be at least 1, got {per_call}")
    device = generator.device
    if order == "sequential":
        return torch.arange(count, device=device, dtype=torch.int32)
    run = max(1, PAGE_BYTES // slot_bytes) if order == "pages" else 1
    runs = torch.rand(-(-count // run), device=device, generator=generator).argsort()  # a permutation of the runs
    slots = (runs[:, None] * run + torch.arange(run, device=device)).flatten()
    slots = slots[slots < count]
    if order == "sorted":
        whole = count - count % per_call
        calls = slots[:whole].reshape(-1, per_call).sort(dim=1).values
        slots = torch.cat((calls.flatten(), slots[whole:].sort().values))
    return slots.to(torch.int32)


def build_calls(
    mode: str, B: int, T: int, H: int, HV: int, R: int, generator: torch.Generator, *, slot_order: str = "random",
) -> list[dict[str, Any]]:
    """Arguments of R calls that share one pool but nothing else: own inputs, slots, buffers and scatter slots.
    Call r takes the slots at r * n .. r * n + n - 1 of call_slots(slot_order) (n = pool_slots_per_call): its
    B read slots, then in scatter mode its B * T scatter slots."""
    cuda = torch.device("cuda")
    slots_per_call = pool_slots_per_call(mode, B, T)
    pool = torch.randn(R * slots_per_call, HV, V, K, device=cuda, generator=generator).mul_(0.1)
    slots = call_slots(pool.shape[0], pool[0].numel() * pool.element_size(), slot_order, generator,
                       per_call=slots_per_call)
    A_log = torch.log(1 + 15 * torch.rand(HV, device=cuda, generator=generator))
    dt_bias = torch.randn(HV, device=cuda, generator=generator)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, device=cuda, dtype=torch.bfloat16, generator=generator)

    calls = []
    for r in range(R):
        own = slots[r * slots_per_call : (r + 1) * slots_per_call]
        kwargs: dict[str, Any] = {
            "q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, HV, V),
            "initial_state": pool,
            "initial_state_indices": own[:B].clone(),  # own allocation: FlashInfer needs 16-byte aligned indices
            "A_log": A_log, "a": randn(B, T, HV), "dt_bias": dt_bias, "b": randn(B, T, HV),
            "output": torch.empty(B, T, HV, V, device=cuda, dtype=torch.bfloat16),
            "disable_state_update": mode == "buffer",
        }
        if mode == "buffer":
            kwargs["intermediate_states_buffer"] = torch.empty(B, T, HV, V, K, device=cuda)
        elif mode == "scatter":
            kwargs["ssm_state_indices"] = own[B:].reshape(B, T).clone()
        calls.append(kwargs)
    return calls


# ---------------------------------------------------------------- implementations


@dataclass(frozen=True)
class Implementation:
    name: str
    bind: Callable[[dict[str, Any]], Callable[[], object]]  # one call's arguments -> a call without arguments
    modes: tuple[str, ...]
    unsupported: str = ""  # why the modes it lacks are n/a
    refuses: Callable[[str, int, int, int, int], str] | None = None  # (mode, B, T, H, HV) -> why not run there


# FlashInfer 0.7.2 overflows 32-bit offsets in two places (its `gdn_decode_mtp.py`), where its per-token
# pool scatter widens its product to 64 bits:
# - the intermediate_states_buffer, through a flat row index (b * T * HV + t * HV + hv) of V * K elements;
#   a full-grid run (H200) timed it at B = 256, T = 8, HV = 64 (2^31 elements, the last that fits) and
#   stopped with an illegal memory access at B = 512 (2^32);
# - the pool, whose reads index (slot * HV + hv) rows of V * K elements without that widening (which
#   access faulted was not measured): in scatter mode (B * (T + 1) slots per call) it timed B = 512, T = 4,
#   HV = 32 and B = 256, T = 4, HV = 64 (1.25 * 2^30 elements) and faulted at B = 512, T = 4, HV = 64
#   (1.25 * 2^31).
# An illegal memory access ends the whole process (NOTES v17, v18), so it is not run past 2^31 elements.
FLASHINFER_MAX_ELEMENTS = 2**31


def flashinfer_refuses(mode: str, B: int, T: int, H: int, HV: int) -> str:
    if mode == "buffer" and B * T * HV * V * K > FLASHINFER_MAX_ELEMENTS:
        return ("not run: a buffer of more than 2^31 elements is past FlashInfer's 32-bit buffer index "
                "(an illegal memory access ends the process)")
    # a call's own pool slots; R > 1 calls share a pool only at sizes far below this
    if pool_slots_per_call(mode, B, T) * HV * V * K > FLASHINFER_MAX_ELEMENTS:
        return ("not run: a pool of more than 2^31 elements is past FlashInfer's 32-bit pool offset "
                "(an illegal memory access ends the process)")
    return ""


def _version(distribution: str, module: str) -> str:
    """A peer's version from its package metadata, else from module.__version__."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(importlib.import_module(module).__version__)
    except (ImportError, AttributeError):
        return "unknown version"


def load_flashinfer() -> tuple[Callable[..., Any] | None, str]:
    """FlashInfer's gated_delta_rule_mtp and its version, or None and why it is missing."""
    try:
        from flashinfer import gdn_decode
    except Exception as error:  # peers fail to import in many ways (missing module, CUDA library mismatch)
        return None, f"not available: {_brief(error)}"
    if not getattr(gdn_decode, "_MTP_AVAILABLE", True):
        # gdn_decode hides a failed import of its MTP kernel module; repeat it for the real reason
        try:
            importlib.import_module("flashinfer.gdn_kernels.gdn_decode_mtp")
        except Exception as error:
            return None, f"not available: its MTP kernel failed to import: {_brief(error)}"
    # the anchors ship FlashInfer without its package metadata; the version lives in _build_meta
    return gdn_decode.gated_delta_rule_mtp, _version("flashinfer-python", "flashinfer._build_meta")


def load_fla() -> tuple[Callable[..., Any] | None, str]:
    """FLA's fused_recurrent_gated_delta_rule_fwd and its version, or None and why it is missing."""
    try:
        from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_fwd
    except Exception as error:  # see load_flashinfer
        return None, f"not available: {_brief(error)}"
    return fused_recurrent_gated_delta_rule_fwd, _version("fla-core", "fla")


def fla_update(fused_recurrent: Callable[..., Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """The update mode as an FLA user runs it: gather the read slots, run the kernel, scatter the final states back.

    FLA 0.6 computes the gates in the kernel (g = a with A_log and dt_bias, beta = sigmoid(b)) and
    takes our [V, K] state layout with state_v_first=True, so this is the same math on the same pool.
    """
    pool, slots = kwargs["initial_state"], kwargs["initial_state_indices"]
    output, final_state = fused_recurrent(
        q=kwargs["q"], k=kwargs["k"], v=kwargs["v"], g=kwargs["a"], beta=kwargs["b"],
        A_log=kwargs["A_log"], dt_bias=kwargs["dt_bias"], scale=K**-0.5,
        initial_state=pool[slots], output_final_state=True, use_qk_l2norm_in_kernel=True,
        use_beta_sigmoid_in_kernel=True, state_v_first=True,
    )
    pool[slots] = final_state
    return output


def implementations(
    ours: Callable[..., Any], with_peers: bool, without: Sequence[str] = ()
) -> tuple[list[Implementation], dict[str, str]]:
    """Ours and every peer that imports (less those in without), plus a status line per peer (its
    version, or why it is missing)."""
    found = [Implementation("ours", lambda kwargs: partial(ours, **kwargs), MODES)]
    if not with_peers:
        return found, {"flashinfer": "skipped (--no-peers)", "fla": "skipped (--no-peers)"}
    status: dict[str, str] = {}
    flashinfer, fused_recurrent = None, None
    if "flashinfer" in without:
        status["flashinfer"] = "skipped (--without flashinfer)"
    else:
        flashinfer, status["flashinfer"] = load_flashinfer()
    if flashinfer is not None:
        found.append(Implementation(
            "flashinfer", lambda kwargs: partial(flashinfer, **kwargs), MODES, refuses=flashinfer_refuses
        ))
    if "fla" in without:
        status["fla"] = "skipped (--without fla)"
    else:
        fused_recurrent, status["fla"] = load_fla()
    if fused_recurrent is not None:
        found.append(Implementation(
            "fla", lambda kwargs: partial(fla_update, fused_recurrent, kwargs), ("update",),
            unsupported="fused_recurrent returns only the final state (no buffer or per-token scatter)",
        ))
    return found, status


def bench_point(
    mode: str, T: int, B: int, H: int, HV: int, found: Sequence[Implementation], status: dict[str, str],
    bandwidth: float, args: argparse.Namespace, generator: torch.Generator, monitor: gpu_state.Monitor | None = None,
) -> Row:
    nbytes = moved_bytes(mode, B, T, H, HV)
    row = Row(mode, T, B, H, HV, floor_us=nbytes / bandwidth * 1e6, floor_bytes=nbytes)
    footprint = footprint_bytes(mode, B, T, H, HV)
    torch.cuda.empty_cache()  # the previous point's pool counts as free
    free, _ = torch.cuda.mem_get_info()
    row.calls_per_replay = calls_per_replay(footprint, args.state_gb * 1e9, MEMORY_FRACTION * free)
    if row.calls_per_replay == 0:
        note = f"one call needs {footprint / 1e9:.1f} GB, more than {MEMORY_FRACTION:.0%} of free memory"
        row.timings = {name: Timing(note=note) for name in IMPLEMENTATIONS}
        return row
    arguments = build_calls(mode, B, T, H, HV, row.calls_per_replay, generator)
    for name in IMPLEMENTATIONS:
        impl = next((impl for impl in found if impl.name == name), None)
        if impl is None:
            row.timings[name] = Timing(note=status[name])
        elif mode not in impl.modes:
            row.timings[name] = Timing(note=f"no {mode} mode: {impl.unsupported}")
        elif impl.refuses is not None and impl.refuses(mode, B, T, H, HV):
            row.timings[name] = Timing(note=impl.refuses(mode, B, T, H, HV))
        else:
            calls = [impl.bind(kwargs) for kwargs in arguments]
            row.timings[name] = time_calls(calls, args.repeats, args.min_ms, peer=name != "ours", monitor=monitor)
    return row


def host_overhead(found: Sequence[Implementation], make_inputs: Callable[..., dict[str, torch.Tensor]]) -> dict:
    """Wall-clock per eager call (validation + launch): batches of HOST_BATCH calls back to back, each
    read before its synchronize, which is outside the clock. A batch is too short to fill the launch
    queue, so a call whose GPU time exceeds its host time (it comes along: graph replay, warm L2)
    still measures the host alone.
    """
    B, T, H, HV = (HOST_SHAPE[name] for name in ("B", "T", "H", "HV"))
    inputs = make_inputs(B, T, H, HV)
    inputs["output"] = torch.empty(B, T, HV, V, device="cuda", dtype=torch.bfloat16)
    results: dict[str, dict] = {}
    for impl in found:
        if impl.name == "fla":
            continue  # its path is several torch ops plus a Triton launch; the grid's timing covers it
        call = impl.bind({**inputs, "disable_state_update": False})
        device = time_calls([call] * 100, repeats=1, min_ms=20.0, peer=impl.name != "ours")
        if device.us is None:
            results[impl.name] = {"error": device.note}
            continue
        for _ in range(50):
            call()
        batches, host_s = HOST_CALLS // HOST_BATCH, 0.0
        for _ in range(batches):
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(HOST_BATCH):
                call()
            host_s += time.perf_counter() - began
        torch.cuda.synchronize()
        results[impl.name] = {"host_us": host_s / (batches * HOST_BATCH) * 1e6, "gpu_us": device.us}
    return results


# Runs in a fresh interpreter: CUDA context and inputs first, then the clock covers the import
# of gdn_nvrtc and its first call (cubin loading included).
_FIRST_CALL_SCRIPT = """
import json, sys, time
import torch
B, T, H, HV, K = map(int, sys.argv[1:])  # K = V
def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(shape, device="cuda", dtype=dtype)
args = dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, HV, K),
            initial_state=0.1 * randn(B, HV, K, K, dtype=torch.float32),
            initial_state_indices=torch.arange(B, device="cuda", dtype=torch.int32),
            A_log=randn(HV, dtype=torch.float32), a=randn(B, T, HV), dt_bias=randn(HV, dtype=torch.float32),
            b=randn(B, T, HV))
torch.cuda.synchronize()
start = time.perf_counter()
import gdn_nvrtc
imported = time.perf_counter()
gdn_nvrtc.gated_delta_rule_mtp(**args, disable_state_update=False)
torch.cuda.synchronize()
done = time.perf_counter()
print(json.dumps({"import_ms": (imported - start) * 1e3, "first_call_ms": (done - imported) * 1e3,
                  "nvrtc_loaded": "cuda.bindings.nvrtc" in sys.modules}))
"""


def first_call_latency(package_dir: Path) -> dict:
    """import gdn_nvrtc + the first call of a prebuilt shape, in a fresh process that imports this same package.

    The package's modules are byte-compiled first, as pip does when it installs the wheel: run from a
    source tree under PYTHONDONTWRITEBYTECODE=1, every fresh process would otherwise compile them
    again (15-20 ms on the GPU machine, benchmarks/NOTES.md v15). Where the directory is not writable
    (an installed package), what is there is used and "bytecode" says so."""
    bytecode = compileall.compile_dir(str(package_dir), quiet=2)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_dir.parent), env.get("PYTHONPATH")]))
    shape = [str(HOST_SHAPE[name]) for name in ("B", "T", "H", "HV")] + [str(K)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", _FIRST_CALL_SCRIPT, *shape], env=env, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return {"error": "the fresh process took more than 300 s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["total_ms"] = result["import_ms"] + result["first_call_ms"]
    result["bytecode"] = "compiled before" if bytecode else "as installed (compiling it failed)"
    return result


def driver_version() -> str:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi failed)"
    return done.stdout.strip().splitlines()[0]


# ---------------------------------------------------------------- output


def plot(rows: Sequence[Row], path: Path, title: str) -> bool:
    """time / floor against B: one panel per (mode, T), a colour per implementation, a line style per (H, HV)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError as error:
        print(f"plot skipped: matplotlib is not importable ({error})")
        return False
    modes = [mode for mode in MODES if any(row.mode == mode for row in rows)]
    tokens = sorted({row.T for row in rows})
    batch_sizes = sorted({row.B for row in rows})
    heads = sorted({(row.H, row.HV) for row in rows}, key=lambda h: (-h[0], h[1]))
    colours = {"ours": "tab:blue", "flashinfer": "tab:orange", "fla": "tab:green"}
    styles = {h: ("-", "--", ":", "-.")[i % 4] for i, h in enumerate(heads)}
    y_top = 2.0  # keeps 1.00 / 1.05 / 1.10 apart; slower points sit on the top edge as triangles
    fig, axes = plt.subplots(
        len(modes), len(tokens), figsize=(max(7.0, 4.5 * len(tokens)), 3.4 * len(modes)), squeeze=False, sharex=True,
        layout="constrained",
    )
    for (i, mode), (j, T) in itertools.product(enumerate(modes), enumerate(tokens)):
        ax = axes[i][j]
        for name, h in itertools.product(IMPLEMENTATIONS, heads):
            points = sorted(
                (row.B, row.timings[name].us / row.floor_us)
                for row in rows
                if (row.mode, row.T, (row.H, row.HV)) == (mode, T, h) and row.timings.get(name, Timing()).us
            )
            batches = [b for b, _ in points]
            clipped = [min(r, y_top) for _, r in points]
            ax.plot(batches, clipped, color=colours[name], linestyle=styles[h], marker="o", markersize=3)
            above = [b for b, r in points if r > y_top]
            ax.plot(above, [y_top] * len(above), color=colours[name], linestyle="none", marker="^")
        for level in (1.0, 1.05, 1.10):
            ax.axhline(level, color="grey", linewidth=0.7, zorder=0)
        ax.set_xscale("log")
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.minorticks_off()
        ax.set_ylim(0.9, y_top + 0.05)  # room for the triangles
        ax.set_title(f"{mode}, T={T}")
        if i == len(modes) - 1:
            ax.set_xlabel("B")
        if j == 0:
            ax.set_ylabel("time / floor")
    timed = [name for name in IMPLEMENTATIONS if any(row.timings.get(name, Timing()).us for row in rows)]
    legend = [Line2D([], [], color=colours[name], label=name) for name in timed] + [
        Line2D([], [], color="black", linestyle=styles[h], label=f"H={h[0]}, HV={h[1]}") for h in heads
    ]
    fig.suptitle(f"{title}\ngrey lines: 1.00, 1.05, 1.10 x floor; a triangle on the top edge: above {y_top}")
    fig.legend(handles=legend, loc="outside lower center", ncol=len(legend), frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def _host_line(results: dict) -> str:
    parts = []
    for name, result in results.items():
        if "error" in result:
            parts.append(f"{name} {result['error']}")
            continue
        parts.append(f"{name} {result['host_us']:.1f} us/call (GPU {result['gpu_us']:.1f} us/call)")
    return "; ".join(parts)


def _first_call_line(result: dict) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    return (f"{result['total_ms']:.1f} ms (import {result['import_ms']:.1f} ms + first call "
            f"{result['first_call_ms']:.1f} ms), NVRTC loaded: {'yes' if result['nvrtc_loaded'] else 'no'}, "
            f"bytecode {result.get('bytecode', 'n/a')}")


# ---------------------------------------------------------------- command line


def _heads(text: str) -> tuple[int, int]:
    try:
        H, HV = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,HV such as 16,32, got {text!r}") from None
    if H < 1 or HV % H:
        raise argparse.ArgumentTypeError(f"HV must be a positive multiple of H, got {text!r}")
    return H, HV


def _axis_values(values: tuple) -> str:
    return " ".join(",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values)


def write_report(path: Path, report: dict) -> None:
    """Replace the JSON at path in one rename: a reader (or a run that dies) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_name(path.name + ".partial")
    partial_path.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(partial_path, path)


def row_key(row: Row) -> tuple:
    return (row.mode, row.T, row.B, row.H, row.HV)


def row_from_dict(data: dict) -> Row:
    timings = {name: Timing(**timing) for name, timing in data["timings"].items()}
    return Row(**{**data, "timings": timings})


def resume_mismatch(earlier: dict, *, card: str, method: dict, peers: dict) -> str:
    """Why the rows of an earlier report cannot join this run's ("" if they can): another card,
    another timing method or other peers."""
    for what, now in (("card", card), ("method", method), ("peers", peers)):
        if earlier.get(what) != now:
            return f"its {what} is {earlier.get(what)!r}, this run's {now!r}"
    return ""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_mtp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    quick = ", ".join(f"{axis} {_axis_values(QUICK_GRID[axis])}" for axis in GRID)
    parser.add_argument("--quick", action="store_true", help=f"a small grid ({quick}); axis flags still override it")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: all")
    parser.add_argument("--T", nargs="+", type=int, help=f"draft tokens per call; default {_axis_values(GRID['T'])}")
    parser.add_argument("--B", nargs="+", type=int, help=f"batch sizes; default {_axis_values(GRID['B'])}")
    parser.add_argument("--heads", nargs="+", type=_heads, metavar="H,HV",
                        help=f"q/k and value heads; default {_axis_values(GRID['heads'])}")
    parser.add_argument("--no-peers", action="store_true", help="time only gdn_nvrtc")
    parser.add_argument("--without", nargs="+", default=[], choices=IMPLEMENTATIONS[1:], help="peers to leave out")
    parser.add_argument("--state-gb", type=float, default=1.0, help="distinct data per graph replay (default 1 GB)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per implementation and point (default 3)")
    parser.add_argument("--min-ms", type=float, default=100.0, help="GPU time per timing (default 100 ms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/<date>-<card>.json")
    parser.add_argument("--plot", type=Path, help="default: the JSON path with .png")
    parser.add_argument("--resume", action="store_true",
                        help="keep the points already in the JSON file (same card, method and peers) and time the "
                             "rest; the file is rewritten after every point")
    args = parser.parse_args(argv)
    preset = QUICK_GRID if args.quick else GRID
    for axis in GRID:
        if getattr(args, axis) is None:
            setattr(args, axis, list(preset[axis]))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def hopper_visible(program: str) -> bool:
    """Whether torch sees a Hopper GPU; if not, says so on stderr for `program`."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        return True
    print(f"{program}: needs a Hopper GPU (compute capability 9.0) visible to torch; nothing to time", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not hopper_visible("bench"):
        return 2
    # imported here, not at the top, so that --help needs neither the package nor its CUDA bindings
    import gdn_nvrtc
    import gdn_nvrtc.mtp
    from gdn_nvrtc.reference import make_inputs

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    began = time.perf_counter()
    card = torch.cuda.get_device_name()
    today = datetime.date.today().isoformat()
    json_path = args.json or RESULTS_DIR / f"{today}-{card_slug(card)}.json"
    plot_path = args.plot or json_path.with_suffix(".png")
    method = {"state_gb_per_replay": args.state_gb, "repeats": args.repeats, "min_ms": args.min_ms,
              "seed": args.seed, "timing": "CUDA-graph replay, cold L2; us per call"}
    found, status = implementations(gdn_nvrtc.gated_delta_rule_mtp, not args.no_peers, args.without)
    monitor, monitor_status = gpu_state.open_monitor(torch.cuda.current_device())
    earlier: dict[tuple, Row] = {}
    if args.resume and json_path.exists():
        earlier_report = json.loads(json_path.read_text())
        mismatch = resume_mismatch(earlier_report, card=card, method=method, peers=status)
        if mismatch:
            print(f"bench: cannot resume {json_path}: {mismatch}", file=sys.stderr)
            return 2
        earlier = {row_key(row): row for row in map(row_from_dict, earlier_report["rows"])}
        bandwidth = earlier_report["copy_bandwidth_gbs"] * 1e9  # one floor for every row of the file
        copy_gbs = earlier_report.get("copy_medians_gbs", [])
        progress(f"bench: {card}; resuming {json_path} ({len(earlier)} points done)")
    else:
        progress(f"bench: {card}; measuring copy bandwidth")
        copy_gbs = [median / 1e9 for median in copy_medians()]
        bandwidth = max(copy_gbs) * 1e9
    progress("bench: host overhead and first-call latency")
    host = host_overhead(found, make_inputs)
    first_call = first_call_latency(Path(gdn_nvrtc.__file__).resolve().parent)

    report = {
        "date": today,
        "card": card,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "copy_medians_gbs": copy_gbs,  # per buffer (copy_medians); the highest is the floor's
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "driver": driver_version(),
        "gdn_nvrtc": {"version": gdn_nvrtc.__version__, "path": str(Path(gdn_nvrtc.__file__).resolve().parent)},
        "peers": status,
        "method": method,
        "host_overhead": {"shape": HOST_SHAPE, "calls": HOST_CALLS, "batch": HOST_BATCH, "results": host,
                          "fast_signature_check": gdn_nvrtc.mtp.fast_signature_check()},
        "first_call": {"shape": HOST_SHAPE, **first_call},
        "gpu_state": monitor_status,
        "resumed_points": 0,
        "complete": False,
        "wall_s": 0.0,
        "rows": [],
    }
    points = [(m, t, b, h, hv) for m in args.modes for t in args.T for (h, hv) in args.heads for b in args.B]
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    # Points of the file outside this run's grid stay in it, first (a grid can be built up in parts).
    grid = set(points)
    rows = [row for key, row in earlier.items() if key not in grid]
    report["resumed_points"] = len(rows)
    for index, (mode, T, B, H, HV) in enumerate(points, 1):
        started = time.perf_counter()
        row = earlier.get((mode, T, B, H, HV))
        resumed = row is not None
        if resumed:
            report["resumed_points"] += 1
        else:
            row = bench_point(mode, T, B, H, HV, found, status, bandwidth, args, generator, monitor)
        rows.append(row)
        # Written after every point (atomically), so that a run that dies keeps what it measured.
        write_report(json_path, {**report, "wall_s": time.perf_counter() - began, "rows": [asdict(r) for r in rows]})
        ours = row.timings["ours"]
        result = f"{ours.us / row.floor_us:.2f} x floor" if ours.us else ours.note
        progress(f"[{index}/{len(points)}] {mode} T={T} B={B} H={H} HV={HV} R={row.calls_per_replay}: "
                 f"ours {result} " + ("(from the file)" if resumed else f"({time.perf_counter() - started:.1f} s)"))

    report.update(complete=True, wall_s=time.perf_counter() - began, rows=[asdict(row) for row in rows])
    write_report(json_path, report)
    plotted = plot(rows, plot_path, f"gated_delta_rule_mtp on {card}, copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    print(f"gdn_nvrtc {gdn_nvrtc.__version__} ({report['gdn_nvrtc']['path']}) on {card}, driver {report['driver']}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    medians = f"; the highest of the medians {', '.join(f'{gbs:.0f}' for gbs in copy_gbs)}" if copy_gbs else ""
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + written{medians})")
    print("peers: " + "; ".join(f"{name} {line}" for name, line in status.items()))
    print(f"host overhead, {HOST_CALLS} eager calls in batches of {HOST_BATCH} at B={HOST_SHAPE['B']} "
          f"T={HOST_SHAPE['T']}: {_host_line(host)}")
    print(f"first call in a fresh process (import + prebuilt T={HOST_SHAPE['T']}): {_first_call_line(first_call)}")
    print(f"GPU state per timing (power, clock limiters): {monitor_status}")
    print(f"results: {json_path}" + (f", {plot_path}" if plotted else ""))
    for note in table_notes(rows):
        print(f"note: {note}")
    print(f"us per call, CUDA-graph replay, cold L2; spread = (max - min) / median of ours over {args.repeats} "
          "timings; * = eager calls (capture failed)")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: benchmark this checkout
    sys.exit(main())
