//! Checks the CUDA kernels' dequantization (kernels/quant.cuh, built for the host by build.rs)
//! bit for bit against candle's, for every format the kernels read.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::os::raw::c_int;

#[allow(unsafe_code)]
mod ffi {
    use std::os::raw::c_int;

    // SAFETY: the signatures are tests/quant_host.c's, compiled and linked by build.rs.
    // `skep_h2f` takes and returns plain values, so calling it cannot break memory safety.
    unsafe extern "C" {
        pub fn skep_unit(kind: c_int, row: *const u8, u: c_int, out: *mut f32);
        pub safe fn skep_h2f(h: u16) -> f32;
    }
}

/// The formats, numbered as tests/quant_host.c's `skep_unit` dispatches them.
const FORMATS: [(&str, c_int, GgmlDType); 6] = [
    ("Q4_0", 0, GgmlDType::Q4_0),
    ("Q4_1", 1, GgmlDType::Q4_1),
    ("Q5_0", 2, GgmlDType::Q5_0),
    ("Q8_0", 3, GgmlDType::Q8_0),
    ("Q4_K", 4, GgmlDType::Q4K),
    ("Q6_K", 5, GgmlDType::Q6K),
];

/// The 32 values of unit `u` of `row` (GGUF block bytes) as the kernels compute them.
fn unit(kind: c_int, dtype: GgmlDType, row: &[u8], u: usize) -> [f32; 32] {
    // The unit reads only the block that holds it: check that block is inside `row`.
    let block = u * 32 / dtype.block_size();
    assert!(
        (block + 1) * dtype.type_size() <= row.len(),
        "unit {u} is outside a row of {} bytes",
        row.len()
    );
    // A NaN pattern no format produces from finite inputs, so a unit left unwritten shows up.
    let mut out = [f32::from_bits(0x7fc0_dead); 32];
    let u = c_int::try_from(u).expect("unit index fits a C int");
    // SAFETY: `row` holds the whole block of unit `u` (checked above), which is all the unit
    // function reads; `out` has the 32 floats it writes.
    #[allow(unsafe_code)]
    unsafe {
        ffi::skep_unit(kind, row.as_ptr(), u, out.as_mut_ptr())
    };
    out
}

/// Seeded pseudo-random values (xorshift64*): a spread around zero in each row, rows of
/// different scales, a few large magnitudes and, in the first row, a block of zeros.
fn values(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        // Uniform in [-1, 1).
        ((state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    };
    let mut out = Vec::with_capacity(rows * width);
    for r in 0..rows {
        let scale = [1.0, 0.001, 37.0, 0.25][r % 4];
        for c in 0..width {
            let mut v = next() * scale;
            if c % 97 == 13 {
                v *= 60.0;
            }
            if r == 0 && (64..96).contains(&c) {
                v = 0.0;
            }
            out.push(v);
        }
    }
    out
}

#[test]
fn kernel_units_match_candle_bit_for_bit() -> candle_core::Result<()> {
    for (name, kind, dtype) in FORMATS {
        for (width, rows) in [(256, 5), (2048, 4)] {
            let seed = (kind as u64 + 1) * 1000 + width as u64;
            let tensor = Tensor::from_vec(values(rows, width, seed), (rows, width), &Device::Cpu)?;
            let q = QTensor::quantize(&tensor, dtype)?;
            let bytes = q.data()?;
            let row_bytes = width / dtype.block_size() * dtype.type_size();
            assert_eq!(
                bytes.len(),
                rows * row_bytes,
                "{name}: candle's block bytes"
            );
            let expected = q.dequantize(&Device::Cpu)?.to_vec2::<f32>()?;
            for (r, want_row) in expected.iter().enumerate() {
                let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
                for u in 0..width / 32 {
                    let got = unit(kind, dtype, row, u);
                    let want = &want_row[u * 32..(u + 1) * 32];
                    if let Some(i) = (0..32).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                        panic!(
                            "{name} (width {width}): row {r} unit {u} index {i}: kernel {:e} \
                             ({:#010x}), candle {:e} ({:#010x})",
                            got[i],
                            got[i].to_bits(),
                            want[i],
                            want[i].to_bits()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn host_h2f_matches_half_for_every_pattern() {
    for bits in 0..=u16::MAX {
        let got = ffi::skep_h2f(bits);
        let want = half::f16::from_bits(bits).to_f32();
        if want.is_nan() {
            assert!(got.is_nan(), "{bits:#06x}: h2f gave {got:e}, want NaN");
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{bits:#06x}: h2f gave {got:e}, want {want:e}"
            );
        }
    }
}
