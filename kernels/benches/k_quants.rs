//! Q4_K and Q6_K matrix products: skep's kernels against candle's `QMatMul` (same weights,
//! same activations) at Gemma 3 270M's k-quant shapes (attention output 1024 -> 640, feed-forward
//! down 2048 -> 640), one token (generation) and 128 (a prompt). Threads: candle's pool, sized
//! by `CANDLE_NUM_THREADS` (both sides use it).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use skep_kernels::{Q4KMatrix, Q6KMatrix};

/// One of our matrices' `matmul`.
type Product = Box<dyn Fn(&[f32], usize, &mut [f32])>;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (dtype, rows, cols) in [
        (GgmlDType::Q4K, 640usize, 1024usize),
        (GgmlDType::Q4K, 640, 2048),
        (GgmlDType::Q6K, 640, 2048),
    ] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1001) as f32 - 500.0) / 5000.0)
            .collect();
        let wt = Tensor::from_vec(w, (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&wt, dtype).unwrap();
        let bytes = q.data().unwrap().into_owned();
        let ours: Product = match dtype {
            GgmlDType::Q4K => {
                let m = Q4KMatrix::from_gguf_bytes(rows, cols, &bytes).unwrap();
                Box::new(move |x, n, out| m.matmul(x, n, out))
            }
            _ => {
                let m = Q6KMatrix::from_gguf_bytes(rows, cols, &bytes).unwrap();
                Box::new(move |x, n, out| m.matmul(x, n, out))
            }
        };
        let theirs = QMatMul::from_qtensor(q).unwrap();
        for m in [1usize, 128] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 40.0)
                .collect();
            let xt = Tensor::from_vec(x.clone(), (m, cols), &dev).unwrap();
            let mut out = vec![0f32; m * rows];
            let mut g = c.benchmark_group(format!("{dtype:?}_{rows}x{cols}_m{m}"));
            g.bench_function("skep", |b| b.iter(|| ours(&x, m, &mut out)));
            g.bench_function("candle", |b| b.iter(|| theirs.forward(&xt).unwrap()));
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
