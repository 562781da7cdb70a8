// The llama / qwen2 forward on the GPU without candle's per-op overhead (host/models/cuda_fast.rs
// drives it). candle launches ~35 kernels per layer, each with its own allocation and argument
// set-up, and decoding on an H200 was bound by the host queueing them (BENCHMARKS.md: 5-8 ms per
// token for every model size). Here a layer is 10 launches over buffers allocated once, and the
// position lives in device memory, so a whole forward has fixed arguments and is captured once as
// a CUDA graph and replayed.
//
// Weights keep their GGUF quantization (regrouped, see `oct`); matrices are dequantized in
// registers, 8 values per lane at a time, and multiplied with f32 activations in f32 (no
// rounding of the activations to 8 bits, which made candle's default kernels part from
// llama.cpp's greedy output). tests/kernels.rs compares the forward with the CPU forward of the
// dequantized weights.
//
// Types by their ggml ids: F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q8_0 8, Q4_K 12, Q5_K 13,
// Q6_K 14, BF16 30.

#define WARP 32
// Output rows of a matvec per block (one warp each).
#define MV_WARPS 4
// Rows of activations one matvec pass keeps accumulators for (a verify forward at k <= 15 is one pass).
#define MV_ROWS 16
// Threads of the row-wise kernels (norm, embedding, rope, attention).
#define THREADS 128
// Keys per attention tile (scores kept in shared memory).
#define TILE 256

typedef unsigned char u8;

__device__ __forceinline__ float h2f(unsigned int h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
    return f;
}

__device__ __forceinline__ float bf2f(unsigned int b) { return __uint_as_float(b << 16); }

__device__ __forceinline__ unsigned short ld16(const u8* p) { return *(const unsigned short*)p; }
__device__ __forceinline__ unsigned int ld32(const u8* p) { return *(const unsigned int*)p; }
// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4); the 12 scale
// bytes are the words s0, s1, s2.
__device__ __forceinline__ unsigned int sbyte(unsigned int s0, unsigned int s1, unsigned int s2,
                                              int j) {
    const unsigned int w = j < 4 ? s0 : (j < 8 ? s1 : s2);
    return (w >> (8 * (j & 3))) & 0xFF;
}
__device__ __forceinline__ void scale_min_k4(int j, unsigned int s0, unsigned int s1,
                                             unsigned int s2, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(sbyte(s0, s1, s2, j) & 63);
        *m = (float)(sbyte(s0, s1, s2, j + 4) & 63);
    } else {
        const unsigned int a = sbyte(s0, s1, s2, j + 4);
        *sc = (float)((a & 0xF) | ((sbyte(s0, s1, s2, j - 4) >> 6) << 4));
        *m = (float)((a >> 4) | ((sbyte(s0, s1, s2, j) >> 6) << 4));
    }
}

// Eight values v0..v0 + 8 (v0 a multiple of 8) of a row of k values (T is the type id), as ggml
// dequantizes them. A warp reads a row with lane l at v0 = 256 g + 8 l: the warp's loads of
// quants, scales and activations are each one contiguous stretch (lanes reading 32-value
// chunks each made every activation load touch 32 cache lines). Rows are in the device layout
// host/models/cuda_fast.rs (`regroup`) makes: rows start 16-byte aligned, and where a GGUF
// block's size is not a multiple of 16 a row holds all its blocks' quants first, their scales
// after them:
//   Q8_0  [32 quants per block][f16 d per block]
//   Q5_0  [16 nibble bytes][4 bytes of fifth bits][f16 d]
//   Q4_0  [16 nibble bytes][f16 d]          Q4_1  [16 nibble bytes][f16 d, f16 m]
//   Q6_K  [ql 128, qh 64, scales 16 per 256][f16 d per 256]
//   Q4_K, Q5_K, F32, F16, BF16: as stored.
template <int T> __device__ __forceinline__ void oct(const u8* row, int v0, int k, float* w) {
    if (T == 0) {
        const float4 a = *(const float4*)(row + 4 * v0), b = *(const float4*)(row + 4 * v0 + 16);
        w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
    } else if (T == 1 || T == 30) {
        const uint4 h = *(const uint4*)(row + 2 * v0);
        const unsigned int hw[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            w[2 * j] = T == 1 ? h2f(hw[j] & 0xFFFF) : bf2f(hw[j] & 0xFFFF);
            w[2 * j + 1] = T == 1 ? h2f(hw[j] >> 16) : bf2f(hw[j] >> 16);
        }
    } else if (T == 2 || T == 3 || T == 6) { // Q4_0, Q4_1, Q5_0: 16 nibble bytes per block
        const int b = v0 >> 5, o = v0 & 31, nb = k >> 5;
        // Values 0..16 of a block are the low nibbles of its bytes, 16..32 the high ones.
        const uint2 q = *(const uint2*)(row + 16 * b + (o & 15));
        const int shift = (o & 16) ? 4 : 0;
        float d, m = 0.f;
        unsigned int qh = 0;
        const int zero = T == 2 ? 8 : (T == 6 ? 16 : 0);
        if (T == 2) {
            d = h2f(ld16(row + 16 * nb + 2 * b));
        } else if (T == 3) {
            const unsigned int dm = ld32(row + 16 * nb + 4 * b);
            d = h2f(dm & 0xFFFF);
            m = h2f(dm >> 16);
        } else {
            qh = ld32(row + 16 * nb + 4 * b) >> o;
            d = h2f(ld16(row + 20 * nb + 2 * b));
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const unsigned int word = j < 4 ? q.x : q.y;
            int v = (int)((word >> (8 * (j & 3) + shift)) & 0xF);
            if (T == 6) v |= (int)((qh >> j) & 1) << 4;
            w[j] = (float)(v - zero) * d + m;
        }
    } else if (T == 8) { // Q8_0
        const uint2 q = *(const uint2*)(row + v0);
        const float d = h2f(ld16(row + k + 2 * (v0 >> 5)));
#pragma unroll
        for (int j = 0; j < 8; j++)
            w[j] = (float)(signed char)((j < 4 ? q.x : q.y) >> (8 * (j & 3))) * d;
    } else if (T == 12 || T == 13) { // Q4_K / Q5_K: 8 sub-blocks of 32 per 256
        const u8* b = row + (T == 12 ? 144 : 176) * (v0 >> 8);
        const int v = v0 & 255, s = v >> 5, l0 = v & 31;
        const uint4 head = *(const uint4*)b; // d, dmin, 12 scale bytes
        float sc, mn;
        scale_min_k4(s, head.y, head.z, head.w, &sc, &mn);
        const float d1 = h2f(head.x & 0xFFFF) * sc, m1 = h2f(head.x >> 16) * mn;
        // Sub-blocks 2p and 2p + 1 share 32 bytes: low and high nibbles.
        const uint2 q = *(const uint2*)(b + (T == 12 ? 16 : 48) + 32 * (s >> 1) + l0);
        const int shift = (s & 1) * 4;
        uint2 qh = make_uint2(0, 0);
        if (T == 13) qh = *(const uint2*)(b + 16 + l0);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int sh = 8 * (j & 3);
            int x = (int)(((j < 4 ? q.x : q.y) >> (sh + shift)) & 0xF);
            if (T == 13) x |= (int)((((j < 4 ? qh.x : qh.y) >> sh) >> s) & 1) << 4;
            w[j] = d1 * (float)x - m1;
        }
    } else { // Q6_K: two halves of 128 per 256, each four quarters of 32
        const int sb = v0 >> 8, v = v0 & 255, n = v >> 7, t = (v & 127) >> 5, l0 = v & 31;
        const u8* b = row + 208 * sb;
        const uint2 ql = *(const uint2*)(b + 64 * n + 32 * (t & 1) + l0);
        const uint2 qh = *(const uint2*)(b + 128 + 32 * n + l0);
        const float d = h2f(ld16(row + 208 * (k >> 8) + 2 * sb)) *
                        (float)(signed char)b[192 + 8 * n + 2 * t + (l0 >> 4)];
        const int lshift = (t >> 1) * 4, hshift = 2 * t;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int sh = 8 * (j & 3);
            const unsigned int lw = j < 4 ? ql.x : ql.y, hw = j < 4 ? qh.x : qh.y;
            const int x = (int)(((lw >> (sh + lshift)) & 0xF) | (((hw >> (sh + hshift)) & 3) << 4));
            w[j] = d * (float)(x - 32);
        }
    }
}

// a + b, or max(a, b).
template <bool MAX> __device__ __forceinline__ float combine(float a, float b) {
    return MAX ? fmaxf(a, b) : a + b;
}

template <bool MAX> __device__ __forceinline__ float warp_reduce(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x = combine<MAX>(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) { return warp_reduce<false>(x); }

// Sum / max over a block of THREADS threads (every thread gets it). `red` holds THREADS / 32.
template <bool MAX> __device__ float block_reduce(float x, float* red) {
    x = warp_reduce<MAX>(x);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = x;
    __syncthreads();
    float s = red[0];
    for (int i = 1; i < THREADS / WARP; i++) s = combine<MAX>(s, red[i]);
    return s;
}
__device__ float block_sum(float x, float* red) { return block_reduce<false>(x, red); }
__device__ float block_max(float x, float* red) { return block_reduce<true>(x, red); }

// s + w . (a, b), accumulated in order (every matvec kernel sums a lane's values this way).
__device__ __forceinline__ float dot8(const float* w, float4 a, float4 b, float s) {
    s = fmaf(w[0], a.x, s);
    s = fmaf(w[1], a.y, s);
    s = fmaf(w[2], a.z, s);
    s = fmaf(w[3], a.w, s);
    s = fmaf(w[4], b.x, s);
    s = fmaf(w[5], b.y, s);
    s = fmaf(w[6], b.z, s);
    return fmaf(w[7], b.w, s);
}

// acc[r] += w . x[r][v0 .. v0 + 8] for the R rows in this pass (rows past `rows` skipped).
template <int R>
__device__ __forceinline__ void dot_rows(const float* w, const float* __restrict__ x, int ldx,
                                         int v0, int r0, int rows, float* acc) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (r0 + r < rows) {
            const float4* xr = (const float4*)(x + (long long)(r0 + r) * ldx + v0);
            const float4 a = xr[0], b = xr[1];
            acc[r] = dot8(w, a, b, acc[r]);
        }
    }
}

// y[r, o] = W[o] . x[r] (+ bias[o]) (+ res[r, o]) for r < rows, o < n_out. One warp per output;
// lane l takes values 256 g + 8 l. `res` may be `y` itself (the residual stream updated in
// place): each element is read and written by the same lane.
template <int T, int R>
__device__ void matvec(const u8* __restrict__ w, unsigned long long row_bytes,
                       const float* __restrict__ x, int ldx, float* y, int ldy, int n_out, int k,
                       int rows, const float* __restrict__ bias, const float* res, int ldr) {
    const int lane = threadIdx.x & 31;
    const int o = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (o >= n_out) return;
    const u8* row = w + (unsigned long long)o * row_bytes;
    const float b = bias ? bias[o] : 0.f;
    for (int r0 = 0; r0 < rows; r0 += R) {
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.f;
#pragma unroll 2
        for (int v0 = 8 * lane; v0 < k; v0 += 8 * WARP) {
            float wv[8];
            oct<T>(row, v0, k, wv);
            dot_rows<R>(wv, x, ldx, v0, r0, rows, acc);
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float s = warp_sum(acc[r]);
            if (lane == 0 && r0 + r < rows) {
                const long long i = (long long)(r0 + r);
                y[i * ldy + o] = s + b + (res ? res[i * ldr + o] : 0.f);
            }
        }
    }
}

// `matvec` for one row with the warps of a block splitting one output's k (warp w takes values
// 256 (w + MV_WARPS i) + 8 l): for long rows (k >= 1024 by default; the MLP's down projection
// has k = 8960 on the 1.5B) one warp walking all of k waits on many dependent rounds of loads,
// which bounded the kernel by latency, not bandwidth. The warps' sums are added in a fixed order.
template <int T>
__device__ void matvec_split(const u8* __restrict__ w, unsigned long long row_bytes,
                             const float* __restrict__ x, float* y, int k,
                             const float* __restrict__ bias, const float* res) {
    __shared__ float part[MV_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int o = blockIdx.x;
    const u8* row = w + (unsigned long long)o * row_bytes;
    float acc = 0.f;
#pragma unroll 4
    for (int v0 = 8 * (lane + WARP * warp); v0 < k; v0 += 8 * WARP * MV_WARPS) {
        float wv[8];
        oct<T>(row, v0, k, wv);
        dot_rows<1>(wv, x, 0, v0, 0, 1, &acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = part[0];
#pragma unroll
        for (int i = 1; i < MV_WARPS; i++) s += part[i];
        y[o] = s + (bias ? bias[o] : 0.f) + (res ? res[o] : 0.f);
    }
}

// The MLP's first half in one pass: m[r, o] = silu(G[o] . x[r]) * (U[o] . x[r]). Gate and up
// share a type; one warp computes both rows o, so x is read once for the two.
template <int T, int R>
__device__ void glu(const u8* __restrict__ g, const u8* __restrict__ u,
                    unsigned long long row_bytes, const float* __restrict__ x, int ldx, float* m,
                    int n_out, int k, int rows) {
    const int lane = threadIdx.x & 31;
    const int o = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (o >= n_out) return;
    const u8* grow = g + (unsigned long long)o * row_bytes;
    const u8* urow = u + (unsigned long long)o * row_bytes;
    for (int r0 = 0; r0 < rows; r0 += R) {
        float ag[R], au[R];
#pragma unroll
        for (int r = 0; r < R; r++) ag[r] = 0.f, au[r] = 0.f;
#pragma unroll 2
        for (int v0 = 8 * lane; v0 < k; v0 += 8 * WARP) {
            float wg[8], wu[8];
            oct<T>(grow, v0, k, wg);
            oct<T>(urow, v0, k, wu);
            dot_rows<R>(wg, x, ldx, v0, r0, rows, ag);
            dot_rows<R>(wu, x, ldx, v0, r0, rows, au);
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float gs = warp_sum(ag[r]), us = warp_sum(au[r]);
            if (lane == 0 && r0 + r < rows)
                m[(long long)(r0 + r) * n_out + o] = gs / (1.f + expf(-gs)) * us;
        }
    }
}

// The multi-row kernels (a verification's k + 1 rows, a prompt's chunks of 16) with the
// activations staged in shared memory. Reading them from global memory once per output warp (the
// `mvn` / `glun` kernels above) made a 9-row forward of the 1.5B cost 3x a one-row forward: a
// row's activations were fetched n_out times, ~56 GB per forward from L1/L2 against 1.1 GB of
// weights. Here a block of MVS_WARPS warps stages KC values of each row once and its warps (O
// outputs each) read them from shared memory. Each lane sums the same values in the same order
// as `matvec`, so the results are bit-identical.
#define MVS_WARPS 8
#define KC 512

// Stages x[r0 + r][c0 .. c0 + n] for r < nr into xs[r][0 .. n] (n a multiple of 4).
__device__ __forceinline__ void stage_rows(float* xs, const float* __restrict__ x, int ldx, int r0,
                                           int nr, int c0, int n) {
    const int n4 = n >> 2;
    for (int e = threadIdx.x; e < nr * n4; e += MVS_WARPS * WARP) {
        const int r = e / n4, i = e - r * n4;
        ((float4*)xs)[r * (KC / 4) + i] =
            *(const float4*)(x + (long long)(r0 + r) * ldx + c0 + 4 * i);
    }
}

// acc[r] += w . xs[r][v .. v + 8] for r < nr.
template <int R>
__device__ __forceinline__ void dot_staged(const float* w, const float* xs, int v, int nr,
                                           float* acc) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (r < nr) {
            const float4 a = *(const float4*)(xs + r * KC + v), b = *(const float4*)(xs + r * KC + v + 4);
            acc[r] = dot8(w, a, b, acc[r]);
        }
    }
}

// `matvec` for several rows: warp w of block b computes outputs (b MVS_WARPS + w) O + j, j < O.
// Every warp joins the block's barriers, also one past n_out.
template <int T, int R, int O>
__device__ void matvec_staged(const u8* __restrict__ w, unsigned long long row_bytes,
                              const float* __restrict__ x, int ldx, float* y, int ldy, int n_out,
                              int k, int rows, const float* __restrict__ bias, const float* res,
                              int ldr) {
    __shared__ __align__(16) float xs[R * KC];
    const int lane = threadIdx.x & 31;
    const int o0 = (blockIdx.x * MVS_WARPS + (threadIdx.x >> 5)) * O;
    const u8* wr[O];
#pragma unroll
    for (int j = 0; j < O; j++) wr[j] = w + (unsigned long long)min(o0 + j, n_out - 1) * row_bytes;
    for (int r0 = 0; r0 < rows; r0 += R) {
        const int nr = min(R, rows - r0);
        float acc[O][R];
#pragma unroll
        for (int j = 0; j < O; j++)
#pragma unroll
            for (int r = 0; r < R; r++) acc[j][r] = 0.f;
        for (int c0 = 0; c0 < k; c0 += KC) {
            const int n = min(KC, k - c0);
            __syncthreads(); // the previous chunk is read
            stage_rows(xs, x, ldx, r0, nr, c0, n);
            __syncthreads();
            if (o0 >= n_out) continue;
            for (int v = 8 * lane; v < n; v += 8 * WARP) {
#pragma unroll
                for (int j = 0; j < O; j++) {
                    float wv[8];
                    oct<T>(wr[j], c0 + v, k, wv);
                    dot_staged<R>(wv, xs, v, nr, acc[j]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < O; j++) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float s = warp_sum(acc[j][r]);
                const int o = o0 + j;
                if (lane == 0 && r < nr && o < n_out) {
                    const long long i = (long long)(r0 + r);
                    y[i * ldy + o] = s + (bias ? bias[o] : 0.f) + (res ? res[i * ldr + o] : 0.f);
                }
            }
        }
    }
}

// `glu` for several rows, activations staged as in `matvec_staged`; one output per warp.
template <int T, int R>
__device__ void glu_staged(const u8* __restrict__ g, const u8* __restrict__ u,
                           unsigned long long row_bytes, const float* __restrict__ x, int ldx,
                           float* m, int n_out, int k, int rows) {
    __shared__ __align__(16) float xs[R * KC];
    const int lane = threadIdx.x & 31;
    const int o = blockIdx.x * MVS_WARPS + (threadIdx.x >> 5);
    const unsigned long long off = (unsigned long long)min(o, n_out - 1) * row_bytes;
    const u8* grow = g + off;
    const u8* urow = u + off;
    for (int r0 = 0; r0 < rows; r0 += R) {
        const int nr = min(R, rows - r0);
        float ag[R], au[R];
#pragma unroll
        for (int r = 0; r < R; r++) ag[r] = 0.f, au[r] = 0.f;
        for (int c0 = 0; c0 < k; c0 += KC) {
            const int n = min(KC, k - c0);
            __syncthreads();
            stage_rows(xs, x, ldx, r0, nr, c0, n);
            __syncthreads();
            if (o >= n_out) continue;
            for (int v = 8 * lane; v < n; v += 8 * WARP) {
                float wg[8], wu[8];
                oct<T>(grow, c0 + v, k, wg);
                oct<T>(urow, c0 + v, k, wu);
                dot_staged<R>(wg, xs, v, nr, ag);
                dot_staged<R>(wu, xs, v, nr, au);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float gs = warp_sum(ag[r]), us = warp_sum(au[r]);
            if (lane == 0 && r < nr && o < n_out)
                m[(long long)(r0 + r) * n_out + o] = gs / (1.f + expf(-gs)) * us;
        }
    }
}

// One row of the embedding table per block: x[r] = dequantized table[ids[r]].
template <int T>
__device__ void embed(const u8* table, unsigned long long row_bytes, const unsigned int* ids,
                      float* x, int k) {
    const u8* row = table + (unsigned long long)ids[blockIdx.x] * row_bytes;
    float* out = x + (long long)blockIdx.x * k;
    for (int v0 = 8 * threadIdx.x; v0 < k; v0 += 8 * blockDim.x) {
        float wv[8];
        oct<T>(row, v0, k, wv);
#pragma unroll
        for (int j = 0; j < 8; j++) out[v0 + j] = wv[j];
    }
}

#define MV_ARGS                                                                                   \
    const u8 *w, unsigned long long row_bytes, const float *x, int ldx, float *y, int ldy,       \
        int n_out, int k, int rows, const float *bias, const float *res, int ldr
#define GLU_ARGS                                                                                  \
    const u8 *g, const u8 *u, unsigned long long row_bytes, const float *x, int ldx, float *m,   \
        int n_out, int k, int rows
#define KERNELS(name, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * WARP) mv1_##name(MV_ARGS) {           \
        matvec<T, 1>(w, row_bytes, x, ldx, y, ldy, n_out, k, rows, bias, res, ldr);              \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * WARP) mvn_##name(MV_ARGS) {           \
        matvec<T, MV_ROWS>(w, row_bytes, x, ldx, y, ldy, n_out, k, rows, bias, res, ldr);        \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * WARP) mv1s_##name(MV_ARGS) {          \
        matvec_split<T>(w, row_bytes, x, y, k, bias, res);                                        \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * WARP) glu1_##name(GLU_ARGS) {         \
        glu<T, 1>(g, u, row_bytes, x, ldx, m, n_out, k, rows);                                    \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(MV_WARPS * WARP) glun_##name(GLU_ARGS) {         \
        glu<T, MV_ROWS>(g, u, row_bytes, x, ldx, m, n_out, k, rows);                              \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(MVS_WARPS * WARP) mvs_##name(MV_ARGS) {          \
        matvec_staged<T, MV_ROWS, 1>(w, row_bytes, x, ldx, y, ldy, n_out, k, rows, bias, res, ldr); \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(MVS_WARPS * WARP) mvs2_##name(MV_ARGS) {         \
        matvec_staged<T, MV_ROWS, 2>(w, row_bytes, x, ldx, y, ldy, n_out, k, rows, bias, res, ldr); \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(MVS_WARPS * WARP) glus_##name(GLU_ARGS) {        \
        glu_staged<T, MV_ROWS>(g, u, row_bytes, x, ldx, m, n_out, k, rows);                       \
    }                                                                                             \
    extern "C" __global__ void embed_##name(const u8* table, unsigned long long row_bytes,       \
                                            const unsigned int* ids, float* x, int k) {           \
        embed<T>(table, row_bytes, ids, x, k);                                                   \
    }

KERNELS(f32, 0)
KERNELS(f16, 1)
KERNELS(bf16, 30)
KERNELS(q4_0, 2)
KERNELS(q4_1, 3)
KERNELS(q5_0, 6)
KERNELS(q8_0, 8)
KERNELS(q4_k, 12)
KERNELS(q5_k, 13)
KERNELS(q6_k, 14)

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, one block per row.
extern "C" __global__ void __launch_bounds__(THREADS)
    rms_norm(const float* x, const float* w, float* y, int n, float eps) {
    __shared__ float red[THREADS / WARP];
    const float* xr = x + (long long)blockIdx.x * n;
    float* yr = y + (long long)blockIdx.x * n;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += THREADS) s += xr[i] * xr[i];
    s = block_sum(s, red);
    const float inv = rsqrtf(s / n + eps);
    for (int i = threadIdx.x; i < n; i += THREADS) yr[i] = xr[i] * inv * w[i];
}

// Rotary embedding of row r's query and key heads at position *pos + r, in place for the
// queries; the rotated keys and the values go to the caches at that position. qkv is
// [rows, (nh + 2 nkv) * hd] (queries, keys, values); a cache row holds nkv * hd floats.
// neox: dimension i pairs with i + hd/2; otherwise 2i with 2i + 1. The angle is computed in
// double, as the CPU's tables are.
extern "C" __global__ void __launch_bounds__(THREADS)
    rope_kv(float* qkv, int ld, const int* pos, const float* inv_freq, int nh, int nkv, int hd,
            int neox, float* kc, float* vc) {
    const int r = blockIdx.x;
    const int p = *pos + r;
    float* row = qkv + (long long)r * ld;
    const int half = hd / 2;
    const int kvw = nkv * hd;
    float* krow = kc + (long long)p * kvw;
    float* vrow = vc + (long long)p * kvw;
    for (int e = threadIdx.x; e < (nh + nkv) * half; e += THREADS) {
        const int head = e / half, i = e % half;
        double sd, cd;
        sincos((double)p * (double)inv_freq[i], &sd, &cd);
        const float s = (float)sd, c = (float)cd;
        float* h = row + head * hd;
        const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
        const float x0 = h[i0], x1 = h[i1];
        const float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
        if (head < nh) {
            h[i0] = y0;
            h[i1] = y1;
        } else {
            const int kh = head - nh;
            krow[kh * hd + i0] = y0;
            krow[kh * hd + i1] = y1;
        }
    }
    const float* v = row + (nh + nkv) * hd;
    for (int e = threadIdx.x; e < kvw; e += THREADS) vrow[e] = v[e];
}

// Causal attention of row r (at position *pos + r) for query head blockIdx.x over the cache's
// positions 0..=*pos + r, in tiles of TILE keys with a running max (one pass over the cache).
// Scores: one thread per key, reading the key and query as float4. Values: warp w takes the
// keys j = w mod 4 of a tile, lane l the dimensions l + 32 c, so loads of several keys are in
// flight at once (one thread per dimension walking every key in turn waited on each load: 0.2 us
// per key and layer); the 4 warps' sums are added in a fixed order at the end.
// out is [rows, nh * hd]. hd <= HD_MAX and a multiple of 4.
#define HD_MAX (2 * THREADS)
extern "C" __global__ void __launch_bounds__(THREADS)
    attention(const float* qkv, int ld, const int* pos, const float* kc, const float* vc,
              float* out, int nh, int nkv, int hd, float scale) {
    __shared__ float4 sq[HD_MAX / 4];
    __shared__ float sp[TILE];
    __shared__ float red[THREADS / WARP];
    __shared__ float part[THREADS / WARP][HD_MAX];
    const int h = blockIdx.x, r = blockIdx.y, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int kvh = h / (nh / nkv);
    const int len = *pos + r + 1;
    const int kvw = nkv * hd;
    const int hd4 = hd / 4;
    const float* q = qkv + (long long)r * ld + h * hd;
    for (int d = tid; d < hd4; d += THREADS)
        sq[d] = make_float4(q[4 * d] * scale, q[4 * d + 1] * scale, q[4 * d + 2] * scale,
                            q[4 * d + 3] * scale);
    __syncthreads();
    float m = -INFINITY, l = 0.f;
    float acc[HD_MAX / WARP];
#pragma unroll
    for (int c = 0; c < HD_MAX / WARP; c++) acc[c] = 0.f;
    for (int t0 = 0; t0 < len; t0 += TILE) {
        const int n = min(TILE, len - t0);
        float lmax = -INFINITY;
        for (int j = tid; j < n; j += THREADS) {
            const float4* kr = (const float4*)(kc + (long long)(t0 + j) * kvw + kvh * hd);
            float s = 0.f;
            for (int d = 0; d < hd4; d++) {
                const float4 k4 = kr[d], q4 = sq[d];
                s = fmaf(q4.x, k4.x, s);
                s = fmaf(q4.y, k4.y, s);
                s = fmaf(q4.z, k4.z, s);
                s = fmaf(q4.w, k4.w, s);
            }
            sp[j] = s;
            lmax = fmaxf(lmax, s);
        }
        const float nm = fmaxf(m, block_max(lmax, red));
        const float corr = expf(m - nm);
        float lsum = 0.f;
        for (int j = tid; j < n; j += THREADS) {
            const float e = expf(sp[j] - nm);
            sp[j] = e;
            lsum += e;
        }
        l = l * corr + block_sum(lsum, red); // its barriers publish sp
#pragma unroll
        for (int c = 0; c < HD_MAX / WARP; c++) acc[c] *= corr;
        const float* vt = vc + (long long)t0 * kvw + kvh * hd;
#pragma unroll 4
        for (int j = warp; j < n; j += THREADS / WARP) {
            const float p = sp[j];
            const float* vr = vt + (long long)j * kvw;
#pragma unroll
            for (int c = 0; c < HD_MAX / WARP; c++) {
                const int d = lane + WARP * c;
                if (d < hd) acc[c] = fmaf(p, vr[d], acc[c]);
            }
        }
        m = nm;
        __syncthreads(); // sp is rewritten by the next tile
    }
#pragma unroll
    for (int c = 0; c < HD_MAX / WARP; c++) {
        const int d = lane + WARP * c;
        if (d < hd) part[warp][d] = acc[c];
    }
    __syncthreads();
    float* o = out + (long long)r * nh * hd + h * hd;
    for (int d = tid; d < hd; d += THREADS) {
        float s = part[0][d];
#pragma unroll
        for (int w = 1; w < THREADS / WARP; w++) s += part[w][d];
        o[d] = s / l;
    }
}

// m[r, i] = silu(gu[r, i]) * gu[r, ff + i]: gate and up side by side in one buffer.
extern "C" __global__ void silu_mul(const float* gu, float* m, int ff, int rows) {
    const long long n = (long long)rows * ff;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / ff, i = e % ff;
        const float g = gu[r * 2 * ff + i], u = gu[r * 2 * ff + ff + i];
        m[e] = g / (1.f + expf(-g)) * u;
    }
}
