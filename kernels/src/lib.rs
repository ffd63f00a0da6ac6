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
