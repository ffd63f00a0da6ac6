// Dequantization of GGUF's quantized formats, shared by the CUDA kernels (decoder.cu) and a host
// build (tests/quant_host.c) that checks it bit for bit against candle, so it is written in the
// common subset of C and CUDA C: no templates, references or other C++.
//
// `u` is a 32-element unit of a row (a block of the 32-element formats, a sub-block of the
// 256-element K formats); `w` receives its values in row order.
#ifndef SKEP_QUANT_CUH
#define SKEP_QUANT_CUH

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SKEP_DEVICE 1
#define SKEP_FN __device__ __forceinline__
#else
#include <string.h>
#define SKEP_FN static inline
#endif

typedef unsigned short half_bits;
typedef unsigned char u8;
typedef signed char i8;

#ifdef SKEP_DEVICE
// No headers: NVRTC from the wheel has no CUDA headers, and half precision needs only two
// conversion instructions.
SKEP_FN float h2f(half_bits h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Every f16 the formats store is at an even offset of a block of even size.
SKEP_FN float f16_at(const u8* p) { return h2f(*(const half_bits*)p); }
#else
// IEEE binary16 -> binary32, exact (every half is a float): what `cvt.f32.f16` does. A NaN keeps
// its payload and comes out quiet, as on x86 and in the `half` crate.
SKEP_FN float h2f(half_bits h) {
    unsigned sign = (unsigned)(h >> 15) << 31, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13) | (mant ? 0x00400000u : 0u);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {
        // A subnormal half is mant * 2^-24: normalise until the implicit bit (bit 10) is set,
        // starting from the exponent of 2^-14 (biased 113).
        unsigned e = 113;
        while (!(mant & 0x400)) {
            mant <<= 1;
            e--;
        }
        bits = sign | (e << 23) | ((mant & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// Byte by byte: little-endian like GGUF and the GPU, with no alignment or aliasing assumption.
SKEP_FN float f16_at(const u8* p) { return h2f((half_bits)(p[0] | (p[1] << 8))); }
#endif

// Q4_0: f16 d, 16 bytes of nibbles (low nibbles are elements 0..15, high 16..31).
SKEP_FN void unit_q4_0(const u8* row, int u, float* w) {
    const u8* b = row + u * 18;
    float d = f16_at(b);
    for (int i = 0; i < 16; i++) {
        int q = b[2 + i];
        w[i] = ((q & 0xF) - 8) * d;
        w[i + 16] = ((q >> 4) - 8) * d;
    }
}

// Q4_1: f16 d, f16 m, 16 bytes of nibbles; value = q * d + m.
SKEP_FN void unit_q4_1(const u8* row, int u, float* w) {
    const u8* b = row + u * 20;
    float d = f16_at(b), m = f16_at(b + 2);
    for (int i = 0; i < 16; i++) {
        int q = b[4 + i];
        w[i] = (q & 0xF) * d + m;
        w[i + 16] = (q >> 4) * d + m;
    }
}

// Q5_0: f16 d, 32 high bits, 16 bytes of low nibbles; value = (q - 16) * d.
SKEP_FN void unit_q5_0(const u8* row, int u, float* w) {
    const u8* b = row + u * 22;
    float d = f16_at(b);
    unsigned qh = b[2] | (b[3] << 8) | (b[4] << 16) | ((unsigned)b[5] << 24);
    for (int i = 0; i < 16; i++) {
        int q = b[6 + i];
        int lo = (q & 0xF) | (((qh >> i) << 4) & 0x10);
        int hi = (q >> 4) | ((qh >> (i + 12)) & 0x10);
        w[i] = (lo - 16) * d;
        w[i + 16] = (hi - 16) * d;
    }
}

// Q8_0: f16 d, 32 signed bytes.
SKEP_FN void unit_q8_0(const u8* row, int u, float* w) {
    const u8* b = row + u * 34;
    float d = f16_at(b);
    for (int i = 0; i < 32; i++) w[i] = (i8)b[2 + i] * d;
}

// Q4_K: 256-element super-blocks of f16 d, f16 dmin, 12 bytes of packed 6-bit scales and mins,
// 128 bytes of nibbles. Sub-block u uses bytes 32*(u/2).. (low nibbles for even u, high for
// odd) with scale and min number u.
SKEP_FN void unit_q4_k(const u8* row, int u, float* w) {
    const u8* b = row + (u / 8) * 144;
    int s = u % 8;
    float d = f16_at(b), dmin = f16_at(b + 2);
    const u8* sc = b + 4;
    int scale, min;
    if (s < 4) {
        scale = sc[s] & 63;
        min = sc[s + 4] & 63;
    } else {
        scale = (sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4);
        min = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
    float d1 = d * scale, m1 = dmin * min;
    const u8* q = b + 16 + 32 * (s / 2);
    int shift = (s & 1) * 4;
    for (int i = 0; i < 32; i++) w[i] = d1 * ((q[i] >> shift) & 0xF) - m1;
}

// Q6_K: 256-element super-blocks of 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16
// signed 8-bit scales and f16 d. Sub-block u: half n = u/4 and group g = u%4 of that half.
SKEP_FN void unit_q6_k(const u8* row, int u, float* w) {
    const u8* b = row + (u / 8) * 210;
    int s = u % 8, n = s / 4, g = s % 4;
    const u8* ql = b + 64 * n + (g & 1) * 32;
    const u8* qh = b + 128 + 32 * n;
    const i8* sc = (const i8*)(b + 192) + 8 * n + 2 * g;
    float d = f16_at(b + 208);
    int lshift = (g >> 1) * 4, hshift = 2 * g;
    for (int i = 0; i < 32; i++) {
        int q = (((ql[i] >> lshift) & 0xF) | (((qh[i] >> hshift) & 3) << 4)) - 32;
        w[i] = d * sc[i / 16] * q;
    }
}

#endif // SKEP_QUANT_CUH
