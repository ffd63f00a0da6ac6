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
    pub(super) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
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

/// Where the products and attention of a pass run.
pub enum Backend {
    /// skep-kernels and candle on the host.
    Cpu,
    /// A CUDA GPU holding every matrix and the KV caches (the `cuda` feature).
    #[cfg(feature = "cuda")]
    Cuda(Box<super::gpu::GpuDecoder>),
}

/// A job's context: its keys and values so far, wherever the pass runs.
pub enum Context {
    /// One cache per layer.
    Cpu(Vec<KvCache>),
    #[cfg(feature = "cuda")]
    Gpu(super::gpu::GpuCache),
}

impl Default for Context {
    fn default() -> Self {
        Context::Cpu(Vec::new())
    }
}

impl Context {
    /// Positions held.
    pub fn len(&self) -> usize {
        match self {
            Context::Cpu(c) => c.first().map_or(0, KvCache::len),
            #[cfg(feature = "cuda")]
            Context::Gpu(c) => c.len(),
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
    /// The one-job path's context (`forward`); a batched engine keeps a context per job and
    /// passes it to `forward_batch`.
    pub caches: Context,
    pub backend: Backend,
}

/// One job's share of a batched pass: its next tokens, where they start, and its context.
pub struct Part<'a> {
    pub ids: &'a [u32],
    pub pos: usize,
    /// Its keys and values so far (a fresh context is made ready on first use).
    pub caches: &'a mut Context,
    /// Whether the logits after its last token are wanted (a prompt chunk other than the
    /// last needs none).
    pub logits: bool,
}

impl Decoder {
    pub fn clear_kv_cache(&mut self) {
        self.caches = Context::default();
    }

    /// A job's context with room for `positions` positions, allocated once (on the GPU this is
    /// device memory, and can fail).
    pub fn new_caches(&self, positions: usize) -> Result<Context> {
        match &self.backend {
            Backend::Cpu => Ok(Context::Cpu(
                (0..self.layers.len())
                    .map(|_| KvCache::with_capacity(self.kv_heads, self.head_dim, positions))
                    .collect(),
            )),
            #[cfg(feature = "cuda")]
            Backend::Cuda(g) => g.new_cache(self, positions).map(Context::Gpu),
        }
    }

    /// Checks that every weight has the shape the hyper-parameters imply, so that a file whose
    /// tensors disagree with its metadata is refused at load rather than failing (or tripping
    /// a kernel's assertion) in the middle of a job.
    pub fn check_shapes(&self) -> Result<()> {
        let (hidden, hd) = (self.hidden, self.head_dim);
        let (q_width, kv_width) = (self.heads * hd, self.kv_heads * hd);
        if self.heads == 0
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || hd % 2 != 0
        {
            candle_core::bail!(
                "{} heads, {} kv heads of size {hd}: not a usable attention shape",
                self.heads,
                self.kv_heads
            );
        }
        let want = |what: &str, got: (usize, usize), rows: usize, cols: usize| -> Result<()> {
            if got != (rows, cols) {
                candle_core::bail!("{what} is {}x{}, expected {rows}x{cols}", got.0, got.1);
            }
            Ok(())
        };
        if self.head.shape().1 != hidden {
            candle_core::bail!(
                "the output head takes {} inputs, expected {hidden}",
                self.head.shape().1
            );
        }
        for (i, l) in self.layers.iter().enumerate() {
            let ffn = l.gate.shape().0;
            want(&format!("layer {i} q"), l.q.shape(), q_width, hidden)?;
            want(&format!("layer {i} k"), l.k.shape(), kv_width, hidden)?;
            want(&format!("layer {i} v"), l.v.shape(), kv_width, hidden)?;
            want(
                &format!("layer {i} attention output"),
                l.o.shape(),
                hidden,
                q_width,
            )?;
            want(&format!("layer {i} up"), l.up.shape(), ffn, hidden)?;
            want(&format!("layer {i} gate"), l.gate.shape(), ffn, hidden)?;
            want(&format!("layer {i} down"), l.down.shape(), hidden, ffn)?;
            if let Some((qn, kn, _)) = &l.qk_norm
                && (qn.len() != hd || kn.len() != hd)
            {
                candle_core::bail!(
                    "layer {i} q/k norms have {}/{} weights, expected {hd}",
                    qn.len(),
                    kn.len()
                );
            }
        }
        Ok(())
    }

    /// Logits `(1, vocab)` for the token after `ids`, which start at position `pos`.
    pub fn forward(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let mut caches = std::mem::take(&mut self.caches);
        let logits = self.forward_batch(&mut [Part {
            ids,
            pos,
            caches: &mut caches,
            logits: true,
        }]);
        self.caches = caches;
        // (1, vocab): one row, as before.
        logits
    }

    /// One pass for several jobs at once: every part's tokens are rows of the same products
    /// (each weight block read once for all of them), and each part attends only to its own
    /// context. Returns `(parts wanting logits, vocab)`, in the order of `parts`.
    pub fn forward_batch(&self, parts: &mut [Part<'_>]) -> Result<Tensor> {
        let rows: usize = parts.iter().map(|p| p.ids.len()).sum();
        if rows == 0 || parts.iter().any(|p| p.ids.is_empty()) {
            candle_core::bail!("no tokens to run");
        }
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(g) = &self.backend {
            return g.forward_batch(self, parts);
        }
        let layers = self.layers.len();
        // Each part's token count and first position, so that its cache can stay borrowed.
        let spans: Vec<(usize, usize)> = parts.iter().map(|p| (p.ids.len(), p.pos)).collect();
        let ids: Vec<u32> = parts.iter().flat_map(|p| p.ids.iter().copied()).collect();
        let wanted: Vec<bool> = parts.iter().map(|p| p.logits).collect();
        let mut caches = Vec::with_capacity(parts.len());
        for p in parts.iter_mut() {
            let held = p.caches.len();
            if held != p.pos {
                candle_core::bail!("position {} after {held} cached tokens", p.pos);
            }
            // One arm without the `cuda` feature; the GPU arm refuses a context from elsewhere.
            #[allow(clippy::infallible_destructuring_match)]
            let c = match &mut *p.caches {
                Context::Cpu(c) => c,
                #[cfg(feature = "cuda")]
                Context::Gpu(_) => candle_core::bail!("a job's GPU context cannot run on the CPU"),
            };
            if c.len() != layers {
                c.resize_with(layers, KvCache::default);
            }
            caches.push(c);
        }
        let mut x = self
            .embed
            .lookup(&ids, &self.device)?
            .reshape((1, rows, self.hidden))?;
        if let Some(scale) = self.embed_scale {
            x = (x * scale)?;
        }
        let (hd, heads, kv_heads) = (self.head_dim, self.heads, self.kv_heads);
        let (q_width, kv_width) = (heads * hd, kv_heads * hd);
        for (li, l) in self.layers.iter().enumerate() {
            let h = l.attn_norm.forward(&x)?;
            let mut q = l.q.forward_vec(&h)?;
            let mut k = l.k.forward_vec(&h)?;
            let v = l.v.forward_vec(&h)?;
            let spec = AttentionSpec {
                heads,
                kv_heads,
                head_dim: hd,
                rope: self.rope,
                rope_base: l.rope_base,
                window: l.window,
            };
            let qk_norm = l.qk_norm.as_ref().map(|(q, k, eps)| (&q[..], &k[..], *eps));
            let mut out = Vec::with_capacity(rows * q_width);
            let mut row = 0;
            for (&(n, pos), c) in spans.iter().zip(caches.iter_mut()) {
                let (qs, ks) = (
                    row * q_width..(row + n) * q_width,
                    row * kv_width..(row + n) * kv_width,
                );
                out.extend(attend(
                    &spec,
                    &mut q[qs],
                    &mut k[ks.clone()],
                    &v[ks],
                    qk_norm,
                    &mut c[li],
                    pos,
                ));
                row += n;
            }
            let out = Tensor::from_vec(out, (1, rows, q_width), &self.device)?;
            let mut out = l.o.forward(&out)?;
            if let Some(n) = &l.post_attn_norm {
                out = n.forward(&out)?;
            }
            x = (x + out)?;
            let h = l.ffn_norm.forward(&x)?;
            let gate = l.gate.forward(&h)?;
            let gate = match self.activation {
                Activation::Silu => candle_nn::ops::silu(&gate)?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let mut ff = l.down.forward(&(gate * l.up.forward(&h)?)?)?;
            if let Some(n) = &l.post_ffn_norm {
                ff = n.forward(&ff)?;
            }
            x = (x + ff)?;
        }
        // The last row of each part that wants logits.
        let mut last = Vec::new();
        let mut row = 0;
        for (&(n, _), &wants) in spans.iter().zip(&wanted) {
            row += n;
            if wants {
                last.push(row as u32 - 1);
            }
        }
        if last.is_empty() {
            return Tensor::zeros((0, self.head.shape().0), DType::F32, &self.device);
        }
        let picked = Tensor::new(last.as_slice(), &self.device)?;
        let last = x.squeeze(0)?.index_select(&picked, 0)?.unsqueeze(0)?;
        let last = self.final_norm.forward(&last)?;
        // (1, m, vocab) -> (m, vocab)
        self.head.forward(&last)?.squeeze(0)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};

    use super::*;

    fn linear(rows: usize, cols: usize) -> Linear {
        let t = Tensor::zeros((rows, cols), DType::F32, &Device::Cpu).unwrap();
        Linear::new(QTensor::quantize(&t, GgmlDType::Q8_0).unwrap()).unwrap()
    }

    fn norm(n: usize) -> Norm {
        Norm {
            weight: Tensor::ones(n, DType::F32, &Device::Cpu).unwrap(),
            eps: 1e-6,
        }
    }

    /// A one-layer decoder: width 64, 2 heads of 32, 1 kv head, FFN 96, vocab 32.
    fn tiny(k_rows: usize) -> Decoder {
        let layer = Layer {
            attn_norm: norm(64),
            q: linear(64, 64),
            k: linear(k_rows, 64),
            v: linear(32, 64),
            o: linear(64, 64),
            qk_norm: None,
            post_attn_norm: None,
            ffn_norm: norm(64),
            gate: linear(96, 64),
            up: linear(96, 64),
            down: linear(64, 96),
            post_ffn_norm: None,
            window: None,
            rope_base: 10_000.0,
        };
        let table = Tensor::zeros((32, 64), DType::F32, &Device::Cpu).unwrap();
        let table = QTensor::quantize(&table, GgmlDType::Q8_0).unwrap();
        Decoder {
            embed: Embedding::Dense(table.dequantize(&Device::Cpu).unwrap()),
            embed_scale: None,
            head: Linear::new(table).unwrap(),
            layers: vec![layer],
            final_norm: norm(64),
            hidden: 64,
            heads: 2,
            kv_heads: 1,
            head_dim: 32,
            rope: Rope::Interleaved,
            activation: Activation::Silu,
            device: Device::Cpu,
            caches: Context::default(),
            backend: Backend::Cpu,
        }
    }

    #[test]
    fn consistent_weights_pass_the_shape_check_and_run() {
        let mut d = tiny(32);
        d.check_shapes().unwrap();
        let logits = d.forward(&[1, 2, 3], 0).unwrap();
        assert_eq!(logits.dims(), &[1, 32]);
        d.forward(&[4], 3).unwrap();
    }

    #[test]
    fn matrices_kept_on_the_gpu_only_refuse_a_host_pass_with_a_clear_error() {
        let mut d = tiny(32);
        d.layers[0].q = Linear::OnDevice((64, 64));
        d.check_shapes().unwrap();
        let err = d.forward(&[1, 2], 0).unwrap_err().to_string();
        assert!(err.contains("GPU memory only"), "{err}");
        // The shape check still sees a device matrix's shape.
        d.layers[0].q = Linear::OnDevice((48, 64));
        let err = d.check_shapes().unwrap_err().to_string();
        assert!(err.contains("layer 0 q is 48x64"), "{err}");
    }

    #[test]
    fn a_weight_that_disagrees_with_the_metadata_is_refused_at_load() {
        let err = tiny(48).check_shapes().unwrap_err().to_string();
        assert!(err.contains("layer 0 k is 48x64, expected 32x64"), "{err}");
    }

    #[test]
    fn a_position_out_of_step_with_the_cache_is_an_error_not_a_panic() {
        let mut d = tiny(32);
        d.forward(&[1, 2], 0).unwrap();
        let err = d.forward(&[3], 5).unwrap_err().to_string();
        assert!(err.contains("position 5 after 2 cached tokens"), "{err}");
    }
}
