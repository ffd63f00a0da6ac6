//! skep's CUDA backend for the GGUF decoder: device selection, launch arithmetic and (with the
//! `cuda` feature) the kernels and the buffers they run on.

pub mod device;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod launch;
#[cfg(feature = "cuda")]
pub mod ptx;
