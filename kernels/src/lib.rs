//! CPU kernels the GGUF engine needs and candle's CPU backend lacks.
//!
//! candle runs Q4_1 and Q5_0 weights (SmolLM2's and Gemma 3's main formats) through scalar
//! reference loops. The kernels here compute the same products the way llama.cpp does
//! (activations quantized to 8 bits per 32-value block, an integer dot product per block, scales
//! applied per block, summed in ggml's AVX2 order) with AVX2 through `safe_arch` where the build
//! targets it, and in portable Rust with the same summation order elsewhere.

pub mod attention;
mod pool;
pub mod q4_1;
pub mod q8;
pub mod q8_1;

pub use q4_1::Q4_1Matrix;
pub use q8::Q8Matrix;
pub use q8_1::Q8_1Row;

/// Values per quantization block in the Q4_1 and Q8_1 formats.
pub const QK: usize = 32;

/// Why weights could not be turned into a kernel's layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("a row of {cols} values is not a whole number of {QK}-value blocks")]
    Ragged { cols: usize },
    #[error("{rows}x{cols} weights need {expected} bytes, got {got}")]
    Size {
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
}

/// Called first by the tests that compare an AVX2 kernel with its portable twin. The AVX2
/// kernels exist only in builds that target AVX2 and FMA (`safe_arch` gates them at compile
/// time), so without this such a test would have nothing to compare and pass vacuously. On
/// x86-64 (every CI machine has AVX2 and FMA) a build or CPU without them fails here instead.
#[cfg(all(test, target_arch = "x86_64"))]
#[track_caller]
pub(crate) fn require_avx2_fma() {
    assert!(
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        "this CPU lacks AVX2 or FMA: the AVX2 kernels cannot be checked here"
    );
    #[cfg(not(all(target_feature = "avx2", target_feature = "fma")))]
    panic!(
        "this build does not target AVX2 and FMA (RUSTFLAGS replace .cargo/config.toml's \
         target-cpu=native), so the AVX2 kernels were not compiled and cannot be checked; \
         build with -C target-cpu=native or x86-64-v3"
    );
}
