//! Reading metadata, norms and embeddings out of a GGUF file for the decoder.

use candle_core::quantized::gguf_file::Content;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Result};

use super::decoder::{Embedding, Norm};
use super::linear::{Linear, q8_matrix};

pub fn md_u32(ct: &Content, key: &str) -> Result<usize> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v.to_u32()? as usize),
        None => candle_core::bail!("missing GGUF metadata {key}"),
    }
}

pub fn md_f32(ct: &Content, key: &str) -> Result<f32> {
    match ct.metadata.get(key) {
        Some(v) => v.to_f32(),
        None => candle_core::bail!("missing GGUF metadata {key}"),
    }
}

pub fn norm(t: QTensor, eps: f64, device: &Device) -> Result<Norm> {
    Ok(Norm {
        weight: t.dequantize(device)?,
        eps,
    })
}

/// The token table: Q8_0 (and Q5_0) stay 8-bit, looked up a row at a time as ggml widens them
/// (optionally rounded to f16); other formats are dequantized to f16.
pub fn embedding(t: &QTensor, round_to_f16: bool, device: &Device) -> Result<Embedding> {
    if let Some(m) = q8_matrix(t)? {
        return Ok(Embedding::Q8 {
            rows: Arc::new(m),
            round_to_f16,
        });
    }
    t.dequantize_f16(device).map(Embedding::Dense)
}

/// The token table and the output head tied to it; one copy of the weights serves both when
/// the kernels take the format.
pub fn tied(t: QTensor, round_to_f16: bool, device: &Device) -> Result<(Embedding, Linear)> {
    let embed = embedding(&t, round_to_f16, device)?;
    let head = match &embed {
        Embedding::Q8 { rows, .. } => Linear::Q8(Arc::clone(rows)),
        Embedding::Dense(_) => Linear::new(t)?,
    };
    Ok((embed, head))
}
