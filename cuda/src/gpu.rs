//! The device side of the decoder: one CUDA context and stream, the kernels of decoder.cu, the
//! buffers they read and write, and one method per launch with its shape checked first.
//!
//! Every launch goes on one stream, in order, so a pass needs no synchronisation until its
//! logits are copied back. Errors are the driver's, as text: a failed launch (out of memory, a
//! lost device) fails the job, and the worker is restarted by its pool.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::launch::{self, LaunchError, QuantKind, Shape};

/// A device buffer of f32 values.
pub type Buffer = CudaSlice<f32>;

/// Why a GPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("CUDA: {0}")]
    Driver(String),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("{0}")]
    Shape(String),
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError::Driver(e.to_string())
    }
}

type Result<T> = std::result::Result<T, GpuError>;

/// A quantized matrix in device memory, in GGUF's block layout.
pub struct Matrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: CudaSlice<u8>,
}

impl Matrix {
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

/// One job's keys and values for every layer, f16, `[layer][kv_head][capacity][head_dim]`.
pub struct KvBuffers {
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
}

impl KvBuffers {
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn bytes(&self) -> usize {
        2 * self.k.len() * std::mem::size_of::<u16>()
    }
}

/// How rotary embeddings pair a head's dimensions (see skep-kernels' `Rope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    Interleaved,
    Neox,
}

/// The gated MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Silu,
    GeluTanh,
}

/// What the rotary launches of one layer share: the pass's row table, its token rows, the
/// layer's frequencies and layout, and the optional per-head norm (weights and epsilon).
pub struct Rotary<'a> {
    pub meta: &'a CudaSlice<u64>,
    pub rows: usize,
    pub head_dim: usize,
    pub inv_freq: &'a Buffer,
    pub layout: RopeLayout,
    pub norm: Option<(&'a Buffer, f32)>,
}

struct RotaryArgs {
    shape: Shape,
    head_dim: i32,
    neox: i32,
    norm: u64,
    eps: f32,
}

/// A CUDA device with the decoder's kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    kernels: HashMap<&'static str, CudaFunction>,
}

const KERNELS: &[&str] = &[
    "matmul_q4_0",
    "matmul_q4_1",
    "matmul_q5_0",
    "matmul_q8_0",
    "matmul_q4_k",
    "matmul_q6_k",
    "rms_norm",
    "add_in_place",
    "gated_act",
    "rope_q",
    "rope_store_kv",
    "attention",
    "gather_rows",
];

fn config(s: Shape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: s.grid,
        block_dim: s.block,
        shared_mem_bytes: 0,
    }
}

fn int(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        GpuError::Launch(LaunchError::TooLarge {
            what,
            value: v,
            limit: i32::MAX as usize,
        })
    })
}

fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(GpuError::Shape(format!(
            "{what} holds {have} values, the launch needs {need}"
        )));
    }
    Ok(())
}

impl Gpu {
    /// Opens device `ordinal` and loads the kernels (the driver JIT-compiles the PTX for this
    /// GPU on first load and caches the result).
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let src = crate::ptx::MODULES
            .iter()
            .find(|(name, _)| *name == "decoder")
            .map(|(_, ptx)| *ptx)
            .ok_or_else(|| GpuError::Driver("the decoder's PTX is not in this build".into()))?;
        let module = ctx.load_module(Ptx::from_src(src))?;
        let mut kernels = HashMap::new();
        for &name in KERNELS {
            kernels.insert(name, module.load_function(name)?);
        }
        Ok(Gpu {
            ctx,
            stream,
            _module: module,
            kernels,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// `(free, total)` device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    fn kernel(&self, name: &str) -> &CudaFunction {
        // KERNELS lists every name used below, and `new` fails if any is missing.
        &self.kernels[name]
    }

    /// Copies a matrix in GGUF's block layout to the device.
    pub fn matrix(
        &self,
        kind: QuantKind,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Matrix> {
        let row_bytes = kind.row_bytes(cols)?;
        if rows.checked_mul(row_bytes) != Some(bytes.len()) {
            return Err(GpuError::Shape(format!(
                "a {rows}x{cols} {} matrix is {} bytes, not {}",
                kind.name(),
                rows.saturating_mul(row_bytes),
                bytes.len()
            )));
        }
        Ok(Matrix {
            kind,
            rows,
            cols,
            row_bytes,
            data: self.stream.clone_htod(bytes)?,
        })
    }

    pub fn upload(&self, values: &[f32]) -> Result<Buffer> {
        Ok(self.stream.clone_htod(values)?)
    }

    pub fn zeros(&self, n: usize) -> Result<Buffer> {
        Ok(self.stream.alloc_zeros(n.max(1))?)
    }

    /// The first `n` values of `b`, after every launch before it has finished.
    pub fn download(&self, b: &Buffer, n: usize) -> Result<Vec<f32>> {
        check_len("the buffer", b.len(), n)?;
        let mut out = vec![0f32; n];
        self.stream.memcpy_dtoh(&b.slice(..n), &mut out)?;
        self.stream.synchronize()?;
        Ok(out)
    }

    /// A job's KV cache with room for `capacity` positions.
    pub fn kv(
        &self,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<KvBuffers> {
        let n = layers
            .checked_mul(kv_heads)
            .and_then(|n| n.checked_mul(head_dim))
            .and_then(|n| n.checked_mul(capacity.max(1)))
            .ok_or_else(|| GpuError::Shape("the KV cache size overflows".into()))?;
        Ok(KvBuffers {
            k: self.stream.alloc_zeros(n)?,
            v: self.stream.alloc_zeros(n)?,
            layers,
            kv_heads,
            head_dim,
            capacity: capacity.max(1),
        })
    }

    /// A copy of `old` with room for `capacity` positions, its first `len` positions kept.
    pub fn grow_kv(&self, old: &KvBuffers, len: usize, capacity: usize) -> Result<KvBuffers> {
        let mut new = self.kv(old.layers, old.kv_heads, old.head_dim, capacity)?;
        let hd = old.head_dim;
        let keep = len.min(old.capacity) * hd;
        for l in 0..old.layers {
            for h in 0..old.kv_heads {
                let plane = l * old.kv_heads + h;
                let from = plane * old.capacity * hd;
                let to = plane * new.capacity * hd;
                self.stream.memcpy_dtod(
                    &old.k.slice(from..from + keep),
                    &mut new.k.slice_mut(to..to + keep),
                )?;
                self.stream.memcpy_dtod(
                    &old.v.slice(from..from + keep),
                    &mut new.v.slice_mut(to..to + keep),
                )?;
            }
        }
        Ok(new)
    }

    /// The per-row words the attention kernels read: for each `(cache, first position, rows)`
    /// of a pass, one entry per row (see `RowMeta` in decoder.cu).
    pub fn row_meta(&self, parts: &[(&KvBuffers, usize, usize)]) -> Result<CudaSlice<u64>> {
        let mut words = Vec::new();
        for &(kv, pos, n) in parts {
            if pos + n > kv.capacity {
                return Err(GpuError::Shape(format!(
                    "positions up to {} in a cache of {}",
                    pos + n,
                    kv.capacity
                )));
            }
            let (k, _) = kv.k.device_ptr(&self.stream);
            let (v, _) = kv.v.device_ptr(&self.stream);
            for p in pos..pos + n {
                words.extend([k, v, (p as u64) | ((kv.capacity as u64) << 32)]);
            }
        }
        Ok(self.stream.clone_htod(&words)?)
    }

    /// `y (tokens x rows) = x (tokens x cols) · Wᵀ`.
    pub fn matmul(&self, w: &Matrix, x: &Buffer, tokens: usize, y: &mut Buffer) -> Result<()> {
        let shape = launch::matmul(w.kind, w.rows, w.cols, tokens)?;
        check_len("the product's input", x.len(), tokens * w.cols)?;
        check_len("the product's output", y.len(), tokens * w.rows)?;
        let (rows, cols, t) = (
            int("rows", w.rows)?,
            int("cols", w.cols)?,
            int("tokens", tokens)?,
        );
        let row_bytes = w.row_bytes as u64;
        let mut b = self.stream.launch_builder(self.kernel(w.kind.kernel()));
        b.arg(&w.data)
            .arg(&row_bytes)
            .arg(x)
            .arg(y)
            .arg(&rows)
            .arg(&cols)
            .arg(&t);
        // SAFETY: the argument list matches MATMUL_KERNEL's signature, and the lengths checked
        // above bound every index the kernel computes from this shape.
        unsafe { b.launch(config(shape)) }?;
        Ok(())
    }

    /// `y = rms_norm(x) * w`, row by row.
    pub fn rms_norm(
        &self,
        x: &Buffer,
        w: &Buffer,
        y: &mut Buffer,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let dim = w.len();
        check_len("the norm's input", x.len(), rows * dim)?;
        check_len("the norm's output", y.len(), rows * dim)?;
        let d = int("dim", dim)?;
        let mut b = self.stream.launch_builder(self.kernel("rms_norm"));
        b.arg(x).arg(w).arg(y).arg(&d).arg(&eps);
        // SAFETY: matches `rms_norm(x, w, y, dim, eps)`; lengths checked above.
        unsafe { b.launch(config(launch::per_row(rows)?)) }?;
        Ok(())
    }

    /// `x += y` over the first `n` values.
    pub fn add(&self, x: &mut Buffer, y: &Buffer, n: usize) -> Result<()> {
        check_len("the sum", x.len().min(y.len()), n)?;
        let nn = int("n", n)?;
        let mut b = self.stream.launch_builder(self.kernel("add_in_place"));
        b.arg(x).arg(y).arg(&nn);
        // SAFETY: matches `add_in_place(x, y, n)`; the kernel guards i < n.
        unsafe { b.launch(config(launch::elementwise(n)?)) }?;
        Ok(())
    }

    /// `gate = act(gate) * up` over the first `n` values.
    pub fn gated(&self, gate: &mut Buffer, up: &Buffer, n: usize, act: Act) -> Result<()> {
        check_len("the gated activation", gate.len().min(up.len()), n)?;
        let (nn, a) = (int("n", n)?, i32::from(act == Act::GeluTanh));
        let mut b = self.stream.launch_builder(self.kernel("gated_act"));
        b.arg(gate).arg(up).arg(&nn).arg(&a);
        // SAFETY: matches `gated_act(gate, up, n, act)`; the kernel guards i < n.
        unsafe { b.launch(config(launch::elementwise(n)?)) }?;
        Ok(())
    }

    /// Norms (optionally) and rotates q in place: `rows x heads x head_dim`.
    pub fn rope_q(&self, q: &mut Buffer, r: &Rotary<'_>, heads: usize) -> Result<()> {
        let a = self.rotary_args(r, heads)?;
        check_len("q", q.len(), r.rows * heads * r.head_dim)?;
        let h = int("heads", heads)?;
        let mut b = self.stream.launch_builder(self.kernel("rope_q"));
        b.arg(q)
            .arg(r.meta)
            .arg(&h)
            .arg(&a.head_dim)
            .arg(r.inv_freq)
            .arg(&a.neox)
            .arg(&a.norm)
            .arg(&a.eps);
        // SAFETY: matches `rope_q(q, meta, heads, hd, inv_freq, neox, norm_w, eps)`; `norm` is
        // a device pointer to `head_dim` values or null, and the lengths are checked above.
        unsafe { b.launch(config(a.shape)) }?;
        Ok(())
    }

    /// Norms (optionally) and rotates k in place, then stores k and v in each row's cache at
    /// `layer`.
    pub fn rope_store_kv(
        &self,
        k: &mut Buffer,
        v: &Buffer,
        r: &Rotary<'_>,
        layer: usize,
        kv_heads: usize,
    ) -> Result<()> {
        let a = self.rotary_args(r, kv_heads)?;
        check_len("k", k.len(), r.rows * kv_heads * r.head_dim)?;
        check_len("v", v.len(), r.rows * kv_heads * r.head_dim)?;
        let (l, kvh) = (int("layer", layer)?, int("kv_heads", kv_heads)?);
        let mut b = self.stream.launch_builder(self.kernel("rope_store_kv"));
        b.arg(k)
            .arg(v)
            .arg(r.meta)
            .arg(&l)
            .arg(&kvh)
            .arg(&a.head_dim)
            .arg(r.inv_freq)
            .arg(&a.neox)
            .arg(&a.norm)
            .arg(&a.eps);
        // SAFETY: matches `rope_store_kv(...)`; the row table was built by `row_meta`, which
        // checked every row's position against its cache's capacity, and every cache of a pass
        // holds the decoder's layer count.
        unsafe { b.launch(config(a.shape)) }?;
        Ok(())
    }

    /// The checks and scalar arguments the two rotary launches share.
    fn rotary_args(&self, r: &Rotary<'_>, heads: usize) -> Result<RotaryArgs> {
        let shape = launch::per_head(r.rows, heads, r.head_dim)?;
        check_len("the row table", r.meta.len(), 3 * r.rows)?;
        check_len("the rotary frequencies", r.inv_freq.len(), r.head_dim / 2)?;
        let (norm, eps) = self.norm_arg(r.norm, r.head_dim)?;
        Ok(RotaryArgs {
            shape,
            head_dim: int("head_dim", r.head_dim)?,
            neox: i32::from(r.layout == RopeLayout::Neox),
            norm,
            eps,
        })
    }

    /// Attention of every row over its own job's cache at `layer`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &Buffer,
        out: &mut Buffer,
        meta: &CudaSlice<u64>,
        layer: usize,
        rows: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> Result<()> {
        let shape = launch::attention(rows, heads, head_dim)?;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(GpuError::Shape(format!(
                "{heads} heads over {kv_heads} kv heads"
            )));
        }
        check_len("q", q.len(), rows * heads * head_dim)?;
        check_len("the attention output", out.len(), rows * heads * head_dim)?;
        check_len("the row table", meta.len(), 3 * rows)?;
        let (l, h, kvh, hd) = (
            int("layer", layer)?,
            int("heads", heads)?,
            int("kv_heads", kv_heads)?,
            int("head_dim", head_dim)?,
        );
        let scale = 1.0 / (head_dim as f32).sqrt();
        let win = int("window", window.unwrap_or(0))?;
        let mut b = self.stream.launch_builder(self.kernel("attention"));
        b.arg(q)
            .arg(out)
            .arg(meta)
            .arg(&l)
            .arg(&h)
            .arg(&kvh)
            .arg(&hd)
            .arg(&scale)
            .arg(&win);
        // SAFETY: matches `attention(...)`; head_dim <= MAX_HEAD_DIM (launch::attention), rows'
        // positions are within their caches (row_meta).
        unsafe { b.launch(config(shape)) }?;
        Ok(())
    }

    /// `y[i] = x[picks[i]]`, rows of `dim` values.
    pub fn gather(&self, x: &Buffer, picks: &[usize], dim: usize, y: &mut Buffer) -> Result<()> {
        let rows_in = x.len() / dim.max(1);
        if let Some(bad) = picks.iter().find(|&&p| p >= rows_in) {
            return Err(GpuError::Shape(format!("row {bad} of {rows_in}")));
        }
        check_len("the gathered rows", y.len(), picks.len() * dim)?;
        let idx: Vec<i32> = picks
            .iter()
            .map(|&p| int("row", p))
            .collect::<Result<_>>()?;
        let idx = self.stream.clone_htod(&idx)?;
        let d = int("dim", dim)?;
        let mut b = self.stream.launch_builder(self.kernel("gather_rows"));
        b.arg(x).arg(y).arg(&idx).arg(&d);
        // SAFETY: matches `gather_rows(x, y, picks, dim)`; every pick is a row of x.
        unsafe { b.launch(config(launch::per_row(picks.len())?)) }?;
        Ok(())
    }

    /// Waits for every launch so far (timing; errors of asynchronous launches surface here).
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// A norm weight's device pointer (or null) and epsilon, as the rope kernels take them.
    fn norm_arg(&self, norm: Option<(&Buffer, f32)>, head_dim: usize) -> Result<(u64, f32)> {
        match norm {
            None => Ok((0, 0.0)),
            Some((w, eps)) => {
                check_len("the q/k norm", w.len(), head_dim)?;
                let (ptr, _) = w.device_ptr(&self.stream);
                Ok((ptr, eps))
            }
        }
    }
}

/// The rotary inverse frequencies as the CPU path computes them: in f64, rounded to f32.
pub fn inv_freq(head_dim: usize, base: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (1.0 / base.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect()
}
