//! Weights with signed values of up to 8 bits per 32-value block and one scale (ggml's Q8_0 and
//! Q5_0), multiplied with Q8_0-quantized activations, read in place in the file's layout.

use crate::pool::{quantized_product, quantized_product_prepared};
use crate::q8_1::Q8_1Row;
use crate::weights::{Blocks, WeightBytes};
use crate::{KernelError, QK};

/// GGUF block sizes: Q8_0 is an f16 scale and 32 bytes; Q5_0 an f16 scale, 32 high bits and
/// 16 bytes of low nibbles.
const Q8_0_BYTES: usize = 2 + QK;
const Q5_0_BYTES: usize = 2 + 4 + QK / 2;

/// One block widened: its scale and its 32 values as the bytes of `i8`s.
type Block = (f32, [u8; QK]);

/// A `rows` x `cols` matrix of 32-value blocks with one f16 scale each, in the file's layout.
/// Q8_0 values are bytes already. Q5_0 values (-16..16) are widened to bytes as they are used:
/// exactly (the products are those of widening them at load, which the kernels did before they
/// read weights in place), per row once per product when a product has several activation rows,
/// and with llama.cpp's bit tricks when it has one.
pub struct Q8Matrix {
    format: Format,
    blocks: Blocks,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Q8_0,
    Q5_0,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Q8Matrix({:?}, {}x{})",
            self.format,
            self.blocks.rows(),
            self.blocks.cols()
        )
    }
}

impl Q8Matrix {
    /// A copy of the raw bytes of a GGUF Q8_0 tensor whose shape is `rows` x `cols`.
    pub fn from_q8_0_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        Self::q8_0(rows, cols, WeightBytes::copied(bytes))
    }

    /// A copy of the raw bytes of a GGUF Q5_0 tensor whose shape is `rows` x `cols`.
    pub fn from_q5_0_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        Self::q5_0(rows, cols, WeightBytes::copied(bytes))
    }

    /// The GGUF Q8_0 tensor in `bytes` (shape `rows` x `cols`), used where it lies.
    pub fn q8_0(rows: usize, cols: usize, bytes: WeightBytes) -> Result<Self, KernelError> {
        Ok(Self {
            format: Format::Q8_0,
            blocks: Blocks::new(rows, cols, QK, Q8_0_BYTES, bytes)?,
        })
    }

    /// The GGUF Q5_0 tensor in `bytes` (shape `rows` x `cols`), used where it lies.
    pub fn q5_0(rows: usize, cols: usize, bytes: WeightBytes) -> Result<Self, KernelError> {
        Ok(Self {
            format: Format::Q5_0,
            blocks: Blocks::new(rows, cols, QK, Q5_0_BYTES, bytes)?,
        })
    }

    pub fn rows(&self) -> usize {
        self.blocks.rows()
    }

    pub fn cols(&self) -> usize {
        self.blocks.cols()
    }

    /// Where the blocks are read from.
    pub fn weight_bytes(&self) -> &WeightBytes {
        self.blocks.bytes()
    }

    /// Calls `f` on each block of row `r`, widened.
    fn for_each_block(&self, r: usize, f: impl FnMut(Block)) {
        let (t, row) = (crate::f16_table(), self.blocks.row(r));
        match self.format {
            Format::Q8_0 => row
                .chunks_exact(Q8_0_BYTES)
                .map(|b| q8_0_block(b, t))
                .for_each(f),
            Format::Q5_0 => row
                .chunks_exact(Q5_0_BYTES)
                .map(|b| q5_0_block(b, t))
                .for_each(f),
        }
    }

    /// Writes row `r` as f32 (`d * q`, as ggml widens it) into `out`. `None` if `r` is out of
    /// range or `out` is not `cols` long; this is how token embeddings are looked up.
    pub fn row_into(&self, r: usize, out: &mut [f32]) -> Option<()> {
        if r >= self.blocks.rows() || out.len() != self.blocks.cols() {
            return None;
        }
        let mut chunks = out.chunks_exact_mut(QK);
        self.for_each_block(r, |(d, q)| {
            if let Some(out) = chunks.next() {
                for (o, &v) in out.iter_mut().zip(&q) {
                    *o = d * f32::from(v as i8);
                }
            }
        });
        Some(())
    }

    /// `out = x · selfᵀ` for `m` rows of activations (`m` x `cols`); `out` is `m` x `rows`.
    /// Panics if the lengths do not match (a bug in the caller, not bad input).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.blocks.rows(), self.blocks.cols());
        if m == 1 && self.format == Format::Q8_0 {
            let t = crate::f16_table();
            return quantized_product(rows, cols, x, m, out, |r, a| {
                dot(
                    self.blocks
                        .row(r)
                        .chunks_exact(Q8_0_BYTES)
                        .map(|b| q8_0_block(b, t)),
                    a,
                )
            });
        }
        // Several activation rows, or Q5_0: each weight row is widened once per product, not
        // once per token.
        quantized_product_prepared(
            rows,
            cols,
            x,
            m,
            out,
            |r, row: &mut Vec<Block>| {
                row.clear();
                self.for_each_block(r, |b| row.push(b));
            },
            |row, a| dot(row.iter().copied(), a),
        );
    }
}

/// A Q8_0 block: its scale widened, its bytes as they are.
#[inline(always)]
fn q8_0_block(block: &[u8], table: &[f32; 1 << 16]) -> Block {
    let d = table[usize::from(u16::from_le_bytes([block[0], block[1]]))];
    let mut q = [0u8; QK];
    q.copy_from_slice(&block[2..Q8_0_BYTES]);
    (d, q)
}

/// A Q5_0 block widened: value `j` is `(low nibble | high bit << 4) - 16`, where values 0..16
/// are the low nibbles of the 16 bytes, values 16..32 their high nibbles, and bit `j` of the
/// 32-bit word after the scale is value `j`'s high bit.
#[inline(always)]
fn q5_0_block(block: &[u8], table: &[f32; 1 << 16]) -> Block {
    let d = table[usize::from(u16::from_le_bytes([block[0], block[1]]))];
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        (d, widen_q5_0_avx2(block))
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    {
        (d, widen_q5_0_portable(block))
    }
}

#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2"), allow(dead_code))]
fn widen_q5_0_portable(block: &[u8]) -> [u8; QK] {
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        let lo = block[6 + j] & 15 | (((qh >> j) & 1) << 4) as u8;
        let hi = block[6 + j] >> 4 | (((qh >> (j + 16)) & 1) << 4) as u8;
        q[j] = (lo as i8 - 16) as u8;
        q[j + QK / 2] = (hi as i8 - 16) as u8;
    }
    q
}

/// ggml's `bytes_from_nibbles_32` and `bytes_from_bits_32`: the nibbles spread to bytes, and
/// `0xF0` (that is, -16 once the nibble is added) put into every byte whose high bit is clear.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
fn widen_q5_0_avx2(block: &[u8]) -> [u8; QK] {
    use safe_arch::*;
    let mut packed = [0u8; QK / 2];
    packed.copy_from_slice(&block[6..Q5_0_BYTES]);
    let packed = m128i::from(packed);
    let nibbles = bitand_m256i(
        set_m128i_m256i(shr_imm_u16_m128i::<4>(packed), packed),
        set_splat_i8_m256i(0x0F),
    );
    let qh = i32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    // Byte i of the result takes byte i / 8 of `qh`, then is all ones if its bit i % 8 is set.
    let spread = shuffle_av_i8z_half_m256i(
        set_splat_i32_m256i(qh),
        set_i64_m256i(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let others = set_splat_i64_m256i(0x7fbf_dfef_f7fb_fdfe);
    let high = cmp_eq_mask_i8_m256i(bitor_m256i(spread, others), set_splat_i64_m256i(-1));
    let minus_16 = bitandnot_m256i(high, set_splat_i8_m256i(0xF0u8 as i8));
    <[u8; QK]>::from(bitor_m256i(nibbles, minus_16))
}

/// Same summation order as ggml's AVX2 `q8_0 · q8_0` (eight lanes of four-value integer sums,
/// one FMA per block, `hsum_float_8`), over a row's blocks widened.
#[inline]
fn dot(row: impl Iterator<Item = Block>, a: &Q8_1Row) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        dot_avx2(row, a)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        dot_portable(row, a)
    }
}

#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn dot_portable(row: impl Iterator<Item = Block>, a: &Q8_1Row) -> f32 {
    let mut acc = [0f32; 8];
    for ((dw, w), (aq, &ad)) in row.zip(a.qs.iter().zip(&a.d)) {
        let scale = dw * ad;
        for (l, acc) in acc.iter_mut().enumerate() {
            let p: i32 = (4 * l..4 * l + 4)
                .map(|j| i32::from(w[j] as i8) * i32::from(aq[j]))
                .sum();
            *acc = scale.mul_add(p as f32, *acc);
        }
    }
    crate::q4_1::hsum8(acc)
}

/// `vpsignb`/`vpabsb` turn the signed x signed product into the unsigned x signed one
/// `vpmaddubsw` takes, as ggml does.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dot_avx2(row: impl Iterator<Item = Block>, a: &Q8_1Row) -> f32 {
    use safe_arch::*;
    let ones = set_splat_i16_m256i(1);
    let mut acc = zeroed_m256();
    for ((dw, w), (aq, &ad)) in row.zip(a.qs.iter().zip(&a.d)) {
        let qx = m256i::from(w);
        let qy = m256i::from(*aq);
        let pairs =
            mul_u8i8_add_horizontal_saturating_m256i(abs_i8_m256i(qx), sign_apply_i8_m256i(qy, qx));
        let quads = mul_i16_horizontal_add_m256i(pairs, ones);
        acc = fused_mul_add_m256(
            set_splat_m256(dw * ad),
            convert_to_m256_from_i32_m256i(quads),
            acc,
        );
    }
    crate::q4_1::hsum8(acc.to_array())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use half::f16;

    use super::*;

    fn q8_0_bytes(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for b in 0..rows * cols / QK {
            let d = ((b as u32 * 7 + seed) % 13 + 1) as f32 / 500.0;
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend((0..QK as u32).map(|j| ((j * 37 + b as u32 * 11 + seed) % 255) as u8));
        }
        out
    }

    #[test]
    fn q5_0_widens_to_the_values_ggml_decodes() {
        // Value j: low nibble j % 16, high bit set for odd j; ggml's value is (q | h << 4) - 16.
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        let qh: u32 = (0..32).filter(|j| j % 2 == 1).map(|j| 1u32 << j).sum();
        block.extend_from_slice(&qh.to_le_bytes());
        block.extend((0..16u8).map(|j| j | (j << 4)));
        let m = Q8Matrix::from_q5_0_bytes(1, QK, &block).unwrap();
        let mut row = vec![0f32; QK];
        m.row_into(0, &mut row).unwrap();
        for (j, v) in row.iter().enumerate() {
            let q = (j % 16) as i32 | (((j % 2) as i32) << 4);
            assert_eq!(*v, 0.25 * (q - 16) as f32, "value {j}");
        }
    }

    #[test]
    fn q8_0_rows_dequantize_as_scale_times_byte() {
        let bytes = q8_0_bytes(3, 64, 1);
        let m = Q8Matrix::from_q8_0_bytes(3, 64, &bytes).unwrap();
        let mut row = vec![0f32; 64];
        m.row_into(2, &mut row).unwrap();
        let block = &bytes[4 * Q8_0_BYTES..5 * Q8_0_BYTES];
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        assert_eq!(row[0], d * f32::from(block[2] as i8));
        assert!(m.row_into(3, &mut row).is_none(), "row past the end");
        assert!(m.row_into(0, &mut [0.0; 3]).is_none(), "wrong width");
        assert!(
            matches!(
                Q8Matrix::from_q8_0_bytes(3, 64, &bytes[1..]),
                Err(KernelError::Size { got, .. }) if got == bytes.len() - 1
            ),
            "short table"
        );
        assert!(
            matches!(
                Q8Matrix::from_q5_0_bytes(1, 33, &[]),
                Err(KernelError::Ragged { cols: 33 })
            ),
            "ragged row"
        );
    }

    #[test]
    fn products_match_the_dequantized_reference() {
        let (rows, cols, m) = (37, 256, 3);
        let w = Q8Matrix::from_q8_0_bytes(rows, cols, &q8_0_bytes(rows, cols, 5)).unwrap();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0)
            .collect();
        let mut out = vec![f32::NAN; m * rows];
        w.matmul(&x, m, &mut out);
        for t in 0..m {
            let a = Q8_1Row::quantize(&x[t * cols..(t + 1) * cols]);
            for r in 0..rows {
                let mut wr = vec![0f32; cols];
                w.row_into(r, &mut wr).unwrap();
                let exact: f64 = (0..cols)
                    .map(|i| {
                        f64::from(wr[i]) * f64::from(a.qs[i / QK][i % QK]) * f64::from(a.d[i / QK])
                    })
                    .sum();
                let mag: f64 = (0..cols)
                    .map(|i| f64::from(wr[i].abs() * x[t * cols + i].abs()))
                    .sum();
                let got = out[t * rows + r];
                assert!(
                    (f64::from(got) - exact).abs() <= 1e-4 * mag + 1e-5,
                    "{got} vs {exact}"
                );
            }
        }
    }

    /// The AVX2 kernel and the portable one agree to the bit; both are called by name, so
    /// this compares two kernels even though `dot` picks one at compile time.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_portable_paths_agree_to_the_bit() {
        crate::require_avx2_fma();
        #[cfg(all(target_feature = "avx2", target_feature = "fma"))]
        {
            let (rows, cols, m) = (37, 256, 3);
            let w = Q8Matrix::from_q8_0_bytes(rows, cols, &q8_0_bytes(rows, cols, 5)).unwrap();
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0)
                .collect();
            for t in 0..m {
                let a = Q8_1Row::quantize(&x[t * cols..(t + 1) * cols]);
                for r in 0..rows {
                    let t = crate::f16_table();
                    let blocks = || {
                        w.blocks
                            .row(r)
                            .chunks_exact(Q8_0_BYTES)
                            .map(|b| q8_0_block(b, t))
                    };
                    let avx2 = dot_avx2(blocks(), &a);
                    assert_eq!(
                        avx2.to_bits(),
                        dot_portable(blocks(), &a).to_bits(),
                        "row {r}"
                    );
                    // And the build's dispatch runs the AVX2 kernel.
                    assert_eq!(dot(blocks(), &a).to_bits(), avx2.to_bits(), "row {r}");
                }
            }
        }
    }

    /// Q5_0 blocks with every value and high bit pattern: scale, high bits, nibbles.
    fn q5_0_bytes(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for b in 0..(rows * cols / QK) as u32 {
            let d = ((b * 7 + seed) % 13 + 1) as f32 / 300.0;
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            let qh = (b ^ seed).wrapping_mul(2654435761).rotate_left(b % 32);
            out.extend_from_slice(&qh.to_le_bytes());
            out.extend((0..16u32).map(|j| ((j * 37 + b * 11 + seed) % 256) as u8));
        }
        out
    }

    /// The AVX2 widening of Q5_0 blocks gives the portable one's bytes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_portable_q5_0_widening_agree() {
        crate::require_avx2_fma();
        #[cfg(all(target_feature = "avx2", target_feature = "fma"))]
        for (i, block) in q5_0_bytes(64, 256, 3).chunks_exact(Q5_0_BYTES).enumerate() {
            assert_eq!(
                widen_q5_0_avx2(block),
                widen_q5_0_portable(block),
                "block {i}"
            );
        }
    }

    /// Q5_0 used in place multiplies to the bit as the same values widened to a Q8_0 table
    /// (which is how the kernels ran Q5_0 before they read it in place), for one activation
    /// row (widened per use) and for several (widened once per row).
    #[test]
    fn q5_0_in_place_equals_its_values_widened_to_q8_0() {
        let (rows, cols) = (29, 320);
        let bytes = q5_0_bytes(rows, cols, 9);
        let q5 = Q8Matrix::from_q5_0_bytes(rows, cols, &bytes).unwrap();
        let mut widened = Vec::new();
        for block in bytes.chunks_exact(Q5_0_BYTES) {
            widened.extend_from_slice(&block[..2]);
            widened.extend_from_slice(&widen_q5_0_portable(block));
        }
        let q8 = Q8Matrix::from_q8_0_bytes(rows, cols, &widened).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for m in [1, 4] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0)
                .collect();
            let (mut a, mut b) = (vec![0f32; m * rows], vec![1f32; m * rows]);
            q5.matmul(&x, m, &mut a);
            q8.matmul(&x, m, &mut b);
            assert_eq!(bits(&a), bits(&b), "{m} activation rows");
        }
        let (mut a, mut b) = (vec![0f32; cols], vec![1f32; cols]);
        for r in 0..rows {
            q5.row_into(r, &mut a).unwrap();
            q8.row_into(r, &mut b).unwrap();
            assert_eq!(bits(&a), bits(&b), "row {r}");
        }
    }

    /// A batch of activation rows gives, row for row, the bits of one row at a time (for Q8_0
    /// the batch widens each weight row once, a single row reads the blocks in place).
    #[test]
    fn a_batch_gives_the_bits_of_one_token_at_a_time() {
        let (rows, cols, m) = (33, 256, 4);
        for w in [
            Q8Matrix::from_q8_0_bytes(rows, cols, &q8_0_bytes(rows, cols, 8)).unwrap(),
            Q8Matrix::from_q5_0_bytes(rows, cols, &q5_0_bytes(rows, cols, 8)).unwrap(),
        ] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 31 % 29) as f32 - 14.0) / 5.0)
                .collect();
            let mut batch = vec![0f32; m * rows];
            w.matmul(&x, m, &mut batch);
            for t in 0..m {
                let mut one = vec![1f32; rows];
                w.matmul(&x[t * cols..(t + 1) * cols], 1, &mut one);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&one),
                    bits(&batch[t * rows..(t + 1) * rows]),
                    "{w:?} {t}"
                );
            }
        }
    }

    /// Q8_0 and Q5_0 tables read in place from a mapped file give a private copy's products.
    #[test]
    fn matrices_read_from_a_mapping_give_the_copys_products_to_the_bit() {
        let (rows, cols) = (24, 256);
        let (q8, q5) = (q8_0_bytes(rows, cols, 2), q5_0_bytes(rows, cols, 4));
        let mut file = q8.clone();
        file.resize(q8.len().next_multiple_of(32), 0);
        let q5_at = file.len();
        file.extend_from_slice(&q5);
        let map = crate::weights::Mapping::of_file(&crate::weights::tests::temp_file("q8", &file))
            .unwrap();
        let at = |start, len| WeightBytes::mapped(map.clone(), start, len, 32).unwrap();
        let pairs = [
            (
                Q8Matrix::from_q8_0_bytes(rows, cols, &q8).unwrap(),
                Q8Matrix::q8_0(rows, cols, at(0, q8.len())).unwrap(),
            ),
            (
                Q8Matrix::from_q5_0_bytes(rows, cols, &q5).unwrap(),
                Q8Matrix::q5_0(rows, cols, at(q5_at, q5.len())).unwrap(),
            ),
        ];
        let x: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 31 % 29) as f32 - 14.0) / 5.0)
            .collect();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (copy, mapped) in &pairs {
            assert!(copy.weight_bytes().mapping().is_none());
            assert!(Arc::ptr_eq(mapped.weight_bytes().mapping().unwrap(), &map));
            for m in [1, 3] {
                let (mut a, mut b) = (vec![0f32; m * rows], vec![1f32; m * rows]);
                copy.matmul(&x[..m * cols], m, &mut a);
                mapped.matmul(&x[..m * cols], m, &mut b);
                assert_eq!(bits(&a), bits(&b), "{mapped:?}, {m} activation rows");
            }
        }
    }
}
