//! Synthetic GGUF models: seeded random weights in the real shapes of the architectures the
//! engine runs, with a generated tokenizer and chat template, so the engine loads them unchanged.
//!
//! They exist for checks where a real model file cannot travel (the GPU machine takes 64 MiB of
//! files and has no network): the file is written where it is used, from a preset name, a
//! quantization and a seed. The same three give the same bytes on every machine: the random
//! numbers come from a fixed generator (SplitMix64 + Box-Muller) seeded per tensor and per chunk,
//! and the quantization is candle's (`QTensor::quantize`), block by block. Nothing here says
//! anything about text quality: the weights are noise, scaled so activations stay finite.

mod rng;
mod vocab;

pub use vocab::GEMMA3_IT_TEMPLATE;

use std::borrow::Cow;
use std::io::{Seek, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use self::rng::Rng;

/// Standard deviation of every weight matrix and of the token table (GPT-2's initialisation).
const WEIGHT_STD: f32 = 0.02;
/// Norm weights are 1 plus noise of this standard deviation (Gemma's GGUF norms already hold the
/// `1 +` offset, so the same holds for both families).
const NORM_STD: f32 = 0.02;
/// Values generated and quantized per work item: whole rows, about this many.
const CHUNK_ELEMS: usize = 1 << 20;
/// GGUF data alignment candle's writer uses (and the real files' default).
const ALIGNMENT: u64 = 32;

/// Every preset name, for `--help` and errors.
pub const PRESETS: &[&str] = &[
    "llama-tiny",
    "llama-135m",
    "llama-1b",
    "gemma3-tiny",
    "gemma3-270m",
];

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset {0:?} (known: {PRESETS:?})")]
    UnknownPreset(String),
    #[error("unknown quantization {0:?} (known: q4_1, q5_0, q8_0, q4_k, q6_k, q4_k_m)")]
    UnknownQuant(String),
    #[error("{0}")]
    Shape(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// llama.cpp's `llama` architecture (SmolLM2, Llama 3.2), byte-level BPE tokenizer.
    Llama,
    /// llama.cpp's `gemma3` architecture, SentencePiece tokenizer.
    Gemma3,
}

/// The hyper-parameters of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub preset: &'static str,
    pub family: Family,
    pub blocks: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context_len: usize,
    pub rope_base: f32,
    pub eps: f32,
    /// Gemma 3's sliding window (unused for llama).
    pub window: usize,
}

/// How the weight matrices are quantized; norms are always f32 and the token table Q8_0, as in
/// the real files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
    /// llama.cpp's Q4_K_M mix: Q4_K, and Q6_K for `attn_v` and `ffn_down` in the layers its
    /// `use_more_bits` picks (the first and last eighth, and every third between).
    Q4KM,
}

/// One tensor the file holds: its name, candle's shape (rows, cols; GGUF lists it reversed), its
/// type and what its values are drawn from.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    mean: f32,
    std: f32,
}

/// Everything a file holds but the weights' values.
#[derive(Debug, Clone)]
pub struct Plan {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorPlan>,
}

// === impl Shape ===

impl Shape {
    /// The preset called `name`.
    pub fn preset(name: &str) -> Result<Shape, SynthError> {
        let llama =
            |preset, blocks, hidden, ffn, heads, kv_heads, vocab, context_len, rope_base| Shape {
                preset,
                family: Family::Llama,
                blocks,
                hidden,
                ffn,
                heads,
                kv_heads,
                head_dim: hidden / heads,
                vocab,
                context_len,
                rope_base,
                eps: 1e-5,
                window: 0,
            };
        let gemma =
            |preset, blocks, hidden, ffn, heads, head_dim, vocab, context_len, window| Shape {
                preset,
                family: Family::Gemma3,
                blocks,
                hidden,
                ffn,
                heads,
                kv_heads: 1,
                head_dim,
                vocab,
                context_len,
                rope_base: 1e6,
                eps: 1e-6,
                window,
            };
        Ok(match name {
            // SmolLM2-135M, as its GGUF states it.
            "llama-135m" => llama("llama-135m", 30, 576, 1536, 9, 3, 49_152, 8192, 100_000.0),
            // Llama 3.2 1B's transformer (tied embeddings, its vocabulary size), without its
            // rope scaling, which the engine does not implement.
            "llama-1b" => llama(
                "llama-1b", 16, 2048, 8192, 32, 8, 128_256, 131_072, 500_000.0,
            ),
            // Dimensions multiples of 256, so every quantization applies to every matrix.
            "llama-tiny" => llama("llama-tiny", 2, 256, 512, 4, 2, 512, 2048, 100_000.0),
            // Gemma 3 270M, as its GGUF states it.
            "gemma3-270m" => gemma("gemma3-270m", 18, 640, 2048, 4, 256, 262_144, 32_768, 512),
            // Six blocks, so that one attends globally; a window shorter than the chat prompt.
            "gemma3-tiny" => gemma("gemma3-tiny", 6, 256, 512, 2, 128, 512, 2048, 8),
            _ => return Err(SynthError::UnknownPreset(name.to_string())),
        })
    }

    fn arch(&self) -> &'static str {
        match self.family {
            Family::Llama => "llama",
            Family::Gemma3 => "gemma3",
        }
    }
}

// === impl Quant ===

impl std::str::FromStr for Quant {
    type Err = SynthError;

    fn from_str(s: &str) -> Result<Self, SynthError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "q4_1" => Quant::Q4_1,
            "q5_0" => Quant::Q5_0,
            "q8_0" => Quant::Q8_0,
            "q4_k" => Quant::Q4K,
            "q6_k" => Quant::Q6K,
            "q4_k_m" => Quant::Q4KM,
            _ => return Err(SynthError::UnknownQuant(s.to_string())),
        })
    }
}

impl Quant {
    /// The type of a matrix with `cols` inputs. As llama.cpp's quantizer does, a k-quant falls
    /// back when a row is not whole 256-value blocks (Gemma 3 270M's width is 640): Q4_K to
    /// Q5_0, Q6_K to Q8_0.
    /// `more_bits`: the matrix is one Q4_K_M widens to Q6_K.
    pub fn matrix_dtype(self, cols: usize, more_bits: bool) -> GgmlDType {
        let whole = |d: GgmlDType| cols.is_multiple_of(d.block_size());
        match self {
            Quant::Q4KM if more_bits => Quant::Q6K.matrix_dtype(cols, false),
            Quant::Q4KM => Quant::Q4K.matrix_dtype(cols, false),
            Quant::Q4_1 => GgmlDType::Q4_1,
            Quant::Q5_0 => GgmlDType::Q5_0,
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4K if whole(GgmlDType::Q4K) => GgmlDType::Q4K,
            Quant::Q4K => GgmlDType::Q5_0,
            Quant::Q6K if whole(GgmlDType::Q6K) => GgmlDType::Q6K,
            Quant::Q6K => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` for a file mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            Quant::Q4_1 => 3,
            Quant::Q8_0 => 7,
            Quant::Q5_0 => 8,
            // LLAMA_FTYPE_MOSTLY_Q4_K_S: every matrix Q4_K.
            Quant::Q4K => 14,
            Quant::Q6K => 18,
            Quant::Q4KM => 15,
        }
    }
}

// === impl Plan ===

impl Plan {
    /// The metadata and tensors a file of `shape` in `quant` holds.
    pub fn new(shape: &Shape, quant: Quant) -> Result<Plan, SynthError> {
        check(shape)?;
        let mut metadata = general(shape, quant);
        metadata.extend(match shape.family {
            Family::Llama => vocab::llama(shape.vocab)?,
            Family::Gemma3 => vocab::gemma3(shape.vocab)?,
        });
        Ok(Plan {
            metadata,
            tensors: tensors(shape, quant),
        })
    }

    /// The size of the file `write` makes, in bytes.
    pub fn file_size(&self) -> u64 {
        let mut header = 4 + 4 + 8 + 8;
        for (k, v) in &self.metadata {
            header += 8 + k.len() as u64 + 4 + value_size(v);
        }
        let mut data = 0;
        for t in &self.tensors {
            header += 8 + t.name.len() as u64 + 4 + 8 * t.dims.len() as u64 + 4 + 8;
            data += t.bytes().next_multiple_of(ALIGNMENT);
        }
        header.next_multiple_of(ALIGNMENT) + data
    }

    /// Draws the weights from `seed`, quantizes them on `threads` threads and writes the file.
    /// The bytes depend on the plan and the seed only, not on the number of threads.
    pub fn write<W: Write + Seek>(
        &self,
        seed: u64,
        threads: usize,
        out: &mut W,
    ) -> Result<(), SynthError> {
        let tensors = self.weights(seed, threads)?;
        let metadata: Vec<(&str, &Value)> =
            self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = self
            .tensors
            .iter()
            .zip(&tensors)
            .map(|(p, t)| (p.name.as_str(), t))
            .collect();
        gguf_file::write(out, &metadata, &tensors)?;
        Ok(())
    }

    /// Every tensor's values, quantized: work items of whole rows, handed to threads in turn.
    fn weights(&self, seed: u64, threads: usize) -> Result<Vec<QTensor>, SynthError> {
        let mut items = Vec::new();
        for (t, plan) in self.tensors.iter().enumerate() {
            let cols = *plan.dims.last().unwrap_or(&1);
            let rows = plan.dims.iter().product::<usize>() / cols.max(1);
            let step = (CHUNK_ELEMS / cols.max(1)).max(1);
            for (chunk, start) in (0..rows).step_by(step).enumerate() {
                items.push((t, chunk, start * cols, (start + step).min(rows) * cols));
            }
        }
        let done: Vec<Mutex<Option<Vec<u8>>>> = items.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let failed = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(t, chunk, from, to)) = items.get(i) else {
                            return;
                        };
                        match self.tensors[t].quantize(seed, chunk, to - from) {
                            Ok(bytes) => *lock(&done[i]) = Some(bytes),
                            Err(e) => {
                                lock(&failed).get_or_insert(e);
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = into_inner(failed) {
            return Err(e);
        }
        let mut bytes: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|p| Vec::with_capacity(p.bytes() as usize))
            .collect();
        for (item, part) in items.iter().zip(done) {
            bytes[item.0].extend(into_inner(part).unwrap_or_default());
        }
        let mut out = Vec::with_capacity(self.tensors.len());
        for (plan, bytes) in self.tensors.iter().zip(bytes) {
            let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, plan.dtype)?;
            out.push(QTensor::new(storage, plan.dims.as_slice())?);
        }
        Ok(out)
    }
}

// A panicking worker thread cannot leave these half-written: each holds a whole value or None.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn into_inner<T>(m: Mutex<T>) -> T {
    m.into_inner().unwrap_or_else(|p| p.into_inner())
}

// === impl TensorPlan ===

impl TensorPlan {
    fn new(name: String, dims: Vec<usize>, dtype: GgmlDType, mean: f32, std: f32) -> Self {
        TensorPlan {
            name,
            dims,
            dtype,
            mean,
            std,
        }
    }

    /// Bytes of the tensor's data.
    pub fn bytes(&self) -> u64 {
        let elems: usize = self.dims.iter().product();
        (elems / self.dtype.block_size() * self.dtype.type_size()) as u64
    }

    /// Values `[chunk's start, + len)` drawn and quantized.
    fn quantize(&self, seed: u64, chunk: usize, len: usize) -> Result<Vec<u8>, SynthError> {
        let mut rng = Rng::new(seed, &self.name, chunk as u64);
        let values: Vec<f32> = (0..len)
            .map(|_| self.mean + self.std * rng.normal())
            .collect();
        let t = Tensor::from_vec(values, len, &Device::Cpu)?;
        Ok(QTensor::quantize(&t, self.dtype)?.data()?.into_owned())
    }
}

/// Refuses shapes the engine (or the quantizer) cannot take, before any work.
fn check(s: &Shape) -> Result<(), SynthError> {
    let ok = s.blocks > 0
        && s.heads > 0
        && s.kv_heads > 0
        && s.heads.is_multiple_of(s.kv_heads)
        && s.head_dim.is_multiple_of(2)
        && s.hidden.is_multiple_of(32)
        && s.ffn.is_multiple_of(32)
        && (s.heads * s.head_dim).is_multiple_of(32)
        && (s.family == Family::Gemma3 || s.heads * s.head_dim == s.hidden);
    if ok {
        Ok(())
    } else {
        Err(SynthError::Shape(format!("unusable shape {s:?}")))
    }
}

fn general(s: &Shape, quant: Quant) -> Vec<(String, Value)> {
    let arch = s.arch();
    let u = |k: &str, v: usize| (format!("{arch}.{k}"), Value::U32(v as u32));
    let f = |k: &str, v: f32| (format!("{arch}.{k}"), Value::F32(v));
    let mut md = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        (
            "general.name".into(),
            Value::String(format!("skep synthetic {}", s.preset)),
        ),
        ("general.quantization_version".into(), Value::U32(2)),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        u("block_count", s.blocks),
        u("context_length", s.context_len),
        u("embedding_length", s.hidden),
        u("feed_forward_length", s.ffn),
        u("attention.head_count", s.heads),
        u("attention.head_count_kv", s.kv_heads),
        f("rope.freq_base", s.rope_base),
        f("attention.layer_norm_rms_epsilon", s.eps),
    ];
    match s.family {
        Family::Llama => md.extend([
            u("vocab_size", s.vocab),
            u("rope.dimension_count", s.head_dim),
        ]),
        Family::Gemma3 => md.extend([
            u("attention.key_length", s.head_dim),
            u("attention.value_length", s.head_dim),
            u("attention.sliding_window", s.window),
        ]),
    }
    md
}

fn tensors(s: &Shape, quant: Quant) -> Vec<TensorPlan> {
    let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let norm =
        |name: String, n: usize| TensorPlan::new(name, vec![n], GgmlDType::F32, 1.0, NORM_STD);
    let matrix = |name: String, rows: usize, cols: usize, more_bits: bool| {
        TensorPlan::new(
            name,
            vec![rows, cols],
            quant.matrix_dtype(cols, more_bits),
            0.0,
            WEIGHT_STD,
        )
    };
    let mut out = vec![
        TensorPlan::new(
            "token_embd.weight".into(),
            vec![s.vocab, s.hidden],
            GgmlDType::Q8_0,
            0.0,
            WEIGHT_STD,
        ),
        norm("output_norm.weight".into(), s.hidden),
    ];
    for i in 0..s.blocks {
        let w = |n: &str| format!("blk.{i}.{n}.weight");
        let more = use_more_bits(i, s.blocks);
        out.extend([
            norm(w("attn_norm"), s.hidden),
            matrix(w("attn_q"), q, s.hidden, false),
            matrix(w("attn_k"), kv, s.hidden, false),
            matrix(w("attn_v"), kv, s.hidden, more),
            matrix(w("attn_output"), s.hidden, q, false),
            norm(w("ffn_norm"), s.hidden),
            matrix(w("ffn_gate"), s.ffn, s.hidden, false),
            matrix(w("ffn_up"), s.ffn, s.hidden, false),
            matrix(w("ffn_down"), s.hidden, s.ffn, more),
        ]);
        if s.family == Family::Gemma3 {
            out.extend([
                norm(w("attn_q_norm"), s.head_dim),
                norm(w("attn_k_norm"), s.head_dim),
                norm(w("post_attention_norm"), s.hidden),
                norm(w("post_ffw_norm"), s.hidden),
            ]);
        }
    }
    out
}

/// llama.cpp's choice of the layers whose `attn_v` and `ffn_down` get more bits in its `_M`
/// mixes.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    // Past the first clause, layer >= layers / 8: the subtraction cannot wrap.
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// Bytes a metadata value takes in a GGUF file (after its type tag).
fn value_size(v: &Value) -> u64 {
    match v {
        Value::U8(_) | Value::I8(_) | Value::Bool(_) => 1,
        Value::U16(_) | Value::I16(_) => 2,
        Value::U32(_) | Value::I32(_) | Value::F32(_) => 4,
        Value::U64(_) | Value::I64(_) | Value::F64(_) => 8,
        Value::String(s) => 8 + s.len() as u64,
        Value::Array(a) => 4 + 8 + a.iter().map(value_size).sum::<u64>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_quants_fall_back_like_llama_cpp_on_partial_blocks() {
        assert_eq!(Quant::Q4K.matrix_dtype(1024, false), GgmlDType::Q4K);
        assert_eq!(Quant::Q4K.matrix_dtype(640, false), GgmlDType::Q5_0);
        assert_eq!(Quant::Q6K.matrix_dtype(640, false), GgmlDType::Q8_0);
        assert_eq!(Quant::Q4_1.matrix_dtype(640, true), GgmlDType::Q4_1);
        assert_eq!(Quant::Q4KM.matrix_dtype(1024, true), GgmlDType::Q6K);
        assert_eq!(Quant::Q4KM.matrix_dtype(640, true), GgmlDType::Q8_0);
    }
}
