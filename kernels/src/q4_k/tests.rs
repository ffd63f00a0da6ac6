//! Tests of the Q4_K kernel and the Q8_K activations; the helpers serve the Q6_K tests too.

use super::*;
use proptest::prelude::*;

/// A deterministic stream of pseudo-random `u32`s.
pub(crate) fn rng(seed: u64) -> impl FnMut() -> u32 {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    }
}

/// `m` x `cols` activations in -scale..scale.
pub(crate) fn activations(m: usize, cols: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut next = rng(seed ^ 0xA5A5);
    (0..m * cols)
        .map(|_| (next() % 20_001) as f32 / 10_000.0 * scale - scale)
        .collect()
}

/// Packs eight 6-bit scales and minimums as ggml's Q4_K does (the inverse of `header`).
fn pack_scales(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
    }
    s
}

/// The bytes of a `rows` x `cols` Q4_K tensor with random scales, minimums and nibbles.
pub(crate) fn q4_k_bytes(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut next = rng(seed);
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / QK_K {
        let d = (next() % 1000 + 1) as f32 / 200_000.0;
        let dmin = (next() % 1000) as f32 / 100_000.0;
        bytes.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        bytes.extend_from_slice(&f16::from_f32(dmin).to_le_bytes());
        // Any 12 bytes are valid packed scales: draw them whole, so every bit is exercised.
        bytes.extend((0..12).map(|_| next() as u8));
        bytes.extend((0..QK_K / 2).map(|_| next() as u8));
    }
    bytes
}

/// Checks `matmul` against the exact (f64) product of the dequantized weights with the Q8_K
/// activations the kernel multiplies: the only difference is the f32 rounding of the scales'
/// products and of the sums, so the tolerance is relative to the sum of the terms' magnitudes.
pub(crate) fn check_against_reference(
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    matmul: impl Fn(&[f32], usize, &mut [f32]),
    dequantize_row: impl Fn(usize) -> Vec<f32>,
) {
    let mut out = vec![f32::NAN; m * rows];
    matmul(x, m, &mut out);
    let weights: Vec<Vec<f32>> = (0..rows).map(dequantize_row).collect();
    for t in 0..m {
        let a = Q8KRow::quantize(&x[t * cols..(t + 1) * cols]);
        let xr: Vec<f64> = (0..cols)
            .map(|i| f64::from(a.qs[i / QK_K][i % QK_K]) * f64::from(a.d[i / QK_K]))
            .collect();
        for (r, wr) in weights.iter().enumerate() {
            let exact: f64 = wr.iter().zip(&xr).map(|(w, x)| f64::from(*w) * x).sum();
            let mag: f64 = wr
                .iter()
                .zip(&xr)
                .map(|(w, x)| (f64::from(*w) * x).abs())
                .sum();
            let got = f64::from(out[t * rows + r]);
            assert!(
                (got - exact).abs() <= 1e-5 * mag + 1e-6,
                "row {r} token {t}: {got} vs {exact} (magnitude {mag})"
            );
        }
    }
}

fn matrix(rows: usize, cols: usize, seed: u64) -> Q4KMatrix {
    Q4KMatrix::from_gguf_bytes(rows, cols, &q4_k_bytes(rows, cols, seed)).unwrap()
}

fn check(rows: usize, cols: usize, m: usize, seed: u64, scale: f32) {
    let w = matrix(rows, cols, seed);
    let x = activations(m, cols, seed, scale);
    check_against_reference(
        rows,
        cols,
        &x,
        m,
        |x, m, out| w.matmul(x, m, out),
        |r| w.dequantize_row(r),
    );
}

#[test]
fn malformed_shapes_and_lengths_are_errors_not_panics() {
    assert_eq!(
        Q4KMatrix::from_gguf_bytes(2, 640, &[0; 2 * 640 / 256 * 144]).unwrap_err(),
        KernelError::Ragged { cols: 640 }
    );
    assert_eq!(
        Q4KMatrix::from_gguf_bytes(3, 512, &[0; 6 * 144 - 1]).unwrap_err(),
        KernelError::Size {
            rows: 3,
            cols: 512,
            expected: 6 * 144,
            got: 6 * 144 - 1
        }
    );
    assert!(matches!(
        Q4KMatrix::from_gguf_bytes(3, 512, &[0; 6 * 144 + 144]),
        Err(KernelError::Size { .. })
    ));
    // A shape whose byte count overflows is refused, not wrapped around.
    assert!(matches!(
        Q4KMatrix::from_gguf_bytes(usize::MAX / 2, 512, &[0; 144]),
        Err(KernelError::Size { .. })
    ));
    assert!(Q4KMatrix::from_gguf_bytes(3, 512, &[0; 6 * 144]).is_ok());
    assert!(Q4KMatrix::from_gguf_bytes(0, 256, &[]).is_ok());
}

#[test]
fn dequantizes_as_ggml_lays_blocks_out() {
    // Scales and minimums that use all six bits, so the packed top bits matter.
    let sc = [1, 2, 33, 63, 17, 48, 5, 62];
    let mn = [0, 63, 7, 40, 61, 3, 32, 16];
    let mut block = Vec::new();
    block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
    block.extend_from_slice(&f16::from_f32(0.25).to_le_bytes());
    block.extend_from_slice(&pack_scales(&sc, &mn));
    // Byte 32j + l: value 64j + l in the low nibble, value 64j + 32 + l in the high one.
    block.extend((0..QK_K / 2).map(|i| (i % 16) as u8 | (((i / 2) % 16) as u8) << 4));
    let w = Q4KMatrix::from_gguf_bytes(1, QK_K, &block).unwrap();
    let row = w.dequantize_row(0);
    for (i, v) in row.iter().enumerate() {
        let (j, half, l) = (i / 64, i % 64 / 32, i % 32);
        let byte = 32 * j + l;
        let q = if half == 0 {
            byte % 16
        } else {
            (byte / 2) % 16
        };
        let sub = i / 32;
        let want = 0.5 * f32::from(sc[sub]) * q as f32 - 0.25 * f32::from(mn[sub]);
        assert_eq!(*v, want, "value {i}");
    }
}

#[test]
fn q8_k_quantization_follows_ggml() {
    let mut x = activations(1, 2 * QK_K, 3, 2.0);
    // Block 0: the value of largest magnitude is negative and comes after a positive one of
    // equal magnitude; ggml keeps the first, so it maps to -127 and the second to +127.
    x[10] = 3.0;
    x[20] = -3.0;
    // Block 1 is all zeros.
    x[QK_K..].fill(0.0);
    let a = Q8KRow::quantize(&x);
    assert_eq!(a.blocks(), 2);
    assert_eq!(a.qs[0][10], -127);
    assert_eq!(a.qs[0][20], 127);
    assert_eq!(a.d[0], 1.0 / (-127.0 / 3.0));
    for (j, v) in x[..QK_K].iter().enumerate() {
        let back = f32::from(a.qs[0][j]) * a.d[0];
        assert!((back - v).abs() <= a.d[0].abs() * 0.5001, "{back} vs {v}");
    }
    for (s, part) in a.sums32[0].iter().zip(a.qs[0].chunks(32)) {
        assert_eq!(
            i32::from(*s),
            part.iter().map(|&v| i32::from(v)).sum::<i32>()
        );
    }
    assert_eq!(a.d[1], 0.0);
    assert!(a.qs[1].iter().all(|&v| v == 0) && a.sums32[1].iter().all(|&v| v == 0));
    // Ties round to even, as ggml's `nearest_int` does: with max 127 the scale is -1, so
    // 2.5 -> -2 and 3.5 -> -4.
    let mut t = vec![0f32; QK_K];
    t[0] = 127.0;
    t[1] = 2.5;
    t[2] = 3.5;
    let a = Q8KRow::quantize(&t);
    assert_eq!((a.qs[0][0], a.qs[0][1], a.qs[0][2]), (-127, -2, -4));
}

#[test]
fn one_token_matches_the_reference_product() {
    // 193 rows split unevenly over the threads; 1536 columns make the product big enough to
    // be split at all.
    check(193, 1536, 1, 1, 1.0);
}

#[test]
fn three_tokens_match_the_reference_product() {
    check(193, 768, 3, 2, 4.0);
}

#[test]
fn a_prompt_of_130_tokens_matches_the_reference_product() {
    // 130 = 32 groups of four tokens and two left over: both kernels run.
    check(37, 512, 130, 3, 0.5);
}

/// The prompt pass (four tokens per weight row) and generation (one) give the same products
/// to the bit, so a token's logits do not depend on how many tokens were computed with it.
#[test]
fn a_prompts_products_equal_one_token_products_to_the_bit() {
    let (rows, cols, m) = (67, 1024, 9);
    let w = matrix(rows, cols, 5);
    let x = activations(m, cols, 5, 3.0);
    let mut all = vec![0f32; m * rows];
    w.matmul(&x, m, &mut all);
    for t in 0..m {
        let mut one = vec![0f32; rows];
        w.matmul(&x[t * cols..(t + 1) * cols], 1, &mut one);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&all[t * rows..(t + 1) * rows]),
            bits(&one),
            "token {t}"
        );
    }
}

/// The AVX2 path and the portable one sum in the same order: their results are equal to the
/// bit (this is what makes the kernel's rounding match llama.cpp's). Both are called by name,
/// so this compares two kernels even though `dots` picks one at compile time.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_and_portable_paths_agree_to_the_bit() {
    crate::require_avx2_fma();
    #[cfg(all(target_feature = "avx2", target_feature = "fma"))]
    {
        let (rows, cols) = (24, 1024);
        let w = matrix(rows, cols, 9);
        for seed in 0..6u64 {
            // Activations from tiny to large, one block all zeros.
            let mut x = activations(4, cols, seed, 10f32.powi(seed as i32 - 3));
            x[QK_K..2 * QK_K].fill(0.0);
            let acts: Vec<Q8KRow> = x.chunks(cols).map(Q8KRow::quantize).collect();
            let four = [&acts[0], &acts[1], &acts[2], &acts[3]];
            for r in 0..rows {
                let tiled = dots_avx2(w.blocks.row(r), four);
                assert_eq!(
                    dots(w.blocks.row(r), four),
                    tiled,
                    "row {r}: the build runs AVX2"
                );
                for (t, a) in acts.iter().enumerate() {
                    let portable = dot_portable(w.blocks.row(r), a);
                    assert_eq!(portable.to_bits(), tiled[t].to_bits(), "row {r} token {t}");
                    assert_eq!(
                        portable.to_bits(),
                        dots_avx2(w.blocks.row(r), [a])[0].to_bits()
                    );
                }
            }
        }
    }
}

/// A matrix read in place from a mapped file, at an aligned offset after other data,
/// multiplies exactly as a private copy of the same bytes does, and reads the file's pages.
#[test]
fn a_matrix_read_from_a_mapping_gives_the_copys_products_to_the_bit() {
    let (rows, cols) = (40, 512);
    let bytes = q4_k_bytes(rows, cols, 4);
    let copy = Q4KMatrix::from_gguf_bytes(rows, cols, &bytes).unwrap();
    let mut file = vec![0xA5u8; 64];
    file.extend_from_slice(&bytes);
    let map =
        crate::weights::Mapping::of_file(&crate::weights::tests::temp_file("q4_k", &file)).unwrap();
    let mapped = Q4KMatrix::new(
        rows,
        cols,
        WeightBytes::mapped(map.clone(), 64, bytes.len(), 32).unwrap(),
    )
    .unwrap();
    assert!(std::ptr::eq(
        mapped.weight_bytes().as_slice().as_ptr(),
        map.bytes()[64..].as_ptr()
    ));
    let x = activations(5, cols, 4, 2.0);
    let (mut a, mut b) = (vec![0f32; 5 * rows], vec![1f32; 5 * rows]);
    copy.matmul(&x, 5, &mut a);
    mapped.matmul(&x, 5, &mut b);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));
    assert!(matches!(
        Q4KMatrix::new(
            rows,
            cols,
            WeightBytes::mapped(map, 64, bytes.len() - 1, 32).unwrap()
        ),
        Err(KernelError::Size { .. })
    ));
}

/// candle's `QMatMul` on a tensor that candle quantized to `dtype`, against our matrix made by
/// `ours` from the same bytes. candle's x86 k-quant products are ports of ggml's AVX2 kernels,
/// and its Q8_K activations are ggml's except at rounding ties (candle rounds them away from
/// zero, ggml to even). With activations that have no ties (checked), the products are equal to
/// the bit, which checks the summation order against an implementation other than ours.
pub(crate) fn check_against_candle(
    dtype: candle_core::quantized::GgmlDType,
    ours: impl Fn(usize, usize, &[u8]) -> Box<dyn Fn(&[f32], usize, &mut [f32])>,
) {
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    let (rows, cols, m) = (70, 768, 3);
    let w: Vec<f32> = activations(rows, cols, 11, 0.1);
    let q = QTensor::quantize(
        &Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap(),
        dtype,
    )
    .unwrap();
    let matmul = ours(rows, cols, &q.data().unwrap());
    let x = activations(m, cols, 12, 1.5);
    for block in x.chunks(QK_K) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let max = *block.iter().find(|v| v.abs() == amax).unwrap();
        let iscale = -127.0 / max;
        assert!(block.iter().all(|v| (iscale * v).fract().abs() != 0.5));
    }
    let theirs = QMatMul::from_qtensor(q)
        .unwrap()
        .forward(&Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut out = vec![0f32; m * rows];
    matmul(&x, m, &mut out);
    #[cfg(target_arch = "x86_64")]
    {
        crate::require_avx2_fma();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&theirs));
    }
    // Elsewhere candle sums in another order: equal up to rounding.
    for (i, (a, b)) in out.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (a.abs() + 1.0),
            "output {i}: {a} vs candle's {b}"
        );
    }
}

#[test]
fn products_equal_candles_qmatmul_on_a_candle_quantized_tensor() {
    check_against_candle(
        candle_core::quantized::GgmlDType::Q4K,
        |rows, cols, bytes| {
            let w = Q4KMatrix::from_gguf_bytes(rows, cols, bytes).unwrap();
            Box::new(move |x, m, out| w.matmul(x, m, out))
        },
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_shapes_match_the_reference_product(
        rows in 1usize..40, blocks in 1usize..5, m in 1usize..7, seed in any::<u64>(),
        scale in 0.01f32..100.0,
    ) {
        check(rows, blocks * QK_K, m, seed, scale);
    }
}
