//! Llama-architecture models (SmolLM2 and kin): reads the weights into the shared decoder.
//!
//! Plain pre-norm blocks with SiLU-gated MLPs; GGUF's converter permutes q and k so that rotary
//! embeddings pair adjacent dimensions. The output head is `output.weight` when the file has
//! one and the token table otherwise (tied embeddings, as in SmolLM2).

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Result};

use skep_kernels::attention::KvCache;

use super::decoder::{Activation, Decoder, Layer, Rope};
use super::linear::Linear;
use super::loader::{embedding, md_f32, md_u32, norm, tied};

/// Rotary base when the file does not say (llama.cpp's default).
const DEFAULT_ROPE_BASE: f32 = 10_000.0;

pub fn from_gguf<R: Read + Seek>(ct: Content, r: &mut R, device: &Device) -> Result<Decoder> {
    let hidden = md_u32(&ct, "llama.embedding_length")?;
    let blocks = md_u32(&ct, "llama.block_count")?;
    let heads = md_u32(&ct, "llama.attention.head_count")?;
    let kv_heads = md_u32(&ct, "llama.attention.head_count_kv")?;
    let eps = f64::from(md_f32(&ct, "llama.attention.layer_norm_rms_epsilon")?);
    let base = f64::from(md_f32(&ct, "llama.rope.freq_base").unwrap_or(DEFAULT_ROPE_BASE));
    // check_llama_metadata has already refused shapes these would divide by.
    let head_dim = hidden / heads;
    let mut tensor = |name: &str| ct.tensor(r, name, device);
    let embed_q = tensor("token_embd.weight")?;
    let (embed, head) = match tensor("output.weight") {
        Ok(t) => (embedding(&embed_q, false, device)?, Linear::new(t)?),
        Err(_) => tied(embed_q, false, device)?,
    };
    let final_norm = norm(tensor("output_norm.weight")?, eps, device)?;
    let mut layers = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let p = format!("blk.{i}");
        let mut w = |name: &str| tensor(&format!("{p}.{name}.weight"));
        layers.push(Layer {
            attn_norm: norm(w("attn_norm")?, eps, device)?,
            q: Linear::new(w("attn_q")?)?,
            k: Linear::new(w("attn_k")?)?,
            v: Linear::new(w("attn_v")?)?,
            o: Linear::new(w("attn_output")?)?,
            qk_norm: None,
            post_attn_norm: None,
            ffn_norm: norm(w("ffn_norm")?, eps, device)?,
            gate: Linear::new(w("ffn_gate")?)?,
            up: Linear::new(w("ffn_up")?)?,
            down: Linear::new(w("ffn_down")?)?,
            post_ffn_norm: None,
            window: None,
            rope_base: base,
            cache: KvCache::default(),
        });
    }
    let decoder = Decoder {
        embed,
        embed_scale: None,
        head,
        layers,
        final_norm,
        hidden,
        heads,
        kv_heads,
        head_dim,
        rope: Rope::Interleaved,
        activation: Activation::Silu,
        device: device.clone(),
    };
    decoder.check_shapes()?;
    Ok(decoder)
}
