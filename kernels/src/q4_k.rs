//! Q4_K weight matrices (ggml's 4-bit k-quant) and the Q8_K activations k-quants multiply.

use half::f16;

use crate::KernelError;
use crate::q4_1::hsum8;
use crate::weights::{Blocks, WeightBytes};

/// Values per k-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// Bytes of one GGUF Q4_K block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and
/// minimums, 128 bytes of nibbles.
const BLOCK_BYTES: usize = 2 + 2 + 12 + QK_K / 2;

/// Activation rows multiplied with one weight row at a time: each weight block is unpacked
/// once for this many tokens, which is what makes the prompt pass faster than one dot product
/// per (row, token).
const TOKENS: usize = 4;

/// Weight rows whose products with a group of [`TOKENS`] activation rows are taken before the
/// next group: the group's Q8_K blocks (a few KiB) then stay in L1 across the rows.
const ROW_TILE: usize = 8;

/// One row of activations as Q8_K blocks, as ggml's `quantize_row_q8_K_ref` makes them (the
/// quantizer llama.cpp's x86 build uses): per 256 values an f32 scale `d` and the signed bytes.
/// ggml keeps the sums of each 16 bytes; the kernels here need only the sums of each 32, which
/// are kept instead (ggml's Q4_K kernel adds its 16-sums in pairs first, so the terms are the
/// same integers).
#[derive(Debug, Clone, Default)]
pub struct Q8KRow {
    pub(crate) d: Vec<f32>,
    pub(crate) qs: Vec<[i8; QK_K]>,
    /// The sums of each 32 values, which the Q4_K minimums multiply.
    pub(crate) sums32: Vec<[i16; QK_K / 32]>,
    /// 32 times the sum of each pair of values: what ggml's Q6_K kernel subtracts (with
    /// `vpmaddubsw` of 32 and the values) for the weights' offset of 32. It depends on the
    /// activations alone, so it is formed once per row here instead of once per weight row.
    pub(crate) offsets: Vec<[i16; QK_K / 2]>,
}

impl Q8KRow {
    /// Quantizes `x`, whose length must be a multiple of [`QK_K`] (the caller checks).
    pub fn quantize(x: &[f32]) -> Self {
        debug_assert!(x.len().is_multiple_of(QK_K));
        let blocks = x.len() / QK_K;
        let mut row = Self {
            d: Vec::with_capacity(blocks),
            qs: Vec::with_capacity(blocks),
            sums32: Vec::with_capacity(blocks),
            offsets: Vec::with_capacity(blocks),
        };
        for chunk in x.chunks_exact(QK_K) {
            // ggml keeps the first value of largest magnitude, sign included: the scale is
            // -127 / that value, so it maps to exactly -127 (and the others round ties to even).
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut q = [0i8; QK_K];
            let mut sums = [0i16; QK_K / 32];
            let d = match chunk.iter().find(|v| v.abs() == amax) {
                Some(&max) if amax != 0.0 => {
                    let iscale = -127.0 / max;
                    for (o, v) in q.iter_mut().zip(chunk) {
                        // `as` saturates (and maps NaN to 0); ggml clamps only the top.
                        *o = ((iscale * v).round_ties_even() as i32).min(127) as i8;
                    }
                    for (s, part) in sums.iter_mut().zip(q.chunks_exact(32)) {
                        *s = part.iter().map(|&v| i16::from(v)).sum();
                    }
                    1.0 / iscale
                }
                _ => 0.0,
            };
            row.d.push(d);
            row.qs.push(q);
            row.sums32.push(sums);
            row.offsets.push(std::array::from_fn(|i| {
                32 * (i16::from(q[2 * i]) + i16::from(q[2 * i + 1]))
            }));
        }
        row
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.qs.len()
    }
}

/// `out = x · Wᵀ` for a `rows` x `cols` k-quant matrix whose row `r` is `row(r)`: the
/// activations are quantized to Q8_K once, then `dots.1(row, tokens)` gives the products of one
/// weight row with [`TOKENS`] activation rows, `dots.0` with one (the rows left over). Rows are
/// split over the pool's threads. Panics if the lengths do not match (a bug in the caller, not
/// bad input).
pub(crate) fn k_product<'a, R, D1, D>(
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    row: R,
    (dot1, dots): (D1, D),
) where
    R: Fn(usize) -> &'a [u8] + Sync,
    D1: Fn(&[u8], [&Q8KRow; 1]) -> [f32; 1] + Sync,
    D: Fn(&[u8], [&Q8KRow; TOKENS]) -> [f32; TOKENS] + Sync,
{
    assert_eq!(x.len(), m * cols, "activations do not match the matrix");
    assert_eq!(out.len(), m * rows, "output does not match the matrix");
    if m == 0 || rows == 0 {
        return;
    }
    let acts: Vec<Q8KRow> = x.chunks_exact(cols).map(Q8KRow::quantize).collect();
    crate::pool::for_row_ranges(rows, m, rows * cols * m, out, |range, buf| {
        let len = range.len();
        let first = range.start;
        let mut tile = range.start;
        while tile < range.end {
            let tile_end = range.end.min(tile + ROW_TILE);
            let mut groups = acts.chunks_exact(TOKENS);
            let mut t0 = 0;
            for group in &mut groups {
                let group: [&Q8KRow; TOKENS] = std::array::from_fn(|k| &group[k]);
                for r in tile..tile_end {
                    for (k, v) in dots(row(r), group).into_iter().enumerate() {
                        buf[(t0 + k) * len + r - first] = v;
                    }
                }
                t0 += TOKENS;
            }
            for a in groups.remainder() {
                for r in tile..tile_end {
                    buf[t0 * len + r - first] = dot1(row(r), [a])[0];
                }
                t0 += 1;
            }
            tile = tile_end;
        }
    });
}

/// A `rows` x `cols` Q4_K matrix (`rows` output features, each a dot product over `cols`
/// inputs) in the file's block layout, read in place. Per 256 values: f16 `d` and `dmin`, eight
/// 6-bit scales `sc` and minimums `mn` packed into 12 bytes, then 128 bytes where byte
/// `32j + l` holds value `64j + l` in its low nibble and value `64j + 32 + l` in its high one;
/// value `i` is `d * sc[i / 32] * q - dmin * mn[i / 32]`.
pub struct Q4KMatrix {
    blocks: Blocks,
}

impl std::fmt::Debug for Q4KMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Q4KMatrix({}x{})",
            self.blocks.rows(),
            self.blocks.cols()
        )
    }
}

impl Q4KMatrix {
    /// A copy of the raw bytes of a GGUF Q4_K tensor whose shape is `rows` x `cols`.
    pub fn from_gguf_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        Self::new(rows, cols, WeightBytes::copied(bytes))
    }

    /// The GGUF Q4_K tensor in `bytes` (shape `rows` x `cols`), used where it lies.
    pub fn new(rows: usize, cols: usize, bytes: WeightBytes) -> Result<Self, KernelError> {
        Ok(Self {
            blocks: Blocks::new(rows, cols, QK_K, BLOCK_BYTES, bytes)?,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.blocks.rows()
    }

    /// Inputs per output feature.
    pub fn cols(&self) -> usize {
        self.blocks.cols()
    }

    /// Where the blocks are read from.
    pub fn weight_bytes(&self) -> &WeightBytes {
        self.blocks.bytes()
    }

    /// Row `r` as f32 values, as ggml's `dequantize_row_q4_K` computes them (for tests and
    /// reference computations).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.blocks.cols()];
        for (block, out) in self
            .blocks
            .row(r)
            .chunks_exact(BLOCK_BYTES)
            .zip(out.chunks_exact_mut(QK_K))
        {
            let (d, dmin, sc, mn) = header(block);
            let qs = &block[16..BLOCK_BYTES];
            for j in 0..4 {
                let (d1, m1) = (d * f32::from(sc[2 * j]), dmin * f32::from(mn[2 * j]));
                let (d2, m2) = (
                    d * f32::from(sc[2 * j + 1]),
                    dmin * f32::from(mn[2 * j + 1]),
                );
                for l in 0..32 {
                    let q = qs[32 * j + l];
                    out[64 * j + l] = d1 * f32::from(q & 15) - m1;
                    out[64 * j + 32 + l] = d2 * f32::from(q >> 4) - m2;
                }
            }
        }
        out
    }

    /// `out = x · selfᵀ` for `m` rows of activations `x` (`m` x `cols`, row-major); `out` is
    /// `m` x `rows`. Panics if the lengths do not match (a bug in the caller, not bad input).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        k_product(
            self.blocks.rows(),
            self.blocks.cols(),
            x,
            m,
            out,
            |r| self.blocks.row(r),
            (dots::<1>, dots::<TOKENS>),
        );
    }
}

/// A block's `d` and `dmin` widened, and its eight scales and minimums unpacked (ggml's
/// `get_scale_min_k4`): sub-blocks 0..4 take the low six bits of bytes 0..4 (scales) and 4..8
/// (minimums); sub-blocks 4..8 take a nibble of bytes 8..12 and the top two bits of bytes 0..8.
/// Four at a time in `u32`s, as ggml's AVX2 kernel does it.
#[inline]
fn header(block: &[u8]) -> (f32, f32, [u8; 8], [u8; 8]) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let dmin = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let word = |i: usize| u32::from_le_bytes([block[i], block[i + 1], block[i + 2], block[i + 3]]);
    let (u0, u1, u2) = (word(4), word(8), word(12));
    let low6 = 0x3f3f_3f3f;
    let nibbles = 0x0f0f_0f0f;
    let top2 = 0x0303_0303;
    let halves = |lo: u32, hi: u32| {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&lo.to_le_bytes());
        out[4..].copy_from_slice(&hi.to_le_bytes());
        out
    };
    let sc = halves(u0 & low6, (u2 & nibbles) | (((u0 >> 6) & top2) << 4));
    let mn = halves(u1 & low6, ((u2 >> 4) & nibbles) | (((u1 >> 6) & top2) << 4));
    (d, dmin, sc, mn)
}

/// The minimums' integer terms of one block against one activation block, as ggml's
/// `vpmaddwd` of the minimums with the sums of each 32 activations makes them: four lanes,
/// lane `i` covering sub-blocks `2i` and `2i + 1`.
#[inline]
fn min_terms(mn: &[u8; 8], sums32: &[i16; QK_K / 32]) -> [i32; 4] {
    std::array::from_fn(|i| {
        i32::from(mn[2 * i]) * i32::from(sums32[2 * i])
            + i32::from(mn[2 * i + 1]) * i32::from(sums32[2 * i + 1])
    })
}

/// ggml's reduction of the four minimum lanes: high pair onto low pair, then the two.
#[inline]
fn hsum4(acc: [f32; 4]) -> f32 {
    (acc[0] + acc[2]) + (acc[1] + acc[3])
}

/// One weight row against `N` quantized activation rows, each summed in the same order as
/// ggml's AVX2 `ggml_vec_dot_q4_K_q8_K`: per block, eight integer lanes (lane `l` takes values
/// `4l..4l + 4` of each 32-value sub-block, times the sub-block's scale), one FMA with
/// `d_x * d_y`; four float lanes of minimum terms, one FMA each with `-dmin_x * d_y`; at the
/// end `hsum_float_8` of the first plus the pairwise sum of the second. The integer lanes are
/// exact, so any path that forms the same lanes rounds exactly as llama.cpp does.
#[inline]
fn dots<const N: usize>(row: &[u8], a: [&Q8KRow; N]) -> [f32; N] {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        dots_avx2(row, a)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        a.map(|a| dot_portable(row, a))
    }
}

/// The reference order in plain Rust, for CPUs (or builds) without AVX2 and FMA.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn dot_portable(row: &[u8], a: &Q8KRow) -> f32 {
    let mut acc = [0f32; 8];
    let mut acc_m = [0f32; 4];
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, dmin, sc, mn) = header(block);
        let qs = &block[16..BLOCK_BYTES];
        let q8 = &a.qs[b];
        let mut sumi = [0i32; 8];
        for j in 0..4 {
            for (l, s) in sumi.iter_mut().enumerate() {
                let (mut lo, mut hi) = (0i32, 0i32);
                for i in 4 * l..4 * l + 4 {
                    let q = qs[32 * j + i];
                    lo += i32::from(q & 15) * i32::from(q8[64 * j + i]);
                    hi += i32::from(q >> 4) * i32::from(q8[64 * j + 32 + i]);
                }
                *s += i32::from(sc[2 * j]) * lo + i32::from(sc[2 * j + 1]) * hi;
            }
        }
        let scale = a.d[b] * d;
        for (acc, &s) in acc.iter_mut().zip(&sumi) {
            *acc = scale.mul_add(s as f32, *acc);
        }
        let scale_m = -a.d[b] * dmin;
        for (acc, p) in acc_m.iter_mut().zip(min_terms(&mn, &a.sums32[b])) {
            *acc = scale_m.mul_add(p as f32, *acc);
        }
    }
    hsum8(acc) + hsum4(acc_m)
}

/// The same sums with AVX2 (through `safe_arch`, so without `unsafe` here), each weight block
/// unpacked once for the `N` activation rows: nibbles masked to bytes, `vpmaddubsw` with the
/// activations, `vpmaddwd` with the sub-block's scale, one FMA per block and row.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dots_avx2<const N: usize>(row: &[u8], a: [&Q8KRow; N]) -> [f32; N] {
    use safe_arch::*;
    let low_nibbles = set_splat_i8_m256i(0x0F);
    let mut acc = [zeroed_m256(); N];
    let mut acc_m = [zeroed_m128(); N];
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, dmin, sc, mn) = header(block);
        let mins = m128i::from(mn.map(i16::from));
        let qs = &block[16..BLOCK_BYTES];
        let mut sumi = [zeroed_m256i(); N];
        for j in 0..4 {
            let bits = load(&qs[32 * j..32 * j + 32]);
            let lo = bitand_m256i(bits, low_nibbles);
            let hi = bitand_m256i(shr_imm_u16_m256i::<4>(bits), low_nibbles);
            let scale_lo = set_splat_i16_m256i(i16::from(sc[2 * j]));
            let scale_hi = set_splat_i16_m256i(i16::from(sc[2 * j + 1]));
            for (sumi, a) in sumi.iter_mut().zip(&a) {
                let q8 = &a.qs[b];
                let p_lo = mul_i16_horizontal_add_m256i(
                    mul_u8i8_add_horizontal_saturating_m256i(lo, load_i8(&q8[64 * j..])),
                    scale_lo,
                );
                let p_hi = mul_i16_horizontal_add_m256i(
                    mul_u8i8_add_horizontal_saturating_m256i(hi, load_i8(&q8[64 * j + 32..])),
                    scale_hi,
                );
                *sumi = add_i32_m256i(*sumi, add_i32_m256i(p_lo, p_hi));
            }
        }
        for t in 0..N {
            acc[t] = fused_mul_add_m256(
                set_splat_m256(a[t].d[b] * d),
                convert_to_m256_from_i32_m256i(sumi[t]),
                acc[t],
            );
            let prod = mul_i16_horizontal_add_m128i(mins, m128i::from(a[t].sums32[b]));
            acc_m[t] = fused_mul_add_m128(
                set_splat_m128(-a[t].d[b] * dmin),
                convert_to_m128_from_i32_m128i(prod),
                acc_m[t],
            );
        }
    }
    std::array::from_fn(|t| hsum8(acc[t].to_array()) + hsum4(acc_m[t].to_array()))
}

/// The first 32 bytes of `bytes` as a vector (an unaligned load).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
pub(crate) fn load(bytes: &[u8]) -> safe_arch::m256i {
    let mut v = [0u8; 32];
    v.copy_from_slice(&bytes[..32]);
    safe_arch::m256i::from(v)
}

/// The first 32 values of `q` as a vector (an unaligned load).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
pub(crate) fn load_i8(q: &[i8]) -> safe_arch::m256i {
    let mut v = [0i8; 32];
    v.copy_from_slice(&q[..32]);
    safe_arch::m256i::from(v)
}

#[cfg(test)]
pub(crate) mod tests;
