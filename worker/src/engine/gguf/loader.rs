//! Reading metadata and weights out of a GGUF file for the decoder.
//!
//! The file is mapped read-only once. Matrices in a format the kernels read in the file's own
//! block layout (Q4_1, Q5_0, Q8_0, on the CPU) are used in place: byte ranges of the mapping,
//! never copied, so the page cache holds the only copy of them however many workers map the
//! file. Everything else (k-quants, which candle's kernels take as their own buffers; norms,
//! dequantized to f32) is read into the process, and counted, so that what a worker holds of
//! its own is known.

use std::cell::Cell;
use std::io::Cursor;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result};
use skep_kernels::{Mapping, Q4_1Matrix, Q8Matrix, WeightBytes};

use super::decoder::{Embedding, Norm};
use super::linear::{Linear, q8_matrix};

/// GGUF's alignment of tensor data when `general.alignment` does not say (as candle and
/// llama.cpp take it).
const DEFAULT_ALIGNMENT: usize = 32;

/// Where a loaded model's weights live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WeightMemory {
    /// Bytes of weights read in place from the mapped file (shared with every process that
    /// maps it).
    pub mapped: usize,
    /// Bytes of weights read into this process's memory (before any conversion).
    pub copied: usize,
    /// `(device, inode)` of the file mapped.
    pub file: (u64, u64),
}

/// A GGUF file, mapped: its header and the weights it holds.
pub struct GgufFile {
    pub ct: Content,
    map: Arc<Mapping>,
    alignment: usize,
    device: Device,
    mapped: Cell<usize>,
    copied: Cell<usize>,
    /// The weight matrices go to a GPU (`--device cuda:N`): `linear` makes no host copy.
    pub matrices_on_device: bool,
}

impl GgufFile {
    /// Reads the header of the file mapped in `map`.
    pub fn new(map: Arc<Mapping>, device: &Device) -> Result<Self> {
        let ct = Content::read(&mut Cursor::new(map.bytes()))?;
        let alignment = alignment(&ct);
        Ok(GgufFile {
            ct,
            map,
            alignment,
            device: device.clone(),
            mapped: Cell::new(0),
            copied: Cell::new(0),
            matrices_on_device: false,
        })
    }

    /// What the weights taken so far cost, in place and copied.
    pub fn memory(&self) -> WeightMemory {
        WeightMemory {
            mapped: self.mapped.get(),
            copied: self.copied.get(),
            file: self.map.file_identity(),
        }
    }

    /// The device the weights are for.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn has(&self, name: &str) -> bool {
        self.ct.tensor_infos.contains_key(name)
    }

    /// Tensor `name` read into memory, in candle's form.
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        let t = self
            .ct
            .tensor(&mut Cursor::new(self.map.bytes()), name, &self.device)?;
        self.copied
            .set(self.copied.get() + t.storage_size_in_bytes());
        Ok(t)
    }

    /// The bytes of 2-D tensor `name`, in place, with its dtype and `(rows, cols)`, when the
    /// kernels take its format on this device; `None` otherwise.
    fn in_place(&self, name: &str) -> Result<Option<(GgmlDType, usize, usize, WeightBytes)>> {
        let Some(info) = self.ct.tensor_infos.get(name) else {
            candle_core::bail!("cannot find tensor info for {name}")
        };
        let dtype = info.ggml_dtype;
        if !self.device.is_cpu()
            || !matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q8_0)
        {
            return Ok(None);
        }
        let (rows, cols) = info.shape.dims2()?;
        let elems = rows
            .checked_mul(cols)
            .filter(|e| e.is_multiple_of(dtype.block_size()));
        let Some(elems) = elems else {
            candle_core::bail!("{name}: {rows}x{cols} is not a whole number of blocks")
        };
        let len = elems / dtype.block_size() * dtype.type_size();
        let start = usize::try_from(self.ct.tensor_data_offset.saturating_add(info.offset))
            .unwrap_or(usize::MAX);
        let bytes = WeightBytes::mapped(Arc::clone(&self.map), start, len, self.alignment)
            .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
        self.mapped.set(self.mapped.get() + len);
        Ok(Some((dtype, rows, cols, bytes)))
    }

    /// The bytes of 2-D tensor `name` as they lie in the file, with its dtype and
    /// `(rows, cols)` (what the GPU backend copies to the device).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn raw(&self, name: &str) -> Result<(GgmlDType, usize, usize, &[u8])> {
        let Some(info) = self.ct.tensor_infos.get(name) else {
            candle_core::bail!("cannot find tensor info for {name}")
        };
        let dtype = info.ggml_dtype;
        let (rows, cols) = info.shape.dims2()?;
        let len = rows
            .checked_mul(cols)
            .filter(|e| e.is_multiple_of(dtype.block_size()))
            .map(|e| e / dtype.block_size() * dtype.type_size());
        let Some(len) = len else {
            candle_core::bail!("{name}: {rows}x{cols} is not a whole number of blocks")
        };
        let bytes = self.map.bytes();
        let start = usize::try_from(self.ct.tensor_data_offset.saturating_add(info.offset))
            .unwrap_or(usize::MAX);
        match start.checked_add(len).and_then(|end| bytes.get(start..end)) {
            Some(b) => Ok((dtype, rows, cols, b)),
            None => candle_core::bail!("{name}: its {len} bytes run past the end of the file"),
        }
    }

    /// Q8_0 and Q5_0 matrix `name` in the kernels' form, in place; `None` for other formats.
    fn q8(&self, name: &str) -> Result<Option<Q8Matrix>> {
        let dtype = self.ct.tensor_infos.get(name).map(|i| i.ggml_dtype);
        if !matches!(dtype, Some(GgmlDType::Q8_0 | GgmlDType::Q5_0)) {
            return Ok(None);
        }
        let m = match self.in_place(name)? {
            Some((GgmlDType::Q8_0, rows, cols, bytes)) => Q8Matrix::q8_0(rows, cols, bytes),
            Some((_, rows, cols, bytes)) => Q8Matrix::q5_0(rows, cols, bytes),
            None => return Ok(None),
        };
        m.map(Some).map_err(candle_core::Error::wrap)
    }

    /// Weight matrix `name`: in place when the kernels take its format, else candle's.
    pub fn linear(&self, name: &str) -> Result<Linear> {
        if self.matrices_on_device {
            return self.dims2(name).map(Linear::OnDevice);
        }
        match self.in_place(name)? {
            Some((GgmlDType::Q4_1, rows, cols, bytes)) => Q4_1Matrix::new(rows, cols, bytes)
                .map(Linear::Q4_1)
                .map_err(candle_core::Error::wrap),
            Some((GgmlDType::Q8_0, rows, cols, bytes)) => Q8Matrix::q8_0(rows, cols, bytes)
                .map(|m| Linear::Q8(Arc::new(m)))
                .map_err(candle_core::Error::wrap),
            Some((_, rows, cols, bytes)) => Q8Matrix::q5_0(rows, cols, bytes)
                .map(|m| Linear::Q8(Arc::new(m)))
                .map_err(candle_core::Error::wrap),
            None => Linear::new(self.qtensor(name)?),
        }
    }

    /// RMS norm weights `name`, dequantized.
    pub fn norm(&self, name: &str, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: self.qtensor(name)?.dequantize(&self.device)?,
            eps,
        })
    }

    /// A vector of weights `name` as f32 values.
    pub fn vector(&self, name: &str) -> Result<Vec<f32>> {
        self.qtensor(name)?
            .dequantize(&self.device)?
            .to_vec1::<f32>()
    }

    /// The token table: Q8_0 (and Q5_0) stay 8-bit in place, looked up a row at a time as ggml
    /// widens them (optionally rounded to f16); other formats are dequantized to f16.
    pub fn embedding(&self, name: &str, round_to_f16: bool) -> Result<Embedding> {
        if let Some(m) = self.q8(name)? {
            return Ok(Embedding::Q8 {
                rows: Arc::new(m),
                round_to_f16,
            });
        }
        embedding(&self.qtensor(name)?, round_to_f16, &self.device)
    }

    /// The token table and the output head tied to it; one copy of the weights serves both when
    /// the kernels take the format.
    pub fn tied(&self, name: &str, round_to_f16: bool) -> Result<(Embedding, Linear)> {
        if let Some(m) = self.q8(name)? {
            let rows = Arc::new(m);
            let head = Linear::Q8(Arc::clone(&rows));
            return Ok((Embedding::Q8 { rows, round_to_f16 }, head));
        }
        let t = self.qtensor(name)?;
        let embed = embedding(&t, round_to_f16, &self.device)?;
        if self.matrices_on_device {
            return Ok((embed, Linear::OnDevice(t.shape().dims2()?)));
        }
        Ok((embed, Linear::new(t)?))
    }

    /// `(rows, cols)` of 2-D tensor `name`.
    fn dims2(&self, name: &str) -> Result<(usize, usize)> {
        match self.ct.tensor_infos.get(name) {
            Some(info) => info.shape.dims2(),
            None => candle_core::bail!("cannot find tensor info for {name}"),
        }
    }
}

/// `general.alignment` as candle reads it (which is where it put the tensor data).
fn alignment(ct: &Content) -> usize {
    let v = match ct.metadata.get("general.alignment") {
        Some(Value::U8(v)) => Some(u64::from(*v)),
        Some(Value::U16(v)) => Some(u64::from(*v)),
        Some(Value::U32(v)) => Some(u64::from(*v)),
        Some(Value::I8(v)) => u64::try_from(*v).ok(),
        Some(Value::I16(v)) => u64::try_from(*v).ok(),
        Some(Value::I32(v)) => u64::try_from(*v).ok(),
        _ => None,
    };
    v.and_then(|v| usize::try_from(v).ok())
        .unwrap_or(DEFAULT_ALIGNMENT)
}

pub fn md_u32(ct: &Content, key: &str) -> Result<usize> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v.to_u32()? as usize),
        None => candle_core::bail!("missing GGUF metadata {key}"),
    }
}

pub fn md_f32(ct: &Content, key: &str) -> Result<f32> {
    match ct.metadata.get(key) {
        Some(v) => v.to_f32(),
        None => candle_core::bail!("missing GGUF metadata {key}"),
    }
}

/// A token table read into memory: 8-bit formats widened per lookup, others dequantized to f16.
fn embedding(t: &QTensor, round_to_f16: bool, device: &Device) -> Result<Embedding> {
    if let Some(m) = q8_matrix(t)? {
        return Ok(Embedding::Q8 {
            rows: Arc::new(m),
            round_to_f16,
        });
    }
    t.dequantize_f16(device).map(Embedding::Dense)
}
