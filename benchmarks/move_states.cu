// The state traffic of one gated_delta_rule_mtp call and nothing else (benchmarks/ceiling.py):
// every (b, hv) state is read from pool[read_slots[b], hv] and written where the mode writes
// states, with no arithmetic on it. Compiled by NVRTC with MOVE_TOKENS, MOVE_K and MOVE_V defined,
// and optionally the variant macros below (ceiling.py's --movers), which change how the same bytes
// move, never which bytes:
//   MOVE_ROWS  V-rows per 128-thread block (default min(V, 32));
//   MOVE_WAIT  1 (default): griddepcontrol.wait before the first read, as the kernel does; 0: none,
//              so consecutive calls overlap (a measure of what the boundary between calls costs);
//   MOVE_LD    state loads: 0 plain (default), 1 ld.global.cs, 2 L2 evict_first policy,
//              3 ld.global.nc.L1::no_allocate;
//   MOVE_ST    state stores: 0 plain (default), 1 st.global.cs, 2 L2 evict_first policy,
//              3 st.global.L1::no_allocate, 4 bulk copies shared -> global (one per row and copy);
//   MOVE_HOLD_NS  a pause between a block's loads and its stores, as if it computed (default 0);
//   MOVE_PAD_KB   unused shared memory per block, to cap the blocks per SM (default 0);
//   MOVE_LPR   0 (default): a warp's access is 512 contiguous bytes; N: the kernel's scalar layout, N
//              lanes per V-row, so one access of a warp is 32 / N rows' N * 16 contiguous bytes each.
//   MOVE_AHEAD 0 (default); N: once its loads are issued, a block asks L2 for one line of each slot row
//              that block blockIdx.x + N will read and write (its read slot, and in scatter mode its T
//              scatter slots), so that their address translations are made before that block starts.
// Pool and buffer are contiguous fp32: pool [pool_size, HV, V, K], buffer [B, T, HV, V, K].

typedef unsigned long long u64;
typedef long long i64;

#ifndef MOVE_ROWS
#define MOVE_ROWS (MOVE_V < 32 ? MOVE_V : 32)
#endif
#ifndef MOVE_WAIT
#define MOVE_WAIT 1
#endif
#ifndef MOVE_LD
#define MOVE_LD 0
#endif
#ifndef MOVE_ST
#define MOVE_ST 0
#endif
#ifndef MOVE_HOLD_NS
#define MOVE_HOLD_NS 0
#endif
#ifndef MOVE_PAD_KB
#define MOVE_PAD_KB 0
#endif
#ifndef MOVE_LPR
#define MOVE_LPR 0
#endif
#ifndef MOVE_AHEAD
#define MOVE_AHEAD 0
#endif

constexpr int T = MOVE_TOKENS;
constexpr int K = MOVE_K;
constexpr int V = MOVE_V;
constexpr int THREADS = 128;
constexpr int ROWS = MOVE_ROWS;                     // V-rows per block
constexpr int TILES = V / ROWS;
constexpr int CHUNKS = ROWS * K / 4 / THREADS;      // float4 per thread
static_assert(TILES * ROWS == V, "a slot's rows split evenly over its blocks");
static_assert(CHUNKS * 4 * THREADS == ROWS * K, "a block's rows split evenly over its threads");

// The float4 of the block's rows (as one array) that a thread moves as its j-th.
__device__ __forceinline__ int chunk_index(int tid, int j) {
#if MOVE_LPR
    constexpr int GROUPS = THREADS / MOVE_LPR, PER_ROW = K / 4 / MOVE_LPR;  // row groups; a lane's float4 per row
    static_assert(ROWS % GROUPS == 0 && PER_ROW * MOVE_LPR * 4 == K, "whole rows per row group");
    const int row = tid / MOVE_LPR + (j / PER_ROW) * GROUPS, c = j % PER_ROW;
    return row * (K / 4) + c * MOVE_LPR + tid % MOVE_LPR;
#else
    return tid + j * THREADS;
#endif
}

constexpr i64 MODE_UPDATE = 0;   // write back to the read slot
constexpr i64 MODE_BUFFER = 1;   // T copies into the buffer at [b, t]
constexpr i64 MODE_SCATTER = 2;  // T copies into pool[scatter_slots[b, t]]

struct Params {
    u64 pool, read_slots, buffer, scatter_slots;  // read_slots int32 [B], scatter_slots int32 [B, T]
    i64 HV, pool_size, mode;
};

__device__ __forceinline__ u64 evict_first_policy() {
    u64 policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    return policy;
}

__device__ __forceinline__ float4 load4(const float4* src) {
    float4 x;
#if MOVE_LD == 0
    x = *src;
#elif MOVE_LD == 1
    asm volatile("ld.global.cs.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(x.x), "=f"(x.y), "=f"(x.z), "=f"(x.w) : "l"(src));
#elif MOVE_LD == 2
    asm volatile("ld.global.L2::cache_hint.v4.f32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=f"(x.x), "=f"(x.y), "=f"(x.z), "=f"(x.w) : "l"(src), "l"(evict_first_policy()));
#elif MOVE_LD == 3
    asm volatile("ld.global.nc.L1::no_allocate.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(x.x), "=f"(x.y), "=f"(x.z), "=f"(x.w) : "l"(src));
#endif
    return x;
}

__device__ __forceinline__ void store4(float4* dst, float4 x) {
#if MOVE_ST == 0 || MOVE_ST == 4
    *dst = x;
#elif MOVE_ST == 1
    asm volatile("st.global.cs.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(x.x), "f"(x.y), "f"(x.z), "f"(x.w) : "memory");
#elif MOVE_ST == 2
    asm volatile("st.global.L2::cache_hint.v4.f32 [%0], {%1, %2, %3, %4}, %5;"
                 ::"l"(dst), "f"(x.x), "f"(x.y), "f"(x.z), "f"(x.w), "l"(evict_first_policy()) : "memory");
#elif MOVE_ST == 3
    asm volatile("st.global.L1::no_allocate.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(x.x), "f"(x.y), "f"(x.z), "f"(x.w) : "memory");
#endif
}

extern "C" __global__ void __launch_bounds__(THREADS) move_states(const __grid_constant__ Params p) {
    const int tile = blockIdx.x % TILES;
    const i64 bh = blockIdx.x / TILES;
    const i64 hv = bh % p.HV, b = bh / p.HV;
    const int tid = threadIdx.x;
    __shared__ i64 slots_s[T];

    // Launched like the kernel it stands beside (a programmatic dependent of the previous one).
#if MOVE_WAIT
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    asm volatile("griddepcontrol.launch_dependents;" :::);
    const i64 read_slot = ((const int*)p.read_slots)[b];
    if (read_slot < 0 || read_slot >= p.pool_size) return;
    if (tid < T) slots_s[tid] = p.mode == MODE_SCATTER ? ((const int*)p.scatter_slots)[b * T + tid] : read_slot;

    const i64 offset = (hv * V + tile * ROWS) * (i64)K;  // of this block's rows within one slot or [b, t]
    const float4* src = (const float4*)((const float*)p.pool + read_slot * p.HV * V * K + offset);
    float4 x[CHUNKS];
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) x[j] = load4(src + chunk_index(tid, j));
#if MOVE_AHEAD
    const i64 ahead = (i64)blockIdx.x + MOVE_AHEAD;
    if (ahead < (i64)gridDim.x && tid <= (p.mode == MODE_SCATTER ? T : 0)) {
        const i64 ahead_bh = ahead / TILES, ahead_hv = ahead_bh % p.HV, ahead_b = ahead_bh / p.HV;
        const i64 slot = tid == 0 ? ((const int*)p.read_slots)[ahead_b] : ((const int*)p.scatter_slots)[ahead_b * T + tid - 1];
        if (slot >= 0 && slot < p.pool_size) {
            const float* line = (const float*)p.pool + slot * p.HV * V * K + (ahead_hv * V + (ahead % TILES) * ROWS) * (i64)K;
            asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
        }
    }
#endif
#if MOVE_PAD_KB
    __shared__ float pad_s[MOVE_PAD_KB * 256];
    if (p.mode < 0) ((volatile float*)pad_s)[tid] = x[0].x;  // never true: keeps the allocation
#endif
#if MOVE_HOLD_NS
    float sum = 0.f;  // the pause starts when the loads have arrived
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) sum += x[j].x;
    if (sum == 12345.f) slots_s[0] = 0;  // uses the values (never true on these states)
    __nanosleep(MOVE_HOLD_NS);
#endif
#if MOVE_ST == 4
    __shared__ __align__(128) float4 rows_s[ROWS * K / 4];
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) rows_s[chunk_index(tid, j)] = x[j];
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the bulk copies
#endif
    __syncthreads();

    const int copies = p.mode == MODE_UPDATE ? 1 : T;
    for (int t = 0; t < copies; ++t) {
        float* base;
        if (p.mode == MODE_BUFFER) {
            base = (float*)p.buffer + (b * T + t) * p.HV * V * K;
        } else {
            const i64 slot = slots_s[t];
            if (slot < 0 || slot >= p.pool_size) continue;
            base = (float*)p.pool + slot * p.HV * V * K;
        }
        float4* dst = (float4*)(base + offset);
#if MOVE_ST == 4
        if (tid < ROWS) {  // one contiguous row of K floats per thread
            const unsigned s = (unsigned)__cvta_generic_to_shared(rows_s + tid * (K / 4));
            asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                         ::"l"(dst + tid * (K / 4)), "r"(s), "n"(K * 4) : "memory");
        }
#else
#pragma unroll
        for (int j = 0; j < CHUNKS; ++j) store4(dst + chunk_index(tid, j), x[j]);
#endif
    }
#if MOVE_ST == 4
    if (tid < ROWS) {  // shared memory stays until the copies have read it
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    }
#endif
}
