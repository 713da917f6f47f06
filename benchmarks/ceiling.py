"""The data-movement ceiling: how close to the floor a kernel gets that only moves the states.

bench_mtp's floor divides a call's bytes by the copy bandwidth (half read, half written, contiguous).
A call reads each state from a pool slot and writes it once (update) or T times (buffer, scatter),
at slots the caller chose. This script times `move_states.cu`, which does exactly that state
traffic with no arithmetic (and skips q, k, v, a, b and the output: under 1% of the bytes at
K = V = 128), on the same arguments as gated_delta_rule_mtp and FlashInfer when it imports, with
bench_mtp's method (graph replay over disjoint slots, cold L2). Where the mover itself stays above
the floor, the gap is the memory system's on that traffic, not the kernel's arithmetic.

    python benchmarks/ceiling.py --modes update buffer scatter --T 2 --B 128 256 --heads 4,8 16,32
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import struct
import sys
from collections.abc import Callable, Sequence
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


def compile_mover(T: int, K: int, V: int) -> bytes:
    """The mover's cubin for T tokens and K x V states (NVRTC; no GPU needed)."""
    from gdn_nvrtc import compiler

    options = (f"-DMOVE_TOKENS={T}", f"-DMOVE_K={K}", f"-DMOVE_V={V}")
    cubin, _ = compiler.compile_source(SOURCE.read_text(), SOURCE.name, options)
    return cubin


def mover_grid(B: int, HV: int, V: int) -> int:
    rows = min(V, 32)  # ROWS in move_states.cu
    return B * HV * (V // rows)


class Mover:
    """move_states for one (T, K, V): bind(kwargs) gives a call that moves the states of those
    gated_delta_rule_mtp arguments on torch's current stream."""

    def __init__(self, T: int, K: int, V: int) -> None:
        from gdn_nvrtc import driver

        self.T, self.K, self.V = T, K, V
        self.function = driver.load_kernel(compile_mover(T, K, V), KERNEL_NAME)

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
        launch = driver.Launch(self.function, mover_grid(B, HV, V), THREADS, pool.device.index, _PARAMS)

        def call() -> None:
            launch(torch.cuda.current_stream(pool.device).cuda_stream, *values)

        return call


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=bench_mtp.MODES, default=list(bench_mtp.MODES))
    parser.add_argument("--T", nargs="+", type=int, default=[2])
    parser.add_argument("--B", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--heads", nargs="+", type=bench_mtp._heads, default=[(4, 8), (16, 32)], metavar="H,HV")
    parser.add_argument("--no-peers", action="store_true", help="leave FlashInfer out")
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
    movers: dict[int, Mover] = {}
    generator = torch.Generator(device="cuda").manual_seed(args.seed)
    rows = []
    print(f"{card}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; flashinfer: {peer_status}")
    print("us per call (x floor), CUDA-graph replay, cold L2; move = move_states.cu on the same arguments")
    print(f"{'mode':8} {'T':>2} {'B':>4} {'H':>3} {'HV':>3} {'floor':>8} {'move':>16} "
          + " ".join(f"{impl.name:>16}" for impl in implementations) + f" {'ours/move':>9}")
    for mode, T, (H, HV), B in itertools.product(args.modes, args.T, args.heads, args.B):
        if T not in movers:
            movers[T] = Mover(T, bench_mtp.K, bench_mtp.V)
        floor_us = bench_mtp.moved_bytes(mode, B, T, H, HV) / bandwidth * 1e6
        budget = bench_mtp.MEMORY_FRACTION * torch.cuda.mem_get_info()[0]
        R = bench_mtp.calls_per_replay(bench_mtp.footprint_bytes(mode, B, T, H, HV), 1e9, budget)
        calls = bench_mtp.build_calls(mode, B, T, H, HV, R, generator)
        times = {"move": bench_mtp.time_calls([movers[T].bind(kw) for kw in calls], args.repeats, args.min_ms,
                                              peer=False)}
        for impl in implementations:
            refused = impl.refuses(mode, B, T, H, HV) if impl.refuses else ""
            times[impl.name] = bench_mtp.Timing(note=refused) if refused else bench_mtp.time_calls(
                [impl.bind(kw) for kw in calls], args.repeats, args.min_ms, peer=impl.name != "ours")
        del calls
        torch.cuda.empty_cache()
        cells = [f"{t.us:8.2f} ({t.us / floor_us:.3f})" if t.us else f"{t.note[:16]:>16}" for t in times.values()]
        ratio = times["ours"].us / times["move"].us
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
            "method": {"repeats": args.repeats, "min_ms": args.min_ms, "seed": args.seed,
                       "timing": "CUDA-graph replay, cold L2; us per call"},
            "rows": rows,
        }, indent=1) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: this checkout
    sys.exit(main())
