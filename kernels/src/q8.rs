//! Weights with 8-bit signed values per 32-value block and one scale (ggml's Q8_0, and Q5_0
//! widened to it at load), multiplied with Q8_0-quantized activations.

use half::f16;

use crate::pool::quantized_product;
use crate::q8_1::Q8_1Row;
use crate::{KernelError, QK};

/// GGUF block sizes: Q8_0 is an f16 scale and 32 bytes; Q5_0 an f16 scale, 32 high bits and
/// 16 bytes of low nibbles.
const Q8_0_BYTES: usize = 2 + QK;
const Q5_0_BYTES: usize = 2 + 4 + QK / 2;

/// A `rows` x `cols` matrix of signed 8-bit blocks. Q5_0 values (-16..16) are widened to bytes
/// when loaded: exact, 1.6x the memory of the packed form, and the product then runs the same
/// integer kernel as Q8_0 instead of unpacking five-bit values on every use.
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    d: Vec<f32>,
    qs: Vec<[i8; QK]>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix({}x{})", self.rows, self.cols)
    }
}

fn check(rows: usize, cols: usize, len: usize, block: usize) -> Result<(), KernelError> {
    if !cols.is_multiple_of(QK) {
        return Err(KernelError::Ragged { cols });
    }
    let expected = rows * cols / QK * block;
    if len != expected {
        return Err(KernelError::Size {
            rows,
            cols,
            expected,
            got: len,
        });
    }
    Ok(())
}

impl Q8Matrix {
    /// Takes the raw bytes of a GGUF Q8_0 tensor whose shape is `rows` x `cols`.
    pub fn from_q8_0_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        check(rows, cols, bytes.len(), Q8_0_BYTES)?;
        let (mut d, mut qs) = (Vec::new(), Vec::new());
        for block in bytes.chunks_exact(Q8_0_BYTES) {
            d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            let mut q = [0i8; QK];
            for (o, &b) in q.iter_mut().zip(&block[2..]) {
                *o = b as i8;
            }
            qs.push(q);
        }
        Ok(Self { rows, cols, d, qs })
    }

    /// Takes the raw bytes of a GGUF Q5_0 tensor whose shape is `rows` x `cols`.
    pub fn from_q5_0_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        check(rows, cols, bytes.len(), Q5_0_BYTES)?;
        let (mut d, mut qs) = (Vec::new(), Vec::new());
        for block in bytes.chunks_exact(Q5_0_BYTES) {
            d.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            let mut q = [0i8; QK];
            for j in 0..QK / 2 {
                let lo = block[6 + j] & 15 | (((qh >> j) & 1) << 4) as u8;
                let hi = block[6 + j] >> 4 | (((qh >> (j + 16)) & 1) << 4) as u8;
                q[j] = lo as i8 - 16;
                q[j + QK / 2] = hi as i8 - 16;
            }
            qs.push(q);
        }
        Ok(Self { rows, cols, d, qs })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Writes row `r` as f32 (`d * q`, as ggml widens it) into `out`. `None` if `r` is out of
    /// range or `out` is not `cols` long; this is how token embeddings are looked up.
    pub fn row_into(&self, r: usize, out: &mut [f32]) -> Option<()> {
        if r >= self.rows || out.len() != self.cols {
            return None;
        }
        let blocks = self.cols / QK;
        for b in 0..blocks {
            let (d, q) = (self.d[r * blocks + b], &self.qs[r * blocks + b]);
            for (o, &v) in out[b * QK..(b + 1) * QK].iter_mut().zip(q) {
                *o = d * f32::from(v);
            }
        }
        Some(())
    }

    /// `out = x · selfᵀ` for `m` rows of activations (`m` x `cols`); `out` is `m` x `rows`.
    /// Panics if the lengths do not match (a bug in the caller, not bad input).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let blocks = self.cols / QK;
        quantized_product(self.rows, self.cols, x, m, out, |r, a| {
            let range = r * blocks..(r + 1) * blocks;
            dot(&self.d[range.clone()], &self.qs[range], a)
        });
    }
}

/// Same summation order as ggml's AVX2 `q8_0 · q8_0` (eight lanes of four-value integer sums,
/// one FMA per block, `hsum_float_8`).
#[inline]
fn dot(d: &[f32], qs: &[[i8; QK]], a: &Q8_1Row) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        dot_avx2(d, qs, a)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        dot_portable(d, qs, a)
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
fn dot_portable(d: &[f32], qs: &[[i8; QK]], a: &Q8_1Row) -> f32 {
    let mut acc = [0f32; 8];
    for ((w, &dw), (aq, &ad)) in qs.iter().zip(d).zip(a.qs.iter().zip(&a.d)) {
        let scale = dw * ad;
        for (l, acc) in acc.iter_mut().enumerate() {
            let p: i32 = (4 * l..4 * l + 4)
                .map(|j| i32::from(w[j]) * i32::from(aq[j]))
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
fn dot_avx2(d: &[f32], qs: &[[i8; QK]], a: &Q8_1Row) -> f32 {
    use safe_arch::*;
    let ones = set_splat_i16_m256i(1);
    let mut acc = zeroed_m256();
    for ((w, &dw), (aq, &ad)) in qs.iter().zip(d).zip(a.qs.iter().zip(&a.d)) {
        let qx = m256i::from(*w);
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
            let blocks = cols / QK;
            for t in 0..m {
                let a = Q8_1Row::quantize(&x[t * cols..(t + 1) * cols]);
                for r in 0..rows {
                    let (d, q) = (
                        &w.d[r * blocks..(r + 1) * blocks],
                        &w.qs[r * blocks..(r + 1) * blocks],
                    );
                    let avx2 = dot_avx2(d, q, &a);
                    assert_eq!(avx2.to_bits(), dot_portable(d, q, &a).to_bits(), "row {r}");
                    // And the build's dispatch runs the AVX2 kernel.
                    assert_eq!(dot(d, q, &a).to_bits(), avx2.to_bits(), "row {r}");
                }
            }
        }
    }
}
