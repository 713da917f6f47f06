import math
import struct

import pytest

from gdn_nvrtc.specs import (
    FIXED_TILINGS,
    FLAGS,
    MAX_TOKENS,
    MMA_MAX_HEAD_DIM_K,
    MMA_MAX_TOKENS,
    PARAM_FIELDS,
    PARAM_STRUCT_FORMAT,
    PREBUILT_SPECS,
    STAGGER_NS,
    STORE_CAP_BLOCKS,
    STORE_CAP_FROM_TOKENS,
    STORE_CAP_MIN_PAIRS_PER_SM,
    SUPPORTED_HEAD_DIMS,
    TILING_NAMES,
    KernelSpec,
    blocks_per_sm_cap,
    choose_spec,
    prefetch_state,
    start_delay,
    start_delay_applies,
    store_cap_blocks,
    tiling_for,
)

SMS = 132


def test_prebuilt_table():
    assert {(s.head_dim_k, s.head_dim_v, s.num_tokens, s.input_dtype, s.state_dtype) for s in PREBUILT_SPECS} == {
        (128, 128, t, dtype, "fp32") for t in range(1, 9) for dtype in ("bf16", "fp16")
    }
    assert len({s.name for s in PREBUILT_SPECS}) == len(PREBUILT_SPECS)


@pytest.mark.parametrize("T", range(1, 9))
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_every_spec_chosen_for_a_prebuilt_shape_is_prebuilt(T, dtype):
    chosen = {
        choose_spec(128, 128, T, dtype, "fp32", writes_states=writes, batch_heads=bh, sm_count=sms)
        for writes in (False, True)
        for bh in [1, 2, 8, 31, 32, 33, 64, 65, 100, 129, 256, 330, 331, 1024, 8192, 2**20]
        for sms in (78, 114, 132, 144)
    }
    assert chosen <= set(PREBUILT_SPECS)


def test_every_prebuilt_spec_is_chosen_for_some_shape():
    """No prebuilt cubin that the dispatcher never picks (on 132 SMs, 1-4096 (b, hv) pairs)."""
    chosen = {
        choose_spec(128, 128, T, dtype, "fp32", writes_states=writes, batch_heads=bh, sm_count=SMS)
        for T in range(1, 9)
        for dtype in ("bf16", "fp16")
        for writes in (False, True)
        for bh in range(1, 4097)
    }
    assert chosen == set(PREBUILT_SPECS)


def test_choice_of_tiling():
    def pick(T, writes, batch_heads):
        return choose_spec(128, 128, T, "bf16", "fp32", writes_states=writes, batch_heads=batch_heads,
                           sm_count=SMS).tiling_name

    # B = 1 at HV = 32: the wide tiling would leave SMs idle (64 or 128 blocks on 132 SMs); in update mode
    # at T <= 2 the short tiling takes such grids.
    assert [pick(T, writes, 32) for T in (2, 4) for writes in (False, True)] == ["short"] + ["narrow"] * 3
    # Per-token states at T >= 3 once the grid is full, except at T = 3-4 up to 8 (b, hv) pairs per SM
    # (1056 on 132 SMs: narrow) and in the mma tiling's bands (v47: more than 1.75 and at most 2 pairs per
    # SM at every T, 232-264 on 132 SMs; at T = 3-4 also 1.15-1.4, 152-184; at T = 7-8 also 0.93-1,
    # 123-132); at T = 1 the wide tiling keeps them, at T = 2 the narrow tiling takes every grid below 9
    # pairs per SM (1188 on 132 SMs) and its staged form the larger ones (v50).
    assert [pick(T, True, 8 * 32) for T in (2, 3, 4, 5, 8)] == ["narrow", "mma", "mma", "mma", "mma"]
    assert [pick(2, True, pairs) for pairs in (33, 64, 132, 133, 462, 463, 923, 924, 1187)] == ["narrow"] * 9
    assert [pick(2, True, pairs) for pairs in (1188, 2048, 32768)] == ["staged"] * 3
    assert [choose_spec(128, 128, 2, "bf16", "fp32", writes_states=True, batch_heads=2048, sm_count=n).tiling_name
            for n in (SMS, 2 * SMS)] == ["staged", "narrow"]
    assert [pick(T, True, 4096) for T in (1, 3)] == ["wide", "store"]
    assert pick(2, False, 4096) == "bulk"
    assert [pick(1, True, pairs) for pairs in (33, 64, 396, 8192)] == ["wide"] * 4
    # Update mode at T <= 2: the wide tiling, but the short one on up to 0.5, more than 1.12 and at most 1.8
    # or more than 2.1 and at most 3 pairs per SM (1-66, 148-237 and 278-396 on 132 SMs, v37), and the bulk
    # one from 12 pairs per SM at T = 1 (1584) and from 7.5 at T = 2 (990, v49); never with per-token states.
    edges = (1, 32, 33, 66, 67, 147, 148, 237, 238, 256, 277, 278, 396, 397, 989)
    for T in (1, 2):
        assert [pick(T, False, pairs) for pairs in edges] == (
            ["short"] * 4 + ["wide"] * 2 + ["short"] * 2 + ["wide"] * 3 + ["short"] * 2 + ["wide"] * 2)
        assert [pick(T, True, pairs) for pairs in (148, 300)] == ["narrow" if T == 2 else "wide"] * 2
    assert [pick(T, False, pairs) for T in (1, 2) for pairs in (990, 1583, 1584, 65536)] == (
        ["wide"] * 2 + ["bulk"] * 2 + ["bulk"] * 4)
    assert [pick(T, True, pairs) for T in (1, 2) for pairs in (990, 1584, 8192)] == ["wide"] * 3 + ["narrow"] + [
        "staged"] * 2
    # In pairs per SM: 1584 pairs are 6 per SM on 264 SMs.
    assert [choose_spec(128, 128, T, "bf16", "fp32", writes_states=False, batch_heads=1584, sm_count=n).tiling_name
            for T in (1, 2) for n in (SMS, 2 * SMS)] == ["bulk", "wide", "bulk", "wide"]
    assert choose_spec(64, 64, 2, "bf16", "fp32", writes_states=False, batch_heads=8192,
                       sm_count=SMS).tiling_name == "wide"  # only measured at K = V = 128
    assert [pick(T, False, 200) for T in (3, 4)] == ["mma"] * 2
    # By pairs per SM: 400 pairs are 3.03 per SM on 132 SMs (no band), 1.52 on 264 (the first band).
    assert [choose_spec(128, 128, 2, "bf16", "fp32", writes_states=False, batch_heads=400, sm_count=n).tiling_name
            for n in (SMS, 2 * SMS)] == ["wide", "short"]
    assert choose_spec(64, 64, 2, "bf16", "fp32", writes_states=False, batch_heads=200,
                       sm_count=SMS).tiling_name == "wide"  # only measured at K = V = 128
    assert choose_spec(64, 64, 2, "bf16", "fp32", writes_states=True, batch_heads=200,
                       sm_count=SMS).tiling_name == "wide"  # only measured at K = V = 128
    assert [pick(T, True, 16 * 32) for T in (2, 3, 4, 5, 8)] == ["narrow", "narrow", "narrow", "store", "store"]
    edges = (122, 123, 132, 133, 151, 152, 184, 185, 231, 232, 264, 265, 396)
    for T in (3, 4):
        assert [pick(T, True, pairs) for pairs in edges] == (
            ["narrow"] * 5 + ["mma"] * 2 + ["narrow"] * 2 + ["mma"] * 2 + ["narrow"] * 2)
    for T in (5, 6):
        assert [pick(T, True, pairs) for pairs in edges] == ["store"] * 9 + ["mma"] * 2 + ["store"] * 2
    for T in (7, 8):
        assert [pick(T, True, pairs) for pairs in edges] == (
            ["store"] + ["mma"] * 2 + ["store"] * 6 + ["mma"] * 2 + ["store"] * 2)
    assert [pick(T, True, pairs) for T in (6, 7, 8) for pairs in (99, 100, 128)] == (
        ["store", "store", "store"] + ["store", "store", "mma"] * 2)
    # The bands are in pairs per SM: 256 pairs are 1.94 per SM on 132 SMs, 0.97 on 264 (T = 8 only).
    assert [choose_spec(128, 128, T, "bf16", "fp32", writes_states=True, batch_heads=256, sm_count=n).tiling_name
            for T in (5, 8) for n in (SMS, 2 * SMS)] == ["mma", "store", "mma", "mma"]
    assert [pick(T, True, 1057) for T in (3, 4, 5)] == ["store"] * 3
    assert [pick(4, True, pairs) for pairs in (96, 1056, 1057, 4096)] == ["narrow"] * 2 + ["store"] * 2
    assert choose_spec(64, 64, 4, "bf16", "fp32", writes_states=True, batch_heads=256,
                       sm_count=SMS).tiling_name == "store"  # only measured at K = V = 128
    assert pick(1, True, 8192) == "wide" and pick(2, False, 8192) == "bulk"
    # Update mode: the mma tiling at T >= 7 on every grid, at T = 5-6 from 1/8 pair per SM (17 on 132
    # SMs), at T = 4 from 1/4 (33) and at T = 3 from 0.45 (60) pairs per SM, on every larger grid (v48);
    # the narrow or short-chain tilings below; never at T <= 2.
    assert [pick(T, False, 8) for T in (1, 2, 3, 4, 5, 6, 7, 8)] == (
        ["short"] * 2 + ["narrow"] * 2 + ["spread"] * 2 + ["mma"] * 2)
    assert [pick(3, False, pairs) for pairs in (33, 59, 60, 462)] == ["narrow"] * 2 + ["mma"] * 2
    assert [pick(4, False, pairs) for pairs in (32, 33, 462)] == ["narrow"] + ["mma"] * 2
    # 60 pairs are 0.45 per SM on 132 SMs, 0.23 on 264.
    assert [choose_spec(128, 128, T, "bf16", "fp32", writes_states=False, batch_heads=pairs, sm_count=n).tiling_name
            for T, pairs in ((3, 60), (4, 33)) for n in (SMS, 2 * SMS)] == ["mma", "narrow"] * 2
    assert [pick(T, False, pairs) for T in (5, 6) for pairs in (16, 17, 1187)] == ["spread", "mma", "mma"] * 2
    assert [pick(T, False, pairs) for T in (7, 8) for pairs in (1, 8, 66, 435)] == ["mma"] * 8
    # ... and the bulk tiling (the mma kernel with the final state through bulk copies) from 4 pairs per SM
    # at T = 3-4 and 7-8 (past the twin4 tiling's band: 529 on 132 SMs), from 9 at T = 5-6 (1188; v49; from
    # 12 at T >= 3 in v48, at T >= 5 before); never with per-token states.
    assert [pick(T, False, pairs) for T in range(3, 9) for pairs in (529, 1187, 1188)] == (
        ["bulk"] * 6 + ["mma", "mma", "bulk"] * 2 + ["bulk"] * 6)
    assert [pick(T, False, pairs) for T in range(3, 9) for pairs in (1584, 8192, 65536)] == ["bulk"] * 18
    assert [pick(T, True, pairs) for T in (3, 5, 8) for pairs in (1584, 8192)] == ["store"] * 6
    # In pairs per SM: 1584 pairs are 6 per SM on 264 SMs, 1056 are 4.
    assert [choose_spec(128, 128, T, "bf16", "fp32", writes_states=False, batch_heads=pairs,
                        sm_count=2 * SMS).tiling_name
            for T, pairs in ((5, 1584), (8, 1584), (4, 1056), (4, 1057))] == ["mma", "bulk", "twin4", "bulk"]
    assert [pick(2, False, pairs) for pairs in (32, 33, 67, 8192)] == ["short", "short", "wide", "bulk"]
    # Update mode on the mma kernel's grids: the twin tiling (two tiles per block, 3 blocks per SM) on more
    # than 2.3 and at most 3 pairs per SM (304-396 on 132 SMs) at T = 3-8, the twin4 tiling (4 blocks per SM)
    # on at most 4 (528) and more than 3.5 (463) at T = 3-4, more than 3.3 (436) at T = 5-8 (v42-v45); never
    # with per-token states.
    edges = (303, 304, 396, 397, 435, 436, 462, 463, 528, 529)
    for T in (3, 4):
        assert [pick(T, False, pairs) for pairs in edges] == (
            ["mma", "twin", "twin", "mma", "mma", "mma", "mma", "twin4", "twin4", "bulk"])
    for T in (5, 6, 7, 8):
        assert [pick(T, False, pairs) for pairs in edges] == (
            ["mma", "twin", "twin", "mma", "mma", "twin4", "twin4", "twin4", "twin4", "bulk" if T >= 7 else "mma"])
    assert [pick(T, True, pairs) for T in (3, 4, 8) for pairs in (331, 463)] == ["narrow"] * 4 + ["store"] * 2
    assert choose_spec(128, 128, 4, "bf16", "fp32", writes_states=False, batch_heads=528,
                       sm_count=2 * SMS).tiling_name == "mma"  # 2 pairs per SM
    assert choose_spec(64, 64, 4, "bf16", "fp32", writes_states=False, batch_heads=352,
                       sm_count=SMS).tiling_name == "wide"  # only measured at K = V = 128
    assert tiling_for(4)["MIN_BLOCKS"] == 5  # the wide tiling at T = 3-4 (head dims other than 128 since v48)
    assert pick(8, True, 32 * 32) == "store"
    # Fewer (b, hv) pairs than the narrow tiling needs to fill the SMs (16-row blocks) with per-token
    # states at T >= 5 (update mode: at T = 5-6 below 17 pairs): 4-row blocks; B = 1-2 at HV = 8 (64 or
    # 128 narrow blocks).
    assert [pick(T, True, 8) for T in (2, 4, 5, 8)] == ["narrow", "narrow", "spread", "spread"]
    assert [pick(T, True, 16) for T in (4, 5, 8)] == ["narrow", "spread", "spread"]
    # Other narrow grids at T >= 5: 8-row blocks (B = 3-4 and 8 at HV = 8, B = 1-2 at HV = 32, B = 1
    # at HV = 64), except at 2-3.5 narrow blocks per SM (265-462 on 132 SMs: B = 5-7 at HV = 8).
    assert [pick(T, True, 64) for T in (3, 4, 5, 8)] == ["narrow", "narrow", "slim", "slim"]
    assert [pick(T, True, 32) for T in (4, 5, 8)] == ["narrow", "slim", "slim"]
    pairs = (17, 32, 33, 34, 40, 56, 57, 58, 65)
    assert [pick(8, True, n) for n in pairs] == ["slim"] * 3 + ["narrow"] * 4 + ["slim"] * 2
    assert pick(8, True, 66) == "store"  # 132 wide blocks
    assert choose_spec(128, 64, 8, "bf16", "fp32", writes_states=False, batch_heads=1,
                       sm_count=SMS).tiling_name == "narrow"
    # Only measured at K = V = 128.
    assert choose_spec(64, 128, 8, "bf16", "fp32", writes_states=False, batch_heads=32 * 32,
                       sm_count=SMS).tiling_name == "wide"
    assert choose_spec(64, 64, 2, "bf16", "fp32", writes_states=True, batch_heads=8192,
                       sm_count=SMS).tiling_name == "wide"


def test_every_tiling_name_has_a_tiling():
    assert set(TILING_NAMES) == set(FIXED_TILINGS) | {"wide"}
    assert len(TILING_NAMES) == len(set(TILING_NAMES))


@pytest.mark.parametrize("K", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("V", SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("T", [1, 8, MAX_TOKENS])
@pytest.mark.parametrize("tiling", TILING_NAMES)
def test_name_round_trip_and_tiling(K, V, T, tiling):
    if tiling_for(1, tiling).get("MMA") and (K > MMA_MAX_HEAD_DIM_K or T > MMA_MAX_TOKENS):
        with pytest.raises(ValueError, match="mma tiling supports K <= 128 and T <= 8"):
            KernelSpec(K, V, T, "fp16", "fp32", tiling)
        return
    spec = KernelSpec(K, V, T, "fp16", "fp32", tiling)
    assert KernelSpec.from_name(spec.name) == spec
    assert spec.rows_per_block * spec.tiles_per_head == V
    assert spec.tiles_per_block * spec.blocks_per_head == spec.tiles_per_head
    assert spec.tiles_per_block == (min(2, spec.tiles_per_head) if tiling in ("twin", "twin4") else 1)
    assert spec.max_blocks_per_sm == (3 if tiling == "twin" else 0)
    assert spec.rows_per_block * spec.lanes_per_row <= spec.threads_per_block * spec.rows_per_thread
    assert K % (spec.lanes_per_row * 4) == 0


@pytest.mark.parametrize(
    "args",
    [(96, 128, 4, "bf16"), (128, 32, 4, "bf16"), (128, 128, 0, "bf16"), (128, 128, MAX_TOKENS + 1, "bf16"),
     (128, 128, 4, "fp32"), (128, 128, 4, "bf16", "bf16")],
)
def test_unsupported_specs_are_rejected(args):
    with pytest.raises(ValueError):
        KernelSpec(*args)


@pytest.mark.parametrize(
    "name", ["gdn_decode_k128", "gdn_mtp_k128_v128_t4_bf16_fp32_wide", "gdn_mtp_k128_v128_t4_bf16_fp32_tall"]
)
def test_from_name_rejects_other_names(name):
    with pytest.raises(ValueError):
        KernelSpec.from_name(name)


def test_param_struct_is_all_8_byte_fields():
    assert struct.calcsize(PARAM_STRUCT_FORMAT) == 8 * len(PARAM_FIELDS)
    names = [name for name, _ in PARAM_FIELDS]
    assert len(names) == len(set(names))
    kinds = [kind for _, kind in PARAM_FIELDS]
    assert kinds == sorted(kinds, key=lambda kind: kind != "ptr"), "pointers must come first (mtp packs them per call)"


def test_start_delay_policy():
    wave = 5 * SMS
    for T in (1, 3, 4, 8):
        spec = KernelSpec(128, 128, T, "bf16")
        for writes in (False, True):
            for grid in (wave // 2, wave, wave + 1, 2 * wave, 40 * wave):
                delayed = not writes and T >= 4 and grid > wave
                expected = (wave // 2, STAGGER_NS) if delayed else (0, 0)
                assert start_delay(spec, writes_states=writes, grid=grid, wave=wave) == expected, (T, writes, grid)
            assert start_delay_applies(spec, writes_states=writes) == (not writes and T >= 4)
    for T in (4, 8):  # the mma tiling: never
        spec = KernelSpec(128, 128, T, "bf16", tiling_name="mma")
        assert not start_delay_applies(spec, writes_states=False)
        assert start_delay(spec, writes_states=False, grid=40 * wave, wave=wave) == (0, 0)


def test_blocks_per_sm_cap_policy():
    """The store tiling's calls from STORE_CAP_FROM_TOKENS on grids of STORE_CAP_MIN_PAIRS_PER_SM (b, hv)
    pairs per SM or more run at most 5 blocks per SM at T = 4-5 and 4 from T = 6 (at K = V = 128, where it
    was measured); every other kernel keeps its tiling's MAX_BLOCKS (0: no cap)."""
    assert STORE_CAP_FROM_TOKENS == min(STORE_CAP_BLOCKS) == 4
    assert [store_cap_blocks(T) for T in range(1, MAX_TOKENS + 1)] == [0, 0, 0, 5, 5] + [4] * (MAX_TOKENS - 5)
    edge = STORE_CAP_MIN_PAIRS_PER_SM * SMS
    for T in range(1, MAX_TOKENS + 1):
        for tiling in TILING_NAMES:
            if tiling_for(T, tiling).get("MMA") and T > MMA_MAX_TOKENS:
                continue
            spec = KernelSpec(128, 128, T, "fp16", tiling_name=tiling)
            for pairs in (1, int(edge) - 1, int(edge), math.ceil(edge), 40 * SMS, 400 * SMS):
                capped = tiling == "store" and T >= 4 and pairs >= edge
                expected = (5 if T <= 5 else 4) if capped else spec.max_blocks_per_sm
                assert blocks_per_sm_cap(spec, batch_heads=pairs, sm_count=SMS) == expected, (T, tiling, pairs)
                if capped:  # a cap below what fits by registers, or it would not change the launch
                    assert spec.max_blocks_per_sm == 0
    for K, V in [(64, 128), (128, 256), (256, 256)]:  # other head dims: not measured, not capped
        for T in (4, 8):
            spec = KernelSpec(K, V, T, "bf16", tiling_name="store")
            assert blocks_per_sm_cap(spec, batch_heads=400 * SMS, sm_count=SMS) == 0
    # the calls it caps: per-token states on large grids, which the dispatcher gives the store tiling
    for T, cap in [(4, 5), (5, 5), (8, 4)]:
        spec = choose_spec(128, 128, T, "bf16", "fp32", writes_states=True, batch_heads=64 * SMS, sm_count=SMS)
        assert spec.tiling_name == "store"
        assert blocks_per_sm_cap(spec, batch_heads=64 * SMS, sm_count=SMS) == cap
        spec = choose_spec(128, 128, T, "bf16", "fp32", writes_states=False, batch_heads=64 * SMS, sm_count=SMS)
        assert blocks_per_sm_cap(spec, batch_heads=64 * SMS, sm_count=SMS) == spec.max_blocks_per_sm


def test_early_state_fetch_policy():
    wave = 8 * SMS
    # Half a wave, except for the short-chain tilings in update mode.
    for tiling, writes in [("wide", False), ("narrow", False), ("slim", True), ("spread", True)]:
        spec = KernelSpec(128, 128, 8, "bf16", tiling_name=tiling)
        for grid, early in [(1, True), (wave // 2, True), (wave // 2 + 1, False), (40 * wave, False)]:
            assert prefetch_state(spec, grid, wave, writes_states=writes) == early, (tiling, writes, grid)
    # The short-chain tilings in update mode: up to a whole wave.
    for tiling in ("slim", "spread", "short"):
        spec = KernelSpec(128, 128, 8, "bf16", tiling_name=tiling)
        assert spec.short_chain and prefetch_state(spec, wave, wave, writes_states=False)
        assert not prefetch_state(spec, wave + 1, wave, writes_states=False)
    assert not KernelSpec(128, 128, 8, "bf16", tiling_name="narrow").short_chain
    bits = list(FLAGS.values())
    assert len(set(bits)) == len(bits) and all(bit & (bit - 1) == 0 for bit in bits)
