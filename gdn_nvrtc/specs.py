"""The compile-time key of a kernel, the prebuilt list, and the kernel's parameter ABI.

Compile-time (one cubin per value, because they size register arrays or unroll loops):
  - K and V, the head dimensions: each thread keeps its slice of the [V, K] state
    tile in registers, so the slice length must be a constant;
  - T, the number of draft tokens: the token loop is fully unrolled so the state
    never leaves registers between tokens;
  - the dtype of q/k/v/output and of the state pool: they set the width of the
    vector loads and the conversion instructions on the hot path.

Run-time (kernel parameters, so one cubin serves them all): B, H, HV, the pool
size, every pointer and stride, the dtypes of a/b/dt_bias and of the index
tensors (read once per block, so a branch costs nothing), scale, and the mode
flags (l2norm, final write-back, intermediate buffer, per-token scatter).
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_NAMES = ("bf16", "fp16")
STATE_DTYPE_NAMES = ("fp32",)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
MAX_TOKENS = 16
ARCH = "sm_90a"

PREBUILT_HEAD_DIM = 128
PREBUILT_TOKENS = tuple(range(1, 9))

# How a block tiles the [V, K] state: THREADS threads; each V-row is shared by K / ELEMS_PER_LANE
# lanes; each thread updates ROWS_PER_THREAD rows; MIN_BLOCKS is the launch-bounds occupancy hint
# (0: none, the compiler's choice). SHORT_CHAIN marks the spread and slim tilings (grids smaller than
# one wave at T >= 5) and the short one (T <= 2, update mode, v37): their token loop takes the decay's
# rescale as a multiply and its reciprocal in one instruction, so no branch or call sits between tokens
# (v17: with the slim and early-fetch choices below, up to 21% faster at B = 1-8, 1% slower at two H100
# points; it cost the narrow tiling at 4 blocks per SM and grew the other tilings' registers). Each call
# picks one of eleven tilings (choose_spec), from measurements on an H200 (benchmarks/NOTES.md):
#   wide      update mode at T <= 2 from one wave outside the short tiling's bands, up to the bulk
#             tiling's grids; buffer and scatter at T = 1. The tiling of head dims other than 128 (at
#             T = 3-4 with a 96-register cap, 5 blocks per SM; at K = V = 128 it served update calls
#             above 8 pairs per SM there until v48).
#   narrow    16 rows per block, for grids that would leave SMs idle with the wide tiling
#             (B = 1) and are not the mma or short tilings': two (T <= 2) or four times the blocks, less
#             token-loop work per thread; buffer and scatter at T = 2 below the staged tiling's grids.
#   spread    4 rows per block, 32 lanes per row, at T >= 5 for grids that leave SMs idle even with
#             the narrow tiling (B = 1-2 at HV = 8; in update mode only at T = 5-6 below the mma
#             tiling's grids): four times its blocks, a quarter of its arithmetic per thread and token.
#   slim      8 rows per block, 16 lanes per row, at T >= 5 for the other narrow grids (update mode:
#             as the spread tiling), except those of 2-3.5 narrow blocks per SM (B = 5-7 at HV = 8 on
#             132 SMs), where the narrow tiling stayed faster (v17); twice the narrow tiling's blocks,
#             half of its arithmetic per thread and token.
#   store     buffer and scatter calls at T >= 3: fewer registers per thread, more blocks per SM,
#             which suits a kernel that writes T + 1 states per state read. At T = 3-4 on grids of
#             up to 8 (b, hv) pairs per SM the narrow tiling does that better (v30, H200: 12-16% at
#             128 pairs, 2.5-5% at 256, 0-1.3% at 512-1024; at 4096 pairs it lost 0.8%). At T >= 4 on
#             large grids its launch holds it to 4-5 blocks per SM (STORE_CAP_BLOCKS, v53-v54).
#   mma       the token loop in chunk form with the state products on the tensor cores (fewer
#             instructions per state element), 128 registers so that 4 blocks of 4 warps fit per SM.
#             Update mode at T >= 7 on every grid, at T = 5-6 from 1/8 (b, hv) pair per SM, at T = 4
#             from 1/4 and at T = 3 from 0.45 pairs per SM (v31, v32, v48, H200: up to 43% faster on the
#             small grids, 3-12% on 2.4-12 pairs per SM, see _mma_pays); buffer and scatter at T = 3-8
#             on the grids where each SM gets 2 or 4 of its blocks (1.75-2 pairs per SM; at T = 7-8 also
#             0.93-1; at T = 3-4 also 1.15-1.4, v47, see MMA_STATES_BANDS); in update mode the bulk
#             and twin tilings below take some of these grids.
#   short     the narrow tiling with the short chain (as the slim and spread tilings), in update mode at
#             T <= 2 on grids the wide tiling fills only in part: up to 0.5, more than 1.12 and at most
#             1.8, or more than 2.1 and at most 3 (b, hv) pairs per SM (v37, H200: 2-7% faster there, up
#             to 4% below 0.5; at 1 and 2 pairs per SM, the wide tiling's whole wave, 2.5-8% slower).
#   bulk      the mma tiling's kernel with its final state stored through shared memory and bulk copies
#             (cp.async.bulk, one 512-byte row per copy) instead of st.global: update mode on grids of at
#             least BULK_MIN_PAIRS_PER_SM[T] (b, hv) pairs per SM, 4 at T = 3-4 and 7-8, 9 at T = 5-6,
#             12 at T = 1, 7.5 at T = 2 (v35, v48, v49, H200: 0.4-3.2% faster than the mma tiling, and at T <= 2
#             than the wide one, on those grids up to 248 pairs per SM; level or mixed below).
#   twin      the mma tiling's kernel with two tiles of a (b, hv) pair per block, one after the other,
#             the second tile's state copies landing while the first computes, the Gram products and
#             coefficient rows made once per block while the first tile's state is in flight (v43); up
#             to 168 registers and at most 3 blocks per SM (MAX_BLOCKS). Update mode at T = 3-8 on more
#             than 2.3 and at most 3 pairs per SM, where its blocks are one wave and the mma tiling's are
#             1.15-1.5 (v42, v43, H200: 2-11% faster).
#   twin4     the same at 128 registers, 4 blocks per SM: update mode on at most 4 pairs per SM and more
#             than 3.5 at T = 3-4 (v42, H200: 2.5-6% faster), more than 3.3 at T = 5-8 (v44, v45, H200:
#             1.5-9% faster; its T = 7 kernel is compiled with ptxas -O1, see PTXAS_O1_SPECS).
#   staged    the narrow tiling with its per-token states stored through shared memory and bulk copies
#             (STATES_BULK: one row per copy): buffer and scatter calls at T = 2 from
#             STAGED_MIN_PAIRS_PER_SM (b, hv) pairs per SM (v49, v50, H200: scatter 0.3-1.3% faster, buffer
#             level, from 9.7 pairs per SM).
WIDE_TILINGS = (  # (largest T, tiling)
    (2, {"THREADS": 64, "ELEMS_PER_LANE": 32, "ROWS_PER_THREAD": 2, "MIN_BLOCKS": 0}),
    (4, {"THREADS": 128, "ELEMS_PER_LANE": 16, "ROWS_PER_THREAD": 4, "MIN_BLOCKS": 5}),  # fits 96 registers
    (MAX_TOKENS, {"THREADS": 128, "ELEMS_PER_LANE": 16, "ROWS_PER_THREAD": 4, "MIN_BLOCKS": 0}),
)
NARROW_TILING = {"THREADS": 128, "ELEMS_PER_LANE": 16, "ROWS_PER_THREAD": 1, "MIN_BLOCKS": 0}
SPREAD_TILING = {"THREADS": 128, "ELEMS_PER_LANE": 4, "ROWS_PER_THREAD": 1, "MIN_BLOCKS": 0, "SHORT_CHAIN": 1}
SPREAD_FROM_TOKENS = 5  # measured at T = 2-8 (benchmarks/NOTES.md v13); below, the narrow tiling was faster
SLIM_TILING = {"THREADS": 128, "ELEMS_PER_LANE": 8, "ROWS_PER_THREAD": 1, "MIN_BLOCKS": 0, "SHORT_CHAIN": 1}
SLIM_FROM_TOKENS = 5  # measured at T = 4-8 (benchmarks/NOTES.md v14)
SLIM_NOT_NARROW_WAVES = (2.0, 3.5)  # narrow blocks per SM where the narrow tiling stays (v17; v14: <= 3.5)
STORE_TILING = {"THREADS": 128, "ELEMS_PER_LANE": 8, "ROWS_PER_THREAD": 2, "MIN_BLOCKS": 0}
MMA_TILING = {"THREADS": 128, "MMA": 1, "MIN_BLOCKS": 4}  # 128 registers: 4 warps per scheduler
MMA_MAX_HEAD_DIM_K = 128  # a lane holds K / 2 state values; at K = 256 the kernel spills
MMA_MAX_TOKENS = 8  # beyond, its static shared memory (the state tile's staging) exceeds 48 KB at K = 128
MMA_FROM_TOKENS = 3  # measured at T = 2-8 on an H200 (benchmarks/NOTES.md v31); at T = 2 it lost (its bulk
# form takes the large update grids at T <= 2 since v49, BULK_MIN_PAIRS_PER_SM)
MMA_ALWAYS_FROM_TOKENS = 7  # update mode: every grid (v31: B = 1 at HV = 8, T = 8 included)
MMA_MID_TOKENS = 5  # T = 5-6, update mode: from MMA_MID_MIN_PAIRS_PER_SM
MMA_MID_MIN_PAIRS_PER_SM = 0.125  # 8 pairs on 132 SMs lost (T = 6), 32 gained
# T = 3-4, update mode: from this many (b, hv) pairs per SM, on every larger grid (v48, H200, against the
# tilings taken without it: at T = 3 40-56 pairs 2-6% slower, 64 1.5% faster; at T = 4 40 pairs 7% faster;
# 320-1056 pairs 3-12% faster at both; 1088-1600 (8.2-12.1 per SM) 3-6% faster, and its bulk form
# (BULK_MIN_PAIRS_PER_SM: from 4 pairs per SM since v49, 12 in v48) 1-4% faster up to 32768 pairs (248 per
# SM). v31-v47 stopped at 8 per SM: v31 measured 2048 pairs slower with the plain mma tiling, before its state
# copy moved to whole lines (v40).
MMA_FEW_MIN_PAIRS_PER_SM = {3: 0.45, 4: 0.25}
MMA_FEW_MAX_PAIRS_PER_SM = float("inf")  # 8 before v48 (benchmarks/tune.py's variant mma_few_v47)
# Buffer and scatter calls (per-token states): the (low, high] bands of (b, hv) pairs per SM, by T, where the mma
# tiling beats the store / narrow / slim tilings (v47, H200, a sweep of 0.79-2.91 pairs per SM at T = 3-8, H=4 HV=8
# and H=16 HV=32 alike at equal pairs). Its two 64-row blocks per pair at 4 per SM win where every SM gets 2 or 4 of
# them: 1.82-1.94 pairs per SM 0.5-6.9% faster at every T, 0.97 5-7% at T = 7-8 (at T = 4 there v32 measured a 7-8%
# loss; T = 3, 5, 6 not measured); they lose where some SMs get 3 (1.03-1.7 at T = 5-8: up to 27% slower; 1.03-1.09
# and 1.45-1.7 at T = 3-4) and beyond one wave (2.18-2.91: 0.2-12% slower). T = 3-4 also gain on 1.21-1.33 (3-9%).
# Before v47: (1, 3] at every T and (0.75, 3] from T = 7 (v31-v32 measured 64, 128, 256 and 512 pairs only).
MMA_STATES_BANDS = {  # T: bands (no entry: never)
    3: ((1.15, 1.4), (1.75, 2.0)),
    4: ((1.15, 1.4), (1.75, 2.0)),
    5: ((1.75, 2.0),),
    6: ((1.75, 2.0),),
    7: ((0.93, 1.0), (1.75, 2.0)),
    8: ((0.93, 1.0), (1.75, 2.0)),
}
SHORT_TILING = {**NARROW_TILING, "SHORT_CHAIN": 1}
SHORT_MAX_TOKENS = 2  # measured at T = 1-2 (v37); at T = 3-4 the mma tiling takes most of these grids
# (low, high]: (b, hv) pairs per SM where update calls take the short tiling. The wide tiling's 64-thread
# blocks fit 8 per SM, a wave of 2 pairs per SM: the upper bands are 0.56-0.9 and 1.05-1.5 of its waves,
# where its last wave leaves part of the GPU idle (v37, H200, 132 SMs: 144 pairs 2.4% slower, 152-232 2-7%
# faster, 240 level, 248-264 3-8% slower, 272 level, 288-396 2.6-7% faster, 400-448 level). On the
# smallest grids (the narrow tiling below 33 pairs, the wide one with its early state fetch from there)
# 8-64 pairs gained 1.4-4% at T = 2 and 0.3-1.5% at T = 1; 80 pairs lost 9% and 128 4-10%.
SHORT_UPDATE_PAIRS_PER_SM = ((0, 0.5), (1.12, 1.8), (2.1, 3.0))
BULK_TILING = {**MMA_TILING, "BULK_FINAL": 1}
# Update calls take the bulk tiling from this many (b, hv) pairs per SM, by T (v49, H200, tune.py, H=4 HV=8,
# H=16 HV=32 and H=16 HV=64 against the tiling taken without it):
# - T = 1 (against the wide tiling): 256 pairs 2% faster, 512 2% slower, 1024 level, 2048-8192 (15.5-62 per
#   SM) 1-2.6% faster;
# - T = 2 (against the wide tiling): 384 pairs 6% slower, 512 0.7-3% slower, 640 1.6% faster, 768 and 896
#   level, 1024 (7.8 per SM) 0.4-0.8% faster, 1536-32768 (11.6-248) 0.9-3.2% faster;
# - T = 3-4 and 8 (against the mma tiling): 576-1280 pairs (4.4-9.7 per SM) 1.2-3.2% faster at H=4 HV=8,
#   768 1.2% (T = 3-4) and 0.8% (T = 8) at H=16 HV=32; below 4 pairs per SM (outside the twin tilings'
#   bands) mixed: 1.45 level, 2.18 0.8% slower to 1.4% faster, 3.03 0.3% faster to 1.7% slower;
# - T = 5-6: 768 and 1024 pairs (5.8 and 7.8 per SM) level to 0.5% slower, 1280 (9.7) 1.2-1.3% faster; from
#   15.5 0.4-1.8% faster (v35);
# - T = 7 follows T = 8 (measured in v49's check, see benchmarks/NOTES.md);
# - T = 1 at 1088 and 1280 pairs (8.2 and 9.7 per SM): level and 0.4% faster, so its edge stays at 12.
# Before v49: 12 at T >= 3 (v48; T >= 5 since v35), never at T <= 2.
BULK_MIN_PAIRS_PER_SM = {1: 12, 2: 7.5, 3: 4, 4: 4, 5: 9, 6: 9, 7: 4, 8: 4}
# MAX_BLOCKS: at most this many blocks per SM, whatever registers the compiler takes (the launch adds
# unused dynamic shared memory where more would fit; v43: the twin kernel at T = 4 compiles to 128
# registers, and 4 blocks per SM on a grid of under 3 were 14% slower than 3).
TWIN_TILING = {**MMA_TILING, "TWO_TILES": 1, "MIN_BLOCKS": 3, "MAX_BLOCKS": 3}
TWIN4_TILING = {**MMA_TILING, "TWO_TILES": 1}
# (low, high]: (b, hv) pairs per SM where update calls take the twin tilings (v42, H200, 132 SMs, HV = 32
# and 64 against the mma tiling: twin at 2.67 and 2.91 pairs per SM 3.2-8.4% faster at T = 3-8, at 2.42
# from 3.8% faster to 0.7% slower, at 3.15-4.12 7-28% slower; twin4 at T = 3-4 at 3.64 and 3.88 2.5-6.1%
# faster, at 3.39 level to 1% slower, at 3.15 and 4.12 4-7% slower, at T >= 5 1.8-30% slower). v43 (the
# twin block's Gram products once, early): at 2.42 (HV = 32) 1.4-6.4% faster at T = 3-8, at 2.18 3.8% slower
# at T = 3, 4% faster at T = 6, level at T = 8; 2.18-2.42 unmeasured.
# v44 (the twin kernels with fewer registers: twin4 spill-free at T = 5, 6 and 8, 24 B at T = 7), twin4 against
# the mma tiling at T = 5-8 (HV = 32; HV = 64 at 3.39 and 3.88): 3.64 and 3.88 pairs per SM 5-9% faster, 3.39
# 1.5-4% faster at T = 5, 6 and 8 and level at T = 7, 3.15 1.3% faster at T = 5 and 2% slower at T = 8, 4.12
# 6-11% slower; the twin tiling 7-30% slower than the mma tiling at 3.15-4.12.
TWIN_PAIRS_PER_SM = (2.3, 3.0)
TWIN4_PAIRS_PER_SM = (3.5, 4.0)  # T = 3-4
TWIN4_LONG_FROM_TOKENS = 5  # ... and from here on (3.3, 4] pairs per SM:
TWIN4_LONG_PAIRS_PER_SM = (3.3, 4.0)
TWIN4_TOKENS = (3, 4, 5, 6, 7, 8)
# (tiling, T) compiled with ptxas -O1 instead of its default -O3: twin4 at T = 7 spills 24 B at -O3 (v44) and
# takes 109 registers and no spill at -O1 (v45, H200: 2.5-7.5% faster than the mma tiling on 3.39-3.88 pairs
# per SM, where the spilling -O3 kernel was level to 6% faster). Not elsewhere: every mma-family kernel
# at -O1 was 0.5-4% slower than at -O3 (v45).
PTXAS_O1_SPECS = (("twin4", 7),)
TILING_NAMES = ("wide", "narrow", "store", "mma", "spread", "slim", "bulk", "short", "twin", "twin4", "staged")
STORE_FROM_TOKENS = 3  # buffer/scatter calls with fewer tokens keep the wide tiling
NARROW_STATES_MAX_TOKENS = 4  # ... and up to this many take the narrow tiling on small grids (v30)
NARROW_STATES_MAX_PAIRS_PER_SM = 8
# Per-token states at T = 2: the narrow tiling on every grid (H200, 132 SMs; v36 against the wide tiling:
# 48-464 pairs 0.7-12% faster, 512 pairs 0.4-0.7% slower; v38: 768 pairs 1.2-2% faster than the wide tiling,
# 1024-32768 pairs 0.15-1.5% faster than the 32-row tiling with 2 rows per thread that served them since v15,
# 512 pairs level to 0.35% slower). Not at T = 1, where it lost 3-9% from 128 pairs.
NARROW_STATES_TOKENS = 2
# ... and from this many (b, hv) pairs per SM its staged form (STAGED_TILING: the per-token states through
# shared memory and bulk copies). H200, 132 SMs, tune.py A/B against the narrow tiling, H=4 HV=8 and H=16
# HV=32: v49, from 2048 pairs (15.5 per SM) scatter 0.9-1.3% faster, buffer 0.3% slower at 2048 and level
# to 0.6% faster from 4096, at 1024 pairs (7.8) scatter level to 0.5% faster and buffer level to 0.4%
# slower, at 256 buffer 1.4% slower; v50, scatter 0.3-1% faster at 9.7-13.6 per SM and 1.1-1.2% at 15.5
# and 31, buffer level (within 0.2%) at 7.8-31, scatter level at 7.8.
STAGED_MIN_PAIRS_PER_SM = 9
STAGED_TILING = {**NARROW_TILING, "STATES_BULK": 1}


# Per-token states on the store tiling at T >= STORE_CAP_FROM_TOKENS on grids of at least
# STORE_CAP_MIN_PAIRS_PER_SM (b, hv) pairs per SM: at most store_cap_blocks(T) of its blocks per SM (7-8 fit by
# its registers), launched with unused dynamic shared memory (blocks_per_sm_cap). STORE_CAP_BLOCKS maps the
# first T of a band to its cap. A call that writes T states per state read is a write-heavy stream, and such
# streams moved more bytes per second with fewer bytes in flight per SM (v53, H200, benchmarks/stream_mix.py: a
# contiguous 1 : 8 read : write stream at 0.91 of the copy bandwidth with 8 blocks of 4 KB per SM, 0.95 with 2).
# v53, H200, tune.py against the uncapped launch at K = V = 128: 4 blocks at T = 6-8 buffer 0.4-2.0% faster,
# scatter level to 1.2% faster on 15.5-248 pairs per SM (H=16 HV=32 and 64, H=4 HV=8); at 7.8 pairs per SM
# buffer 0.3-0.7% faster, scatter 0.2-1.1% slower; at most 3 blocks per SM 3-12% slower, 5 or 6 gained less.
# At T = 4-5 against the uncapped launch (v53, two rounds, 15.5-124 pairs per SM): 4 blocks from 0.6% faster to
# 1.8% slower, 5 blocks buffer 0.9-1.5% faster and scatter level to 0.6% faster; v54 (two rounds, 15.5-124 pairs
# per SM), 5 blocks against it: buffer 0.4-0.9% faster, scatter 0.3-0.6% faster at HV = 32 and level to 0.4% slower
# at H=4 HV=8, and 4 blocks at T = 4 1.7-3.1% slower than 5. At T = 3, 5 blocks 0.3-0.8% slower (v53).
STORE_CAP_BLOCKS = {4: 5, 6: 4}
STORE_CAP_FROM_TOKENS = min(STORE_CAP_BLOCKS)
STORE_CAP_MIN_PAIRS_PER_SM = 12


def store_cap_blocks(num_tokens: int) -> int:
    """The store tiling's cap on blocks per SM at T = num_tokens on large grids (0: none below the first
    band): the entry of STORE_CAP_BLOCKS whose band holds T."""
    bands = [first for first in STORE_CAP_BLOCKS if first <= num_tokens]
    return STORE_CAP_BLOCKS[max(bands)] if bands else 0


# The tilings that do not depend on T (wide does, through WIDE_TILINGS).
FIXED_TILINGS = {
    "narrow": NARROW_TILING, "store": STORE_TILING, "mma": MMA_TILING, "spread": SPREAD_TILING,
    "slim": SLIM_TILING, "bulk": BULK_TILING, "short": SHORT_TILING, "twin": TWIN_TILING, "twin4": TWIN4_TILING,
    "staged": STAGED_TILING,
}


# STORE_CS, by tiling: from this T on, the per-token states (buffer and scatter mode) are stored with the
# streaming cache hint, st.global.cs (v46, H200, against plain stores): the store tiling 0.5-1.2% faster at
# T = 4-8 (1024-4096 pairs), level to 0.3% faster at T = 3; the narrow tiling 0.3-0.9% faster at T = 3-4
# (512-1024 pairs), 0.2-0.8% slower at T = 2; the mma tiling 2.7-3.6% faster at T = 7-8 on one pair per
# SM, level to 0.7% faster at T = 6-8 on 2-3, level at T = 4 and 0.5-0.7% slower at T = 3 on 2, and its
# update calls level (T = 6-8: within 0.3% either way; at T = 5, 0.5% slower).
STREAMING_STATES_FROM_TOKENS = {"store": STORE_FROM_TOKENS, "narrow": 3, "mma": 6}


def tiling_for(num_tokens: int, name: str = "wide") -> dict:
    if name in FIXED_TILINGS:
        tiling = dict(FIXED_TILINGS[name])
    else:
        tiling = dict(next(tiling for largest, tiling in WIDE_TILINGS if num_tokens <= largest))
    if num_tokens >= STREAMING_STATES_FROM_TOKENS.get(name, MAX_TOKENS + 1):
        tiling["STORE_CS"] = 1
    return tiling


@dataclass(frozen=True)
class KernelSpec:
    """Everything a cubin is specialised on; its name is the kernel's symbol."""

    head_dim_k: int
    head_dim_v: int
    num_tokens: int
    input_dtype: str
    state_dtype: str = "fp32"
    tiling_name: str = "wide"

    def __post_init__(self) -> None:
        if self.head_dim_k not in SUPPORTED_HEAD_DIMS or self.head_dim_v not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"K and V must each be one of {SUPPORTED_HEAD_DIMS}, got K={self.head_dim_k}, V={self.head_dim_v}"
            )
        if not 1 <= self.num_tokens <= MAX_TOKENS:
            raise ValueError(f"T must be in 1..{MAX_TOKENS}, got {self.num_tokens}")
        if self.input_dtype not in DTYPE_NAMES:
            raise ValueError(f"input dtype must be one of {DTYPE_NAMES}, got {self.input_dtype!r}")
        if self.state_dtype not in STATE_DTYPE_NAMES:
            raise ValueError(f"state dtype must be one of {STATE_DTYPE_NAMES}, got {self.state_dtype!r}")
        if self.tiling_name not in TILING_NAMES:
            raise ValueError(f"tiling must be one of {TILING_NAMES}, got {self.tiling_name!r}")
        if self.uses_mma and (self.head_dim_k > MMA_MAX_HEAD_DIM_K or self.num_tokens > MMA_MAX_TOKENS):
            raise ValueError(
                f"the mma tiling supports K <= {MMA_MAX_HEAD_DIM_K} and T <= {MMA_MAX_TOKENS}, "
                f"got K={self.head_dim_k}, T={self.num_tokens}"
            )

    @property
    def name(self) -> str:
        suffix = "" if self.tiling_name == "wide" else f"_{self.tiling_name}"
        return (
            f"gdn_mtp_k{self.head_dim_k}_v{self.head_dim_v}_t{self.num_tokens}"
            f"_{self.input_dtype}_{self.state_dtype}{suffix}"
        )

    @classmethod
    def from_name(cls, name: str) -> KernelSpec:
        parts = name.split("_")
        if len(parts) not in (7, 8) or parts[:2] != ["gdn", "mtp"] or parts[7:] == ["wide"]:
            raise ValueError(f"not a kernel name: {name!r}")
        tiling = parts[7] if len(parts) == 8 else "wide"
        return cls(int(parts[2][1:]), int(parts[3][1:]), int(parts[4][1:]), parts[5], parts[6], tiling)

    @property
    def compile_options(self) -> tuple[str, ...]:
        """NVRTC options for this kernel on top of compiler.NVRTC_OPTIONS."""
        return ("--ptxas-options=-O1",) if (self.tiling_name, self.num_tokens) in PTXAS_O1_SPECS else ()

    @property
    def tiling(self) -> dict:
        return tiling_for(self.num_tokens, self.tiling_name)

    @property
    def threads_per_block(self) -> int:
        return self.tiling["THREADS"]

    @property
    def uses_mma(self) -> bool:
        """The chunk-form kernel whose state products run on the tensor cores (16 rows per warp)."""
        return bool(self.tiling.get("MMA"))

    @property
    def short_chain(self) -> bool:
        """The token loop without a branch or a call per token (the spread, slim and short tilings)."""
        return bool(self.tiling.get("SHORT_CHAIN"))

    @property
    def streaming_state_stores(self) -> bool:
        """The per-token states (buffer and scatter mode) stored with the streaming cache hint (st.global.cs):
        tiling key STORE_CS, set by STREAMING_STATES_FROM_TOKENS."""
        return bool(self.tiling.get("STORE_CS"))

    @property
    def states_bulk(self) -> bool:
        """The per-token states stored through shared memory and bulk copies (the scalar kernel; tiling key
        STATES_BULK: the staged tiling, and benchmarks/tune.py's variant states_bulk on any scalar tiling)."""
        return not self.uses_mma and bool(self.tiling.get("STATES_BULK"))

    @property
    def bulk_final(self) -> bool:
        """The final state stored through shared memory and bulk copies (cp.async.bulk), not st.global
        (the bulk tiling: the mma tiling's kernel otherwise)."""
        return bool(self.tiling.get("BULK_FINAL"))

    @property
    def two_tiles(self) -> bool:
        """Each block takes two tiles of its (b, hv) pair, one after the other, the second tile's state
        copies in flight while the first computes (the twin tilings: the mma kernel only)."""
        return self.uses_mma and bool(self.tiling.get("TWO_TILES"))

    @property
    def lanes_per_row(self) -> int:
        """Threads that share one V-row of the state (each holds K / lanes values); in the mma form a
        quad of lanes holds two rows."""
        if self.uses_mma:
            return 4
        # A row's lanes stay within one warp (the spread tiling at K = 256: 8 values per lane).
        return min(32, max(1, self.head_dim_k // self.tiling["ELEMS_PER_LANE"]))

    @property
    def rows_per_thread(self) -> int:
        """Independent V-rows each thread updates (more rows: more work in flight), at most V per block."""
        if self.uses_mma:
            return 2
        groups = self.threads_per_block // self.lanes_per_row
        return max(1, min(self.tiling["ROWS_PER_THREAD"], self.head_dim_v // groups))

    @property
    def min_blocks_per_sm(self) -> int:
        # The hint was measured (and fits without spills) at the prebuilt K = V = 128 only.
        prebuilt_dims = self.head_dim_k == self.head_dim_v == PREBUILT_HEAD_DIM
        return self.tiling["MIN_BLOCKS"] if prebuilt_dims else 0

    @property
    def max_blocks_per_sm(self) -> int:
        """At most this many blocks per SM (0: as many as fit): the launch pads the dynamic shared memory
        (driver.shared_bytes_for_at_most)."""
        return self.tiling.get("MAX_BLOCKS", 0)

    @property
    def rows_per_block(self) -> int:
        if self.uses_mma:
            return 16 * (self.threads_per_block // 32)
        return self.threads_per_block // self.lanes_per_row * self.rows_per_thread

    @property
    def tiles_per_head(self) -> int:
        return self.head_dim_v // self.rows_per_block

    @property
    def tiles_per_block(self) -> int:
        return min(2, self.tiles_per_head) if self.two_tiles else 1

    @property
    def blocks_per_head(self) -> int:
        return self.tiles_per_head // self.tiles_per_block


def _mma_pays(K: int, V: int, T: int, batch_heads: int, sm_count: int, *, writes_states: bool) -> bool:
    """Whether the mma tiling is the faster choice (measured at K = V = 128 on an H200, v31: tune.py,
    every mode against the shipped choice of v30). Its 64-row blocks hold 4 per SM; at T >= 5 its
    chunk form beats every scalar tiling but on the smallest grids, at T = 3-4 from 1/4 or 0.45 pairs
    per SM (v48: on every larger grid; its bulk form from BULK_MIN_PAIRS_PER_SM), and with per-token states only
    where each SM gets 2 or 4 of its blocks (and at T = 3-4 on 1.15-1.4 pairs per SM; v47:
    MMA_STATES_BANDS); elsewhere the store and narrow tilings'
    smaller blocks share the grid out more evenly."""
    if not (K == V == PREBUILT_HEAD_DIM and MMA_FROM_TOKENS <= T <= MMA_MAX_TOKENS):
        return False
    pairs_per_sm = batch_heads / sm_count
    if writes_states:
        return any(low < pairs_per_sm <= high for low, high in MMA_STATES_BANDS.get(T, ()))
    if T >= MMA_ALWAYS_FROM_TOKENS:
        return True
    if T >= MMA_MID_TOKENS:
        return pairs_per_sm >= MMA_MID_MIN_PAIRS_PER_SM
    return MMA_FEW_MIN_PAIRS_PER_SM[T] <= pairs_per_sm <= MMA_FEW_MAX_PAIRS_PER_SM


def _twin_pays(T: int, pairs_per_sm: float) -> str | None:
    """The twin tiling that beats the mma tiling on an update-mode grid of the mma tiling's, if one does."""
    low, high = TWIN_PAIRS_PER_SM
    if low < pairs_per_sm <= high:
        return "twin"
    low, high = TWIN4_LONG_PAIRS_PER_SM if T >= TWIN4_LONG_FROM_TOKENS else TWIN4_PAIRS_PER_SM
    if T in TWIN4_TOKENS and low < pairs_per_sm <= high:
        return "twin4"
    return None


def _bulk_pays(T: int, batch_heads: int, sm_count: int, *, writes_states: bool) -> bool:
    """Whether an update-mode call takes the bulk tiling (BULK_MIN_PAIRS_PER_SM; measured at K = V = 128 only,
    which the callers check)."""
    low = BULK_MIN_PAIRS_PER_SM.get(T)
    return not writes_states and low is not None and batch_heads >= low * sm_count


def _short_pays(pairs_per_sm: float) -> bool:
    return any(low < pairs_per_sm <= high for low, high in SHORT_UPDATE_PAIRS_PER_SM)


def choose_spec(
    K: int, V: int, T: int, input_dtype: str, state_dtype: str, *, writes_states: bool, batch_heads: int,
    sm_count: int,
) -> KernelSpec:
    """The kernel for a call: its shape, whether it writes per-token states (buffer or scatter),
    B * HV and the GPU's multiprocessor count (see the tilings above)."""
    if _mma_pays(K, V, T, batch_heads, sm_count, writes_states=writes_states):
        twin = _twin_pays(T, batch_heads / sm_count) if not writes_states else None
        if twin:
            return KernelSpec(K, V, T, input_dtype, state_dtype, twin)
        bulk = _bulk_pays(T, batch_heads, sm_count, writes_states=writes_states)
        return KernelSpec(K, V, T, input_dtype, state_dtype, "bulk" if bulk else "mma")
    wide = KernelSpec(K, V, T, input_dtype, state_dtype)
    blocks = batch_heads * wide.tiles_per_head
    measured = K == V == PREBUILT_HEAD_DIM  # the head dims the choices below were measured at
    if measured and T < MMA_FROM_TOKENS and _bulk_pays(T, batch_heads, sm_count, writes_states=writes_states):
        return KernelSpec(K, V, T, input_dtype, state_dtype, "bulk")
    if not writes_states and T <= SHORT_MAX_TOKENS and measured and _short_pays(batch_heads / sm_count):
        return KernelSpec(K, V, T, input_dtype, state_dtype, "short")
    if blocks < sm_count:
        narrow_blocks = batch_heads * KernelSpec(K, V, T, input_dtype, state_dtype, "narrow").tiles_per_head
        if measured and T >= SPREAD_FROM_TOKENS and narrow_blocks < sm_count:
            name = "spread"
        elif measured and T >= SLIM_FROM_TOKENS and not (
            SLIM_NOT_NARROW_WAVES[0] * sm_count < narrow_blocks <= SLIM_NOT_NARROW_WAVES[1] * sm_count
        ):
            name = "slim"
        else:
            name = "narrow"
    elif writes_states and T >= STORE_FROM_TOKENS:
        small = T <= NARROW_STATES_MAX_TOKENS and batch_heads <= NARROW_STATES_MAX_PAIRS_PER_SM * sm_count
        name = "narrow" if measured and small else "store"
    elif writes_states and T == NARROW_STATES_TOKENS and measured:
        name = "staged" if batch_heads >= STAGED_MIN_PAIRS_PER_SM * sm_count else "narrow"
    else:
        return wide
    return KernelSpec(K, V, T, input_dtype, state_dtype, name)


def blocks_per_sm_cap(spec: KernelSpec, *, batch_heads: int, sm_count: int) -> int:
    """At most this many blocks of the kernel per SM for a grid of batch_heads (b, hv) pairs (0: as many as
    fit): the tiling's MAX_BLOCKS, or store_cap_blocks(T) for the store tiling's calls on large grids (at
    the head dims it was measured at)."""
    cap = store_cap_blocks(spec.num_tokens) if spec.tiling_name == "store" else 0
    if (cap and spec.head_dim_k == spec.head_dim_v == PREBUILT_HEAD_DIM
            and batch_heads >= STORE_CAP_MIN_PAIRS_PER_SM * sm_count):
        return cap
    return spec.max_blocks_per_sm


# Start delay (measured on an H100 and an H200, benchmarks/NOTES.md): in update mode at T >= 4,
# the blocks of one wave load their states together and then compute together, so DRAM idles
# while they compute and the next wave repeats it. Delaying half of the first wave by about half a
# block's lifetime offsets two cohorts for the rest of the kernel. Only for grids of more than one
# wave (a single wave lost time: T = 4 and 8 at B = 8 on an H200); per-token-state calls did not gain.
# Not on the mma tiling (v33, H200: without the delay T = 4 at B = 16-32 was 1.7% faster, T = 5-8 from
# B = 32 to 512 level or up to 0.6% faster), so in effect the wide tiling at T = 4 on grids above the
# mma tiling's (more than 8 (b, hv) pairs per SM). On the mma tiling's single waves (v39b, H200, 2-4 us)
# it lost 12-15% (HV = 32 B = 8, H=4 HV=8 B = 32); STAGGER_ON_MMA turns it on there for tune.py.
STAGGER_FROM_TOKENS = 4
STAGGER_FRACTION = 0.5  # of the first wave
STAGGER_NS = 6000
STAGGER_MIN_WAVES = 1
STAGGER_ON_MMA = False


def start_delay_applies(spec: KernelSpec, *, writes_states: bool) -> bool:
    """Whether start_delay can be non-zero for this kernel and mode (whatever the grid)."""
    return not writes_states and spec.num_tokens >= STAGGER_FROM_TOKENS and (STAGGER_ON_MMA or not spec.uses_mma)


def start_delay(spec: KernelSpec, *, writes_states: bool, grid: int, wave: int) -> tuple[int, int]:
    """(blocks, ns): the kernel's first `blocks` blocks sleep about ns at their start; wave is
    how many blocks of the kernel the GPU holds at once."""
    if not start_delay_applies(spec, writes_states=writes_states) or grid <= STAGGER_MIN_WAVES * wave:
        return 0, 0
    return int(wave * STAGGER_FRACTION), STAGGER_NS


# Early state fetch (measured on an H200, benchmarks/NOTES.md v12). A kernel launched as a programmatic
# dependent has its blocks resident while the previous kernel still runs, if there is room beside it.
# Until griddepcontrol.wait those blocks may touch nothing the previous kernel could write, but they
# can ask L2 for their state rows at the read slot as it is then (a hint: the slot is read again after
# the wait, and L2 is coherent). For a small grid that takes both dependent DRAM trips (slot, then
# state) off the critical path (B = 1, T = 2: 4.8 -> 3.8 us); a grid near a full wave of blocks finds
# no room beside the previous kernel and only pays the extra round trip (T = 2, B = 8, HV = 32: 12.0 ->
# 12.7 us), so the kernel does it for grids of at most this fraction of a wave. Every other grid
# asks L2 for the line of its read slot only.
PREFETCH_STATE_MAX_WAVES = 0.5


# The short-chain tilings in update mode: grids of up to a whole wave gained (v17, H200: slim at B = 8
# HV = 8 T = 8 9.1 -> 8.6 us, B = 1 HV = 64 T = 5 8.3 -> 7.1); with per-token states they lost 3%.
PREFETCH_SHORT_CHAIN_UPDATE_MAX_WAVES = 1.0


def prefetch_state(spec: KernelSpec, grid: int, wave: int, *, writes_states: bool) -> bool:
    """Whether a grid of `grid` blocks of `spec`, of which the GPU holds `wave` at once, fetches its
    state early."""
    short_update = spec.short_chain and not writes_states
    limit = PREFETCH_SHORT_CHAIN_UPDATE_MAX_WAVES if short_update else PREFETCH_STATE_MAX_WAVES
    return grid <= limit * wave


def tilings_chosen(num_tokens: int) -> tuple[str, ...]:
    """Every tiling choose_spec can pick for T tokens at the prebuilt head dims."""
    # From T = MMA_FROM_TOKENS on the mma family, the small-grid tilings and the store tiling take
    # every grid there (test_specs checks that each prebuilt spec is chosen somewhere).
    names = ["wide", "narrow"] if num_tokens < MMA_FROM_TOKENS else ["narrow"]
    if num_tokens >= STORE_FROM_TOKENS:
        names.append("store")
    if num_tokens <= SHORT_MAX_TOKENS:
        names.append("short")
    if MMA_FROM_TOKENS <= num_tokens <= MMA_MAX_TOKENS:
        names += ["mma", "twin"]
    if num_tokens in TWIN4_TOKENS:
        names.append("twin4")
    if num_tokens in BULK_MIN_PAIRS_PER_SM:
        names.append("bulk")
    if num_tokens == NARROW_STATES_TOKENS:
        names.append("staged")
    if num_tokens >= SPREAD_FROM_TOKENS:
        names.append("spread")
    if num_tokens >= SLIM_FROM_TOKENS:
        names.append("slim")
    return tuple(names)


PREBUILT_SPECS = tuple(
    KernelSpec(PREBUILT_HEAD_DIM, PREBUILT_HEAD_DIM, t, dtype, "fp32", tiling)
    for dtype in DTYPE_NAMES
    for t in PREBUILT_TOKENS
    for tiling in tilings_chosen(t)
)

# Codes for the dtypes chosen at run time (a, b, dt_bias).
SCALAR_DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}

# Mode flags, one bit each; the template reads the same table.
FLAGS = {
    "L2NORM": 1,
    "WRITE_FINAL": 2,
    "WRITE_BUFFER": 4,
    "WRITE_SCATTER": 8,
    "HAS_WRITE_SLOTS": 16,
    "ZERO_PADDED_OUTPUT": 32,
    "PREFETCH_STATE": 64,
}

# The kernel takes one struct by value. Every field is 8 bytes ("ptr", "i64" or
# "f64"), so the C layout has no padding and Python packs it with one format.
PARAM_FIELDS = (
    ("q", "ptr"), ("k", "ptr"), ("v", "ptr"), ("a", "ptr"), ("b", "ptr"),
    ("A_log", "ptr"), ("dt_bias", "ptr"), ("pool", "ptr"), ("read_slots", "ptr"),
    ("write_slots", "ptr"), ("scatter_slots", "ptr"), ("buffer", "ptr"), ("out", "ptr"),
    ("B", "i64"), ("H", "i64"), ("HV", "i64"), ("pool_size", "i64"),
    ("q_sb", "i64"), ("q_st", "i64"), ("q_sh", "i64"),
    ("k_sb", "i64"), ("k_st", "i64"), ("k_sh", "i64"),
    ("v_sb", "i64"), ("v_st", "i64"), ("v_sh", "i64"),
    ("a_sb", "i64"), ("a_st", "i64"), ("b_sb", "i64"), ("b_st", "i64"), ("A_log_s", "i64"), ("dt_bias_s", "i64"),
    ("o_sb", "i64"), ("o_st", "i64"), ("o_sh", "i64"),
    ("pool_s0", "i64"), ("pool_s1", "i64"), ("pool_s2", "i64"),
    ("buf_sb", "i64"), ("buf_st", "i64"),
    ("read_s", "i64"), ("write_s", "i64"), ("scatter_sb", "i64"), ("scatter_st", "i64"),
    ("read_is64", "i64"), ("write_is64", "i64"), ("scatter_is64", "i64"),
    ("a_dtype", "i64"), ("b_dtype", "i64"), ("dt_bias_dtype", "i64"),
    ("stagger_blocks", "i64"), ("stagger_ns", "i64"), ("flags", "i64"), ("scale", "f64"),
)
PARAM_STRUCT_FORMAT = "<" + "".join({"ptr": "Q", "i64": "q", "f64": "d"}[kind] for _, kind in PARAM_FIELDS)
