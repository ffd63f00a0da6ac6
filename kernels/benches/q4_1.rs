//! Q4_1 matrix products: skep's kernel against candle's (same weights, same activations), one
//! token (generation) and a 46-token prompt, at SmolLM2's feed-forward shape.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use skep_kernels::Q4_1Matrix;

fn bench(c: &mut Criterion) {
    let (rows, cols) = (1536usize, 576usize);
    let dev = Device::Cpu;
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1001) as f32 - 500.0) / 5000.0)
        .collect();
    let wt = Tensor::from_vec(w, (rows, cols), &dev).unwrap();
    let q = QTensor::quantize(&wt, GgmlDType::Q4_1).unwrap();
    let ours = Q4_1Matrix::from_gguf_bytes(rows, cols, &q.data().unwrap()).unwrap();
    let theirs = QMatMul::from_qtensor(q).unwrap();
    for m in [1usize, 46] {
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 40.0)
            .collect();
        let xt = Tensor::from_vec(x.clone(), (m, cols), &dev).unwrap();
        let mut out = vec![0f32; m * rows];
        let mut g = c.benchmark_group(format!("q4_1_{rows}x{cols}_m{m}"));
        g.bench_function("skep", |b| b.iter(|| ours.matmul(&x, m, &mut out)));
        g.bench_function("candle", |b| b.iter(|| theirs.forward(&xt).unwrap()));
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
