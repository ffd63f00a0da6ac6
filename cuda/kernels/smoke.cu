// Smoke kernel: the smallest kernel that exercises what the decoder's kernels rely on (a warp
// shuffle reduction and f16 loads), so the build and ptx-check catch a toolchain or PTX ISA
// problem even when no real kernel has changed.
#include <cuda_fp16.h>

// Sums `n` f16 values with one warp (launch with 32 threads, one block) into out[0] as f32.
extern "C" __global__ void smoke_warp_sum_f16(const __half *__restrict__ in, float *__restrict__ out,
                                              unsigned int n) {
    float acc = 0.0f;
    for (unsigned int i = threadIdx.x; i < n; i += 32) {
        acc += __half2float(in[i]);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    }
    if (threadIdx.x == 0) {
        out[0] = acc;
    }
}
