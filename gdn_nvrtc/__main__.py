"""Command line: python -m gdn_nvrtc {info,demo,bench}.

  info   what this installation contains: prebuilt cubins, their resources, the compile cache
  demo   one Qwen3-Next-shaped verify step on the GPU, checked against the float64 reference
  bench  the roofline benchmark (benchmarks/bench_mtp.py; needs a source checkout)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .cubins import PREBUILT_DIR, cache_dir, prebuilt_manifest

DEMO_SHAPE = {"B": 32, "T": 4, "H": 16, "HV": 32}  # Qwen3-Next at TP=1, four draft tokens


def info() -> None:
    manifest = prebuilt_manifest()
    print(f"gdn_nvrtc {__version__}")
    kernels = manifest["kernels"]
    if not kernels:
        print(f"no prebuilt cubins in {PREBUILT_DIR}: run `python build_cubins.py` (every shape would use NVRTC)")
    else:
        print(f"{len(kernels)} prebuilt sm_90a cubins in {PREBUILT_DIR}")
        print(f"  built with NVRTC {manifest['nvrtc_version']}: {' '.join(manifest['nvrtc_options'])}")
        for name, entry in kernels.items():
            print(
                f"  {name:34s} {entry['registers']:3d} registers, {entry['spill_bytes']} B spilled, "
                f"{entry['shared_bytes']} B shared memory"
                + "".join(f", {option}" for option in entry.get("extra_options", ()))
            )
    print(f"compile cache for other shapes: {cache_dir()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            usable = "usable" if (major, minor) == (9, 0) else "not usable: needs compute capability 9.0"
            print(f"cuda:{index}: {torch.cuda.get_device_name(index)} ({major}.{minor}), {usable}")
    else:
        print("no CUDA GPU visible to torch")


def demo() -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("demo: no Hopper GPU (compute capability 9.0) here, so nothing to run. This installation has:\n")
        info()
        return 0
    from . import gated_delta_rule_mtp
    from .reference import OUTPUT_REL_TOL, STATE_REL_TOL, gated_delta_rule_mtp_reference, make_inputs

    shape = DEMO_SHAPE
    inputs = make_inputs(shape["B"], shape["T"], shape["H"], shape["HV"], pool_size=4 * shape["B"])
    expected_out, expected_pool, _ = gated_delta_rule_mtp_reference(**inputs, disable_state_update=False)
    start = time.perf_counter()
    out, pool = gated_delta_rule_mtp(**inputs, disable_state_update=False)
    torch.cuda.synchronize()
    first_call_ms = (time.perf_counter() - start) * 1e3
    read = inputs["initial_state_indices"].long()
    out_error = ((out.double() - expected_out).norm() / expected_out.norm()).item()
    state_error = ((pool[read].double() - expected_pool[read]).norm() / expected_pool[read].norm()).item()

    calls = 200
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    events[0].record()
    for _ in range(calls):
        gated_delta_rule_mtp(**inputs, disable_state_update=True)
    events[1].record()
    torch.cuda.synchronize()
    per_call_us = events[0].elapsed_time(events[1]) * 1e3 / calls

    print(f"gdn_nvrtc {__version__} on {torch.cuda.get_device_name()}")
    print(f"verify step B={shape['B']} T={shape['T']} H={shape['H']} HV={shape['HV']} K=V=128, bf16, fp32 state")
    print(f"  output error vs float64 reference: {out_error:.2e} (limit {OUTPUT_REL_TOL:g})")
    print(f"  state error vs float64 reference:  {state_error:.2e} (limit {STATE_REL_TOL:g})")
    print(f"  first call (loads the cubin): {first_call_ms:.1f} ms")
    print(f"  {per_call_us:.1f} us per call ({calls} eager calls, warm L2; see `bench` for HBM-bound numbers)")
    nvrtc_loaded = sys.modules.get("cuda.bindings.nvrtc") is not None
    print(f"  NVRTC loaded in this process: {'yes' if nvrtc_loaded else 'no'}")
    ok = out_error < OUTPUT_REL_TOL and state_error < STATE_REL_TOL
    print("  result: " + ("OK" if ok else "MISMATCH"))
    return 0 if ok else 1


def bench(argv: list[str]) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_mtp.py"
    if not script.is_file():
        print(f"bench needs a source checkout: {script} not found", file=sys.stderr)
        return 2
    sys.path.insert(0, str(script.parent))
    import bench_mtp

    return bench_mtp.main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gdn_nvrtc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["info", "demo", "bench"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for bench")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "demo":
        return demo()
    return bench(args.args)


if __name__ == "__main__":
    sys.exit(main())
