//! Gemma 3 (llama.cpp's `gemma3` architecture): reads the weights into the shared decoder.
//!
//! Written here rather than taken from candle-transformers because upstream's quantized Gemma 3
//! differs from the reference in two ways that matter: its feed-forward uses SiLU where Gemma
//! uses GELU (tanh approximation), and it builds rotary tables for the whole 131k context on
//! every layer (seconds of load time, gigabytes of memory). The decoder computes rotary angles
//! for the positions a call needs, once per base frequency.
//!
//! Layer layout (per llama.cpp): pre-norm, attention with per-head RMS-normed q and k, NeoX-style
//! rotary (base 10 000 on sliding-window layers, `rope.freq_base` on global ones; every sixth
//! layer is global), post-attention norm, residual; pre-FFN norm, GELU-gated MLP, post-FFN norm,
//! residual. Embeddings are scaled by sqrt(hidden) and tied to the output head. Norm weights in
//! GGUF already include Gemma's `1 +` offset (the converter adds it).

use candle_core::Result;
use candle_core::quantized::gguf_file::Content;

use super::decoder::{Activation, Backend, Context, Decoder, Layer, Rope};
use super::loader::{GgufFile, md_f32, md_u32};

/// Every `SWA_PATTERN`-th layer attends globally; the others see a sliding window.
const SWA_PATTERN: usize = 6;
/// Rotary base of the sliding-window layers (fixed by the architecture, not in the metadata).
const LOCAL_ROPE_BASE: f64 = 10_000.0;

pub fn from_gguf(file: &GgufFile) -> Result<Decoder> {
    let ct = &file.ct;
    let hidden = md_u32(ct, "gemma3.embedding_length")?;
    let blocks = md_u32(ct, "gemma3.block_count")?;
    let heads = md_u32(ct, "gemma3.attention.head_count")?;
    let kv_heads = md_u32(ct, "gemma3.attention.head_count_kv")?;
    let head_dim = md_u32(ct, "gemma3.attention.key_length")?;
    let window = md_u32(ct, "gemma3.attention.sliding_window")?;
    let eps = f64::from(md_f32(ct, "gemma3.attention.layer_norm_rms_epsilon")?);
    let global_base = f64::from(md_f32(ct, "gemma3.rope.freq_base")?);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
        candle_core::bail!(
            "bad Gemma 3 shape: {heads} heads, {kv_heads} kv heads, head {head_dim}"
        );
    }
    // Rows rounded through f16: the reference prompt of the llama.cpp check has a near-tie at
    // its 19th greedy token (0.03 logits apart at ~21); the engine's first Gemma version kept
    // the table in f16 and lands on llama.cpp's side, exact f32 rows land on the other. The
    // rounding (2^-11 relative) is far below the weights' own quantization error.
    let (embed, head) = file.tied("token_embd.weight", true)?;
    let final_norm = file.norm("output_norm.weight", eps)?;
    let mut layers = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let w = |name: &str| format!("blk.{i}.{name}.weight");
        let global = (i + 1) % SWA_PATTERN == 0;
        layers.push(Layer {
            attn_norm: file.norm(&w("attn_norm"), eps)?,
            q: file.linear(&w("attn_q"))?,
            k: file.linear(&w("attn_k"))?,
            v: file.linear(&w("attn_v"))?,
            o: file.linear(&w("attn_output"))?,
            qk_norm: Some((
                file.vector(&w("attn_q_norm"))?,
                file.vector(&w("attn_k_norm"))?,
                eps as f32,
            )),
            post_attn_norm: Some(file.norm(&w("post_attention_norm"), eps)?),
            ffn_norm: file.norm(&w("ffn_norm"), eps)?,
            gate: file.linear(&w("ffn_gate"))?,
            up: file.linear(&w("ffn_up"))?,
            down: file.linear(&w("ffn_down"))?,
            post_ffn_norm: Some(file.norm(&w("post_ffw_norm"), eps)?),
            window: (!global).then_some(window),
            rope_base: if global { global_base } else { LOCAL_ROPE_BASE },
        });
    }
    let decoder = Decoder {
        embed,
        embed_scale: Some((hidden as f64).sqrt()),
        head,
        layers,
        final_norm,
        hidden,
        heads,
        kv_heads,
        head_dim,
        rope: Rope::Neox,
        activation: Activation::GeluTanh,
        device: file.device().clone(),
        caches: Context::default(),
        backend: Backend::Cpu,
    };
    decoder.check_shapes()?;
    Ok(decoder)
}

/// The number of positions a Gemma 3 file supports.
pub fn context_len(ct: &Content) -> Result<usize> {
    md_u32(ct, "gemma3.context_length")
}
