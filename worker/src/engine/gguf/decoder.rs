//! The decoder-only transformer forward pass shared by the architectures the engine runs.
//!
//! Llama and Gemma 3 are the same stack of pre-norm attention + gated MLP blocks; they differ in
//! a handful of switches (rotary layout, activation, extra norms, sliding windows, embedding
//! scale), which `Decoder` carries as data rather than as two copies of the loop.

use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

use skep_kernels::Q8Matrix;

use super::linear::Linear;

pub struct Norm {
    pub weight: Tensor,
    pub eps: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }
}

/// How rotary embeddings pair up a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rope {
    /// `(2i, 2i + 1)`: GGUF Llama (its converter permutes q and k for this).
    Interleaved,
    /// `(i, i + d/2)`: Gemma and other NeoX-style models.
    Neox,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (what Gemma is trained with).
    GeluTanh,
}

pub struct Layer {
    pub attn_norm: Norm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Per-head RMS norms of q and k (Gemma 3).
    pub qk_norm: Option<(Norm, Norm)>,
    /// Norm of the attention output before the residual add (Gemma 3).
    pub post_attn_norm: Option<Norm>,
    pub ffn_norm: Norm,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// Norm of the MLP output before the residual add (Gemma 3).
    pub post_ffn_norm: Option<Norm>,
    /// Sliding window in tokens, or `None` for a layer that attends to the whole context.
    pub window: Option<usize>,
    pub rope_base: f64,
    pub cache: Option<(Tensor, Tensor)>,
}

/// Token embeddings: rows of the file's table, widened as they are looked up.
pub enum Embedding {
    /// `round_to_f16`: each value is rounded to half precision after widening (see
    /// `gemma3::from_gguf` for why).
    Q8 {
        rows: Arc<Q8Matrix>,
        round_to_f16: bool,
    },
    /// Any other format, dequantized at load (half precision to bound memory).
    Dense(Tensor),
}

impl Embedding {
    fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Q8 {
                rows: t,
                round_to_f16,
            } => {
                let mut out = vec![0f32; ids.len() * t.cols()];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(t.cols())) {
                    if t.row_into(id as usize, row).is_none() {
                        candle_core::bail!(
                            "token {id} is outside the {}-entry vocabulary",
                            t.rows()
                        );
                    }
                }
                if *round_to_f16 {
                    for v in &mut out {
                        *v = half::f16::from_f32(*v).to_f32();
                    }
                }
                Tensor::from_vec(out, (ids.len(), t.cols()), device)
            }
            Embedding::Dense(t) => {
                let ids = Tensor::new(ids, device)?;
                t.index_select(&ids, 0)?.to_dtype(DType::F32)
            }
        }
    }
}

pub struct Decoder {
    pub embed: Embedding,
    /// Gemma multiplies embeddings by sqrt(hidden).
    pub embed_scale: Option<f64>,
    pub head: Linear,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: Rope,
    pub activation: Activation,
    pub device: Device,
}

impl Decoder {
    pub fn clear_kv_cache(&mut self) {
        for l in &mut self.layers {
            l.cache = None;
        }
    }

    /// Rotary cos/sin tables for positions `pos..pos + len` at `base`: `(len, head_dim / 2)`.
    /// Computed per call for just these positions: tables for the whole context would cost
    /// load time and memory for positions no job reaches.
    fn rotary(&self, base: f64, pos: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / base.powf(2.0 * i as f64 / self.head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in pos..pos + len {
            for inv in &inv {
                let angle = p as f32 * inv;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), &self.device)?,
            Tensor::from_vec(sin, (len, half), &self.device)?,
        ))
    }

    /// Additive mask `(1, 1, seq, kv_len)` for queries at `pos..pos + seq`, or `None` when every
    /// key is visible to every query (one new token and no window in the way).
    fn mask(&self, pos: usize, seq: usize, window: Option<usize>) -> Result<Option<Tensor>> {
        let kv_len = pos + seq;
        if seq == 1 && window.is_none_or(|w| kv_len <= w) {
            return Ok(None);
        }
        // Query i (absolute pos + i) sees key j when j <= pos + i and, on sliding-window
        // layers, pos + i - j < window.
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                let qp = pos + i;
                (0..kv_len).map(move |j| {
                    let visible = j <= qp && window.is_none_or(|w| qp - j < w);
                    if visible { 0.0 } else { f32::NEG_INFINITY }
                })
            })
            .collect();
        Tensor::from_vec(mask, (1, 1, seq, kv_len), &self.device).map(Some)
    }

    /// Logits `(1, vocab)` for the token after `ids`, which start at position `pos`.
    pub fn forward(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let seq = ids.len();
        if seq == 0 {
            candle_core::bail!("no tokens to run");
        }
        let mut x = self
            .embed
            .lookup(ids, &self.device)?
            .reshape((1, seq, self.hidden))?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        let (hd, heads, kv_heads) = (self.head_dim, self.heads, self.kv_heads);
        // One rotary table and one mask per distinct base / window, shared by the layers.
        let mut ropes: Vec<(f64, (Tensor, Tensor))> = Vec::new();
        let mut masks: Vec<(Option<usize>, Option<Tensor>)> = Vec::new();
        for l in &self.layers {
            if !ropes.iter().any(|(b, _)| *b == l.rope_base) {
                ropes.push((l.rope_base, self.rotary(l.rope_base, pos, seq)?));
            }
            if !masks.iter().any(|(w, _)| *w == l.window) {
                masks.push((l.window, self.mask(pos, seq, l.window)?));
            }
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let rope = self.rope;
        let activation = self.activation;
        for l in &mut self.layers {
            let (cos, sin) = &ropes
                .iter()
                .find(|(b, _)| *b == l.rope_base)
                .expect("built above")
                .1;
            let mask = &masks
                .iter()
                .find(|(w, _)| *w == l.window)
                .expect("built above")
                .1;
            let h = l.attn_norm.forward(&x)?;
            let split = |t: Tensor, n: usize| -> Result<Tensor> {
                t.reshape((1, seq, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let mut q = split(l.q.forward(&h)?, heads)?;
            let mut k = split(l.k.forward(&h)?, kv_heads)?;
            let v = split(l.v.forward(&h)?, kv_heads)?;
            if let Some((qn, kn)) = &l.qk_norm {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            }
            let (q, k) = match rope {
                Rope::Interleaved => (
                    candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                    candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
                ),
                Rope::Neox => (
                    candle_nn::rotary_emb::rope(&q, cos, sin)?,
                    candle_nn::rotary_emb::rope(&k, cos, sin)?,
                ),
            };
            let (k, v) = match &l.cache {
                Some((ck, cv)) if pos > 0 => {
                    (Tensor::cat(&[ck, &k], 2)?, Tensor::cat(&[cv, &v], 2)?)
                }
                _ => (k, v),
            };
            l.cache = Some((k.clone(), v.clone()));
            let rep = heads / kv_heads;
            let k = candle_transformers::utils::repeat_kv(k, rep)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, rep)?.contiguous()?;
            let mut att = (q.matmul(&k.t()?)? * scale)?;
            if let Some(mask) = mask {
                att = att.broadcast_add(mask)?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let out = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((1, seq, heads * hd))?;
            let mut out = l.o.forward(&out)?;
            if let Some(n) = &l.post_attn_norm {
                out = n.forward(&out)?;
            }
            x = (x + out)?;
            let h = l.ffn_norm.forward(&x)?;
            let gate = l.gate.forward(&h)?;
            let gate = match activation {
                Activation::Silu => candle_nn::ops::silu(&gate)?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let mut ff = l.down.forward(&(gate * l.up.forward(&h)?)?)?;
            if let Some(n) = &l.post_ffn_norm {
                ff = n.forward(&ff)?;
            }
            x = (x + ff)?;
        }
        let last = x.narrow(1, seq - 1, 1)?;
        let last = self.final_norm.forward(&last)?;
        // (1, 1, vocab) -> (1, vocab)
        self.head.forward(&last)?.squeeze(1)
    }
}
