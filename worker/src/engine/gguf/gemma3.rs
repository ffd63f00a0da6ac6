//! Gemma 3 forward pass over quantized GGUF weights (llama.cpp's `gemma3` architecture).
//!
//! Written here rather than taken from candle-transformers because upstream's quantized Gemma 3
//! differs from the reference in two ways that matter: its feed-forward uses SiLU where Gemma
//! uses GELU (tanh approximation), and it builds rotary tables for the whole 131k context on
//! every layer (seconds of load time, gigabytes of memory). Here rotary angles are computed for
//! the positions a call needs, once per base frequency, and the MLP is `gelu_tanh(gate) * up`.
//!
//! Layer layout (per llama.cpp): pre-norm, attention with per-head RMS-normed q and k, NeoX-style
//! rotary (base 10 000 on sliding-window layers, `rope.freq_base` on global ones; every sixth
//! layer is global), post-attention norm, residual; pre-FFN norm, GELU-gated MLP, post-FFN norm,
//! residual. Embeddings are scaled by sqrt(hidden) and tied to the output head. Norm weights in
//! GGUF already include Gemma's `1 +` offset (the converter adds it).

use std::io::{Read, Seek};

use candle_core::quantized::QMatMul;
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Module, Result, Tensor};

/// Every `SWA_PATTERN`-th layer attends globally; the others see a sliding window.
const SWA_PATTERN: usize = 6;
/// Rotary base of the sliding-window layers (fixed by the architecture, not in the metadata).
const LOCAL_ROPE_BASE: f64 = 10_000.0;

struct Norm {
    weight: Tensor,
    eps: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }
}

struct Layer {
    attn_norm: Norm,
    q: QMatMul,
    k: QMatMul,
    v: QMatMul,
    o: QMatMul,
    q_norm: Norm,
    k_norm: Norm,
    post_attn_norm: Norm,
    ffn_norm: Norm,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
    post_ffn_norm: Norm,
    /// Sliding window in tokens, or `None` for a global layer.
    window: Option<usize>,
    rope_base: f64,
    cache: Option<(Tensor, Tensor)>,
}

pub struct Gemma3 {
    embed: Tensor,
    head: QMatMul,
    layers: Vec<Layer>,
    final_norm: Norm,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

fn md_u32(ct: &Content, key: &str) -> Result<usize> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v.to_u32()? as usize),
        None => candle_core::bail!("missing GGUF metadata {key}"),
    }
}

fn md_f32(ct: &Content, key: &str) -> Result<f32> {
    match ct.metadata.get(key) {
        Some(v) => v.to_f32(),
        None => candle_core::bail!("missing GGUF metadata {key}"),
    }
}

impl Gemma3 {
    pub fn from_gguf<R: Read + Seek>(ct: Content, r: &mut R, device: &Device) -> Result<Self> {
        let hidden = md_u32(&ct, "gemma3.embedding_length")?;
        let blocks = md_u32(&ct, "gemma3.block_count")?;
        let heads = md_u32(&ct, "gemma3.attention.head_count")?;
        let kv_heads = md_u32(&ct, "gemma3.attention.head_count_kv")?;
        let head_dim = md_u32(&ct, "gemma3.attention.key_length")?;
        let window = md_u32(&ct, "gemma3.attention.sliding_window")?;
        let eps = f64::from(md_f32(&ct, "gemma3.attention.layer_norm_rms_epsilon")?);
        let global_base = f64::from(md_f32(&ct, "gemma3.rope.freq_base")?);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
            candle_core::bail!(
                "bad Gemma 3 shape: {heads} heads, {kv_heads} kv heads, head {head_dim}"
            );
        }
        let mut tensor = |name: &str| ct.tensor(r, name, device);
        let embed_q = tensor("token_embd.weight")?;
        // Half precision keeps the 262k-row table at a third of f32's size; rows are widened
        // to f32 as they are looked up.
        let embed = embed_q.dequantize_f16(device)?;
        let head = QMatMul::from_qtensor(embed_q)?;
        let norm = |t: candle_core::quantized::QTensor| -> Result<Norm> {
            Ok(Norm {
                weight: t.dequantize(device)?,
                eps,
            })
        };
        let final_norm = norm(tensor("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let p = format!("blk.{i}");
            let mm = |t| QMatMul::from_qtensor(t);
            let global = (i + 1) % SWA_PATTERN == 0;
            layers.push(Layer {
                attn_norm: norm(tensor(&format!("{p}.attn_norm.weight"))?)?,
                q: mm(tensor(&format!("{p}.attn_q.weight"))?)?,
                k: mm(tensor(&format!("{p}.attn_k.weight"))?)?,
                v: mm(tensor(&format!("{p}.attn_v.weight"))?)?,
                o: mm(tensor(&format!("{p}.attn_output.weight"))?)?,
                q_norm: norm(tensor(&format!("{p}.attn_q_norm.weight"))?)?,
                k_norm: norm(tensor(&format!("{p}.attn_k_norm.weight"))?)?,
                post_attn_norm: norm(tensor(&format!("{p}.post_attention_norm.weight"))?)?,
                ffn_norm: norm(tensor(&format!("{p}.ffn_norm.weight"))?)?,
                gate: mm(tensor(&format!("{p}.ffn_gate.weight"))?)?,
                up: mm(tensor(&format!("{p}.ffn_up.weight"))?)?,
                down: mm(tensor(&format!("{p}.ffn_down.weight"))?)?,
                post_ffn_norm: norm(tensor(&format!("{p}.post_ffw_norm.weight"))?)?,
                window: (!global).then_some(window),
                rope_base: if global { global_base } else { LOCAL_ROPE_BASE },
                cache: None,
            });
        }
        Ok(Gemma3 {
            embed,
            head,
            layers,
            final_norm,
            hidden,
            heads,
            kv_heads,
            head_dim,
            device: device.clone(),
        })
    }

    pub fn clear_kv_cache(&mut self) {
        for l in &mut self.layers {
            l.cache = None;
        }
    }

    /// Rotary cos/sin tables for positions `pos..pos + len` at `base`: `(len, head_dim / 2)`.
    fn rotary(&self, base: f64, pos: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / base.powf(2.0 * i as f64 / self.head_dim as f64)) as f32)
            .collect();
        let inv = Tensor::from_vec(inv, (1, half), &self.device)?;
        let t = Tensor::arange(pos as u32, (pos + len) as u32, &self.device)?
            .to_dtype(DType::F32)?
            .reshape((len, 1))?;
        let freqs = t.matmul(&inv)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Logits for the token after `tokens` (shape `(1, seq)`), which start at position `pos`.
    pub fn forward(&mut self, tokens: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, seq) = tokens.dims2()?;
        let mut x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .to_dtype(DType::F32)?
            .reshape((b, seq, self.hidden))?;
        x = (x * (self.hidden as f64).sqrt())?;
        let (hd, heads, kv_heads) = (self.head_dim, self.heads, self.kv_heads);
        let local = self.rotary(LOCAL_ROPE_BASE, pos, seq)?;
        let global_base = self
            .layers
            .iter()
            .find(|l| l.window.is_none())
            .map_or(LOCAL_ROPE_BASE, |l| l.rope_base);
        let global = self.rotary(global_base, pos, seq)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &mut self.layers {
            let (cos, sin) = if l.window.is_some() { &local } else { &global };
            let h = l.attn_norm.forward(&x)?;
            let split = |t: Tensor, n: usize| -> Result<Tensor> {
                t.reshape((b, seq, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = l.q_norm.forward(&split(l.q.forward(&h)?, heads)?)?;
            let k = l.k_norm.forward(&split(l.k.forward(&h)?, kv_heads)?)?;
            let v = split(l.v.forward(&h)?, kv_heads)?;
            let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
            let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
            let (k, v) = match &l.cache {
                Some((ck, cv)) if pos > 0 => {
                    (Tensor::cat(&[ck, &k], 2)?, Tensor::cat(&[cv, &v], 2)?)
                }
                _ => (k, v),
            };
            l.cache = Some((k.clone(), v.clone()));
            let kv_len = k.dim(2)?;
            let rep = heads / kv_heads;
            let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
            let mut att = (q.matmul(&k.t()?)? * scale)?;
            // Query i (absolute pos + i) sees key j when j <= pos + i and, on sliding-window
            // layers, pos + i - j < window.
            let window = l.window;
            let mask: Vec<f32> = (0..seq)
                .flat_map(|i| {
                    let qp = pos + i;
                    (0..kv_len).map(move |j| {
                        let visible = j <= qp && window.is_none_or(|w| qp - j < w);
                        if visible { 0.0 } else { f32::NEG_INFINITY }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (1, 1, seq, kv_len), &self.device)?;
            att = att.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let out = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, seq, heads * hd))?;
            let out = l.post_attn_norm.forward(&l.o.forward(&out)?)?;
            x = (x + out)?;
            let h = l.ffn_norm.forward(&x)?;
            let ff = (l.gate.forward(&h)?.gelu()? * l.up.forward(&h)?)?;
            let ff = l.post_ffn_norm.forward(&l.down.forward(&ff)?)?;
            x = (x + ff)?;
        }
        let last = x.narrow(1, seq - 1, 1)?;
        let last = self.final_norm.forward(&last)?;
        // (1, 1, vocab) -> (1, vocab), as the llama path returns.
        self.head.forward(&last)?.squeeze(1)
    }
}

/// The number of positions a Gemma 3 file supports.
pub fn context_len(ct: &Content) -> Result<usize> {
    md_u32(ct, "gemma3.context_length")
}
