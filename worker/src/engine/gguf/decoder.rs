//! The decoder-only transformer forward pass shared by the architectures the engine runs.
//!
//! Llama and Gemma 3 are the same stack of pre-norm attention + gated MLP blocks; they differ in
//! a handful of switches (rotary layout, activation, extra norms, sliding windows, embedding
//! scale), which `Decoder` carries as data rather than as two copies of the loop.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use skep_kernels::Q8Matrix;
pub use skep_kernels::attention::Rope;
use skep_kernels::attention::{AttentionSpec, KvCache, attend};

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
    /// Per-head RMS norm weights of q and k and their epsilon (Gemma 3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>, f32)>,
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
    pub cache: KvCache,
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
            l.cache.clear();
        }
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
        let rope = self.rope;
        let activation = self.activation;
        for l in &mut self.layers {
            let h = l.attn_norm.forward(&x)?;
            let mut q = l.q.forward_vec(&h)?;
            let mut k = l.k.forward_vec(&h)?;
            let v = l.v.forward_vec(&h)?;
            let spec = AttentionSpec {
                heads,
                kv_heads,
                head_dim: hd,
                rope,
                rope_base: l.rope_base,
                window: l.window,
            };
            if l.cache.len() != pos {
                candle_core::bail!("position {pos} after {} cached tokens", l.cache.len());
            }
            let qk_norm = l.qk_norm.as_ref().map(|(q, k, eps)| (&q[..], &k[..], *eps));
            let out = attend(&spec, &mut q, &mut k, &v, qk_norm, &mut l.cache, pos);
            let out = Tensor::from_vec(out, (1, seq, heads * hd), &self.device)?;
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
