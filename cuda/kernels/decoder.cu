// The GGUF decoder's kernels: quantized matrix products, RMS norm, rotary embeddings with the
// optional per-head q/k norms, the f16 KV cache, attention and the gated MLP activations.
//
// Each kernel mirrors a CPU path of skep's decoder (skep-kernels' portable code and candle's
// ops): same element order within a block, same rotary angles (inverse frequencies computed on
// the host in f64 and rounded to f32), keys and values rounded to f16 as the CPU cache does.
// Launch shapes are computed in src/launch.rs, whose constants must match the ones below.

// No CUDA headers: NVRTC from the wheel has none, and half precision needs only two conversion
// instructions. quant.cuh holds the dequantization (h2f, the u8/i8 types, the formats' units),
// shared with a host build that tests it against candle.
#include "quant.cuh"

__device__ __forceinline__ half_bits f2h(float f) {
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

#define NEG_INF __int_as_float(0xff800000)

#define WARP 32
// Rows of a matrix product per block (one warp each) and token rows per block.
#define MM_ROWS 4
#define MM_TOKENS 8
// Threads of the norm and attention kernels; keys scored per attention tile.
#define NORM_THREADS 256
#define ATT_THREADS 128
#define ATT_TILE 128

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < warps; i++) t += scratch[i];
    return t;
}

__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = NEG_INF;
    for (int i = 0; i < warps; i++) t = fmaxf(t, scratch[i]);
    return t;
}

// ---- y[t][r] = sum_c W[r][c] * x[t][c] for t < tokens: one warp per row, MM_TOKENS token rows
// per block (grid.y covers the rest), so a weight unit is dequantized once for all of them.
template <void (*UNIT)(const u8*, int, float*)>
__device__ void matmul(const u8* W, size_t row_bytes, const float* x, float* y, int rows,
                       int cols, int tokens) {
    int lane = threadIdx.x % WARP;
    int r = blockIdx.x * MM_ROWS + threadIdx.x / WARP;
    int t0 = blockIdx.y * MM_TOKENS;
    if (r >= rows) return;
    int nt = min(MM_TOKENS, tokens - t0);
    const u8* row = W + (size_t)r * row_bytes;
    float acc[MM_TOKENS];
    for (int t = 0; t < MM_TOKENS; t++) acc[t] = 0.f;
    float w[32];
    for (int u = lane; u < cols / 32; u += WARP) {
        UNIT(row, u, w);
        for (int t = 0; t < nt; t++) {
            const float4* xs = reinterpret_cast<const float4*>(x + (size_t)(t0 + t) * cols + u * 32);
            float a = 0.f;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float4 v = xs[i];
                a += w[4 * i] * v.x + w[4 * i + 1] * v.y + w[4 * i + 2] * v.z + w[4 * i + 3] * v.w;
            }
            acc[t] += a;
        }
    }
    for (int t = 0; t < nt; t++) {
        float s = warp_sum(acc[t]);
        if (lane == 0) y[(size_t)(t0 + t) * rows + r] = s;
    }
}

#define MATMUL_KERNEL(NAME, UNIT)                                                              \
    extern "C" __global__ void NAME(const u8* W, unsigned long long row_bytes, const float* x,  \
                                    float* y, int rows, int cols, int tokens) {                \
        matmul<UNIT>(W, row_bytes, x, y, rows, cols, tokens);                                  \
    }

MATMUL_KERNEL(matmul_q4_0, unit_q4_0)
MATMUL_KERNEL(matmul_q4_1, unit_q4_1)
MATMUL_KERNEL(matmul_q5_0, unit_q5_0)
MATMUL_KERNEL(matmul_q8_0, unit_q8_0)
MATMUL_KERNEL(matmul_q4_k, unit_q4_k)
MATMUL_KERNEL(matmul_q6_k, unit_q6_k)

// ---- y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, one block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* y, int dim, float eps) {
    __shared__ float scratch[NORM_THREADS / WARP];
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* yr = y + (size_t)blockIdx.x * dim;
    float s = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i] * xr[i];
    s = block_sum(s, scratch);
    float scale = 1.f / sqrtf(s / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
}

// x += y over n elements.
extern "C" __global__ void add_in_place(float* x, const float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// gate = act(gate) * up over n elements; act 0 = SiLU, 1 = GELU (tanh approximation).
extern "C" __global__ void gated_act(float* gate, const float* up, int n, int act) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = gate[i];
    float a;
    if (act == 0) {
        a = v / (1.f + expf(-v));
    } else {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        a = 0.5f * v * (1.f + tanhf(k * v * (1.f + 0.044715f * v * v)));
    }
    gate[i] = a * up[i];
}

// Per token row of a pass, three words: the job's key cache, its value cache (device pointers to
// f16 `[layer][kv_head][capacity][head_dim]`), then the row's position (low 32 bits) and the
// cache's capacity in positions (high 32 bits).
struct RowMeta {
    const unsigned long long* w;
    __device__ half_bits* k(int layer, int kvh, int hd) const {
        return reinterpret_cast<half_bits*>(w[0]) + (size_t)layer * kvh * cap() * hd;
    }
    __device__ half_bits* v(int layer, int kvh, int hd) const {
        return reinterpret_cast<half_bits*>(w[1]) + (size_t)layer * kvh * cap() * hd;
    }
    __device__ int pos() const { return (int)(w[2] & 0xffffffffu); }
    __device__ int cap() const { return (int)(w[2] >> 32); }
};

__device__ __forceinline__ RowMeta meta_of(const unsigned long long* meta, int row) {
    RowMeta m;
    m.w = meta + 3 * (size_t)row;
    return m;
}

// Optional per-head RMS norm, then rotary embedding, of one head (one warp). `x` is the head's
// `hd` values in place. neox: pairs (i, i + hd/2), else (2i, 2i + 1).
__device__ void norm_rope_head(float* x, int hd, int pos, const float* inv_freq, int neox,
                               const float* norm_w, float eps) {
    int lane = threadIdx.x;
    if (norm_w) {
        float s = 0.f;
        for (int i = lane; i < hd; i += WARP) s += x[i] * x[i];
        s = warp_sum(s);
        float scale = 1.f / sqrtf(s / hd + eps);
        for (int i = lane; i < hd; i += WARP) x[i] = x[i] * scale * norm_w[i];
        __syncwarp();
    }
    int half_hd = hd / 2;
    for (int i = lane; i < half_hd; i += WARP) {
        float sn, cs;
        sincosf((float)pos * inv_freq[i], &sn, &cs);
        int a = neox ? i : 2 * i, b = neox ? i + half_hd : 2 * i + 1;
        float x0 = x[a], x1 = x[b];
        x[a] = x0 * cs - x1 * sn;
        x[b] = x0 * sn + x1 * cs;
    }
}

// q: rows x heads x hd, normed and rotated in place. grid (rows, heads), one warp.
extern "C" __global__ void rope_q(float* q, const unsigned long long* meta, int heads, int hd,
                                  const float* inv_freq, int neox, const float* norm_w, float eps) {
    int row = blockIdx.x, h = blockIdx.y;
    norm_rope_head(q + ((size_t)row * heads + h) * hd, hd, meta_of(meta, row).pos(), inv_freq,
                   neox, norm_w, eps);
}

// k and v: rows x kvh x hd. k is normed and rotated in place, then both are stored in f16 at
// the row's position of its job's cache for `layer`. grid (rows, kvh), one warp.
extern "C" __global__ void rope_store_kv(float* k, const float* v, const unsigned long long* meta,
                                         int layer, int kvh, int hd, const float* inv_freq,
                                         int neox, const float* norm_w, float eps) {
    int row = blockIdx.x, h = blockIdx.y;
    RowMeta m = meta_of(meta, row);
    float* kh = k + ((size_t)row * kvh + h) * hd;
    const float* vh = v + ((size_t)row * kvh + h) * hd;
    norm_rope_head(kh, hd, m.pos(), inv_freq, neox, norm_w, eps);
    __syncwarp();
    size_t at = ((size_t)h * m.cap() + m.pos()) * hd;
    half_bits* kc = m.k(layer, kvh, hd) + at;
    half_bits* vc = m.v(layer, kvh, hd) + at;
    for (int i = threadIdx.x; i < hd; i += WARP) {
        kc[i] = f2h(kh[i]);
        vc[i] = f2h(vh[i]);
    }
}

// out[row][h] = softmax(q . K / sqrt(hd)) V over the row's job's positions lo..=pos of `layer`
// (lo = pos + 1 - window for a sliding window, else 0). One block per (row, head); keys are
// scored a tile at a time with a running maximum, so any context length fits in shared memory.
// The thread d < hd owns output dimension d (hd <= ATT_THREADS * 2).
extern "C" __global__ void attention(const float* q, float* out, const unsigned long long* meta,
                                     int layer, int heads, int kvh, int hd, float scale,
                                     int window) {
    __shared__ float qs[2 * ATT_THREADS];
    __shared__ float p[ATT_TILE];
    __shared__ float scratch[ATT_THREADS / WARP];
    int row = blockIdx.x, h = blockIdx.y, g = h / (heads / kvh);
    RowMeta m = meta_of(meta, row);
    int pos = m.pos();
    int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const float* qh = q + ((size_t)row * heads + h) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = qh[i];
    __syncthreads();
    const half_bits* K = m.k(layer, kvh, hd) + (size_t)g * m.cap() * hd;
    const half_bits* V = m.v(layer, kvh, hd) + (size_t)g * m.cap() * hd;
    float run_max = NEG_INF, run_sum = 0.f;
    float acc0 = 0.f, acc1 = 0.f;  // dimensions threadIdx.x and threadIdx.x + ATT_THREADS
    for (int t0 = lo; t0 <= pos; t0 += ATT_TILE) {
        int n = min(ATT_TILE, pos + 1 - t0);
        float s = NEG_INF;
        if ((int)threadIdx.x < n) {
            const half_bits* kr = K + (size_t)(t0 + threadIdx.x) * hd;
            float d = 0.f;
            for (int i = 0; i < hd; i++) d += qs[i] * h2f(kr[i]);
            s = d * scale;
        }
        float tile_max = block_max(s, scratch);
        float new_max = fmaxf(run_max, tile_max);
        float e = (int)threadIdx.x < n ? expf(s - new_max) : 0.f;
        __syncthreads();
        p[threadIdx.x] = e;
        float tile_sum = block_sum(e, scratch);
        float rescale = expf(run_max - new_max);  // 0 on the first tile (run_max = -inf)
        run_sum = run_sum * rescale + tile_sum;
        acc0 *= rescale;
        acc1 *= rescale;
        for (int j = 0; j < n; j++) {
            const half_bits* vr = V + (size_t)(t0 + j) * hd;
            if ((int)threadIdx.x < hd) acc0 += p[j] * h2f(vr[threadIdx.x]);
            if ((int)threadIdx.x + ATT_THREADS < hd)
                acc1 += p[j] * h2f(vr[threadIdx.x + ATT_THREADS]);
        }
        run_max = new_max;
        __syncthreads();
    }
    float* o = out + ((size_t)row * heads + h) * hd;
    if ((int)threadIdx.x < hd) o[threadIdx.x] = acc0 / run_sum;
    if ((int)threadIdx.x + ATT_THREADS < hd) o[threadIdx.x + ATT_THREADS] = acc1 / run_sum;
}

// Copies the rows `picks[i]` of x (rows x dim) to y[i].
extern "C" __global__ void gather_rows(const float* x, float* y, const int* picks, int dim) {
    const float* src = x + (size_t)picks[blockIdx.x] * dim;
    float* dst = y + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = src[i];
}
