//! CPU kernels the GGUF engine needs and candle's CPU backend lacks.
//!
//! candle runs Q4_1 and Q5_0 weights (SmolLM2's and Gemma 3's main formats) through scalar
//! reference loops. The kernels here compute the same products the way llama.cpp does
//! (activations quantized to 8 bits per 32-value block, an integer dot product per block, scales
//! applied per block, summed in ggml's AVX2 order) with AVX2 through `safe_arch` where the build
//! targets it, and in portable Rust with the same summation order elsewhere.
//!
//! The matrices read their blocks in the GGUF file's own layout from [`WeightBytes`], normally a
//! range of a read-only mapping of the model file ([`weights`]), so that the weights are never
//! copied and every process on the same file shares their pages. `unsafe_code` is denied
//! crate-wide; the one function that needs it (the mapping) opts in with `#[allow]` and a
//! `SAFETY:` comment.

#![deny(unsafe_code)]

pub mod attention;
mod pool;
pub mod q4_1;
pub mod q4_k;
pub mod q6_k;
pub mod q8;
pub mod q8_1;
pub mod weights;

pub use q4_1::Q4_1Matrix;
pub use q4_k::{Q4KMatrix, Q8KRow};
pub use q6_k::Q6KMatrix;
pub use q8::Q8Matrix;
pub use q8_1::Q8_1Row;
pub use weights::{Mapping, WeightBytes};

/// Every f16 widened to f32 (256 KiB), indexed by its bits: one load per scale of the weights
/// read in place. F16C's scalar conversion merges into a register, which chains a product's
/// iterations through that register; ggml widened its scales through the same table before
/// it used F16C.
pub(crate) fn f16_table() -> &'static [f32; 1 << 16] {
    static TABLE: std::sync::OnceLock<Box<[f32; 1 << 16]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0f32; 1 << 16]);
        for (bits, v) in t.iter_mut().enumerate() {
            *v = half::f16::from_bits(bits as u16).to_f32();
        }
        t
    })
}

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
    #[error("weights at byte {start} are not aligned to {alignment} bytes")]
    Misaligned { start: usize, alignment: usize },
    #[error("{len} bytes of weights at byte {start} run past the end of the {file}-byte file")]
    OutOfFile {
        start: usize,
        len: usize,
        file: usize,
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
