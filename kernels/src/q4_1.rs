//! Q4_1 weight matrices (ggml's 4-bit format with a per-block scale and minimum).

use half::f16;

use crate::pool::{quantized_product, quantized_product_batched};
use crate::q8_1::Q8_1Row;
use crate::weights::{Blocks, WeightBytes};
use crate::{KernelError, QK};

/// Bytes of one GGUF Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 4 + QK / 2;

/// A `rows` x `cols` Q4_1 matrix (`rows` output features, each a dot product over `cols`
/// inputs) in the file's block layout, read in place: per block the f16 scale `d` and minimum
/// `m` (value = d * q + m), then value `j` in the low nibble of byte `j` and value `j + 16` in
/// its high nibble. The scales are widened as each block is used (exactly, so the products are
/// those of widening them at load), and the products are memory-bound, so the weights stay
/// 4-bit.
pub struct Q4_1Matrix {
    blocks: Blocks,
}

impl std::fmt::Debug for Q4_1Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Q4_1Matrix({}x{})",
            self.blocks.rows(),
            self.blocks.cols()
        )
    }
}

impl Q4_1Matrix {
    /// A copy of the raw bytes of a GGUF Q4_1 tensor whose shape is `rows` x `cols`.
    pub fn from_gguf_bytes(rows: usize, cols: usize, bytes: &[u8]) -> Result<Self, KernelError> {
        Self::new(rows, cols, WeightBytes::copied(bytes))
    }

    /// The GGUF Q4_1 tensor in `bytes` (shape `rows` x `cols`), used where it lies.
    pub fn new(rows: usize, cols: usize, bytes: WeightBytes) -> Result<Self, KernelError> {
        Ok(Self {
            blocks: Blocks::new(rows, cols, QK, BLOCK_BYTES, bytes)?,
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

    /// Row `r` as f32 values (for tests and reference computations).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.blocks.cols()];
        for (block, out) in self
            .blocks
            .row(r)
            .chunks_exact(BLOCK_BYTES)
            .zip(out.chunks_exact_mut(QK))
        {
            let (d, m, q) = split(block);
            for j in 0..QK / 2 {
                out[j] = d * f32::from(q[j] & 15) + m;
                out[j + QK / 2] = d * f32::from(q[j] >> 4) + m;
            }
        }
        out
    }

    /// `out = x · selfᵀ` for `m` rows of activations `x` (`m` x `cols`, row-major); `out` is
    /// `m` x `rows`. Panics if the lengths do not match (a bug in the caller, not bad input).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.blocks.rows(), self.blocks.cols());
        if m == 1 {
            return quantized_product(rows, cols, x, m, out, |r, a| dot(self.blocks(r), a));
        }
        // Several activation rows: each weight row's scales are widened once, not per token.
        quantized_product_batched(
            rows,
            cols,
            x,
            m,
            out,
            |r, row: &mut Vec<Block>| {
                row.clear();
                row.extend(self.blocks(r));
            },
            |row, acts, out| dots(row, acts, out),
        );
    }

    /// The blocks of row `r`, widened as they are read.
    fn blocks(&self, r: usize) -> impl Iterator<Item = Block> + '_ {
        let table = crate::f16_table();
        self.blocks.row(r).chunks_exact(BLOCK_BYTES).map(move |b| {
            let half = |i: usize| table[usize::from(u16::from_le_bytes([b[i], b[i + 1]]))];
            let mut q = [0u8; QK / 2];
            q.copy_from_slice(&b[4..BLOCK_BYTES]);
            (half(0), half(2), q)
        })
    }
}

/// A block's scale and minimum, widened, and its 16 bytes of nibbles.
type Block = (f32, f32, [u8; QK / 2]);

#[inline(always)]
fn split(block: &[u8]) -> Block {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
    let mut q = [0u8; QK / 2];
    q.copy_from_slice(&block[4..BLOCK_BYTES]);
    (d, m, q)
}

/// One weight row against one quantized activation row, summed in the same order as ggml's
/// AVX2 kernel: eight float lanes, lane `l` fed per block by the integer sum of the block's
/// values `4l..4l + 4` (values 0..16 are the low nibbles, 16..32 the high ones), the lanes
/// reduced pairwise at the end, then the minimum terms added. Same order, same rounding: the
/// products are bit-identical to llama.cpp's, so near-tied logits break the same way.
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

/// `out[t] = dot(row, acts[t])` for every activation row, each to the bit of `dot`: with AVX2,
/// four activation rows at a time share each block's load and nibble unpacking.
fn dots(row: &[Block], acts: &[Q8_1Row], out: &mut [f32]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        let mut quads = acts.chunks_exact(4);
        let mut outs = out.chunks_exact_mut(4);
        for (a, o) in (&mut quads).zip(&mut outs) {
            o.copy_from_slice(&dotn_avx2(row, [&a[0], &a[1], &a[2], &a[3]]));
        }
        // A batch of decoding jobs is often not a multiple of four: the rest share the block
        // loads too (a lone row would unpack every block for itself).
        match (quads.remainder(), outs.into_remainder()) {
            ([a, b, c], o) => o.copy_from_slice(&dotn_avx2(row, [a, b, c])),
            ([a, b], o) => o.copy_from_slice(&dotn_avx2(row, [a, b])),
            ([a], [o]) => *o = dot(row.iter().copied(), a),
            _ => {}
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    for (a, o) in acts.iter().zip(out) {
        *o = dot(row.iter().copied(), a);
    }
}

/// `dot_avx2` for `N` activation rows at once, each summed exactly as `dot_avx2` sums it.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dotn_avx2<const N: usize>(row: &[Block], a: [&Q8_1Row; N]) -> [f32; N] {
    use safe_arch::*;
    let low_nibbles = set_splat_i8_m256i(0x0F);
    let ones = set_splat_i16_m256i(1);
    let mut acc = [zeroed_m256(); N];
    let mut mins = [0f32; N];
    for (b, &(d, m, w)) in row.iter().enumerate() {
        let packed = m128i::from(w);
        let bytes = set_m128i_m256i(shr_imm_u16_m128i::<4>(packed), packed);
        let qx = bitand_m256i(bytes, low_nibbles);
        for k in 0..N {
            let qy = m256i::from(a[k].qs[b]);
            let pairs = mul_u8i8_add_horizontal_saturating_m256i(qx, qy);
            let quads = mul_i16_horizontal_add_m256i(pairs, ones);
            acc[k] = fused_mul_add_m256(
                set_splat_m256(d * a[k].d[b]),
                convert_to_m256_from_i32_m256i(quads),
                acc[k],
            );
            mins[k] = m.mul_add(a[k].s[b], mins[k]);
        }
    }
    std::array::from_fn(|k| hsum8(acc[k].to_array()) + mins[k])
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
fn dot_portable(row: impl Iterator<Item = Block>, a: &Q8_1Row) -> f32 {
    let mut acc = [0f32; 8];
    let mut mins = 0f32;
    for (((d, m, w), aq), (&ad, &asum)) in row.zip(&a.qs).zip(a.d.iter().zip(&a.s)) {
        let mut p = [0i32; 8];
        for (l, pl) in p.iter_mut().enumerate() {
            let base = 4 * (l % 4);
            let shift = if l < 4 { 0 } else { 4 };
            let off = if l < 4 { 0 } else { QK / 2 };
            for j in 0..4 {
                *pl += i32::from((w[base + j] >> shift) & 15) * i32::from(aq[off + base + j]);
            }
        }
        let scale = d * ad;
        for (acc, &pl) in acc.iter_mut().zip(&p) {
            *acc = scale.mul_add(pl as f32, *acc);
        }
        mins = m.mul_add(asum, mins);
    }
    hsum8(acc) + mins
}

/// ggml's `hsum_float_8`: high half onto low half, then pairs.
pub(crate) fn hsum8(acc: [f32; 8]) -> f32 {
    let r = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// The same sums with AVX2 (through `safe_arch`, so without `unsafe` here): nibbles unpacked
/// to bytes, `vpmaddubsw` + `vpmaddwd` for the four-value integer sums, one FMA per block.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
fn dot_avx2(row: impl Iterator<Item = Block>, a: &Q8_1Row) -> f32 {
    use safe_arch::*;
    let low_nibbles = set_splat_i8_m256i(0x0F);
    let ones = set_splat_i16_m256i(1);
    let mut acc = zeroed_m256();
    let mut mins = 0f32;
    for (((d, m, w), aq), (&ad, &asum)) in row.zip(&a.qs).zip(a.d.iter().zip(&a.s)) {
        let packed = m128i::from(w);
        let bytes = set_m128i_m256i(shr_imm_u16_m128i::<4>(packed), packed);
        let qx = bitand_m256i(bytes, low_nibbles);
        let qy = m256i::from(*aq);
        let pairs = mul_u8i8_add_horizontal_saturating_m256i(qx, qy);
        let quads = mul_i16_horizontal_add_m256i(pairs, ones);
        acc = fused_mul_add_m256(
            set_splat_m256(d * ad),
            convert_to_m256_from_i32_m256i(quads),
            acc,
        );
        mins = m.mul_add(asum, mins);
    }
    hsum8(acc.to_array()) + mins
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn block(d: f32, m: f32, nibbles: &[u8; QK]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(m).to_le_bytes());
        for j in 0..QK / 2 {
            out.push(nibbles[j] | (nibbles[j + QK / 2] << 4));
        }
        out
    }

    fn matrix(rows: usize, cols: usize, seed: u64) -> (Q4_1Matrix, Vec<u8>) {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK {
            let mut nib = [0u8; QK];
            for n in &mut nib {
                *n = (next() % 16) as u8;
            }
            let d = (next() % 1000) as f32 / 20_000.0;
            let m = -((next() % 1000) as f32) / 5_000.0;
            bytes.extend(block(d, m, &nib));
        }
        (
            Q4_1Matrix::from_gguf_bytes(rows, cols, &bytes).unwrap(),
            bytes,
        )
    }

    #[test]
    fn rejects_ragged_rows_and_short_data() {
        assert_eq!(
            Q4_1Matrix::from_gguf_bytes(2, 33, &[]).unwrap_err(),
            KernelError::Ragged { cols: 33 }
        );
        assert!(matches!(
            Q4_1Matrix::from_gguf_bytes(2, 64, &[0; 79]).unwrap_err(),
            KernelError::Size {
                expected: 80,
                got: 79,
                ..
            }
        ));
    }

    #[test]
    fn dequantizes_as_ggml_lays_blocks_out() {
        let mut nib = [0u8; QK];
        for (j, n) in nib.iter_mut().enumerate() {
            *n = (j % 16) as u8;
        }
        let m = Q4_1Matrix::from_gguf_bytes(1, QK, &block(0.5, -1.0, &nib)).unwrap();
        let row = m.dequantize_row(0);
        for (j, v) in row.iter().enumerate() {
            assert_eq!(*v, 0.5 * (j % 16) as f32 - 1.0);
        }
    }

    /// The product equals the exact product of the dequantized weights with the Q8_1-rounded
    /// activations, up to float summation order.
    fn check(rows: usize, cols: usize, m: usize, seed: u64, x: &[f32]) {
        let (w, _) = matrix(rows, cols, seed);
        let mut out = vec![f32::NAN; m * rows];
        w.matmul(x, m, &mut out);
        for t in 0..m {
            let a = Q8_1Row::quantize(&x[t * cols..(t + 1) * cols]);
            let xr: Vec<f32> = (0..cols)
                .map(|i| f32::from(a.qs[i / QK][i % QK]) * a.d[i / QK])
                .collect();
            for r in 0..rows {
                let wr = w.dequantize_row(r);
                // Q8_1 keeps `s` in f16, so the minimum's share carries its rounding.
                let exact: f64 = wr
                    .iter()
                    .zip(&xr)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                let mag: f64 = wr
                    .iter()
                    .zip(&xr)
                    .map(|(a, b)| f64::from((a * b).abs()))
                    .sum();
                let got = f64::from(out[t * rows + r]);
                assert!(
                    (got - exact).abs() <= 2e-3 * mag + 1e-4,
                    "row {r} token {t}: {got} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn one_token_matches_the_reference_product() {
        let x: Vec<f32> = (0..576)
            .map(|i| ((i * 7919 % 101) as f32 - 50.0) / 17.0)
            .collect();
        check(193, 576, 1, 1, &x);
    }

    #[test]
    fn many_tokens_match_the_reference_product() {
        let x: Vec<f32> = (0..5 * 64)
            .map(|i| ((i * 31 % 29) as f32 - 14.0) / 5.0)
            .collect();
        check(70, 64, 5, 2, &x);
    }

    /// The AVX2 path and the portable one sum in the same order: their results are equal to
    /// the bit (this is what makes the kernel's rounding match llama.cpp's). Both are called by
    /// name, so this compares two kernels even though `dot` picks one at compile time.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_portable_paths_agree_to_the_bit() {
        crate::require_avx2_fma();
        #[cfg(all(target_feature = "avx2", target_feature = "fma"))]
        {
            let (w, _) = matrix(64, 576, 9);
            for seed in 0..8u32 {
                let x: Vec<f32> = (0..576u32)
                    .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let a = Q8_1Row::quantize(&x);
                for r in 0..64 {
                    let avx2 = dot_avx2(w.blocks(r), &a);
                    assert_eq!(
                        avx2.to_bits(),
                        dot_portable(w.blocks(r), &a).to_bits(),
                        "row {r}"
                    );
                    // And the build's dispatch runs the AVX2 kernel.
                    assert_eq!(dot(w.blocks(r), &a).to_bits(), avx2.to_bits(), "row {r}");
                }
            }
        }
    }

    /// A batch of activation rows (each weight row widened once) gives, row for row, the bits
    /// of one activation row at a time (blocks widened as they are read): a prompt's products
    /// do not depend on how it is chunked.
    #[test]
    fn a_batch_gives_the_bits_of_one_token_at_a_time() {
        let (w, _) = matrix(40, 256, 12);
        // Every remainder after the groups of four: 1, 2 and 3 rows, alone and after a group.
        for m in [2, 3, 5, 6, 7] {
            let x: Vec<f32> = (0..m * 256)
                .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0)
                .collect();
            let mut batch = vec![0f32; m * 40];
            w.matmul(&x, m, &mut batch);
            for t in 0..m {
                let mut one = vec![1f32; 40];
                w.matmul(&x[t * 256..(t + 1) * 256], 1, &mut one);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&one),
                    bits(&batch[t * 40..(t + 1) * 40]),
                    "{m} rows, row {t}"
                );
            }
        }
    }

    /// A matrix read in place from a mapped file, at an aligned offset after other data,
    /// multiplies exactly as a private copy of the same bytes does, and reads the file's pages.
    #[test]
    fn a_matrix_read_from_a_mapping_gives_the_copys_products_to_the_bit() {
        let (copy, bytes) = matrix(48, 192, 4);
        let mut file = vec![0xA5u8; 96];
        file.extend_from_slice(&bytes);
        let map =
            crate::weights::Mapping::of_file(&crate::weights::tests::temp_file("q4_1", &file))
                .unwrap();
        let mapped = Q4_1Matrix::new(
            48,
            192,
            WeightBytes::mapped(map.clone(), 96, bytes.len(), 32).unwrap(),
        )
        .unwrap();
        assert!(std::ptr::eq(
            mapped.weight_bytes().as_slice().as_ptr(),
            map.bytes()[96..].as_ptr()
        ));
        let x: Vec<f32> = (0..3 * 192)
            .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0)
            .collect();
        let (mut a, mut b) = (vec![0f32; 3 * 48], vec![1f32; 3 * 48]);
        copy.matmul(&x, 3, &mut a);
        mapped.matmul(&x, 3, &mut b);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        assert!(matches!(
            Q4_1Matrix::new(
                48,
                192,
                WeightBytes::mapped(map, 96, bytes.len() - 20, 32).unwrap()
            ),
            Err(KernelError::Size { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn random_shapes_match_the_reference_product(
            rows in 1usize..40, blocks in 1usize..6, m in 1usize..4, seed in any::<u64>(),
            scale in 0.01f32..100.0,
        ) {
            let cols = blocks * QK;
            let x: Vec<f32> = (0..m * cols)
                .map(|i| (((i as u64 ^ seed).wrapping_mul(2654435761) % 1000) as f32 / 500.0 - 1.0) * scale)
                .collect();
            check(rows, cols, m, seed, &x);
        }
    }
}
