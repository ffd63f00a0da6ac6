//! Gated feed-forward activations over plain slices, written so the compiler vectorizes them.

/// `e^x` for `x` in about `[-87, 88]` (clamped outside), within a few ulp: `2^n · p(r)` with
/// `x = n ln 2 + r`, as Cephes' `expf`. Branch-free so a loop over a slice vectorizes, where
/// libm's `expf` is one call per value.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 in two parts so that `n * ln2_hi` is exact.
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let p = p.mul_add(r * r, r) + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `gate[i] = gelu(gate[i]) * up[i]` with GELU's tanh form (Gemma's `gelu_pytorch_tanh`):
/// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, tanh taken as `1 - 2 / (e^{2u} + 1)`.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up differ in length");
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let inner = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
        let tanh = 1.0 - 2.0 / (exp_approx(2.0 * inner) + 1.0);
        *g = 0.5 * x * (1.0 + tanh) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_within_a_few_ulp() {
        for i in -8700..8790 {
            let x = i as f32 / 100.0 + 0.003;
            let (got, want) = (exp_approx(x), x.exp());
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want,
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn gelu_matches_the_libm_tanh_formula() {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 200.0 + 0.0007).collect();
        let up: Vec<f32> = xs.iter().map(|x| 1.0 + x.sin()).collect();
        let mut got = xs.clone();
        gelu_tanh_mul(&mut got, &up);
        for ((x, u), g) in xs.iter().zip(&up).zip(&got) {
            let want = 0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044_715 * x * x)).tanh()) * u;
            assert!(
                (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{x}: {g} vs {want}"
            );
        }
    }
}
