//! Q6_K weight matrices (ggml's 6-bit k-quant), multiplied with Q8_K activations.

use half::f16;

use crate::KernelError;
use crate::q4_1::hsum8;
use crate::q4_k::{Q8KRow, QK_K, k_product};
use crate::weights::{Blocks, WeightBytes};

/// Bytes of one GGUF Q6_K block: 128 bytes of low nibbles, 64 bytes of high bit pairs, sixteen
/// signed 8-bit scales, f16 `d` (last).
const BLOCK_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// A `rows` x `cols` Q6_K matrix (`rows` output features, each a dot product over `cols`
/// inputs) in the file's block layout, read in place. Per 256 values, in two halves of 128:
/// value `128h + 32k + l` (`k` in 0..4, `l` in 0..32) has its low four bits in byte
/// `64h + 32(k % 2) + l` of the nibble area (low nibble for `k` < 2, high for the others), its
/// top two bits at bit `2k` of byte `32h + l` of the high-bit area, is stored plus 32, and is
/// scaled by `d * scales[i / 16]`.
pub struct Q6KMatrix {
    blocks: Blocks,
}

impl std::fmt::Debug for Q6KMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Q6KMatrix({}x{})",
            self.blocks.rows(),
            self.blocks.cols()
        )
    }
}

impl Q6KMatrix {
    /// A copy of the raw bytes of a GGUF Q6_K tensor whose shape is `rows` x `cols`.
    pub fn from_gguf_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        Self::new(rows, cols, WeightBytes::copied(bytes))
    }

    /// The GGUF Q6_K tensor in `bytes` (shape `rows` x `cols`), used where it lies.
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

    /// Row `r` as f32 values, as ggml's `dequantize_row_q6_K` computes them (for tests and
    /// reference computations).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.blocks.cols()];
        for (block, out) in self
            .blocks
            .row(r)
            .chunks_exact(BLOCK_BYTES)
            .zip(out.chunks_exact_mut(QK_K))
        {
            let (d, sc) = header(block);
            for (i, o) in out.iter_mut().enumerate() {
                *o = d * f32::from(sc[i / 16]) * f32::from(value(block, i));
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
            // Two activation rows at a time: with four, the unpacked block, its scales and the
            // sums no longer fit in the sixteen vector registers and the kernel runs slower.
            (dots::<1>, |row, [a, b, c, d]| {
                let ([w, x], [y, z]) = (dots(row, [a, b]), dots(row, [c, d]));
                [w, x, y, z]
            }),
        );
    }
}

/// A block's `d` widened and its sixteen scales.
#[inline]
fn header(block: &[u8]) -> (f32, [i8; 16]) {
    let d = f16::from_le_bytes([block[BLOCK_BYTES - 2], block[BLOCK_BYTES - 1]]).to_f32();
    let sc = std::array::from_fn(|i| block[QK_K / 2 + QK_K / 4 + i] as i8);
    (d, sc)
}

/// Value `i` (0..256) of a block, -32..32.
#[inline]
fn value(block: &[u8], i: usize) -> i8 {
    let (h, k, l) = (i / 128, i % 128 / 32, i % 32);
    let ql = block[64 * h + 32 * (k % 2) + l];
    let low = if k < 2 { ql & 15 } else { ql >> 4 };
    let high = (block[QK_K / 2 + 32 * h + l] >> (2 * k)) & 3;
    (low | high << 4) as i8 - 32
}

/// One weight row against `N` quantized activation rows, each summed in the same order as
/// ggml's AVX2 `ggml_vec_dot_q6_K_q8_K`: per block, eight integer lanes (lane `l` takes values
/// `4l..4l + 4` of each 32-value chunk, times the scale of the 16 they belong to), one FMA with
/// `d_x * d_y`, `hsum_float_8` at the end. The integer lanes are exact, so any path that forms
/// the same lanes rounds exactly as llama.cpp does.
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
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, sc) = header(block);
        let q8 = &a.qs[b];
        let mut sumi = [0i32; 8];
        for chunk in 0..QK_K / 32 {
            for (l, s) in sumi.iter_mut().enumerate() {
                let start = 32 * chunk + 4 * l;
                let p: i32 = (start..start + 4)
                    .zip(&q8[start..start + 4])
                    .map(|(i, &y)| i32::from(value(block, i)) * i32::from(y))
                    .sum();
                *s += i32::from(sc[2 * chunk + l / 4]) * p;
            }
        }
        let scale = a.d[b] * d;
        for (acc, &s) in acc.iter_mut().zip(&sumi) {
            *acc = scale.mul_add(s as f32, *acc);
        }
    }
    hsum8(acc)
}

/// The same sums with AVX2 (through `safe_arch`, so without `unsafe` here), each weight block
/// unpacked once for the `N` activation rows: values rebuilt as bytes 0..64, `vpmaddubsw` with
/// the activations minus the activations' pair sums times 32 (the offset, formed with them),
/// `vpmaddwd` with the scales, one FMA per block and row.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dots_avx2<const N: usize>(row: &[u8], a: [&Q8KRow; N]) -> [f32; N] {
    use crate::q4_k::{load, load_i8};
    use safe_arch::*;
    let low_nibbles = set_splat_i8_m256i(0x0F);
    let two_bits = set_splat_i8_m256i(3);
    let mut acc = [zeroed_m256(); N];
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, sc) = header(block);
        let mut sumi = [zeroed_m256i(); N];
        for h in 0..2 {
            let bits1 = load(&block[64 * h..]);
            let bits2 = load(&block[64 * h + 32..]);
            let high = load(&block[QK_K / 2 + 32 * h..]);
            // Bits 2k..2k + 2 of each high byte, moved to bits 4..6.
            let top0 = shl_imm_u16_m256i::<4>(bitand_m256i(high, two_bits));
            let top1 = shl_imm_u16_m256i::<2>(bitand_m256i(high, shl_imm_u16_m256i::<2>(two_bits)));
            let top2 = bitand_m256i(high, shl_imm_u16_m256i::<4>(two_bits));
            let top3 = shr_imm_u16_m256i::<2>(bitand_m256i(high, shl_imm_u16_m256i::<6>(two_bits)));
            let q = [
                bitor_m256i(bitand_m256i(bits1, low_nibbles), top0),
                bitor_m256i(bitand_m256i(bits2, low_nibbles), top1),
                bitor_m256i(
                    bitand_m256i(shr_imm_u16_m256i::<4>(bits1), low_nibbles),
                    top2,
                ),
                bitor_m256i(
                    bitand_m256i(shr_imm_u16_m256i::<4>(bits2), low_nibbles),
                    top3,
                ),
            ];
            // Chunk `k`'s first 16 values take scale `8h + 2k`, its last 16 the next one.
            let scales: [m256i; 4] = std::array::from_fn(|k| {
                set_m128i_m256i(
                    set_splat_i16_m128i(i16::from(sc[8 * h + 2 * k + 1])),
                    set_splat_i16_m128i(i16::from(sc[8 * h + 2 * k])),
                )
            });
            for (sumi, a) in sumi.iter_mut().zip(&a) {
                let q8 = &a.qs[b][128 * h..];
                let offsets = &a.offsets[b][64 * h..];
                let p: [m256i; 4] = std::array::from_fn(|k| {
                    let mut o = [0i16; 16];
                    o.copy_from_slice(&offsets[16 * k..16 * k + 16]);
                    let p = sub_i16_m256i(
                        mul_u8i8_add_horizontal_saturating_m256i(q[k], load_i8(&q8[32 * k..])),
                        m256i::from(o),
                    );
                    mul_i16_horizontal_add_m256i(scales[k], p)
                });
                *sumi = add_i32_m256i(*sumi, add_i32_m256i(p[0], p[1]));
                *sumi = add_i32_m256i(*sumi, add_i32_m256i(p[2], p[3]));
            }
        }
        for t in 0..N {
            acc[t] = fused_mul_add_m256(
                set_splat_m256(a[t].d[b] * d),
                convert_to_m256_from_i32_m256i(sumi[t]),
                acc[t],
            );
        }
    }
    std::array::from_fn(|t| hsum8(acc[t].to_array()))
}

#[cfg(test)]
mod tests;
