//! The decoder's pass on a CUDA GPU: `Decoder::forward_batch` step for step — the same norms,
//! products, rotary embeddings, attention and MLP, in the same order — with every matrix and
//! every job's KV cache in device memory (skep-cuda's kernels).
//!
//! The decoder's hyper-parameters, token table and per-layer switches (windows, rotary bases,
//! extra norms) come from the CPU `Decoder` it is attached to, so the two passes cannot
//! disagree about the model; only the weights' home differs. Token rows are looked up on the
//! host (a few KiB per step) and copied in; logits come back for the rows that want them.

use candle_core::quantized::GgmlDType;
use candle_core::{Result, Tensor};
use skep_cuda::gpu::{Act, Buffer, Gpu, GpuError, KvBuffers, Matrix, RopeLayout, Rotary};
use skep_cuda::launch::QuantKind;

use super::decoder::{Activation, Context, Decoder, Norm, Part, Rope};
use super::loader::GgufFile;

/// Positions a cache grows by at least, so that a job generating token by token reallocates
/// rarely.
const GROW_BY: usize = 256;

fn gpu_err(e: GpuError) -> candle_core::Error {
    match e {
        GpuError::Driver(_) => candle_core::Error::Msg(format!("{DEVICE_FAILED}{e}")),
        other => candle_core::Error::Msg(format!("GPU: {other}")),
    }
}

/// Marks an error from the driver in the message (candle's errors carry no type to downcast).
const DEVICE_FAILED: &str = "device error: ";

/// Whether `e` came from the driver (as opposed to, say, a bad position), so that the worker
/// treats its device as lost.
pub fn is_device_error(e: &candle_core::Error) -> bool {
    e.to_string().contains(DEVICE_FAILED)
}

/// A job's KV cache on the GPU.
pub struct GpuCache {
    kv: KvBuffers,
    len: usize,
}

impl GpuCache {
    pub fn len(&self) -> usize {
        self.len
    }
}

struct GpuNorm {
    weight: Buffer,
    eps: f32,
}

struct GpuLayer {
    attn_norm: GpuNorm,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    qk_norm: Option<(Buffer, Buffer, f32)>,
    post_attn_norm: Option<GpuNorm>,
    ffn_norm: GpuNorm,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    post_ffn_norm: Option<GpuNorm>,
    inv_freq: Buffer,
}

/// A model's weights on one GPU.
pub struct GpuDecoder {
    gpu: Gpu,
    layers: Vec<GpuLayer>,
    head: Matrix,
    final_norm: GpuNorm,
    /// Bytes of weights on the device.
    weight_bytes: usize,
}

/// The GPU kernels' name for a GGUF format, or an error naming the formats they take.
pub fn quant_kind(dtype: GgmlDType) -> Result<QuantKind> {
    Ok(match dtype {
        GgmlDType::Q4_0 => QuantKind::Q4_0,
        GgmlDType::Q4_1 => QuantKind::Q4_1,
        GgmlDType::Q5_0 => QuantKind::Q5_0,
        GgmlDType::Q8_0 => QuantKind::Q8_0,
        GgmlDType::Q4K => QuantKind::Q4K,
        GgmlDType::Q6K => QuantKind::Q6K,
        other => candle_core::bail!(
            "{other:?} matrices do not run on the GPU (it takes Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K)"
        ),
    })
}

impl GpuDecoder {
    /// Copies the weights of `dec` (read from `file`) to GPU `ordinal`.
    pub fn load(file: &GgufFile, dec: &Decoder, ordinal: usize) -> Result<GpuDecoder> {
        let gpu = Gpu::new(ordinal).map_err(gpu_err)?;
        let mut weight_bytes = 0;
        let mut matrix = |name: &str| -> Result<Matrix> {
            let (dtype, rows, cols, bytes) = file.raw(name)?;
            let kind =
                quant_kind(dtype).map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
            let m = gpu.matrix(kind, rows, cols, bytes).map_err(gpu_err)?;
            weight_bytes += m.bytes();
            Ok(m)
        };
        let head_name = if file.has("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let head = matrix(head_name)?;
        let mut names = Vec::new();
        for i in 0..dec.layers.len() {
            let w = |n: &str| format!("blk.{i}.{n}.weight");
            names.push([
                w("attn_q"),
                w("attn_k"),
                w("attn_v"),
                w("attn_output"),
                w("ffn_gate"),
                w("ffn_up"),
                w("ffn_down"),
            ]);
        }
        let mut mats = Vec::with_capacity(names.len());
        for n in &names {
            mats.push([
                matrix(&n[0])?,
                matrix(&n[1])?,
                matrix(&n[2])?,
                matrix(&n[3])?,
                matrix(&n[4])?,
                matrix(&n[5])?,
                matrix(&n[6])?,
            ]);
        }
        let norm = |n: &Norm| -> Result<GpuNorm> {
            let w = n.weight.flatten_all()?.to_vec1::<f32>()?;
            Ok(GpuNorm {
                weight: gpu.upload(&w).map_err(gpu_err)?,
                eps: n.eps as f32,
            })
        };
        let mut layers = Vec::with_capacity(dec.layers.len());
        for (l, [q, k, v, o, gate, up, down]) in dec.layers.iter().zip(mats) {
            let qk_norm = match &l.qk_norm {
                Some((qn, kn, eps)) => Some((
                    gpu.upload(qn).map_err(gpu_err)?,
                    gpu.upload(kn).map_err(gpu_err)?,
                    *eps,
                )),
                None => None,
            };
            let inv = skep_cuda::gpu::inv_freq(dec.head_dim, l.rope_base);
            layers.push(GpuLayer {
                attn_norm: norm(&l.attn_norm)?,
                q,
                k,
                v,
                o,
                qk_norm,
                post_attn_norm: l.post_attn_norm.as_ref().map(norm).transpose()?,
                ffn_norm: norm(&l.ffn_norm)?,
                gate,
                up,
                down,
                post_ffn_norm: l.post_ffn_norm.as_ref().map(norm).transpose()?,
                inv_freq: gpu.upload(&inv).map_err(gpu_err)?,
            });
        }
        let final_norm = norm(&dec.final_norm)?;
        gpu.synchronize().map_err(gpu_err)?;
        Ok(GpuDecoder {
            gpu,
            layers,
            head,
            final_norm,
            weight_bytes,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// A job's context with room for `positions` positions.
    pub fn new_cache(&self, dec: &Decoder, positions: usize) -> Result<GpuCache> {
        let kv = self
            .gpu
            .kv(
                self.layers.len(),
                dec.kv_heads,
                dec.head_dim,
                positions.max(1),
            )
            .map_err(gpu_err)?;
        Ok(GpuCache { kv, len: 0 })
    }

    /// Makes `ctx` a GPU cache with room for `need` positions (a fresh CPU context, as the
    /// one-job path starts with, becomes an empty GPU cache).
    fn ready(&self, dec: &Decoder, ctx: &mut Context, need: usize) -> Result<()> {
        if let Context::Cpu(c) = ctx {
            if !c.is_empty() {
                candle_core::bail!("a job's CPU cache cannot continue on the GPU");
            }
            *ctx = Context::Gpu(self.new_cache(dec, need.max(GROW_BY))?);
        }
        let Context::Gpu(cache) = ctx else {
            unreachable!("made a GPU cache above")
        };
        if need > cache.kv.capacity() {
            let capacity = need.max(cache.kv.capacity() + GROW_BY);
            cache.kv = self
                .gpu
                .grow_kv(&cache.kv, cache.len, capacity)
                .map_err(gpu_err)?;
        }
        Ok(())
    }

    /// `Decoder::forward_batch` on the GPU; the same contract.
    pub fn forward_batch(&self, dec: &Decoder, parts: &mut [Part<'_>]) -> Result<Tensor> {
        let rows: usize = parts.iter().map(|p| p.ids.len()).sum();
        for p in parts.iter_mut() {
            if p.caches.len() != p.pos {
                candle_core::bail!("position {} after {} cached tokens", p.pos, p.caches.len());
            }
            self.ready(dec, p.caches, p.pos + p.ids.len())?;
        }
        let g = &self.gpu;
        let e = gpu_err;
        let (hidden, heads, kvh, hd) = (dec.hidden, dec.heads, dec.kv_heads, dec.head_dim);
        let (q_width, kv_width) = (heads * hd, kvh * hd);
        let ffn = self.layers.first().map_or(0, |l| l.gate.shape().0);

        let ids: Vec<u32> = parts.iter().flat_map(|p| p.ids.iter().copied()).collect();
        let mut x = dec.embed.lookup(&ids, &dec.device)?;
        if let Some(scale) = dec.embed_scale {
            x = (x * scale)?;
        }
        let mut x = g.upload(&x.flatten_all()?.to_vec1::<f32>()?).map_err(e)?;
        let meta = {
            let mut table = Vec::with_capacity(parts.len());
            for p in parts.iter() {
                let Context::Gpu(c) = &*p.caches else {
                    unreachable!("made GPU caches above")
                };
                table.push((&c.kv, p.pos, p.ids.len()));
            }
            g.row_meta(&table).map_err(e)?
        };
        let mut h = g.zeros(rows * hidden).map_err(e)?;
        let mut q = g.zeros(rows * q_width).map_err(e)?;
        let mut k = g.zeros(rows * kv_width).map_err(e)?;
        let mut v = g.zeros(rows * kv_width).map_err(e)?;
        let mut att = g.zeros(rows * q_width).map_err(e)?;
        let mut out = g.zeros(rows * hidden).map_err(e)?;
        let mut normed = g.zeros(rows * hidden).map_err(e)?;
        let mut gate = g.zeros(rows * ffn).map_err(e)?;
        let mut up = g.zeros(rows * ffn).map_err(e)?;
        let layout = match dec.rope {
            Rope::Interleaved => RopeLayout::Interleaved,
            Rope::Neox => RopeLayout::Neox,
        };
        let act = match dec.activation {
            Activation::Silu => Act::Silu,
            Activation::GeluTanh => Act::GeluTanh,
        };
        for (li, (l, cpu)) in self.layers.iter().zip(&dec.layers).enumerate() {
            g.rms_norm(&x, &l.attn_norm.weight, &mut h, rows, l.attn_norm.eps)
                .map_err(e)?;
            g.matmul(&l.q, &h, rows, &mut q).map_err(e)?;
            g.matmul(&l.k, &h, rows, &mut k).map_err(e)?;
            g.matmul(&l.v, &h, rows, &mut v).map_err(e)?;
            let (qn, kn) = match &l.qk_norm {
                Some((qw, kw, eps)) => (Some((qw, *eps)), Some((kw, *eps))),
                None => (None, None),
            };
            let rotary = |norm| Rotary {
                meta: &meta,
                rows,
                head_dim: hd,
                inv_freq: &l.inv_freq,
                layout,
                norm,
            };
            g.rope_q(&mut q, &rotary(qn), heads).map_err(e)?;
            g.rope_store_kv(&mut k, &v, &rotary(kn), li, kvh)
                .map_err(e)?;
            g.attention(&q, &mut att, &meta, li, rows, heads, kvh, hd, cpu.window)
                .map_err(e)?;
            g.matmul(&l.o, &att, rows, &mut out).map_err(e)?;
            self.residual(
                &mut x,
                &mut out,
                &mut normed,
                l.post_attn_norm.as_ref(),
                rows,
                hidden,
            )?;
            g.rms_norm(&x, &l.ffn_norm.weight, &mut h, rows, l.ffn_norm.eps)
                .map_err(e)?;
            g.matmul(&l.gate, &h, rows, &mut gate).map_err(e)?;
            g.matmul(&l.up, &h, rows, &mut up).map_err(e)?;
            g.gated(&mut gate, &up, rows * ffn, act).map_err(e)?;
            g.matmul(&l.down, &gate, rows, &mut out).map_err(e)?;
            self.residual(
                &mut x,
                &mut out,
                &mut normed,
                l.post_ffn_norm.as_ref(),
                rows,
                hidden,
            )?;
        }
        for p in parts.iter_mut() {
            if let Context::Gpu(c) = p.caches {
                c.len += p.ids.len();
            }
        }
        let mut last = Vec::new();
        let mut row = 0;
        for p in parts.iter() {
            row += p.ids.len();
            if p.logits {
                last.push(row - 1);
            }
        }
        let vocab = self.head.shape().0;
        if last.is_empty() {
            g.synchronize().map_err(e)?;
            return Tensor::zeros((0, vocab), candle_core::DType::F32, &dec.device);
        }
        let m = last.len();
        g.gather(&x, &last, hidden, &mut h).map_err(e)?;
        g.rms_norm(
            &h,
            &self.final_norm.weight,
            &mut normed,
            m,
            self.final_norm.eps,
        )
        .map_err(e)?;
        let mut logits = g.zeros(m * vocab).map_err(e)?;
        g.matmul(&self.head, &normed, m, &mut logits).map_err(e)?;
        let logits = g.download(&logits, m * vocab).map_err(e)?;
        Tensor::from_vec(logits, (m, vocab), &dec.device)
    }

    /// `x += norm(out)` (or `x += out` without a norm).
    fn residual(
        &self,
        x: &mut Buffer,
        out: &mut Buffer,
        normed: &mut Buffer,
        norm: Option<&GpuNorm>,
        rows: usize,
        hidden: usize,
    ) -> Result<()> {
        let g = &self.gpu;
        match norm {
            Some(n) => {
                g.rms_norm(out, &n.weight, normed, rows, n.eps)
                    .map_err(gpu_err)?;
                g.add(x, normed, rows * hidden).map_err(gpu_err)
            }
            None => g.add(x, out, rows * hidden).map_err(gpu_err),
        }
    }
}
