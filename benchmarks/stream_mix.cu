// An ideal read : write stream (benchmarks/stream_mix.py): no pool, no slots, no arithmetic. Block c reads
// chunk c of the source (MIX_THREADS threads, 16 bytes each) and writes it `writes` times; the copies of a
// group of `group` consecutive chunks lie next to each other, as the per-token states of one batch row do
// in the [B, T, HV, V, K] buffer: copy w of chunk c goes to chunk (c / group) * writes * group + w * group +
// c % group of the target. With reads = 0 a block writes a pattern instead of reading (write only); with
// writes = 0 it only reads (its store is never taken). Compiled by NVRTC with optional macros:
//   MIX_THREADS  threads per block (default 256), so a chunk is MIX_THREADS * 16 bytes;
//   MIX_ST       0 (default): plain stores; 1: st.global.cs (the streaming hint).

typedef long long i64;

#ifndef MIX_THREADS
#define MIX_THREADS 256
#endif
#ifndef MIX_ST
#define MIX_ST 0
#endif

struct Params {
    const float4* source;
    float4* target;
    i64 chunks;
    i64 group;
    int reads;   // 0 or 1
    int writes;  // copies of each chunk
};

__device__ __forceinline__ void store4(float4* dst, float4 x) {
#if MIX_ST == 1
    asm volatile("st.global.cs.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(x.x), "f"(x.y), "f"(x.z), "f"(x.w)
                 : "memory");
#else
    *dst = x;
#endif
}

extern "C" __global__ void __launch_bounds__(MIX_THREADS) stream_mix(const __grid_constant__ Params p) {
    const i64 c = blockIdx.x;
    const int tid = threadIdx.x;
    if (c >= p.chunks) return;
    const float4 x = p.reads ? p.source[c * MIX_THREADS + tid] : make_float4(1.f + tid, 2.f, 3.f + (float)c, 4.f);
    if (p.writes == 0) {
        if (x.x + x.y + x.z + x.w == 123456.75f) p.target[tid] = x;  // uses the load (never true on randn data)
        return;
    }
    const i64 first = (c / p.group) * p.writes * p.group + c % p.group;
    for (int w = 0; w < p.writes; ++w) store4(p.target + (first + w * p.group) * MIX_THREADS + tid, x);
}
