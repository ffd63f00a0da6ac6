//! Llama-architecture models (SmolLM2 and kin): reads the weights into the shared decoder.
//!
//! Plain pre-norm blocks with SiLU-gated MLPs; GGUF's converter permutes q and k so that rotary
//! embeddings pair adjacent dimensions. The output head is `output.weight` when the file has
//! one and the token table otherwise (tied embeddings, as in SmolLM2).

use candle_core::Result;

use super::decoder::{Activation, Backend, Context, Decoder, Layer, Rope};
use super::loader::{GgufFile, md_f32, md_u32};

/// Rotary base when the file does not say (llama.cpp's default).
const DEFAULT_ROPE_BASE: f32 = 10_000.0;

pub fn from_gguf(file: &GgufFile) -> Result<Decoder> {
    let ct = &file.ct;
    let hidden = md_u32(ct, "llama.embedding_length")?;
    let blocks = md_u32(ct, "llama.block_count")?;
    let heads = md_u32(ct, "llama.attention.head_count")?;
    let kv_heads = md_u32(ct, "llama.attention.head_count_kv")?;
    let eps = f64::from(md_f32(ct, "llama.attention.layer_norm_rms_epsilon")?);
    let base = f64::from(md_f32(ct, "llama.rope.freq_base").unwrap_or(DEFAULT_ROPE_BASE));
    // check_llama_metadata has already refused shapes these would divide by.
    let head_dim = hidden / heads;
    let (embed, head) = if file.has("output.weight") {
        (
            file.embedding("token_embd.weight", false)?,
            file.linear("output.weight")?,
        )
    } else {
        file.tied("token_embd.weight", false)?
    };
    let final_norm = file.norm("output_norm.weight", eps)?;
    let mut layers = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let w = |name: &str| format!("blk.{i}.{name}.weight");
        layers.push(Layer {
            attn_norm: file.norm(&w("attn_norm"), eps)?,
            q: file.linear(&w("attn_q"))?,
            k: file.linear(&w("attn_k"))?,
            v: file.linear(&w("attn_v"))?,
            o: file.linear(&w("attn_output"))?,
            qk_norm: None,
            post_attn_norm: None,
            ffn_norm: file.norm(&w("ffn_norm"), eps)?,
            gate: file.linear(&w("ffn_gate"))?,
            up: file.linear(&w("ffn_up"))?,
            down: file.linear(&w("ffn_down"))?,
            post_ffn_norm: None,
            window: None,
            rope_base: base,
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
        device: file.device().clone(),
        caches: Context::default(),
        backend: Backend::Cpu,
    };
    decoder.check_shapes()?;
    Ok(decoder)
}
