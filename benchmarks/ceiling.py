"""The data-movement ceiling: how close to the floor a kernel gets that only moves the states.

bench_mtp's floor divides a call's bytes by the copy bandwidth (half read, half written, contiguous).
A call reads each state from a pool slot and writes it once (update) or T times (buffer, scatter),
at slots the caller chose. This script times `move_states.cu`, which does exactly that state
traffic with no arithmetic (and skips q, k, v, a, b and the output: under 1% of the bytes at
K = V = 128), on the same arguments as gated_delta_rule_mtp and FlashInfer when it imports, with
bench_mtp's method (graph replay over disjoint slots, cold L2). Where the mover itself stays above
the floor, the gap is not the kernel's arithmetic: it is the memory system's on that traffic as the
mover issues it (NOTES v33: in update mode the same bytes moved 5% faster in 4 KB blocks or with bulk
stores). The last column is ours over the first mover listed that was timed.

    python benchmarks/ceiling.py --modes update buffer scatter --T 2 --B 128 256 --heads 4,8 16,32

--movers times variants of the mover beside the plain one (move_states.cu's macros: cache hints,
rows per block, lanes per row, bulk stores, no wait at the start), and `copy`: torch's copy of the same number of
state bytes from one contiguous region to another per call (update mode only), which is the floor's
copy cut into calls of this size. --slots sequential gives the calls the pool's slots in order instead of
the bench's random permutation (NOTES v55: in update and scatter mode the order is worth 1-5%), --slots
pages runs of consecutive slots that fill 2 MB, in a random order, --slots sorted the bench's random slots with
each call's in ascending order.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import struct
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mtp  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "move_states.cu"
KERNEL_NAME = "move_states"
THREADS = 128  # as in move_states.cu
MOVE_MODES = {"update": 0, "buffer": 1, "scatter": 2}
_PARAMS = struct.Struct("<QQQQqqq")  # move_states.cu's Params
# --movers: name -> move_states.cu's variant macros ("copy" is torch's copy, not the mover)
MOVER_VARIANTS: dict[str, dict[str, int]] = {
    "plain": {},
    "nowait": {"MOVE_WAIT": 0},
    "ld_cs": {"MOVE_LD": 1}, "ld_ef": {"MOVE_LD": 2}, "ld_nc": {"MOVE_LD": 3},
    "st_cs": {"MOVE_ST": 1}, "st_ef": {"MOVE_ST": 2}, "st_na": {"MOVE_ST": 3}, "st_bulk": {"MOVE_ST": 4},
    "ef": {"MOVE_LD": 2, "MOVE_ST": 2},
    "lpr4": {"MOVE_LPR": 4}, "lpr8": {"MOVE_LPR": 8}, "lpr16": {"MOVE_LPR": 16},
    "rows4": {"MOVE_ROWS": 4}, "rows8": {"MOVE_ROWS": 8}, "rows16": {"MOVE_ROWS": 16}, "rows64": {"MOVE_ROWS": 64},
    "hold1us": {"MOVE_HOLD_NS": 1000}, "hold3us": {"MOVE_HOLD_NS": 3000},
    "occ4": {"MOVE_PAD_KB": 46}, "occ8": {"MOVE_PAD_KB": 26},  # at most 4 / 8 blocks per SM
    # one line of each slot row of the block this many blocks later, asked of L2 early (its translations)
    "ahead512": {"MOVE_AHEAD": 512}, "ahead1k": {"MOVE_AHEAD": 1024}, "ahead2k": {"MOVE_AHEAD": 2048},
    "ahead4k": {"MOVE_AHEAD": 4096},
}
COPY = "copy"


def mover_variant(name: str) -> dict[str, int]:
    """The macros of a --movers name: one of MOVER_VARIANTS, or several joined by '+' (rows8+st_bulk)."""
    macros: dict[str, int] = {}
    for part in name.split("+"):
        if part not in MOVER_VARIANTS:
            raise ValueError(f"unknown mover variant {part!r}; known: {', '.join(MOVER_VARIANTS)}")
        macros.update(MOVER_VARIANTS[part])
    return macros


def _mover_name(name: str) -> str:
    if name != COPY:
        mover_variant(name)
    return name


def compile_mover(T: int, K: int, V: int, variant: dict[str, int] | None = None) -> bytes:
    """The mover's cubin for T tokens and K x V states (NVRTC; no GPU needed)."""
    from gdn_nvrtc import compiler

    options = (f"-DMOVE_TOKENS={T}", f"-DMOVE_K={K}", f"-DMOVE_V={V}",
               *(f"-D{name}={value}" for name, value in (variant or {}).items()))
    cubin, _ = compiler.compile_source(SOURCE.read_text(), SOURCE.name, options)
    return cubin


def mover_rows(V: int, variant: dict[str, int] | None = None) -> int:
    return (variant or {}).get("MOVE_ROWS", min(V, 32))  # ROWS in move_states.cu


def mover_grid(B: int, HV: int, V: int, variant: dict[str, int] | None = None) -> int:
    return B * HV * (V // mover_rows(V, variant))


class Mover:
    """move_states for one (T, K, V): bind(kwargs) gives a call that moves the states of those
    gated_delta_rule_mtp arguments on torch's current stream."""

    def __init__(self, T: int, K: int, V: int, variant: dict[str, int] | None = None) -> None:
        from gdn_nvrtc import driver

        self.T, self.K, self.V, self.variant = T, K, V, dict(variant or {})
        if V % mover_rows(V, self.variant) or (mover_rows(V, self.variant) * K) % (4 * THREADS):
            raise ValueError(f"{mover_rows(V, self.variant)} rows per block do not split {V} x {K} states")
        self.function = driver.load_kernel(compile_mover(T, K, V, self.variant), KERNEL_NAME)

    def bind(self, kwargs: dict[str, Any]) -> Callable[[], None]:
        from gdn_nvrtc import driver

        pool, read_slots = kwargs["initial_state"], kwargs["initial_state_indices"]
        buffer, scatter = kwargs.get("intermediate_states_buffer"), kwargs.get("ssm_state_indices")
        B, T, HV, V = kwargs["v"].shape
        if T != self.T:
            raise ValueError(f"this mover was compiled for T={self.T}, the call has T={T}")
        if pool.shape[2:] != (self.V, self.K):
            raise ValueError(f"this mover was compiled for {self.V} x {self.K} states, the pool's are "
                             f"{pool.shape[2]} x {pool.shape[3]}")
        if not pool.is_contiguous() or read_slots.dtype != torch.int32:
            raise ValueError("the mover needs a contiguous pool and int32 read slots")
        if scatter is not None and (not scatter.is_contiguous() or scatter.dtype != torch.int32):
            raise ValueError("the mover needs contiguous int32 scatter slots")
        if buffer is not None and (not buffer.is_contiguous() or buffer.shape[:2] != (B, T)):
            raise ValueError("the mover needs a contiguous [B, T, HV, V, K] buffer")
        mode = "scatter" if scatter is not None else "buffer" if buffer is not None else "update"
        values = (pool.data_ptr(), read_slots.data_ptr(), 0 if buffer is None else buffer.data_ptr(),
                  0 if scatter is None else scatter.data_ptr(), HV, pool.shape[0], MOVE_MODES[mode])
        launch = driver.Launch(self.function, mover_grid(B, HV, V, self.variant), THREADS, pool.device.index, _PARAMS)

        def call() -> None:
            launch(torch.cuda.current_stream(pool.device).cuda_stream, *values)

        return call


def bind_copy(kwargs: dict[str, Any], r: int, target: torch.Tensor) -> Callable[[], object]:
    """torch's copy of one call's state bytes (B slots of the pool) from the pool's contiguous slots
    r * B .. r * B + B - 1 into the same slots of `target`: the floor's copy, cut to this call's size."""
    B = kwargs["v"].shape[0]
    source, destination = kwargs["initial_state"][r * B : (r + 1) * B], target[r * B : (r + 1) * B]
    return partial(destination.copy_, source)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=bench_mtp.MODES, default=list(bench_mtp.MODES))
    parser.add_argument("--T", nargs="+", type=int, default=[2])
    parser.add_argument("--B", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--heads", nargs="+", type=bench_mtp._heads, default=[(4, 8), (16, 32)], metavar="H,HV")
    parser.add_argument("--no-peers", action="store_true", help="leave FlashInfer out")
    parser.add_argument("--movers", nargs="+", type=_mover_name, default=["plain"],
                        help=f"mover variants to time (see move_states.cu), joined by '+' to combine: "
                             f"{', '.join(MOVER_VARIANTS)}; {COPY}: torch's copy, update mode only")
    parser.add_argument("--slots", choices=bench_mtp.SLOT_ORDERS, default="random",
                        help="the calls' pool slots: a random permutation (the bench's), the pool's order, "
                             "2 MB runs of consecutive slots in a random order, or the random slots ascending "
                             "within each call (bench_mtp.call_slots)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-ms", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not bench_mtp.hopper_visible("ceiling"):
        return 2
    import gdn_nvrtc

    card = torch.cuda.get_device_name()
    bandwidth = bench_mtp.copy_bandwidth()
    # ours and FlashInfer as the bench runs them (FlashInfer not where its offsets overflow)
    implementations, status = bench_mtp.implementations(gdn_nvrtc.gated_delta_rule_mtp, not args.no_peers, ["fla"])
    peer_status = status["flashinfer"]
    movers: dict[tuple[int, str], Mover] = {}
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    rows = []
    print(f"{card}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; flashinfer: {peer_status}; {args.slots} slots")
    print("us per call (x floor), CUDA-graph replay, cold L2; move = move_states.cu on the same arguments")
    print(f"{'mode':8} {'T':>2} {'B':>4} {'H':>3} {'HV':>3} {'floor':>8} "
          + " ".join(f"{'move' if n == 'plain' else n:>16}" for n in args.movers) + " "
          + " ".join(f"{impl.name:>16}" for impl in implementations) + f" {'ours/move':>9}")
    for mode, T, (H, HV), B in itertools.product(args.modes, args.T, args.heads, args.B):
        for name in args.movers:
            if name != COPY and (T, name) not in movers:
                movers[T, name] = Mover(T, bench_mtp.K, bench_mtp.V, mover_variant(name))
        floor_us = bench_mtp.moved_bytes(mode, B, T, H, HV) / bandwidth * 1e6
        budget = bench_mtp.MEMORY_FRACTION * torch.cuda.mem_get_info()[0]
        R = bench_mtp.calls_per_replay(bench_mtp.footprint_bytes(mode, B, T, H, HV), 1e9, budget)
        calls = bench_mtp.build_calls(mode, B, T, H, HV, R, generator, slot_order=args.slots)
        times = {}
        for name in args.movers:
            key = "move" if name == "plain" else f"move_{name}"
            if name != COPY:
                binds = [movers[T, name].bind(kw) for kw in calls]
            elif mode == "update":
                target = torch.empty_like(calls[0]["initial_state"][: R * B])
                binds = [bind_copy(kw, r, target) for r, kw in enumerate(calls)]
            else:
                times[key] = bench_mtp.Timing(note="copy: update mode only")
                continue
            times[key] = bench_mtp.time_calls(binds, args.repeats, args.min_ms, peer=False)
            del binds
        for impl in implementations:
            refused = impl.refuses(mode, B, T, H, HV) if impl.refuses else ""
            times[impl.name] = bench_mtp.Timing(note=refused) if refused else bench_mtp.time_calls(
                [impl.bind(kw) for kw in calls], args.repeats, args.min_ms, peer=impl.name != "ours")
        del calls
        target = None
        torch.cuda.empty_cache()
        cells = [f"{t.us:8.2f} ({t.us / floor_us:.3f})" if t.us else f"{t.note[:16]:>16}" for t in times.values()]
        mover = next((t for t in times.values() if t.us), None)
        ratio = times["ours"].us / mover.us if mover else float("nan")
        print(f"{mode:8} {T:>2} {B:>4} {H:>3} {HV:>3} {floor_us:8.2f} " + " ".join(cells) + f" {ratio:9.3f}",
              flush=True)
        rows.append({"mode": mode, "T": T, "B": B, "H": H, "HV": HV, "floor_us": floor_us, "calls_per_replay": R,
                     "timings": {name: {"us": t.us, "samples_us": t.samples_us, "note": t.note}
                                 for name, t in times.items()}})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "card": card, "copy_bandwidth_gbs": bandwidth / 1e9,
            "flashinfer": peer_status, "gdn_nvrtc": gdn_nvrtc.__version__,
            "method": {"repeats": args.repeats, "min_ms": args.min_ms, "seed": args.seed, "slots": args.slots,
                       "timing": "CUDA-graph replay, cold L2; us per call"},
            "rows": rows,
        }, indent=1) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: this checkout
    sys.exit(main())
