//! Tests of the Q6_K kernel.

use super::*;
use crate::q4_k::tests::{activations, check_against_candle, check_against_reference, rng};
use proptest::prelude::*;

/// The bytes of a `rows` x `cols` Q6_K tensor with random values and scales (any bytes are a
/// valid block apart from `d`, drawn small and positive).
fn q6_k_bytes(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut next = rng(seed);
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / QK_K {
        bytes.extend((0..BLOCK_BYTES - 2).map(|_| next() as u8));
        let d = (next() % 1000 + 1) as f32 / 1_000_000.0;
        bytes.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    }
    bytes
}

fn matrix(rows: usize, cols: usize, seed: u64) -> Q6KMatrix {
    Q6KMatrix::from_gguf_bytes(rows, cols, &q6_k_bytes(rows, cols, seed)).unwrap()
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
        Q6KMatrix::from_gguf_bytes(2, 640, &[0; 5 * 210]).unwrap_err(),
        KernelError::Ragged { cols: 640 }
    );
    assert_eq!(
        Q6KMatrix::from_gguf_bytes(3, 512, &[0; 6 * 210 + 1]).unwrap_err(),
        KernelError::Size {
            rows: 3,
            cols: 512,
            expected: 6 * 210,
            got: 6 * 210 + 1
        }
    );
    assert!(matches!(
        Q6KMatrix::from_gguf_bytes(usize::MAX / 4, 1024, &[0; 210]),
        Err(KernelError::Size { .. })
    ));
    assert!(Q6KMatrix::from_gguf_bytes(3, 512, &[0; 6 * 210]).is_ok());
}

#[test]
fn dequantizes_as_ggml_lays_blocks_out() {
    // Values chosen per position: q(i) = (i * 7) % 64, stored as the file stores them.
    let q = |i: usize| ((i * 7) % 64) as u8;
    let mut block = vec![0u8; BLOCK_BYTES];
    for h in 0..2 {
        for l in 0..32 {
            let v: [u8; 4] = std::array::from_fn(|k| q(128 * h + 32 * k + l));
            block[64 * h + l] = (v[0] & 15) | (v[2] & 15) << 4;
            block[64 * h + 32 + l] = (v[1] & 15) | (v[3] & 15) << 4;
            block[128 + 32 * h + l] =
                v[0] >> 4 | (v[1] >> 4) << 2 | (v[2] >> 4) << 4 | (v[3] >> 4) << 6;
        }
    }
    let scales: [i8; 16] = std::array::from_fn(|i| (i as i8 - 8) * 9);
    for (b, s) in block[192..208].iter_mut().zip(&scales) {
        *b = *s as u8;
    }
    block[208..].copy_from_slice(&f16::from_f32(0.125).to_le_bytes());
    let w = Q6KMatrix::from_gguf_bytes(1, QK_K, &block).unwrap();
    for (i, v) in w.dequantize_row(0).iter().enumerate() {
        let want = 0.125 * f32::from(scales[i / 16]) * (f32::from(q(i)) - 32.0);
        assert_eq!(*v, want, "value {i}");
    }
}

#[test]
fn one_token_matches_the_reference_product() {
    check(193, 2048, 1, 1, 1.0);
}

#[test]
fn three_tokens_match_the_reference_product() {
    check(193, 768, 3, 2, 4.0);
}

#[test]
fn a_prompt_of_130_tokens_matches_the_reference_product() {
    check(37, 512, 130, 3, 0.5);
}

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

/// As for Q4_K: the AVX2 path (one and four tokens) and the portable one, called by name,
/// give the same bits.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_and_portable_paths_agree_to_the_bit() {
    crate::require_avx2_fma();
    #[cfg(all(target_feature = "avx2", target_feature = "fma"))]
    {
        let (rows, cols) = (24, 1024);
        let w = matrix(rows, cols, 9);
        for seed in 0..6u64 {
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

#[test]
fn a_matrix_read_from_a_mapping_gives_the_copys_products_to_the_bit() {
    let (rows, cols) = (40, 512);
    let bytes = q6_k_bytes(rows, cols, 4);
    let copy = Q6KMatrix::from_gguf_bytes(rows, cols, &bytes).unwrap();
    let mut file = vec![0x5Au8; 96];
    file.extend_from_slice(&bytes);
    let map =
        crate::weights::Mapping::of_file(&crate::weights::tests::temp_file("q6_k", &file)).unwrap();
    let mapped = Q6KMatrix::new(
        rows,
        cols,
        WeightBytes::mapped(map.clone(), 96, bytes.len(), 32).unwrap(),
    )
    .unwrap();
    assert!(std::ptr::eq(
        mapped.weight_bytes().as_slice().as_ptr(),
        map.bytes()[96..].as_ptr()
    ));
    let x = activations(5, cols, 4, 2.0);
    let (mut a, mut b) = (vec![0f32; 5 * rows], vec![1f32; 5 * rows]);
    copy.matmul(&x, 5, &mut a);
    mapped.matmul(&x, 5, &mut b);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));
}

/// As for Q4_K: candle's product on a tensor it quantized equals ours to the bit.
#[test]
fn products_equal_candles_qmatmul_on_a_candle_quantized_tensor() {
    check_against_candle(
        candle_core::quantized::GgmlDType::Q6K,
        |rows, cols, bytes| {
            let w = Q6KMatrix::from_gguf_bytes(rows, cols, bytes).unwrap();
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
