//! Causal self-attention over a per-layer KV cache: rotary embeddings, optional per-head RMS
//! norms of q and k, grouped-query attention with an optional sliding window.
//!
//! One pass over plain slices instead of a dozen tensor operations per layer: no repeated
//! key/value heads, no cache concatenation (the cache grows in place), no mask tensor.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::pool::for_item_ranges;

/// How rotary embeddings pair a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rope {
    /// `(2i, 2i + 1)`: GGUF Llama.
    Interleaved,
    /// `(i, i + d/2)`: Gemma and other NeoX-style models.
    Neox,
}

/// The shape and switches of one layer's attention.
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: Rope,
    pub rope_base: f64,
    /// Keys at most this many positions back are visible; `None`: all earlier keys.
    pub window: Option<usize>,
}

/// Keys and values of the positions seen so far, one buffer per kv head, position-major
/// (`[kv_head][pos][head_dim]`): a head's attention reads one contiguous stream, and appending
/// a token is one `extend` per kv head. Stored in half precision, as llama.cpp's default cache
/// is: half the memory per position (what bounds how many jobs a batched worker holds), half
/// the bytes read per attention step at depth, and the same rounding of keys and values as the
/// reference implementation.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    len: usize,
}

impl KvCache {
    /// An empty cache with room for `positions` positions of `kv_heads` heads of `head_dim`,
    /// allocated once: a job whose length is known up front never grows (and never holds the
    /// slack of a doubling) its cache.
    pub fn with_capacity(kv_heads: usize, head_dim: usize, positions: usize) -> KvCache {
        let room = || Vec::with_capacity(positions.saturating_mul(head_dim));
        KvCache {
            k: (0..kv_heads).map(|_| room()).collect(),
            v: (0..kv_heads).map(|_| room()).collect(),
            len: 0,
        }
    }

    pub fn clear(&mut self) {
        self.k = Vec::new();
        self.v = Vec::new();
        self.len = 0;
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held for keys and values (capacity, not just length).
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|b| b.capacity() * std::mem::size_of::<f16>())
            .sum()
    }
}

/// `a · b` with sixteen partial sums, which the compiler keeps in vector registers (a single
/// running sum would serialize every addition).
#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `x[.. n * dim]` as `n` rows, each scaled to unit RMS and multiplied by `weight`.
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / weight.len() as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// `(sin, cos)` of the rotary angles for positions `pos..pos + seq`: `seq x head_dim / 2`.
/// Angles as candle and ggml compute them: inverse frequencies rounded to f32 once, then
/// position * frequency in f32.
fn rotary_table(spec: &AttentionSpec, pos: usize, seq: usize) -> Vec<(f32, f32)> {
    let hd = spec.head_dim;
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| (1.0 / spec.rope_base.powf(2.0 * i as f64 / hd as f64)) as f32)
        .collect();
    (pos..pos + seq)
        .flat_map(|p| inv.iter().map(move |f| (p as f32 * f).sin_cos()))
        .collect()
}

/// Rotates each `head_dim` row of `x` (tokens x `n` heads) by the angles of its token.
fn rotate(x: &mut [f32], n: usize, spec: &AttentionSpec, table: &[(f32, f32)]) {
    let hd = spec.head_dim;
    let half = hd / 2;
    for (token, angles) in x.chunks_exact_mut(n * hd).zip(table.chunks_exact(half)) {
        for head in token.chunks_exact_mut(hd) {
            for (i, &(sin, cos)) in angles.iter().enumerate() {
                let (a, b) = match spec.rope {
                    Rope::Interleaved => (2 * i, 2 * i + 1),
                    Rope::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }
}

/// Runs attention for `seq` new tokens at positions `pos..pos + seq`.
///
/// `q` is `seq x heads x head_dim`, `k` and `v` are `seq x kv_heads x head_dim` (the projections'
/// output layout). `qk_norm` are the per-head norm weights and epsilon, when the model has them.
/// `k` and `v` are rotated / normed and appended to `cache`, whose length must be `pos`.
/// Returns `seq x heads x head_dim`.
pub fn attend(
    spec: &AttentionSpec,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    qk_norm: Option<(&[f32], &[f32], f32)>,
    cache: &mut KvCache,
    pos: usize,
) -> Vec<f32> {
    let (hd, heads, kvh) = (spec.head_dim, spec.heads, spec.kv_heads);
    let seq = q.len() / (heads * hd);
    assert_eq!(q.len(), seq * heads * hd, "q does not match the heads");
    assert_eq!(k.len(), seq * kvh * hd, "k does not match the kv heads");
    assert_eq!(v.len(), k.len(), "v does not match k");
    assert_eq!(
        cache.len, pos,
        "the cache must hold exactly the earlier positions"
    );
    if let Some((qw, kw, eps)) = qk_norm {
        rms_norm_rows(q, qw, eps);
        rms_norm_rows(k, kw, eps);
    }
    let table = rotary_table(spec, pos, seq);
    rotate(q, heads, spec, &table);
    rotate(k, kvh, spec, &table);
    cache.k.resize_with(kvh, Vec::new);
    cache.v.resize_with(kvh, Vec::new);
    for (kt, vt) in k.chunks_exact(kvh * hd).zip(v.chunks_exact(kvh * hd)) {
        for (h, (kh, vh)) in kt.chunks_exact(hd).zip(vt.chunks_exact(hd)).enumerate() {
            append_half(&mut cache.k[h], kh);
            append_half(&mut cache.v[h], vh);
        }
    }
    cache.len += seq;

    let rep = heads / kvh;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; seq * heads * hd];
    let q: &[f32] = q;
    let cache: &KvCache = cache;
    // One work item per (token, head), each writing its own `head_dim` values; a range of items
    // is walked in runs of adjacent heads sharing a kv head, so each cached key and value row is
    // read once per run rather than once per head (at depth, reading the cache bounds the time).
    // One token has few heads: one range per thread keeps the runs whole.
    let items = seq * heads;
    let work = items * (pos + seq) * hd * 2;
    let per_thread = if seq == 1 { 1 } else { 4 };
    for_item_ranges(items, hd, work, per_thread, &mut out, |range, part| {
        let mut scores = Vec::new();
        // A run's keys and values widened once, for all the heads of the run.
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let mut start = range.start;
        while start < range.end {
            let (t, h) = (start / heads, start % heads);
            let kv = h / rep;
            let end = range.end.min(t * heads + (kv + 1) * rep);
            let run = end - start;
            let p = pos + t;
            let lo = spec.window.map_or(0, |w| (p + 1).saturating_sub(w));
            let n = p + 1 - lo;
            let qs = &q[start * hd..end * hd];
            widen(&cache.k[kv][lo * hd..(p + 1) * hd], &mut keys);
            widen(&cache.v[kv][lo * hd..(p + 1) * hd], &mut values);
            let off = (start - range.start) * hd;
            let rows = &mut part[off..off + run * hd];
            scores.clear();
            scores.resize(run * n, 0f32);
            for (i, kj) in keys.chunks_exact(hd).enumerate() {
                for (r, qh) in qs.chunks_exact(hd).enumerate() {
                    scores[r * n + i] = dot_f32(qh, kj) * scale;
                }
            }
            for s in scores.chunks_exact_mut(n) {
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for x in s.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                for x in s.iter_mut() {
                    *x /= sum;
                }
            }
            for (i, vj) in values.chunks_exact(hd).enumerate() {
                for (r, row) in rows.chunks_exact_mut(hd).enumerate() {
                    let w = scores[r * n + i];
                    for (o, x) in row.iter_mut().zip(vj) {
                        *o += w * x;
                    }
                }
            }
            start = end;
        }
    });
    out
}

/// Appends `x` rounded to half precision.
fn append_half(buf: &mut Vec<f16>, x: &[f32]) {
    let at = buf.len();
    buf.resize(at + x.len(), f16::ZERO);
    buf[at..].convert_from_f32_slice(x);
}

/// `into` = `x` widened to single precision.
fn widen(x: &[f16], into: &mut Vec<f32>) {
    into.clear();
    into.resize(x.len(), 0.0);
    x.convert_to_f32_slice(into);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Tensor};

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 1013) as f32 / 506.5 - 1.0) * 0.7)
            .collect()
    }

    /// Attention computed with candle's tensor ops (candle-nn's rotary kernels, explicit
    /// repeated kv heads, an additive mask, softmax) for all `seq` tokens at once.
    fn reference(
        spec: &AttentionSpec,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        norm: Option<(&[f32], &[f32], f32)>,
        seq: usize,
    ) -> Vec<f32> {
        let dev = Device::Cpu;
        let (h, kvh, hd) = (spec.heads, spec.kv_heads, spec.head_dim);
        let heads = |x: &[f32], n: usize| {
            Tensor::from_vec(x.to_vec(), (1, seq, n, hd), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (mut qt, mut kt, vt) = (heads(q, h), heads(k, kvh), heads(v, kvh));
        if let Some((qw, kw, eps)) = norm {
            let n = |t: Tensor, w: &[f32]| {
                let w = Tensor::new(w, &dev).unwrap();
                let rms = (t.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + f64::from(eps))
                    .unwrap()
                    .sqrt()
                    .unwrap();
                t.broadcast_div(&rms).unwrap().broadcast_mul(&w).unwrap()
            };
            qt = n(qt, qw);
            kt = n(kt, kw);
        }
        let half = hd / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / spec.rope_base.powf(2.0 * i as f64 / hd as f64)) as f32)
            .collect();
        let angles: Vec<f32> = (0..seq)
            .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (seq, half), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let rot = |t: &Tensor| match spec.rope {
            Rope::Interleaved => candle_nn::rotary_emb::rope_i(t, &cos, &sin).unwrap(),
            Rope::Neox => candle_nn::rotary_emb::rope(t, &cos, &sin).unwrap(),
        };
        // The cache holds keys and values in half precision.
        let half = |t: Tensor| {
            t.to_dtype(candle_core::DType::F16)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
        };
        let (qt, kt) = (rot(&qt), half(rot(&kt)));
        let vt = half(vt);
        let rep: Vec<u32> = (0..h as u32).map(|i| i / (h / kvh) as u32).collect();
        let rep = Tensor::new(rep.as_slice(), &dev).unwrap();
        let kt = kt.index_select(&rep, 1).unwrap();
        let vt = vt.index_select(&rep, 1).unwrap();
        let mask: Vec<f32> = (0..seq)
            .flat_map(|i| {
                (0..seq).map(move |j| {
                    let ok = j <= i && spec.window.is_none_or(|w| i - j < w);
                    if ok { 0.0 } else { f32::NEG_INFINITY }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, seq, seq), &dev).unwrap();
        let att = (qt.matmul(&kt.t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt()))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
        att.matmul(&vt)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A prompt of `seq - 1` tokens then one more, through the cache, against the reference.
    fn check(rope: Rope, window: Option<usize>, with_norm: bool) {
        let spec = AttentionSpec {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            rope,
            rope_base: 10_000.0,
            window,
        };
        let seq = 6;
        let (qn, kn) = (seq * 4 * 16, seq * 2 * 16);
        let (q, k, v) = (values(qn, 1), values(kn, 2), values(kn, 3));
        let (qw, kw) = (values(16, 4), values(16, 5));
        let norm = with_norm.then_some((&qw[..], &kw[..], 1e-6f32));
        let want = reference(&spec, &q, &k, &v, norm, seq);
        let mut cache = KvCache::default();
        let split = seq - 1;
        let (mut q1, mut k1) = (q[..split * 64].to_vec(), k[..split * 32].to_vec());
        let mut got = attend(
            &spec,
            &mut q1,
            &mut k1,
            &v[..split * 32],
            norm,
            &mut cache,
            0,
        );
        let (mut q2, mut k2) = (q[split * 64..].to_vec(), k[split * 32..].to_vec());
        got.extend(attend(
            &spec,
            &mut q2,
            &mut k2,
            &v[split * 32..],
            norm,
            &mut cache,
            split,
        ));
        assert_eq!(cache.len(), seq);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{rope:?} {window:?} [{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn matches_tensor_attention_with_interleaved_rotary() {
        check(Rope::Interleaved, None, false);
    }

    #[test]
    fn matches_tensor_attention_with_neox_rotary_norms_and_a_window() {
        check(Rope::Neox, Some(3), true);
        check(Rope::Neox, None, true);
    }

    #[test]
    #[should_panic(expected = "the cache must hold exactly the earlier positions")]
    fn a_position_that_skips_the_cache_is_a_bug_not_a_silent_gap() {
        let spec = AttentionSpec {
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            rope: Rope::Neox,
            rope_base: 10_000.0,
            window: None,
        };
        attend(
            &spec,
            &mut [0.0; 2],
            &mut [0.0; 2],
            &[0.0; 2],
            None,
            &mut KvCache::default(),
            3,
        );
    }
}
