//! Activations quantized to Q8_1 blocks, the form Q4_1 weights are multiplied with.

use half::f16;

use crate::QK;

/// One row of activations as Q8_1 blocks: per block a scale `d`, `s = d * sum(q)` and 32
/// signed bytes. `d` and `s` go through f16 exactly as ggml stores them, so that products
/// match llama.cpp's to the rounding of the final sums.
#[derive(Debug, Clone, Default)]
pub struct Q8_1Row {
    pub(crate) d: Vec<f32>,
    pub(crate) s: Vec<f32>,
    pub(crate) qs: Vec<[i8; QK]>,
}

impl Q8_1Row {
    /// Quantizes `x`, whose length must be a multiple of [`QK`] (the caller checks).
    pub fn quantize(x: &[f32]) -> Self {
        let mut row = Self::default();
        row.quantize_into(x);
        row
    }

    /// Like [`Q8_1Row::quantize`], reusing this row's buffers.
    pub fn quantize_into(&mut self, x: &[f32]) {
        debug_assert!(x.len().is_multiple_of(QK));
        let blocks = x.len() / QK;
        self.d.clear();
        self.s.clear();
        self.qs.clear();
        self.d.reserve(blocks);
        self.s.reserve(blocks);
        self.qs.reserve(blocks);
        for chunk in x.chunks_exact(QK) {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            // As ggml's SIMD quantizer does it (127 / amax, ties to even), not its scalar
            // reference (1 / d, ties away from zero): the rounding of near-tied logits follows.
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut q = [0i8; QK];
            let mut sum = 0i32;
            for (o, v) in q.iter_mut().zip(chunk) {
                // `as` saturates; |v * id| <= 127 up to rounding anyway.
                *o = (v * id).round_ties_even() as i8;
                sum += i32::from(*o);
            }
            self.d.push(f16::from_f32(d).to_f32());
            self.s.push(f16::from_f32(sum as f32 * d).to_f32());
            self.qs.push(q);
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.qs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_round_trips_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0)
            .collect();
        let q = Q8_1Row::quantize(&x);
        assert_eq!(q.blocks(), 2);
        for (b, chunk) in x.chunks(QK).enumerate() {
            let sum: i32 = q.qs[b].iter().map(|&v| i32::from(v)).sum();
            assert!((q.s[b] - sum as f32 * q.d[b]).abs() <= q.s[b].abs() * 1e-3 + 1e-3);
            for (j, v) in chunk.iter().enumerate() {
                let back = f32::from(q.qs[b][j]) * q.d[b];
                assert!((back - v).abs() <= q.d[b] * 0.51, "{back} vs {v}");
            }
        }
    }

    #[test]
    fn an_all_zero_block_quantizes_to_zero() {
        let q = Q8_1Row::quantize(&[0.0; QK]);
        assert_eq!(q.d[0], 0.0);
        assert_eq!(q.s[0], 0.0);
        assert!(q.qs[0].iter().all(|&v| v == 0));
    }
}
