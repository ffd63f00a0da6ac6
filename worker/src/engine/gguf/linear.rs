//! Weight matrices of the forward pass: skep's own kernels (crate `skep-kernels`) on the CPU
//! for the formats candle runs without SIMD (Q4_1, Q5_0) and for Q8_0, candle's `QMatMul` for
//! the rest and on GPUs.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};
use skep_kernels::{Q4_1Matrix, Q8Matrix};

pub enum Linear {
    /// With its `(rows, cols)`, which `QMatMul` does not expose.
    Candle(QMatMul, (usize, usize)),
    Q4_1(Q4_1Matrix),
    /// Shared with the token table when the head is tied to the embeddings.
    Q8(Arc<Q8Matrix>),
    /// `(rows, cols)` of a matrix that lives in GPU memory only (`--device cuda:N`): the GPU
    /// backend reads it from the file, and no host copy is made.
    OnDevice((usize, usize)),
}

fn on_device() -> candle_core::Error {
    candle_core::Error::Msg(
        "this matrix is in GPU memory only (the model was loaded for --device cuda); the host pass cannot use it".into(),
    )
}

impl Linear {
    pub fn new(t: QTensor) -> Result<Self> {
        if let Some(m) = q8_matrix(&t)? {
            return Ok(Linear::Q8(Arc::new(m)));
        }
        if t.device().is_cpu() && t.dtype() == GgmlDType::Q4_1 {
            let (rows, cols) = t.shape().dims2()?;
            let m = Q4_1Matrix::from_gguf_bytes(rows, cols, &t.data()?)
                .map_err(candle_core::Error::wrap)?;
            return Ok(Linear::Q4_1(m));
        }
        let shape = t.shape().dims2()?;
        QMatMul::from_qtensor(t).map(|m| Linear::Candle(m, shape))
    }

    /// `x · Wᵀ` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(m, _) => m.forward(x),
            Linear::Q4_1(w) => product(x, w.rows(), w.cols(), |xs, m, out| w.matmul(xs, m, out)),
            Linear::Q8(w) => product(x, w.rows(), w.cols(), |xs, m, out| w.matmul(xs, m, out)),
            Linear::OnDevice(_) => Err(on_device()),
        }
    }
}

impl Linear {
    /// `(rows, cols)`: outputs by inputs.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Linear::Candle(_, shape) => *shape,
            Linear::Q4_1(w) => (w.rows(), w.cols()),
            Linear::Q8(w) => (w.rows(), w.cols()),
            Linear::OnDevice(shape) => *shape,
        }
    }

    /// Like `forward`, the result as a flat vector (what the attention kernel takes).
    pub fn forward_vec(&self, x: &Tensor) -> Result<Vec<f32>> {
        match self {
            Linear::Candle(m, _) => m.forward(x)?.flatten_all()?.to_vec1::<f32>(),
            Linear::Q4_1(w) => {
                product_vec(x, w.rows(), w.cols(), |xs, m, out| w.matmul(xs, m, out))
            }
            Linear::Q8(w) => product_vec(x, w.rows(), w.cols(), |xs, m, out| w.matmul(xs, m, out)),
            Linear::OnDevice(_) => Err(on_device()),
        }
    }
}

/// The number of `cols`-wide rows in `x`, checking its last dimension.
fn input_rows(x: &Tensor, cols: usize) -> Result<usize> {
    match x.dims().last() {
        Some(&last) if last == cols => Ok(x.elem_count() / cols),
        Some(&last) => candle_core::bail!("input width {last} for a matrix of width {cols}"),
        None => candle_core::bail!("a matrix product needs at least one dimension"),
    }
}

/// Q8_0 and Q5_0 CPU tensors in the kernels' 8-bit block form; `None` for anything else.
pub fn q8_matrix(t: &QTensor) -> Result<Option<Q8Matrix>> {
    if !t.device().is_cpu() {
        return Ok(None);
    }
    let (rows, cols) = match t.dtype() {
        GgmlDType::Q8_0 | GgmlDType::Q5_0 => t.shape().dims2()?,
        _ => return Ok(None),
    };
    let bytes = t.data()?;
    let m = if t.dtype() == GgmlDType::Q8_0 {
        Q8Matrix::from_q8_0_bytes(rows, cols, &bytes)
    } else {
        Q8Matrix::from_q5_0_bytes(rows, cols, &bytes)
    };
    m.map(Some).map_err(candle_core::Error::wrap)
}

/// Runs a kernel over the last dimension of `x`: `cols` in, `rows` out.
fn product(
    x: &Tensor,
    rows: usize,
    cols: usize,
    kernel: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<Tensor> {
    let out = product_vec(x, rows, cols, kernel)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = rows;
    }
    Tensor::from_vec(out, dims, x.device())
}

/// Like `product`, the result as a flat vector.
fn product_vec(
    x: &Tensor,
    rows: usize,
    cols: usize,
    kernel: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<Vec<f32>> {
    let m = input_rows(x, cols)?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; m * rows];
    kernel(&xs, m, &mut out);
    Ok(out)
}
