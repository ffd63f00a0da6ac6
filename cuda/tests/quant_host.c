// Host build of kernels/quant.cuh for tests/dequant.rs: one entry point that dispatches to each
// format's unit function, so Rust can compare them with candle's dequantization.
#include "quant.cuh"

// `kind` numbers the formats in the order of tests/dequant.rs's `Kind`; an unknown one leaves
// `out` untouched (the test then sees its sentinel values).
void skep_unit(int kind, const unsigned char* row, int u, float* out) {
    switch (kind) {
    case 0: unit_q4_0(row, u, out); break;
    case 1: unit_q4_1(row, u, out); break;
    case 2: unit_q5_0(row, u, out); break;
    case 3: unit_q8_0(row, u, out); break;
    case 4: unit_q4_k(row, u, out); break;
    case 5: unit_q6_k(row, u, out); break;
    default: break;
    }
}

// The host half -> float conversion itself, tested against the `half` crate.
float skep_h2f(unsigned short h) { return h2f(h); }
