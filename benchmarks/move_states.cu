// The state traffic of one gated_delta_rule_mtp call and nothing else (benchmarks/ceiling.py):
// every (b, hv) state is read from pool[read_slots[b], hv] and written where the mode writes
// states, with no arithmetic on it. Compiled by NVRTC with MOVE_TOKENS, MOVE_K and MOVE_V defined.
// Pool and buffer are contiguous fp32: pool [pool_size, HV, V, K], buffer [B, T, HV, V, K].

typedef unsigned long long u64;
typedef long long i64;

constexpr int T = MOVE_TOKENS;
constexpr int K = MOVE_K;
constexpr int V = MOVE_V;
constexpr int THREADS = 128;
constexpr int ROWS = V < 32 ? V : 32;               // V-rows per block
constexpr int TILES = V / ROWS;
constexpr int CHUNKS = ROWS * K / 4 / THREADS;      // float4 per thread
static_assert(CHUNKS * 4 * THREADS == ROWS * K, "a block's rows split evenly over its threads");

constexpr i64 MODE_UPDATE = 0;   // write back to the read slot
constexpr i64 MODE_BUFFER = 1;   // T copies into the buffer at [b, t]
constexpr i64 MODE_SCATTER = 2;  // T copies into pool[scatter_slots[b, t]]

struct Params {
    u64 pool, read_slots, buffer, scatter_slots;  // read_slots int32 [B], scatter_slots int32 [B, T]
    i64 HV, pool_size, mode;
};

extern "C" __global__ void __launch_bounds__(THREADS) move_states(const __grid_constant__ Params p) {
    const int tile = blockIdx.x % TILES;
    const i64 bh = blockIdx.x / TILES;
    const i64 hv = bh % p.HV, b = bh / p.HV;
    const int tid = threadIdx.x;
    __shared__ i64 slots_s[T];

    // Launched like the kernel it stands beside (a programmatic dependent of the previous one).
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" :::);
    const i64 read_slot = ((const int*)p.read_slots)[b];
    if (read_slot < 0 || read_slot >= p.pool_size) return;
    if (tid < T) slots_s[tid] = p.mode == MODE_SCATTER ? ((const int*)p.scatter_slots)[b * T + tid] : read_slot;

    const i64 offset = (hv * V + tile * ROWS) * (i64)K;  // of this block's rows within one slot or [b, t]
    const float4* src = (const float4*)((const float*)p.pool + read_slot * p.HV * V * K + offset);
    float4 x[CHUNKS];
#pragma unroll
    for (int j = 0; j < CHUNKS; ++j) x[j] = src[tid + j * THREADS];
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
#pragma unroll
        for (int j = 0; j < CHUNKS; ++j) dst[tid + j * THREADS] = x[j];
    }
}
