"""gated_delta_rule_mtp on the GPU against the float64 reference, in every mode."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import check_call, rel_error, same_bits

from gdn_nvrtc import compiler, cubins, driver, gated_delta_rule_mtp, mtp, specs
from gdn_nvrtc.reference import OUTPUT_REL_TOL, STATE_REL_TOL, gated_delta_rule_mtp_reference, make_inputs
from gdn_nvrtc.specs import (
    BULK_MIN_PAIRS_PER_SM,
    FLAGS,
    MMA_MAX_HEAD_DIM_K,
    PREBUILT_HEAD_DIM,
    PREBUILT_SPECS,
    PREBUILT_TOKENS,
    STAGED_MIN_PAIRS_PER_SM,
    STORE_CAP_FROM_TOKENS,
    STORE_CAP_MIN_PAIRS_PER_SM,
    TILING_NAMES,
    KernelSpec,
    prefetch_state,
    store_cap_blocks,
    tiling_for,
)

pytestmark = pytest.mark.gpu

HEADS = [(16, 32), (16, 64), (4, 8), (2, 8), (8, 8)]
MODES = ["update", "no_update", "buffer", "buffer_longer", "scatter"]
FALLBACK_T = 11
FALLBACK_KV = [(64, 256), (256, 64)]


def nan_like(shape, dtype, device="cuda"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def mode_kwargs(mode: str, inputs: dict, generator: torch.Generator) -> dict:
    B, T = inputs["q"].shape[:2]
    _, HV, V, K = inputs["initial_state"].shape
    pool_size = inputs["initial_state"].shape[0]
    if mode == "update":
        return {"disable_state_update": False}
    if mode == "no_update":
        return {"disable_state_update": True}
    if mode in ("buffer", "buffer_longer"):
        steps = T if mode == "buffer" else T + 2
        buffer = nan_like((B + 1, steps, HV, V, K), torch.float32)
        return {"disable_state_update": True, "intermediate_states_buffer": buffer}
    if mode == "scatter":
        # Every (row, token) gets its own slot, disjoint from the read slots; some are skipped (-1).
        read = set(inputs["initial_state_indices"].tolist())
        free = [s for s in torch.randperm(pool_size, generator=generator).tolist() if s not in read][: B * T]
        scatter = torch.tensor(free + [-1] * (B * T - len(free)), dtype=torch.int32).view(B, T)
        if B * T > 1:
            scatter[0, -1] = -1
        return {"disable_state_update": False, "ssm_state_indices": scatter.cuda()}
    if mode == "scatter_repeated":
        # Slots repeated within a row, where the later token's state must win: row 0 sends every token to
        # one slot, row 1 alternates two, row 2 writes into its own read slot (read before written), row 3
        # repeats one slot around skipped tokens, row 4 is padding whose slots stay untouched.
        assert B >= 5 and pool_size >= 2 * B + 8, "mode scatter_repeated needs B >= 5 and room for its slots"
        inputs["initial_state_indices"][4] = -1
        read = inputs["initial_state_indices"].tolist()
        free = [s for s in torch.randperm(pool_size, generator=generator).tolist() if s not in read]
        scatter = torch.full((B, T), -1, dtype=torch.int32)
        for t in range(T):
            scatter[0, t] = free[0]
            scatter[1, t] = free[1 + t % 2]
            scatter[2, t] = read[2]
            scatter[3, t] = free[3] if t % 3 != 1 else -1
            scatter[4, t] = free[4 + t % 2]
        return {"disable_state_update": False, "ssm_state_indices": scatter.cuda()}
    raise AssertionError(mode)


def fuzz_cases(count: int = 48, seed: int = 1234):
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        B = rng.choice([0, 1, 3, 7, 33, 40])
        T = rng.choice(PREBUILT_TOKENS)
        K = V = PREBUILT_HEAD_DIM
        if i % 12 == 5:
            T = FALLBACK_T
        if i % 12 == 9:
            K, V = FALLBACK_KV[(i // 12) % 2]
            T = 3
        H, HV = rng.choice(HEADS)
        dtype = rng.choice([torch.bfloat16, torch.float16])
        gate_dtype = rng.choice([dtype, torch.float32])
        dt_bias_dtype = rng.choice([torch.float32, torch.bfloat16, dtype])
        mode = MODES[i % len(MODES)]
        cases.append((B, T, H, HV, K, V, dtype, gate_dtype, dt_bias_dtype, mode))
    return cases


@pytest.mark.parametrize("B,T,H,HV,K,V,dtype,gate_dtype,dt_bias_dtype,mode", fuzz_cases())
def test_fuzz(B, T, H, HV, K, V, dtype, gate_dtype, dt_bias_dtype, mode):
    generator = torch.Generator().manual_seed(hash((B, T, H, HV, K, V, str(dtype), mode)) % 2**31)
    inputs = make_inputs(
        B, T, H, HV, K, V, dtype=dtype, gate_dtype=gate_dtype, dt_bias_dtype=dt_bias_dtype,
        pool_size=B * (T + 2) + 2, generator=generator,
    )
    if B > 2:  # a padded row in the middle
        inputs["initial_state_indices"][B // 2] = -1
    kwargs = mode_kwargs(mode, inputs, generator)
    kwargs["output"] = nan_like((B, T, HV, V), dtype)
    check_call(inputs, **kwargs)


@pytest.mark.parametrize("T", PREBUILT_TOKENS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_prebuilt_spec_allocated_output(T, dtype):
    inputs = make_inputs(5, T, 4, 8, dtype=dtype, pool_size=12)
    inputs["initial_state_indices"][1] = -3
    check_call(inputs, disable_state_update=False)


def force_tiling(monkeypatch, tiling: str) -> None:
    """Make every call use the given tiling, whatever choose_spec would pick (and forget cached plans)."""
    def forced(K, V, T, dtype, state_dtype, **_):
        return KernelSpec(K, V, T, dtype, state_dtype, tiling)

    monkeypatch.setattr(mtp, "choose_spec", forced)
    # Fresh caches for the test, and the previous ones back afterwards: no plan of a forced tiling
    # outlives it.
    monkeypatch.setattr(mtp, "_plans", {})
    monkeypatch.setattr(mtp, "_last_plan", mtp._NO_LAST_PLAN)
    monkeypatch.setattr(mtp, "_guards", {})


@pytest.mark.parametrize("tiling", TILING_NAMES)
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("mode", ["update", "no_update", "buffer", "scatter"])
def test_every_tiling_in_every_mode(monkeypatch, tiling, T, mode):
    force_tiling(monkeypatch, tiling)
    generator = torch.Generator().manual_seed(hash((tiling, T, mode)) % 2**31)
    inputs = make_inputs(5, T, 16, 32, pool_size=5 * (T + 2) + 2, generator=generator)
    inputs["initial_state_indices"][2] = -1
    check_call(inputs, **mode_kwargs(mode, inputs, generator))


@pytest.mark.parametrize(
    ("tiling", "T"),
    [(tiling, T) for tiling in TILING_NAMES for T in (3, 8)]
    + [(tiling, 2) for tiling in TILING_NAMES if KernelSpec(128, 128, 2, "bf16", "fp32", tiling) in PREBUILT_SPECS],
)
def test_scatter_slots_repeated_within_a_row(monkeypatch, tiling, T):
    """Per-token scatter slots repeated within a row (the state after the later token must be what the
    slot holds, as token by token) and a row scattering into its own read slot, on every tiling."""
    force_tiling(monkeypatch, tiling)
    generator = torch.Generator().manual_seed(hash((tiling, T, "repeated slots")) % 2**31)
    inputs = make_inputs(6, T, 4, 8, pool_size=24, generator=generator)
    check_call(inputs, **mode_kwargs("scatter_repeated", inputs, generator))


@pytest.mark.parametrize(("tiling", "T"), [("store", 3), ("store", 8), ("narrow", 2), ("narrow", 4), ("wide", 1)])
@pytest.mark.parametrize("mode", ["buffer", "scatter", "scatter_repeated"])
def test_states_through_bulk_copies(monkeypatch, tmp_path, tiling, T, mode):
    """The tiling key STATES_BULK (the staged tiling's; benchmarks/tune.py's variant states_bulk sets it on
    any scalar tiling): the kernel's per-token states through shared memory and bulk copies, with a padding
    row and, in scatter mode, skipped slots and the final state. Compiled on demand into a private cache
    (the prebuilt cubins and the shared cache hold the shipped kernels of the same names)."""
    shipped = specs.tiling_for
    monkeypatch.setattr(specs, "tiling_for",
                        lambda num_tokens, name="wide": {**shipped(num_tokens, name), "STATES_BULK": 1})
    monkeypatch.setattr(cubins, "prebuilt_manifest", lambda: {"kernels": {}})
    monkeypatch.setenv("GDN_NVRTC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(driver, "_kernels", {})
    force_tiling(monkeypatch, tiling)
    spec = KernelSpec(128, 128, T, "bf16", "fp32", tiling)
    assert spec.states_bulk and "store_rows_bulk(" in compiler.render(spec)
    generator = torch.Generator().manual_seed(hash((tiling, T, mode, "bulk")) % 2**31)
    inputs = make_inputs(6, T, 4, 8, pool_size=6 * (T + 2) + 2, generator=generator)
    inputs["initial_state_indices"][3] = -1
    check_call(inputs, **mode_kwargs(mode, inputs, generator))
    (plan,) = mtp._plans.values()
    assert plan.launch.function is driver.kernel(spec)


@pytest.mark.parametrize(
    "tiling,K,V",
    [(tiling, K, V) for tiling in TILING_NAMES for K, V in FALLBACK_KV
     if not (tiling_for(1, tiling).get("MMA") and K > MMA_MAX_HEAD_DIM_K)],  # that spec does not exist (test_specs)
)
def test_every_tiling_at_other_head_dims(monkeypatch, tiling, K, V):
    force_tiling(monkeypatch, tiling)
    generator = torch.Generator().manual_seed(hash((tiling, K, V)) % 2**31)
    inputs = make_inputs(3, 3, 2, 4, K, V, pool_size=9, generator=generator)
    check_call(inputs, **mode_kwargs("buffer", inputs, generator))
    check_call(inputs, **mode_kwargs("update", inputs, generator))


@pytest.mark.parametrize("T,B", [(4, 14), (5, 36), (7, 13), (8, 13)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_tiling_chosen_for_update_mode(T, B, dtype):
    """The dispatcher's mma tiling (update mode, grids of more than one wave; from specs.BULK_MIN_PAIRS_PER_SM
    (b, hv) pairs per SM its bulk form) with padding rows, write slots of which one is skipped, an allocated
    output and a pool that is a strided slice: no start delay (specs.start_delay_applies)."""
    H, HV = 16, 32
    generator = torch.Generator().manual_seed(1000 * T + (dtype == torch.float16))
    inputs = make_inputs(B, T, H, HV, dtype=dtype, pool_size=2 * B + 5, generator=generator)
    cache = torch.randn(2 * B + 5, 2, HV, 128, 128, device="cuda")
    cache[:, 1].copy_(inputs["initial_state"])
    inputs["initial_state"] = cache[:, 1]
    inputs["initial_state_indices"][[3, B * 5 // 8]] = -1
    read = set(inputs["initial_state_indices"].tolist())
    write = torch.tensor([s for s in range(2 * B + 5) if s not in read][:B], dtype=torch.int64, device="cuda")
    write[11] = -1  # no write-back for that row
    mtp.forget_plans()
    check_call(inputs, disable_state_update=False, output_state_indices=write)
    (plan,) = mtp._plans.values()
    assert plan.fixed_values()["stagger_blocks"] == 0
    spec = mtp.choose_spec(128, 128, T, "bf16" if dtype == torch.bfloat16 else "fp16", "fp32",
                           writes_states=False, batch_heads=B * HV,
                           sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
    assert spec.tiling_name == "mma"
    assert plan.launch.function is driver.kernel(spec) and plan.grid == B * HV * spec.tiles_per_head


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bulk_tiling_chosen_for_large_update_grids(T, dtype):
    """The dispatcher's bulk tiling (update mode from specs.BULK_MIN_PAIRS_PER_SM (b, hv) pairs per SM: the
    mma kernel with the final state through bulk copies) with padding rows, write slots of which one is
    skipped and one out of range, an allocated output and a pool that is a strided slice of a larger cache
    (only its rows are written)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    H, HV = 16, 32
    B = math.ceil(BULK_MIN_PAIRS_PER_SM[T] * sms / HV) + 1
    generator = torch.Generator().manual_seed(2000 * T + (dtype == torch.float16))
    inputs = make_inputs(B, T, H, HV, dtype=dtype, pool_size=2 * B + 5, generator=generator)
    cache = torch.randn(2 * B + 5, 2, HV, 132, 128, device="cuda")
    cache[:, 1, :, 2:130].copy_(inputs["initial_state"])
    inputs["initial_state"] = cache[:, 1, :, 2:130]
    inputs["initial_state_indices"][[0, B // 2]] = -1
    read = set(inputs["initial_state_indices"].tolist())
    write = torch.tensor([s for s in range(2 * B + 5) if s not in read][:B], dtype=torch.int64, device="cuda")
    write[5], write[B - 1] = -1, 2 * B + 5  # no write-back for these rows
    untouched = cache[:, 0].clone(), cache[:, 1, :, :2].clone(), cache[:, 1, :, 130:].clone()
    mtp.forget_plans()
    check_call(inputs, disable_state_update=False, output_state_indices=write)
    assert same_bits(cache[:, 0], untouched[0])
    assert same_bits(cache[:, 1, :, :2], untouched[1]) and same_bits(cache[:, 1, :, 130:], untouched[2])
    spec = mtp.choose_spec(128, 128, T, "bf16" if dtype == torch.bfloat16 else "fp16", "fp32",
                           writes_states=False, batch_heads=B * HV, sm_count=sms)
    assert spec.tiling_name == "bulk" and spec.bulk_final
    (plan,) = mtp._plans.values()
    assert plan.launch.function is driver.kernel(spec) and plan.fixed_values()["stagger_blocks"] == 0


@pytest.mark.parametrize(
    "T,mode,pairs_per_sm",
    [(T, mode, 2 if mode != "update" else 0.5) for T in (3, 4, 8) for mode in ("buffer", "scatter", "update")]
    + [(8, "buffer", 1), (7, "scatter", 1), (4, "scatter", 1.3), (3, "buffer", 1.3)],
)
def test_mma_tiling_chosen_for_small_grids(T, mode, pairs_per_sm):
    """The dispatcher's mma tiling where it takes small grids (H = 4, HV = 8): update mode at T = 3-4
    from a quarter of a (b, hv) pair per SM, per-token states at T = 3-8 on 2 pairs per SM, at T = 7-8
    on 1 and at T = 3-4 on 1.3 (the bands of specs.MMA_STATES_BANDS), with a padding row."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    H, HV = 4, 8
    B = int(pairs_per_sm * sms) // HV
    generator = torch.Generator().manual_seed(7000 + 10 * T + MODES.index(mode) + int(10 * pairs_per_sm))
    inputs = make_inputs(B, T, H, HV, pool_size=B * (T + 1) + 3, generator=generator)
    inputs["initial_state_indices"][B // 2] = -1
    mtp.forget_plans()
    check_call(inputs, **mode_kwargs(mode, inputs, generator))
    spec = mtp.choose_spec(128, 128, T, "bf16", "fp32", writes_states=mode != "update", batch_heads=B * HV,
                           sm_count=sms)
    assert spec.tiling_name == "mma"
    (plan,) = mtp._plans.values()
    assert plan.launch.function is driver.kernel(spec)


@pytest.mark.parametrize("mode", ["buffer", "scatter"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_staged_tiling_chosen_for_large_state_grids(mode, dtype):
    """The dispatcher's staged tiling (per-token states at T = 2 from specs.STAGED_MIN_PAIRS_PER_SM (b, hv)
    pairs per SM: the narrow kernel with the per-token states through bulk copies) with padding rows, skipped
    scatter slots and a pool that is a strided slice of a larger cache, rows 136 floats apart (only its
    elements are written)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    H, HV, T = 4, 8, 2
    B = math.ceil(STAGED_MIN_PAIRS_PER_SM * sms / HV) + 1
    pool_size = B * (T + 1) + 3
    generator = torch.Generator().manual_seed(3000 + MODES.index(mode) + 10 * (dtype == torch.float16))
    inputs = make_inputs(B, T, H, HV, dtype=dtype, pool_size=pool_size, generator=generator)
    cache = torch.randn(pool_size, HV, 132, 136, device="cuda")
    cache[:, :, 2:130, 4:132].copy_(inputs["initial_state"])
    inputs["initial_state"] = cache[:, :, 2:130, 4:132]
    inputs["initial_state_indices"][[1, B // 3]] = -1
    untouched = cache.clone()
    untouched[:, :, 2:130, 4:132] = float("nan")
    mtp.forget_plans()
    check_call(inputs, **mode_kwargs(mode, inputs, generator))
    outside = ~torch.isnan(untouched)
    assert same_bits(cache[outside], untouched[outside])
    spec = mtp.choose_spec(128, 128, T, "bf16" if dtype == torch.bfloat16 else "fp16", "fp32",
                           writes_states=True, batch_heads=B * HV, sm_count=sms)
    assert spec.tiling_name == "staged" and spec.states_bulk
    (plan,) = mtp._plans.values()
    assert plan.launch.function is driver.kernel(spec)


@pytest.mark.parametrize(("T", "mode", "dtype"), [
    (STORE_CAP_FROM_TOKENS, "buffer", torch.bfloat16), (5, "scatter", torch.bfloat16), (6, "buffer", torch.bfloat16),
    (7, "scatter", torch.float16), (8, "buffer", torch.float16),
])
def test_store_tiling_capped_on_large_state_grids(T, mode, dtype):
    """Per-token states on the store tiling from STORE_CAP_FROM_TOKENS on a grid of STORE_CAP_MIN_PAIRS_PER_SM
    (b, hv) pairs per SM and more: launched with at most store_cap_blocks(T) blocks per SM (unused dynamic shared
    memory), with padding rows and skipped scatter slots; every output and state is checked."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    H, HV = 4, 8
    B = math.ceil(STORE_CAP_MIN_PAIRS_PER_SM * sms / HV) + 1
    pool_size = B * (T + 1) + 3
    generator = torch.Generator().manual_seed(4000 + 10 * T + MODES.index(mode))
    inputs = make_inputs(B, T, H, HV, dtype=dtype, pool_size=pool_size, generator=generator)
    inputs["initial_state_indices"][[1, B // 3]] = -1
    mtp.forget_plans()
    check_call(inputs, **mode_kwargs(mode, inputs, generator))
    spec = mtp.choose_spec(128, 128, T, "bf16" if dtype == torch.bfloat16 else "fp16", "fp32",
                           writes_states=True, batch_heads=B * HV, sm_count=sms)
    assert spec.tiling_name == "store"
    (plan,) = mtp._plans.values()
    assert plan.launch.function is driver.kernel(spec) and plan.launch.shared_bytes > 0
    cap = store_cap_blocks(T)
    assert cap and driver.blocks_per_sm(plan.launch.function, spec.threads_per_block, 0) > cap
    per_sm = driver.blocks_per_sm(plan.launch.function, spec.threads_per_block, 0, plan.launch.shared_bytes)
    assert per_sm == cap


@pytest.mark.parametrize("H,HV", [(1, 1), (8, 8), (2, 16), (3, 12), (5, 40)])
@pytest.mark.parametrize("mode", ["update", "buffer"])
def test_mma_tiling_over_head_layouts(monkeypatch, H, HV, mode):
    """The mma tiling maps every block to its (tile, value head, query head, batch row): query heads
    shared by 1 to 8 value heads, the last row padded, an output poisoned before the call."""
    force_tiling(monkeypatch, "mma")
    generator = torch.Generator().manual_seed(100 * H + HV + len(mode))
    inputs = make_inputs(4, 8, H, HV, pool_size=4 * 10 + 2, generator=generator)
    inputs["initial_state_indices"][3] = -1
    kwargs = mode_kwargs(mode, inputs, generator)
    kwargs["output"] = nan_like((4, 8, HV, 128), torch.bfloat16)
    check_call(inputs, **kwargs)


@pytest.mark.parametrize(
    "tiling,T,mode",
    [(tiling, T, mode) for tiling in ("spread", "slim") for T in (5, 8) for mode in ("buffer", "scatter")]
    + [("spread", 5, "update"), ("spread", 6, "update")],  # in update mode the mma tiling takes the rest
)
def test_few_head_tilings_chosen_by_the_dispatcher(tiling, T, mode):
    """H = 4, HV = 8 at the largest batch for which the dispatcher picks the tiling on this GPU
    (132 SMs: spread at B = 2, 128 narrow blocks; slim at B = 8, 512 narrow blocks, with per-token
    states): the kernel it launches, one row padded where B > 1, after a previous kernel on the stream
    (the state fetched early where the grid is small)."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count

    def spec_for(B: int):
        return mtp.choose_spec(128, 128, T, "bf16", "fp32", writes_states=mode != "update", batch_heads=B * 8,
                               sm_count=sm_count)

    batches = [B for B in range(1, 65) if spec_for(B).tiling_name == tiling]
    if not batches:
        pytest.skip(f"no batch picks the {tiling} tiling on {sm_count} SMs")
    B, spec = batches[-1], spec_for(batches[-1])
    generator = torch.Generator().manual_seed(10 * T + len(mode) + len(tiling))
    inputs = make_inputs(B, T, 4, 8, pool_size=B * (T + 2) + 2, generator=generator)
    gated_delta_rule_mtp(**inputs, disable_state_update=True)  # a previous kernel on the stream
    if B > 1:
        inputs["initial_state_indices"][1] = -1
    mtp.forget_plans()
    check_call(inputs, **mode_kwargs(mode, inputs, generator))
    (plan,) = mtp._plans.values()
    assert plan.launch.function is driver.kernel(spec) and plan.grid == B * 8 * spec.tiles_per_head
    wave = driver.blocks_per_sm(plan.launch.function, spec.threads_per_block, 0) * sm_count
    early = bool(plan.fixed_values()["flags"] & FLAGS["PREFETCH_STATE"])
    assert early == prefetch_state(spec, plan.grid, wave, writes_states=mode != "update")
    assert early or tiling != "spread"


@pytest.mark.parametrize(("T", "pairs_per_sm", "tiling"), [(6, 2, "mma"), (7, 1, "mma"), (4, 4, "narrow")])
@pytest.mark.parametrize("mode", ["buffer", "scatter"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streaming_state_stores_where_chosen(T, pairs_per_sm, tiling, mode, dtype):
    """The dispatcher's kernels whose per-token states go out with the streaming hint (STORE_CS: the mma tiling
    from T = 6, the narrow one from T = 3), with a padding row and, in scatter mode, skipped slots."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    H, HV = 16, 32
    B = pairs_per_sm * sm_count // HV  # at most pairs_per_sm: the mma tiling's bands end there
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    spec = mtp.choose_spec(128, 128, T, name, "fp32", writes_states=True, batch_heads=B * HV, sm_count=sm_count)
    if spec.tiling_name != tiling:
        pytest.skip(f"B = {B} takes the {spec.tiling_name} tiling on {sm_count} SMs")
    assert spec.streaming_state_stores
    generator = torch.Generator().manual_seed(100 * T + B + len(mode) + (dtype == torch.float16))
    inputs = make_inputs(B, T, H, HV, dtype=dtype, pool_size=B * (T + 1) + 3, generator=generator)
    inputs["initial_state_indices"][B // 2] = -1
    mtp.forget_plans()
    check_call(inputs, **mode_kwargs(mode, inputs, generator))
    (plan,) = mtp._plans.values()
    assert plan.launch.function is driver.kernel(spec)


@pytest.mark.parametrize(("mode", "HV", "B", "index_dtype", "dtype"), [
    ("buffer", 64, 7, torch.int32, torch.float16), ("scatter", 64, 7, torch.int32, torch.float16),
    ("buffer", 32, 29, torch.int64, torch.bfloat16), ("scatter", 8, 130, torch.int64, torch.bfloat16),
])
def test_narrow_tiling_for_t2_state_grids(mode, HV, B, index_dtype, dtype):
    """T = 2 with per-token states takes the narrow tiling on grids the wide tiling would fill: 448 pairs
    (HV = 64, B = 7, a given output) and grids of several waves (928 and 1040 pairs, int64 indices, an
    allocated output), with padding rows."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    H, T = (4 if HV == 8 else 16), 2
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    spec = mtp.choose_spec(128, 128, T, name, "fp32", writes_states=True, batch_heads=B * HV, sm_count=sm_count)
    assert spec.tiling_name == "narrow"
    assert B * HV * 4 >= sm_count  # the wide tiling's 32-row blocks would have filled the SMs
    generator = torch.Generator().manual_seed(B + HV + len(mode))
    inputs = make_inputs(B, T, H, HV, dtype=dtype, pool_size=B * (T + 1) + 4, generator=generator)
    inputs["initial_state_indices"] = inputs["initial_state_indices"].to(index_dtype)
    padded = [B // 2] if B < 16 else [0, B // 2, B - 1]
    inputs["initial_state_indices"][padded] = -1
    kwargs = mode_kwargs(mode, inputs, generator)
    if B < 16:  # a given output (its padding row left alone); the larger grids allocate theirs (zeros there)
        kwargs["output"] = nan_like((B, T, HV, 128), dtype)
    mtp.forget_plans()
    check_call(inputs, **kwargs)
    (plan,) = mtp._plans.values()
    assert plan.launch.function is driver.kernel(spec) and plan.grid == B * HV * spec.tiles_per_head


@pytest.mark.parametrize(("T", "band", "write_slots", "dtype"), [
    (1, 0, True, torch.bfloat16), (2, 0, False, torch.float16), (1, 1, False, torch.bfloat16),
    (2, 1, True, torch.float16), (1, 2, True, torch.float16), (2, 2, False, torch.bfloat16),
])
def test_short_tiling_for_part_filled_update_grids(T, band, write_slots, dtype):
    """Update mode at T <= 2 at the largest batch (H=16, HV=32) of each band of grids that picks the short
    tiling on this GPU (132 SMs: B = 2, 7 and 12), the final states to the read slots or to write slots,
    padding rows."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    H, HV = 16, 32
    name = "bf16" if dtype == torch.bfloat16 else "fp16"

    def spec_for(B: int):
        return mtp.choose_spec(128, 128, T, name, "fp32", writes_states=False, batch_heads=B * HV, sm_count=sm_count)

    batches = [B for B in range(1, 64) if spec_for(B).tiling_name == "short"]
    bands = [B for i, B in enumerate(batches) if i + 1 == len(batches) or batches[i + 1] != B + 1]  # each band's last
    if len(bands) <= band:
        pytest.skip(f"{len(bands)} bands of batches pick the short tiling on {sm_count} SMs")
    B, spec = bands[band], spec_for(bands[band])
    generator = torch.Generator().manual_seed(100 * T + B)
    inputs = make_inputs(B, T, H, HV, dtype=dtype, pool_size=2 * B + 3, generator=generator)
    inputs["initial_state_indices"][[1, B - 2] if B > 3 else [B - 1]] = -1
    kwargs = {"disable_state_update": False}
    if write_slots:  # slots of their own, one skipped (but at B = 2, where one row of two is padded)
        read = set(inputs["initial_state_indices"].tolist())
        write = torch.tensor([s for s in torch.randperm(2 * B + 3, generator=generator).tolist() if s not in read][:B],
                             dtype=torch.int32)
        if B > 3:
            write[B // 2] = -1
        kwargs["output_state_indices"] = write.cuda()
    mtp.forget_plans()
    check_call(inputs, **kwargs)
    (plan,) = mtp._plans.values()
    assert spec.short_chain and plan.launch.function is driver.kernel(spec)
    assert plan.grid == B * HV * spec.tiles_per_head


@pytest.mark.parametrize(("tiling", "T", "HV", "write_slots", "dtype"), [
    ("twin", 3, 32, False, torch.bfloat16), ("twin", 5, 64, True, torch.float16), ("twin", 8, 32, True, torch.bfloat16),
    ("twin4", 3, 64, True, torch.float16), ("twin4", 4, 32, False, torch.bfloat16),
    ("twin4", 5, 32, True, torch.bfloat16), ("twin4", 6, 64, False, torch.float16),
    ("twin4", 7, 32, True, torch.bfloat16), ("twin4", 8, 32, False, torch.float16),
])
def test_twin_tilings_chosen_for_update_mode(tiling, T, HV, write_slots, dtype):
    """The dispatcher's twin tilings (update mode, two tiles per block) at the largest batch that picks them on
    this GPU (H = 16; 132 SMs: twin at B = 12 (HV = 32) / 6 (HV = 64), twin4 at B = 16 / 8): padding rows (the
    first and the last), the final states to the read slots or to write slots (one skipped, one out of range),
    an output poisoned before the call, a pool that is a strided slice of a larger cache (only its rows are
    written)."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    H, name = 16, "bf16" if dtype == torch.bfloat16 else "fp16"

    def spec_for(B: int):
        return mtp.choose_spec(128, 128, T, name, "fp32", writes_states=False, batch_heads=B * HV, sm_count=sm_count)

    batches = [B for B in range(1, 128) if spec_for(B).tiling_name == tiling]
    if not batches:
        pytest.skip(f"no batch picks the {tiling} tiling at HV = {HV} on {sm_count} SMs")
    B, spec = batches[-1], spec_for(batches[-1])
    generator = torch.Generator().manual_seed(300 * T + HV + B)
    pool_size = 2 * B + 3
    inputs = make_inputs(B, T, H, HV, dtype=dtype, pool_size=pool_size, generator=generator)
    cache = torch.randn(pool_size, 2, HV, 128, 128, device="cuda")
    cache[:, 0].copy_(inputs["initial_state"])
    inputs["initial_state"] = cache[:, 0]
    inputs["initial_state_indices"][[0, B - 1]] = -1
    kwargs = {"disable_state_update": False, "output": nan_like((B, T, HV, 128), dtype)}
    if write_slots:
        read = set(inputs["initial_state_indices"].tolist())
        write = torch.tensor([s for s in torch.randperm(pool_size, generator=generator).tolist() if s not in read][:B],
                             dtype=torch.int64)
        write[B // 2], write[B // 3] = -1, pool_size
        kwargs["output_state_indices"] = write.cuda()
    untouched = cache[:, 1].clone()
    mtp.forget_plans()
    check_call(inputs, **kwargs)
    assert same_bits(cache[:, 1], untouched)
    (plan,) = mtp._plans.values()
    assert spec.tiling_name == tiling and spec.two_tiles and plan.launch.function is driver.kernel(spec)
    assert plan.grid == B * HV * spec.blocks_per_head == B * HV * spec.tiles_per_head // 2
    assert plan.fixed_values()["stagger_blocks"] == 0
    # twin: 3 blocks per SM whatever its registers (dynamic shared memory at launch where more would fit)
    per_sm = driver.blocks_per_sm(plan.launch.function, spec.threads_per_block, 0, plan.launch.shared_bytes)
    assert per_sm == (3 if tiling == "twin" else 4)


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_blocks_per_sm_capped_by_dynamic_shared_memory(blocks):
    """driver.shared_bytes_for_at_most: the mma kernel (4 blocks per SM) launched with the padding it gives
    has `blocks` blocks per SM (none at 4), and computes as without it."""
    spec = KernelSpec(128, 128, 4, "bf16", "fp32", "mma")
    function = driver.kernel(spec)
    assert driver.blocks_per_sm(function, 128, 0) == 4
    padding = driver.shared_bytes_for_at_most(function, 128, 0, blocks)
    assert (padding == 0) == (blocks == 4)
    assert driver.blocks_per_sm(function, 128, 0, padding) == blocks
    assert driver.shared_bytes_for_at_most(function, 128, 0, blocks) == padding


@pytest.mark.parametrize(("B", "T", "HV", "K", "dtype"),
                         [(40, 4, 32, 64, torch.bfloat16), (12, 5, 64, 256, torch.float16)])
def test_start_delay_is_correct(B, T, HV, K, dtype):
    """A grid of more than one wave in update mode, where part of the first wave starts late (the wide
    tiling at T >= 4; since v48 it serves those grids at head dims other than 128 only)."""
    generator = torch.Generator().manual_seed(B)
    inputs = make_inputs(B, T, 16, HV, K, K, dtype=dtype, pool_size=B + 5, generator=generator)
    inputs["initial_state_indices"][7] = -1
    mtp.forget_plans()
    check_call(inputs, disable_state_update=False)
    (plan,) = [plan for plan in mtp._plans.values() if plan.grid >= B * HV]
    fixed = plan.fixed_values()
    assert fixed["stagger_blocks"] > 0 and fixed["stagger_ns"] > 0  # the delay was in effect
    spec = mtp.choose_spec(K, K, T, "bf16" if dtype == torch.bfloat16 else "fp16", "fp32", writes_states=False,
                           batch_heads=B * HV, sm_count=torch.cuda.get_device_properties(0).multi_processor_count)
    assert spec.tiling_name == "wide"


def test_write_slots_with_padding():
    inputs = make_inputs(6, 4, 4, 8, pool_size=20)
    inputs["initial_state_indices"] = torch.tensor([0, 1, 2, -1, 4, 5], dtype=torch.int64, device="cuda")
    write = torch.tensor([10, -1, 12, 13, 14, 5], dtype=torch.int64, device="cuda")
    out, pool = check_call(inputs, disable_state_update=False, output_state_indices=write)
    assert same_bits(pool[13], inputs["initial_state"][13])  # padded row: no write-back to its write slot


def test_out_of_range_slots_are_padding():
    inputs = make_inputs(4, 3, 4, 8, pool_size=6)
    inputs["initial_state_indices"] = torch.tensor([0, 6, 2, 1 << 40], dtype=torch.int64, device="cuda")
    write = torch.tensor([1, 3, 7, 4], dtype=torch.int32, device="cuda")
    output = nan_like((4, 3, 8, 128), torch.bfloat16)
    check_call(inputs, disable_state_update=False, output_state_indices=write, output=output)
    scatter = torch.tensor([[3, 99, -1], [4, 4, 4], [5, 1 << 30, 1]], dtype=torch.int32, device="cuda")
    inputs = make_inputs(3, 3, 4, 8, pool_size=6)
    inputs["initial_state_indices"] = torch.tensor([0, 7, 2], dtype=torch.int32, device="cuda")
    check_call(inputs, disable_state_update=False, ssm_state_indices=scatter)
    # int64 scatter slots whose low word alone is a valid slot (1, 4, 1): out of range, never written
    scatter = torch.tensor(
        [[3, (1 << 32) + 1, -1], [4, 4, 4], [5, -(1 << 32) + 4, (1 << 40) + 1]], dtype=torch.int64, device="cuda"
    )
    check_call(inputs, disable_state_update=False, ssm_state_indices=scatter)


def test_strided_pool_slice_of_larger_cache():
    B, T, H, HV = 5, 4, 4, 8
    inputs = make_inputs(B, T, H, HV, pool_size=9)
    # A per-layer cache [slots, layers, HV, V + 4, K]; this layer's pool is a strided slice of it.
    cache = torch.randn(9, 3, HV, 132, 128, device="cuda")
    pool = cache[:, 1, :, 2:130, :]
    assert not pool.is_contiguous()
    inputs["initial_state"] = pool
    untouched = cache[:, [0, 2]].clone(), cache[:, 1, :, :2].clone(), cache[:, 1, :, 130:].clone()
    check_call(inputs, disable_state_update=False)
    assert same_bits(cache[:, [0, 2]], untouched[0])
    assert same_bits(cache[:, 1, :, :2], untouched[1])
    assert same_bits(cache[:, 1, :, 130:], untouched[2])


@pytest.mark.parametrize("tiling", ["mma", "bulk", "wide"])
@pytest.mark.parametrize("mode", ["update", "scatter"])
def test_pool_rows_padded_beyond_k(monkeypatch, tiling, mode):
    """A pool whose rows lie K + 8 floats apart (a slice of a cache with padded rows): every tiling takes
    the row stride from the call (the mma tiling's copies included), and the padding stays untouched."""
    force_tiling(monkeypatch, tiling)
    generator = torch.Generator().manual_seed(hash((tiling, mode, "padded rows")) % 2**31)
    B, T, H, HV, K = 5, 8, 4, 8, 128
    pool_size = B * (T + 2) + 2
    inputs = make_inputs(B, T, H, HV, pool_size=pool_size, generator=generator)
    cache = torch.randn(pool_size, HV, K, K + 8, generator=generator).mul_(0.1).cuda()
    pool = cache[..., :K]
    assert pool.stride(2) == K + 8
    inputs["initial_state"] = pool
    padding = cache[..., K:].clone()
    check_call(inputs, **mode_kwargs(mode, inputs, generator))
    assert same_bits(cache[..., K:], padding)


def test_packed_projection_views():
    B, T, H, HV, K, V = 6, 3, 4, 8, 128, 128
    inputs = make_inputs(B, T, H, HV, pool_size=10)
    qkv = torch.randn(B, T, 2 * H * K + HV * V + 2 * HV + 8, device="cuda").to(torch.bfloat16)
    q = qkv[..., : H * K].view(B, T, H, K)
    k = qkv[..., H * K : 2 * H * K].view(B, T, H, K)
    v = qkv[..., 2 * H * K : 2 * H * K + HV * V].view(B, T, HV, V)
    gates = qkv[..., 2 * H * K + HV * V + 3 : 2 * H * K + HV * V + 3 + 2 * HV]  # odd offset: 2-byte aligned only
    a, b = gates[..., :HV], gates[..., HV:]
    inputs.update(q=q, k=k, v=v, a=a, b=b)
    out_storage = nan_like((B, T, HV, V + 16), torch.bfloat16)
    check_call(inputs, disable_state_update=False, output=out_storage[..., 8 : 8 + V])
    assert torch.isnan(out_storage[..., :8]).all() and torch.isnan(out_storage[..., 8 + V :]).all()


@pytest.mark.parametrize("tiling", ["mma", "wide"])
@pytest.mark.parametrize("T", [5, 8])
@pytest.mark.parametrize("offset,extra", [(1, 3), (0, 2), (4, 1), (4, 4)])
def test_qk_views_of_any_alignment(monkeypatch, tiling, T, offset, extra):
    """q and k as views of a wider row of 2 H K + extra elements, from `offset`: in the first three cases
    some vectors start off a 4- or 8-byte boundary (the kernels read q and k element by element through
    their strides), in the last every vector is 8-byte aligned but the rows are not contiguous."""
    force_tiling(monkeypatch, tiling)
    B, H, HV, K = 6, 4, 8, 128
    generator = torch.Generator().manual_seed(100 * T + 10 * offset + extra)
    inputs = make_inputs(B, T, H, HV, pool_size=2 * B + 2, generator=generator)
    row = torch.randn(B, T, 2 * H * K + extra + offset, generator=generator).to("cuda", torch.bfloat16)
    inputs["q"] = row[..., offset : offset + H * K].view(B, T, H, K)
    inputs["k"] = row[..., offset + H * K + extra : offset + 2 * H * K + extra].view(B, T, H, K)
    inputs["initial_state_indices"][1] = -1
    check_call(inputs, disable_state_update=False)


def test_unaligned_index_views():
    inputs = make_inputs(5, 2, 4, 8, pool_size=12)
    storage = torch.tensor([99, 3, 1, 7, 0, 11, 5], dtype=torch.int32, device="cuda")
    inputs["initial_state_indices"] = storage[1:6]  # 4-byte offset
    check_call(inputs, disable_state_update=False)
    inputs = make_inputs(4, 2, 4, 8, pool_size=12)
    inputs["initial_state_indices"] = torch.arange(8, dtype=torch.int64, device="cuda")[::2]  # strided
    check_call(inputs, disable_state_update=False)


@pytest.mark.parametrize("use_qk_l2norm", [True, False])
@pytest.mark.parametrize("scale", [None, 0.37])
def test_l2norm_and_scale(use_qk_l2norm, scale):
    inputs = make_inputs(4, 5, 4, 8, dtype=torch.float16, pool_size=8)
    if not use_qk_l2norm:  # keep q.k moderate without normalisation
        inputs["q"] = (inputs["q"].float() / 8).half()
        inputs["k"] = (inputs["k"].float() / 8).half()
    check_call(inputs, disable_state_update=False, scale=scale, use_qk_l2norm=use_qk_l2norm)


def test_large_gates_do_not_make_nan():
    inputs = make_inputs(3, 4, 4, 8, gate_dtype=torch.float32, pool_size=6)
    inputs["a"].fill_(100.0)
    inputs["a"][0, 0, 0] = 1e30
    inputs["b"][1] = -1e4
    inputs["b"][2] = 1e4
    out, pool = check_call(inputs, disable_state_update=False)
    assert torch.isfinite(out).all() and torch.isfinite(pool).all()


def test_fp16_inputs_are_not_rounded_through_bf16():
    inputs = make_inputs(4, 4, 4, 8, dtype=torch.float16, gate_dtype=torch.float16, pool_size=8)
    out, _ = gated_delta_rule_mtp(**inputs, disable_state_update=True)
    ref, _, _ = gated_delta_rule_mtp_reference(**inputs, disable_state_update=True)
    # fp16 keeps 3 more mantissa bits than bf16: the error must be well under bf16's.
    assert rel_error(out, ref) < 2e-3


def test_default_disable_state_update_warns_and_keeps_pool():
    import gdn_nvrtc.mtp as mtp

    mtp._warned_default_update = False
    inputs = make_inputs(3, 2, 4, 8, pool_size=5)
    before = inputs["initial_state"].clone()
    with pytest.warns(FutureWarning, match="disable_state_update"):
        gated_delta_rule_mtp(**inputs)
    torch.cuda.synchronize()
    assert same_bits(inputs["initial_state"], before)


def test_batch_zero_returns_at_once():
    inputs = make_inputs(0, 3, 4, 8, pool_size=4)
    before = inputs["initial_state"].clone()
    out, pool = gated_delta_rule_mtp(**inputs, disable_state_update=False)
    assert out.shape == (0, 3, 8, 128) and pool is inputs["initial_state"]
    assert same_bits(pool, before)


def test_cuda_graph_replay_with_new_indices():
    B, T, H, HV = 6, 4, 4, 8
    pool_size = 24
    inputs = make_inputs(B, T, H, HV, pool_size=pool_size)
    write = torch.empty(B, dtype=torch.int32, device="cuda")
    out = torch.empty(B, T, HV, 128, dtype=torch.bfloat16, device="cuda")
    kwargs = dict(disable_state_update=False, output_state_indices=write, output=out)
    write.copy_(inputs["initial_state_indices"])
    gated_delta_rule_mtp(**inputs, **kwargs)  # warm up: load the kernel outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        gated_delta_rule_mtp(**inputs, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    for replay in range(3):
        fresh = make_inputs(B, T, H, HV, pool_size=pool_size)
        for name in ("q", "k", "v", "a", "b", "initial_state", "A_log", "dt_bias"):
            inputs[name].copy_(fresh[name])
        perm = torch.randperm(pool_size, device="cuda").to(torch.int32)
        inputs["initial_state_indices"].copy_(perm[:B])
        inputs["initial_state_indices"][replay] = -1
        write.copy_(perm[B : 2 * B])
        out.fill_(float("nan"))
        expected_out, expected_pool, _ = gated_delta_rule_mtp_reference(**inputs, **kwargs)
        graph.replay()
        torch.cuda.synchronize()
        valid = inputs["initial_state_indices"] >= 0
        assert rel_error(out[valid], expected_out[valid]) < OUTPUT_REL_TOL
        assert torch.isnan(out[~valid]).all()
        assert rel_error(inputs["initial_state"], expected_pool) < STATE_REL_TOL


def test_returns_on_current_stream():
    inputs = make_inputs(8, 4, 4, 8, pool_size=10)
    expected, _, _ = gated_delta_rule_mtp_reference(**inputs, disable_state_update=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, _ = gated_delta_rule_mtp(**inputs, disable_state_update=True)
        result = out.float().cpu()  # ordered after the kernel on this stream
    assert rel_error(result, expected.cpu()) < OUTPUT_REL_TOL


def test_failed_call_writes_nothing():
    inputs = make_inputs(4, 3, 4, 8, pool_size=8)
    output = nan_like((4, 3, 8, 128), torch.bfloat16)
    buffer = nan_like((4, 2, 8, 128, 128), torch.float32)  # too few steps
    before = inputs["initial_state"].clone()
    with pytest.raises(ValueError, match="intermediate_states_buffer must have shape"):
        gated_delta_rule_mtp(**inputs, disable_state_update=False, output=output, intermediate_states_buffer=buffer)
    torch.cuda.synchronize()
    assert same_bits(inputs["initial_state"], before)
    assert torch.isnan(output).all() and torch.isnan(buffer).all()


@pytest.mark.parametrize(
    "argument,row,value",
    [("initial_state_indices", 2, 9), ("output_state_indices", 1, 1 << 33), ("ssm_state_indices", [3, 1], 8)],
)
def test_index_checking_mode_names_the_bad_entry(argument, row, value):
    import gdn_nvrtc

    inputs = make_inputs(4, 2, 4, 8, pool_size=8)
    kwargs = {"disable_state_update": False}
    if argument == "initial_state_indices":
        inputs[argument][row] = value
    elif argument == "output_state_indices":
        kwargs[argument] = torch.tensor([0, value, -1, 3], dtype=torch.int64, device="cuda")
    else:
        scatter = torch.full((4, 2), -1, dtype=torch.int32, device="cuda")
        scatter[tuple(row)] = value
        kwargs[argument] = scatter
    before = inputs["initial_state"].clone()
    gdn_nvrtc.set_index_checking(True)
    try:
        with pytest.raises(IndexError) as raised:
            gated_delta_rule_mtp(**inputs, **kwargs)
    finally:
        gdn_nvrtc.set_index_checking(False)
    assert str(raised.value) == f"{argument}[{row}] = {value} is out of range for a state pool of 8 slots"
    assert same_bits(inputs["initial_state"], before)


def test_misaligned_pool_is_refused_after_an_aligned_call_of_the_same_shape():
    inputs = make_inputs(3, 2, 4, 8, pool_size=4)
    storage = torch.randn(4 * 8 * 128 * 128 + 4, device="cuda")
    inputs["initial_state"] = storage[: 4 * 8 * 128 * 128].view(4, 8, 128, 128)
    gated_delta_rule_mtp(**inputs, disable_state_update=False)  # caches the plan of this signature
    inputs["initial_state"] = storage[1 : 1 + 4 * 8 * 128 * 128].view(4, 8, 128, 128)  # same shape, 4-byte offset
    before = storage.clone()
    with pytest.raises(ValueError, match="initial_state must be 16-byte aligned"):
        gated_delta_rule_mtp(**inputs, disable_state_update=False)
    torch.cuda.synchronize()
    assert same_bits(storage, before)


@pytest.mark.parametrize("tiling", ["chosen", *TILING_NAMES])
@pytest.mark.parametrize("mode", ["update", "buffer", "scatter"])
def test_strong_decay_over_many_tokens(monkeypatch, tiling, mode):
    """alpha ~ 0.1 per token: the decay the kernel folds into the state's scale crosses the point
    where it is applied to the registers in the middle of the sequence, at different tokens per head.
    In every tiling: the short-chain ones (specs.SHORT_CHAIN) apply it without a branch."""
    if tiling != "chosen":
        force_tiling(monkeypatch, tiling)
    generator = torch.Generator().manual_seed(7)
    inputs = make_inputs(5, 8, 4, 8, gate_dtype=torch.float32, pool_size=48)
    inputs["A_log"].zero_()
    inputs["dt_bias"].copy_(torch.linspace(0.5, 3.5, 8))  # softplus ~ 1..3.5: alpha ~ 0.3..0.03
    inputs["a"].uniform_(-0.5, 0.5)
    check_call(inputs, **mode_kwargs(mode, inputs, generator))


def test_strided_gate_parameters():
    inputs = make_inputs(4, 3, 4, 8, pool_size=8)
    inputs["A_log"] = torch.randn(8, 2, device="cuda")[:, 1]  # stride 2
    inputs["dt_bias"] = torch.randn(8, 3, device="cuda").bfloat16()[:, 2]  # stride 3
    assert inputs["A_log"].stride(0) == 2 and inputs["dt_bias"].stride(0) == 3
    check_call(inputs, disable_state_update=False)


@pytest.mark.parametrize("tiling", TILING_NAMES)
@pytest.mark.parametrize("mode", ["update", "scatter"])
def test_broadcast_inputs(monkeypatch, tiling, mode):
    """Inputs with stride 0 on axes before the last (broadcast views a caller can pass without a copy):
    q and k shared by every row, v by every token, a and b by every token, A_log and dt_bias by every
    head; with three value heads per q/k head (H=2, HV=6)."""
    force_tiling(monkeypatch, tiling)
    generator = torch.Generator().manual_seed(hash((tiling, mode, "broadcast")) % 2**31)
    B, T, H, HV = 5, 3, 2, 6
    inputs = make_inputs(B, T, H, HV, pool_size=B * (T + 2) + 2, generator=generator)
    inputs["q"] = inputs["q"][:1].expand(B, -1, -1, -1)
    inputs["k"] = inputs["k"][:1].expand(B, -1, -1, -1)
    inputs["v"] = inputs["v"][:, :1].expand(-1, T, -1, -1)
    inputs["a"] = inputs["a"][:, :1].expand(-1, T, -1)
    inputs["b"] = inputs["b"][:, :1].expand(-1, T, -1)
    inputs["A_log"] = inputs["A_log"][:1].expand(HV)
    inputs["dt_bias"] = inputs["dt_bias"][:1].expand(HV)
    assert inputs["q"].stride(0) == 0 and inputs["v"].stride(1) == 0 and inputs["A_log"].stride(0) == 0
    inputs["initial_state_indices"][3] = -1
    check_call(inputs, **mode_kwargs(mode, inputs, generator))


@pytest.mark.parametrize("tiling", ["chosen", "narrow", "staged", "mma"])
def test_broadcast_pool_read_only(monkeypatch, tiling):
    """A pool whose slots are one state broadcast (stride 0 over the pool) is only read when
    disable_state_update=True: accepted, every row starts from that state, and the buffer gets the states."""
    if tiling != "chosen":
        force_tiling(monkeypatch, tiling)
    generator = torch.Generator().manual_seed(hash((tiling, "broadcast pool")) % 2**31)
    B, T, H, HV = 4, 3, 2, 4
    inputs = make_inputs(B, T, H, HV, pool_size=6, generator=generator)
    inputs["initial_state"] = inputs["initial_state"][2:3].expand(6, -1, -1, -1)
    check_call(inputs, **mode_kwargs("buffer", inputs, generator))


@pytest.mark.parametrize(
    "argument,accepted,refused",
    [("scale", 1.0, True), ("use_qk_l2norm", True, 1), ("disable_state_update", True, 1)],
)
def test_refused_argument_types_stay_refused_after_a_cached_call(argument, accepted, refused):
    inputs = make_inputs(2, 2, 4, 8, pool_size=4)
    kwargs = {"disable_state_update": False, argument: accepted}
    gated_delta_rule_mtp(**inputs, **kwargs)  # caches the plan of this signature
    kwargs[argument] = refused  # equal to the accepted value in Python, but of the wrong type
    before = inputs["initial_state"].clone()
    with pytest.raises(TypeError, match=argument):
        gated_delta_rule_mtp(**inputs, **kwargs)
    torch.cuda.synchronize()
    assert same_bits(inputs["initial_state"], before)


@pytest.mark.parametrize("indices", ["written_just_before", "prepared"])
@pytest.mark.parametrize("B", [1, 3, 48])
def test_back_to_back_calls_read_what_came_just_before(B, indices):
    """Calls on one stream with no synchronisation between them, each reading the slots the previous
    call wrote; the slot indices are either written by a torch kernel just before each call or
    prepared beforehand (then each call follows the previous call directly). The blocks of a small
    grid fetch their state into L2 before the previous kernel has finished (FLAG_PREFETCH_STATE),
    from slots and states that are about to change: what they use must still be the new ones."""
    T, H, HV, steps = 2, 4, 8, 5
    generator = torch.Generator().manual_seed(300 + B)
    pool_size = B * (steps + 1)
    calls = [make_inputs(B, T, H, HV, pool_size=pool_size, generator=generator) for _ in range(steps)]
    pool = calls[0]["initial_state"]
    read = torch.zeros(B, dtype=torch.int32, device="cuda")
    write = torch.zeros(B, dtype=torch.int32, device="cuda")
    slots = []
    for step in range(steps):
        order = torch.randperm(B, generator=generator)
        slots.append(((step * B + order).int(), ((step + 1) * B + order.flip(0)).int()))
    expected_pool = pool.double()
    expected_outputs = []
    for step, call in enumerate(calls):
        call = {**call, "initial_state": expected_pool}
        call["initial_state_indices"], write_slots = (x.cuda() for x in slots[step])
        out, expected_pool, _ = gated_delta_rule_mtp_reference(
            **call, disable_state_update=False, output_state_indices=write_slots)
        expected_outputs.append(out)
    mtp.forget_plans()
    write.fill_(-1)  # no write-back: the call only makes the plan
    gated_delta_rule_mtp(**{**calls[0], "initial_state": pool, "initial_state_indices": read},
                         disable_state_update=False, output_state_indices=write)
    torch.cuda.synchronize()
    plan = mtp._last_plan[-1]
    assert bool(plan.fixed_values()["flags"] & FLAGS["PREFETCH_STATE"]) == (B < 48)
    slots = [(r.cuda(), w.cuda()) for r, w in slots]
    outputs = []
    torch.cuda.synchronize()
    for step, call in enumerate(calls):
        if indices == "prepared":
            read, write = slots[step]
        else:
            torch.add(slots[step][0], 0, out=read)  # kernels, not copies: the call's previous kernel
            torch.add(slots[step][1], 0, out=write)
        out, _ = gated_delta_rule_mtp(**{**call, "initial_state": pool, "initial_state_indices": read},
                                      disable_state_update=False, output_state_indices=write)
        outputs.append(out)
    torch.cuda.synchronize()
    for step in range(steps):
        assert rel_error(outputs[step], expected_outputs[step]) < OUTPUT_REL_TOL, f"output of call {step}"
    assert rel_error(pool, expected_pool) < STATE_REL_TOL
