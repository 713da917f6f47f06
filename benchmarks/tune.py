"""Compare block tilings of the kernel on the GPU (a tuning aid, not part of the package).

    python benchmarks/tune.py [--variants NAME ...] [--points MODE:T:B ...] [--heads H,HV ...]
                              [--template-dir DIR ...] [--rounds N]

Each variant sets the tiling of every kernel (gdn_nvrtc.specs.tiling_for; "by_t" keeps the shipped
choice of gdn_nvrtc.specs.choose_spec) or a launch option ("capN": the shipped choice launched with
unused dynamic shared memory, so that at most N of its blocks fit on an SM), compiles with NVRTC into
a private cache (the prebuilt cubins are bypassed) and is timed with bench_mtp's method (graph
replay, cold L2). --template-dir compiles other copies of the template (e.g. an earlier version;
"." is the repository's templates/): with several, every round times
each variant of each copy in turn, in one process and against one copy-bandwidth measurement, for
an A/B comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_mtp  # noqa: E402

from gdn_nvrtc import compiler, cubins, driver, gated_delta_rule_mtp, mtp, specs  # noqa: E402


def variant(threads=128, elems_per_lane=32, rows_per_thread=1, min_blocks=0, short_chain=0) -> dict:
    return {"THREADS": threads, "ELEMS_PER_LANE": elems_per_lane, "ROWS_PER_THREAD": rows_per_thread,
            "MIN_BLOCKS": min_blocks, "SHORT_CHAIN": short_chain}


# per-token states on the mma family on every grid of at most 2 pairs per SM (the twin-form variants below)
_STATES_UP_TO_2 = {T: ((0, 2.0),) for T in range(3, 9)}


def _bulk_min(pairs_per_sm: float, tokens=None) -> dict:
    """specs.BULK_MIN_PAIRS_PER_SM with `pairs_per_sm` at T = 3-8 and the shipped values at T <= 2, or
    with `pairs_per_sm` at the given T only (no bulk form elsewhere)."""
    if tokens is not None:
        return dict.fromkeys(tokens, pairs_per_sm)
    return {T: low if T < specs.MMA_FROM_TOKENS else pairs_per_sm for T, low in specs.BULK_MIN_PAIRS_PER_SM.items()}


# the modules whose constants a variant may set as "module.NAME"
CONSTANT_MODULES = {"specs": specs, "compiler": compiler}

VARIANTS = {
    "by_t": None,
    "by_t_mb0": {"MIN_BLOCKS": 0},  # overrides of the shipped choice by T: the occupancy hint
    "by_t_mb5": {"MIN_BLOCKS": 5},
    "by_t_mb6": {"MIN_BLOCKS": 6},
    "by_t_mb10": {"MIN_BLOCKS": 10},
    "by_t_mb12": {"MIN_BLOCKS": 12},
    "by_t_nopdl": {"PDL": False},  # launched without programmatic dependent launch
    "by_t_nodelay": {"DELAY": False},  # without specs.start_delay
    "mma4": {"THREADS": 128, "MMA": 1, "MIN_BLOCKS": 4},  # every call on the mma tiling
    "mma4_bulk": {"THREADS": 128, "MMA": 1, "MIN_BLOCKS": 4, "BULK_FINAL": 1},  # ... final state by bulk copies
    "twin_never": {"specs.TWIN_PAIRS_PER_SM": (0, 0), "specs.TWIN4_PAIRS_PER_SM": (0, 0),  # the mma tiling there
                   "specs.TWIN4_LONG_PAIRS_PER_SM": (0, 0)},
    # every call of the mma kernel (not the bulk one) on the twin tiling: two tiles per block (v42), at 3
    # blocks per SM, or at 4 (twin4)
    "mma_twin": {"MMA_ONLY": True, "TWO_TILES": 1, "MIN_BLOCKS": 3},
    "mma_twin4": {"MMA_ONLY": True, "TWO_TILES": 1, "MIN_BLOCKS": 4},
    "mma2w": {"THREADS": 64, "MMA": 1, "MIN_BLOCKS": 0},  # the mma tiling with 2 warps (32 rows) per block
    "mma2w8": {"THREADS": 64, "MMA": 1, "MIN_BLOCKS": 8},  # ... at 128 registers (8 blocks per SM)
    "mma1w": {"THREADS": 32, "MMA": 1, "MIN_BLOCKS": 0},  # ... 1 warp (16 rows) per block
    # the shipped choice with at most N blocks per SM: unused dynamic shared memory at launch (never more
    # blocks than the shipped launch allows: specs.blocks_per_sm_cap)
    "cap2": {"CAP": 2}, "cap3": {"CAP": 3}, "cap4": {"CAP": 4}, "cap5": {"CAP": 5}, "cap6": {"CAP": 6},
    "cap8": {"CAP": 8},
    # the store tiling's per-token-state calls never capped (before v53), capped from T = 6 only (v53), or
    # capped at 4 blocks per SM from T = 4
    "store_cap_never": {"specs.STORE_CAP_MIN_PAIRS_PER_SM": float("inf")},
    "store_cap_t6": {"specs.STORE_CAP_BLOCKS": {6: 4}},
    "store_cap4_t4": {"specs.STORE_CAP_BLOCKS": {4: 4}},
    # "specs.NAME": value sets a constant of gdn_nvrtc.specs for the variant (the start-delay policy)
    "slim_never": {"specs.SLIM_FROM_TOKENS": 99},  # specs.choose_spec without the slim tiling
    "pf_never": {"specs.PREFETCH_STATE_MAX_WAVES": 0},  # specs.prefetch_state: no grid fetches its state early
    "pf_wave06": {"specs.PREFETCH_STATE_MAX_WAVES": 0.6},  # grids of up to 0.6 waves
    "pf_wave075": {"specs.PREFETCH_STATE_MAX_WAVES": 0.75},
    "pf_wave1": {"specs.PREFETCH_STATE_MAX_WAVES": 1},  # grids of up to one wave
    "pf_short05": {"specs.PREFETCH_SHORT_CHAIN_UPDATE_MAX_WAVES": 0.5},  # the short-chain tilings' limit
    "slim_above35": {"specs.SLIM_NOT_NARROW_WAVES": (0, 3.5)},  # where the slim tiling went before v17
    "pf_always": {"specs.PREFETCH_STATE_MAX_WAVES": 1e9},
    "by_t_delay3us": {"specs.STAGGER_NS": 3000},  # specs.start_delay with another delay
    "by_t_delay9us": {"specs.STAGGER_NS": 9000},
    "delay_all_2us": {"specs.STAGGER_MIN_WAVES": 0, "specs.STAGGER_NS": 2000},
    "delay_all_3us": {"specs.STAGGER_MIN_WAVES": 0, "specs.STAGGER_NS": 3000},
    "delay_all_4us": {"specs.STAGGER_MIN_WAVES": 0, "specs.STAGGER_NS": 4000},
    "delay_all_6us": {"specs.STAGGER_MIN_WAVES": 0},
    "delay_min1": {"specs.STAGGER_MIN_WAVES": 1},
    "delay_min2": {"specs.STAGGER_MIN_WAVES": 2},
    "delay_min1_5us": {"specs.STAGGER_MIN_WAVES": 1, "specs.STAGGER_NS": 5000},
    "delay_all_t2_3us": {"specs.STAGGER_MIN_WAVES": 0, "specs.STAGGER_FROM_TOKENS": 2, "specs.STAGGER_NS": 3000},
    "delay_t1": {"specs.STAGGER_FROM_TOKENS": 1},  # the shipped delay (6 us, grids of more than a wave) from T = 1
    "delay_t1_3us": {"specs.STAGGER_FROM_TOKENS": 1, "specs.STAGGER_NS": 3000},
    "delay_t1_2us": {"specs.STAGGER_FROM_TOKENS": 1, "specs.STAGGER_NS": 2000},
    # the delay on the mma tiling, single waves included (v39: one wave loads, computes and stores in turn)
    "mma_delay_2us": {"specs.STAGGER_ON_MMA": True, "specs.STAGGER_MIN_WAVES": 0, "specs.STAGGER_NS": 2000},
    "mma_delay_3us": {"specs.STAGGER_ON_MMA": True, "specs.STAGGER_MIN_WAVES": 0, "specs.STAGGER_NS": 3000},
    "mma_delay_4us": {"specs.STAGGER_ON_MMA": True, "specs.STAGGER_MIN_WAVES": 0, "specs.STAGGER_NS": 4000},
    # "compiler.NAME": value sets a constant of gdn_nvrtc.compiler (the NVRTC options) for the variant
    "ptxas_o1": {"compiler.NVRTC_OPTIONS": (*compiler.NVRTC_OPTIONS, "--ptxas-options=-O1")},  # every kernel
    "twin4_no_t7": {"specs.TWIN4_TOKENS": (3, 4, 5, 6, 8)},  # the mma tiling at T = 7 there (before v45)
    # the scalar kernel's per-token states through shared memory and bulk copies (KernelSpec.states_bulk)
    "states_bulk": {"STATES_BULK": 1},
    # per-token states at T = 2 on the narrow tiling on every grid (v49: the staged tiling never), or on its
    # staged form from N pairs per SM (v50: from 15, then 9)
    "staged_never": {"specs.STAGED_MIN_PAIRS_PER_SM": 1e9},
    "staged_min_8": {"specs.STAGED_MIN_PAIRS_PER_SM": 8},
    "staged_min_15": {"specs.STAGED_MIN_PAIRS_PER_SM": 15},
    "cs_states": {"STORE_CS": 1},  # every tiling stores the per-token states with the streaming hint (st.global.cs)
    "no_cs": {"STORE_CS": 0},  # ... without it anywhere (every tiling before v46)
    "mma_states_never": {"specs.MMA_STATES_BANDS": {}},  # per-token states never on the mma tiling
    # update calls never on the mma tiling (nor its bulk and twin forms)
    "mma_update_never": {"specs.MMA_ALWAYS_FROM_TOKENS": 99, "specs.MMA_MID_MIN_PAIRS_PER_SM": 1e9,
                         "specs.MMA_FEW_MIN_PAIRS_PER_SM": {3: 1e9, 4: 1e9}},
    # per-token states on the mma tiling where v46 took it: more than 1 and at most 3 pairs per SM, at T = 7-8 from 3/4
    "mma_states_v46": {"specs.MMA_STATES_BANDS": {T: ((1 if T < 7 else 0.75, 3),) for T in range(3, 9)}},
    # every mma-kernel call on 0-2 pairs per SM (per-token states too) on a twin form, so that a grid
    # leaves room on every SM for the next call's blocks (programmatic launch); "mma_states_all": the
    # per-token states on the plain mma tiling there, for reference
    "mma_states_all": {"specs.MMA_STATES_BANDS": _STATES_UP_TO_2},
    "twin4_all": {"specs.MMA_STATES_BANDS": _STATES_UP_TO_2, "MMA_ONLY": True, "TWO_TILES": 1, "MIN_BLOCKS": 4},
    "twin3_all": {"specs.MMA_STATES_BANDS": _STATES_UP_TO_2, "MMA_ONLY": True, "TWO_TILES": 1, "MIN_BLOCKS": 3,
                  "MAX_BLOCKS": 3},
    # update calls at T = 3-4 as before v48: the mma tiling from 1/4 to 8 pairs per SM, the wide one above
    "mma_few_v47": {"specs.MMA_FEW_MIN_PAIRS_PER_SM": {3: 0.25, 4: 0.25}, "specs.MMA_FEW_MAX_PAIRS_PER_SM": 8,
                    "specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(12, range(5, 9))},
    # update calls at T <= 4 never on the bulk form (the plain mma tiling at T = 3-4, the wide one at T <= 2)
    "bulk_few_never": {"specs.BULK_MIN_PAIRS_PER_SM": {
        T: low for T, low in specs.BULK_MIN_PAIRS_PER_SM.items() if T >= 5}},
    # update calls at T = 3-8 on the bulk form from N pairs per SM (T <= 2 as shipped); "bulk_v48": the
    # rule of v48 (from 12 at T = 3-8, never at T <= 2)
    "bulk_min_1": {"specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(1)},
    "bulk_min_4": {"specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(4)},
    "bulk_min_8": {"specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(8)},
    "bulk_v48": {"specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(12, range(3, 9))},
    "bulk_min_8_all": {"specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(8, range(1, 9))},  # ... from 8 at every T
    # update calls at T = 3-8 never on the bulk form (the mma tiling there), or on the twin forms instead (v55)
    "bulk_never_big": {"specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(float("inf"))},
    "twin_big": {"specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(float("inf")), "MMA_ONLY": True, "TWO_TILES": 1,
                 "MIN_BLOCKS": 3},
    "twin4_big": {"specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(float("inf")), "MMA_ONLY": True, "TWO_TILES": 1,
                  "MIN_BLOCKS": 4},
    # the twin4 tiling's grids (3.3-4 pairs per SM) on the bulk form instead
    "twin4_as_bulk": {"specs.TWIN4_PAIRS_PER_SM": (0, 0), "specs.TWIN4_LONG_PAIRS_PER_SM": (0, 0),
                      "specs.BULK_MIN_PAIRS_PER_SM": _bulk_min(3.3)},
    # per-token states at T = 3-4 never on the narrow tiling (the store one), or on it up to 16 pairs per SM
    "narrow_states_never": {"specs.NARROW_STATES_MAX_PAIRS_PER_SM": 0},
    "narrow_states_16": {"specs.NARROW_STATES_MAX_PAIRS_PER_SM": 16},
    # the shipped choice with one row per thread (the store tiling: 8 rows, 4 KB of state per block), alone
    # and with at most N blocks per SM (fewer state bytes in flight per SM)
    "rpt1": {"ROWS_PER_THREAD": 1},
    "rpt1_cap4": {"ROWS_PER_THREAD": 1, "CAP": 4},
    "rpt1_cap6": {"ROWS_PER_THREAD": 1, "CAP": 6},
    "base": variant(),
    "rpt2": variant(rows_per_thread=2),
    "epl16": variant(elems_per_lane=16),
    "epl16_rpt2": variant(elems_per_lane=16, rows_per_thread=2),
    "t256": variant(threads=256),
    "epl8_rpt4": variant(elems_per_lane=8, rows_per_thread=4),
    "epl4_rpt8": variant(elems_per_lane=4, rows_per_thread=8),
    "rpt2_t64": variant(threads=64, rows_per_thread=2),
    "epl16_rpt4": variant(elems_per_lane=16, rows_per_thread=4),
    "epl16_rpt4_t64": variant(threads=64, elems_per_lane=16, rows_per_thread=4),
    "epl8_rpt4_t64": variant(threads=64, elems_per_lane=8, rows_per_thread=4),
    "epl16_rpt1": variant(elems_per_lane=16, rows_per_thread=1),
    "epl8_rpt2": variant(elems_per_lane=8, rows_per_thread=2),
    "epl4_rpt4": variant(elems_per_lane=4, rows_per_thread=4),
    "epl16_rpt1_t64": variant(threads=64, elems_per_lane=16, rows_per_thread=1),
    "epl8_rpt1": variant(elems_per_lane=8, rows_per_thread=1),
    "epl4_rpt1": variant(elems_per_lane=4, rows_per_thread=1),  # 4 rows per block (B = 1 at few heads)
    "narrow_long": variant(elems_per_lane=16),  # the narrow, slim and spread tilings without the short chain
    "slim_long": variant(elems_per_lane=8),
    "spread_long": variant(elems_per_lane=4),
    "narrow_short": variant(elems_per_lane=16, short_chain=1),  # ... with it: the short tiling (v37)
    "narrow_mb10": variant(elems_per_lane=16, min_blocks=10),  # the narrow tiling at 48 registers (10 blocks per SM)
    "narrow_mb12": variant(elems_per_lane=16, min_blocks=12),  # ... at 40 registers (12 blocks per SM)
    "slim_short": variant(elems_per_lane=8, short_chain=1),
    "spread_short": variant(elems_per_lane=4, short_chain=1),
    "epl4_rpt2": variant(elems_per_lane=4, rows_per_thread=2),  # 8 rows per block, 32 lanes per row
    "epl32_rpt1": variant(elems_per_lane=32, rows_per_thread=1),
    "epl32_rpt1_t64": variant(threads=64, elems_per_lane=32, rows_per_thread=1),
    "epl32_rpt1_t64_mb16": variant(threads=64, elems_per_lane=32, rows_per_thread=1, min_blocks=16),  # 64 registers
    # One tile per head at K = V = 128 (the q/k normalisation and gates once per head, not twice).
    "t256_epl16_rpt4": variant(threads=256, elems_per_lane=16, rows_per_thread=4),
    "t256_rpt2": variant(threads=256, rows_per_thread=2),
}
POINTS = ["update:2:256", "update:8:256", "update:2:32", "update:8:8", "buffer:4:128"]


_shipped_launch_config = driver._launch_config
_shipped_launch = driver.launch


def cap_blocks(cap: int) -> None:
    """Launch every kernel with the unused dynamic shared memory that leaves at most `cap` blocks of it per
    SM (driver.shared_bytes_for_at_most, as the twin tiling's MAX_BLOCKS does; 0: as shipped). Patches
    driver's launch paths."""
    driver._configs.clear()
    if not cap:
        driver._launch_config, driver.launch = _shipped_launch_config, _shipped_launch
        return
    current = {}

    def launch_config(grid: int, block: int, stream: int, shared_bytes: int = 0):
        config = _shipped_launch_config(grid, block, stream, shared_bytes)
        padding = driver.shared_bytes_for_at_most(current["function"], block, current["device"], cap)
        config.sharedMemBytes = max(shared_bytes, padding)
        return config

    def launch(function, grid, block, stream, device_index, params, shared_bytes=0) -> None:
        current["function"], current["device"] = function, device_index
        driver._configs.clear()  # the padding depends on the kernel, not only on (grid, block, stream)
        _shipped_launch(function, grid, block, stream, device_index, params, shared_bytes)

    driver._launch_config, driver.launch = launch_config, launch


def time_variant(name, points, H, HV, bandwidth, generator, shipped_tiling, shipped_constants, cache_dir) -> str:
    """Set variant `name` up (tiling, constants, launch options), compile into cache_dir (the variant's
    own), time every point; one line of results."""
    fixed = dict(VARIANTS[name] or {}) or None
    modules = CONSTANT_MODULES
    for (module, constant), value in shipped_constants.items():
        setattr(modules[module], constant, value)
    for key in [key for key in (fixed or {}) if key.split(".")[0] in modules]:
        module, constant = key.split(".", 1)
        shipped_constants.setdefault((module, constant), getattr(modules[module], constant))
        setattr(modules[module], constant, fixed.pop(key))
    driver.programmatic_launch = fixed.pop("PDL", True) if fixed else True
    cap_blocks(fixed.pop("CAP", 0) if fixed else 0)
    mtp.start_delays = fixed.pop("DELAY", True) if fixed else True
    fixed = fixed or None
    if fixed is None:
        specs.tiling_for = shipped_tiling
    elif "THREADS" not in fixed:  # an override of the shipped choice (MMA_ONLY: of the mma tiling's only)
        mma_only = fixed.pop("MMA_ONLY", False)

        def patched(num_tokens, name="wide", change=fixed, mma_only=mma_only):
            tiling = shipped_tiling(num_tokens, name)
            if mma_only and not (tiling.get("MMA") and not tiling.get("BULK_FINAL")):
                return tiling
            return {**tiling, **change}

        specs.tiling_for = patched
    else:
        specs.tiling_for = lambda num_tokens, name="wide", tiling=fixed: tiling
    # The compile cache is keyed by the source files, which a patched tiling leaves alone.
    os.environ["GDN_NVRTC_CACHE_DIR"] = cache_dir
    driver._kernels.clear()
    mtp.forget_plans()  # a plan holds its kernel: the last one must not outlive the variant
    cells = []
    registers = set()
    for point in points:
        mode, T, B = point.split(":")
        T, B = int(T), int(B)
        spec = mtp.choose_spec(128, 128, T, "bf16", "fp32", writes_states=mode != "update", batch_heads=B * HV,
                               sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
        registers.add(compiler.compile_spec(spec).registers)  # of the kernel the point runs
        floor_us = bench_mtp.moved_bytes(mode, B, T, H, HV) / bandwidth * 1e6
        footprint = bench_mtp.footprint_bytes(mode, B, T, H, HV)
        R = bench_mtp.calls_per_replay(footprint, 1e9, 0.6 * torch.cuda.mem_get_info()[0])
        arguments = bench_mtp.build_calls(mode, B, T, H, HV, R, generator)
        calls = [lambda kw=kw: gated_delta_rule_mtp(**kw) for kw in arguments]
        timing = bench_mtp.time_calls(calls, repeats=2, min_ms=50.0, peer=False)
        cells.append(f"{point}={timing.us:.{2 if timing.us < 10 else 1}f}us({timing.us / floor_us:.3f})")
        del calls, arguments
        torch.cuda.empty_cache()
    mtp.forget_plans()
    driver._kernels.clear()
    return f"regs={sorted(registers)} " + " ".join(cells)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--points", nargs="+", default=POINTS)
    parser.add_argument("--template-dir", type=Path, nargs="+", default=[None],
                        help="compile these directories' gdn_mtp.cu.j2 instead, in turn (\".\": templates/)")
    parser.add_argument("--heads", nargs="+", type=bench_mtp._heads, default=[(16, 32)], metavar="H,HV",
                        help="head layouts, each timed at every point (default 16,32)")
    parser.add_argument("--rounds", type=int, default=1, help="time every (template, variant) this many times")
    args = parser.parse_args()
    shipped_template_dir = compiler.template_dir
    cubins.prebuilt_manifest.cache_clear()
    cubins.prebuilt_manifest = lambda: {"kernels": {}}  # compile every variant
    bandwidth = bench_mtp.copy_bandwidth()
    generator = torch.Generator(device="cuda").manual_seed(0)
    layouts = ", ".join(f"H={H} HV={HV}" for H, HV in args.heads)
    lines = [f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}; {layouts}"]
    shipped_tiling = specs.tiling_for
    shipped_constants = {}
    cache_dirs = {}  # one compile cache per (template, variant), kept across rounds
    for round_index in range(args.rounds):
        for template_index, template in enumerate(args.template_dir):
            if template is None or str(template) == ".":
                compiler.template_dir = shipped_template_dir
            else:
                compiler.template_dir = lambda template=template: template
            compiler._template.cache_clear()
            for name in args.variants:
                label = name if template is None else f"{template}:{name}"
                if args.rounds > 1:
                    label = f"r{round_index + 1} {label}"
                key = (template_index, name)
                if key not in cache_dirs:
                    cache_dirs[key] = tempfile.mkdtemp(prefix=f"gdn_tune_{template_index}_{name}_")
                for H, HV in args.heads:  # the variant's compile cache serves every layout
                    heads = f" H={H} HV={HV}" if len(args.heads) > 1 else ""
                    lines.append((label + heads).ljust(12) + " " + time_variant(
                        name, args.points, H, HV, bandwidth, generator, shipped_tiling, shipped_constants,
                        cache_dirs[key]))
                    print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
