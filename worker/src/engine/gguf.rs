//! The GGUF engine: runs llama-architecture (e.g. SmolLM2) and Gemma 3 GGUF models on candle,
//! CPU by default.
//!
//! The model file is mapped once at start and its weights used in place where the kernels can
//! (`loader`); the model stays warm, and each job clears the KV cache and starts from position
//! 0, so jobs never see each other's context. With the `cuda` cargo feature and
//! `--device cuda:N` the same decoder runs on that GPU (`gpu`: every matrix and KV cache in
//! device memory).

mod batch;
mod decoder;
mod gemma3;
#[cfg(feature = "cuda")]
mod gpu;
mod linear;
mod llama;
mod loader;
mod special;
mod spm;
mod stream;
mod template;
mod tokenizer;
mod trace;

use std::fs::File;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use candle_transformers::generation::LogitsProcessor;

use self::decoder::Decoder;
use self::loader::GgufFile;
pub use self::loader::WeightMemory;

use self::stream::TextStream;
use self::template::{ChatTemplate, TemplateError};
pub use self::tokenizer::PromptTokens;
use self::tokenizer::{GgufTokenizer, TokenizerError};
pub use self::trace::{Trace, argmax, top_two_gap};
use crate::engine::{Engine, EngineError, Finish, GenerateRequest, Sampling, Stop};

/// Prompt tokens per forward pass of the prompt: a cancel or a deadline during a long prompt
/// pass takes effect at the next chunk. Chunking changes nothing in the result (each row's
/// products and attention do not depend on the other rows of its pass).
pub const PREFILL_CHUNK: usize = 128;

/// Worker-wide options. How tokens are picked is per job (`GenerateRequest::sampling`).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufOptions {
    /// Generation ends when the text contains one of these; the stop text itself is not emitted.
    pub stop: Vec<String>,
    /// Prompt tokens per forward pass (`PREFILL_CHUNK`; at least 1).
    pub prefill_chunk: usize,
    /// Where the decoder runs (`--device`).
    pub device: skep_cuda::device::DeviceSpec,
}

impl Default for GgufOptions {
    fn default() -> Self {
        GgufOptions {
            stop: Vec::new(),
            prefill_chunk: PREFILL_CHUNK,
            device: skep_cuda::device::DeviceSpec::Cpu,
        }
    }
}

/// Why a GGUF model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("not a readable GGUF file: {0}")]
    Format(candle_core::Error),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("bad model metadata: {0}")]
    Metadata(String),
    #[error("cannot load weights: {0}")]
    Weights(candle_core::Error),
    #[error("reading the model crashed: {0}")]
    Panicked(String),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The requested device cannot run the model; the text says why and what to do.
    #[error("device: {0}")]
    Device(String),
}

/// What `GgufEngine::profile` measured.
#[derive(Debug, Clone)]
pub struct Profile {
    pub prompt_tokens: usize,
    pub prompt: std::time::Duration,
    pub gen_tokens: usize,
    pub generation: std::time::Duration,
    /// The ids the prompt pass was given, so a benchmark can check the other side got the same.
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
}

/// How `GgufEngine::profile` shapes its run, for fixed-size benchmarks (llama-bench's pp512 and
/// tg128 ignore text boundaries and end-of-generation tokens).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProfileOpts {
    /// Keep only the first this many prompt ids (an error when the text has fewer).
    pub prompt_tokens: Option<usize>,
    /// Generate all `n` tokens, through end-of-generation tokens.
    pub past_eog: bool,
}

/// A GGUF model loaded and ready to generate.
pub struct GgufEngine {
    model_name: String,
    weights: Decoder,
    /// Where the weights live (in place in the mapped file, or copied).
    memory: WeightMemory,
    tokenizer: GgufTokenizer,
    template: Option<ChatTemplate>,
    device: Device,
    /// Prompt plus generated tokens may not exceed this (the model's trained context, capped so
    /// that one job's KV cache stays within a home machine's memory).
    context_len: usize,
    opts: GgufOptions,
    /// Jobs held when it serves as a `BatchEngine` (the one-job path uses none).
    jobs: batch::Seqs,
}

// Hand-written so that logging an engine never dumps (or walks) the weights.
impl std::fmt::Debug for GgufEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufEngine")
            .field("model", &self.model_name)
            .field("device", &self.device)
            .field("context_len", &self.context_len)
            .field("chat_template", &self.template.is_some())
            .field("tokenizer", &self.tokenizer)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl GgufEngine {
    /// Reads the GGUF file at `path` and builds weights, tokenizer and chat template.
    pub fn load(path: &Path, model_name: &str, opts: GgufOptions) -> Result<Self, EngineError> {
        Self::load_inner(path, model_name, opts)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))
    }

    fn load_inner(path: &Path, model_name: &str, opts: GgufOptions) -> Result<Self, GgufError> {
        if let skep_cuda::device::DeviceSpec::Cuda(_) = opts.device {
            // Before the file is read: a GPU that cannot be used is the first thing to report.
            skep_cuda::device::probe(&opts.device)
                .map_err(|e| GgufError::Device(format!("{}: {e}", opts.device)))?;
        }
        let open = |source| GgufError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(open)?;
        // Mapped, not read: the matrices the kernels take in the file's layout are used where
        // they lie, so every worker on this file shares one copy of them (the page cache's).
        let map = skep_kernels::Mapping::of_file(&file).map_err(open)?;
        let device = pick_device()?;
        // candle's GGUF reader validates most of the header, but a few corrupt values (e.g. a
        // zero alignment or head count) reach arithmetic that panics. A corrupt file must be an
        // error, not a crashed worker, so the whole read runs under catch_unwind.
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut file = GgufFile::new(map, &device).map_err(GgufError::Format)?;
            // On a GPU the matrices are read from the file straight to the device (gpu.rs):
            // the host keeps the token table and the norms only.
            file.matrices_on_device = matches!(opts.device, skep_cuda::device::DeviceSpec::Cuda(_));
            let content = &file.ct;
            let arch = architecture(content)?;
            let context_len = match arch {
                Arch::Llama => check_llama_metadata(content)?,
                Arch::Gemma3 => gemma3::context_len(content)
                    .map_err(GgufError::Weights)?
                    .min(GEMMA3_MAX_CONTEXT),
            };
            let tokenizer = GgufTokenizer::from_gguf(content)?;
            let template = match content.metadata.get("tokenizer.chat_template") {
                Some(v) => {
                    let src = v.to_string().map_err(|e| {
                        GgufError::Metadata(format!("tokenizer.chat_template: {e}"))
                    })?;
                    Some(ChatTemplate::new(
                        src.clone(),
                        tokenizer.special_text(tokenizer.bos()),
                        tokenizer.special_text(tokenizer.eos()),
                    )?)
                }
                None => None,
            };
            #[allow(unused_mut)] // mutated with the `cuda` feature only
            let mut weights = match arch {
                Arch::Llama => llama::from_gguf(&file),
                Arch::Gemma3 => gemma3::from_gguf(&file),
            }
            .map_err(GgufError::Weights)?;
            // The probe above has refused a CUDA device in a build without the feature.
            #[cfg(feature = "cuda")]
            if let skep_cuda::device::DeviceSpec::Cuda(n) = opts.device {
                let g = gpu::GpuDecoder::load(&file, &weights, n)
                    .map_err(|e| GgufError::Device(format!("{}: {e}", opts.device)))?;
                weights.backend = decoder::Backend::Cuda(Box::new(g));
            }
            Ok::<_, GgufError>((weights, tokenizer, template, context_len, file.memory()))
        }))
        .map_err(|panic| GgufError::Panicked(panic_message(&panic)))??;
        let (mut weights, tokenizer, template, context_len, memory) = loaded;
        // candle repacks k-quant weights into its SIMD tile layout on their first product (one
        // layout for single tokens, one for batches). Two tokens through the model here make
        // that part of loading, as llama.cpp's repacking is, instead of the first job's time.
        let warm = [tokenizer.bos().unwrap_or(0); 2];
        weights.forward(&warm, 0).map_err(GgufError::Weights)?;
        weights.clear_kv_cache();
        tracing::info!(
            model = model_name,
            path = %path.display(),
            vocab = tokenizer.vocab_size(),
            context_len,
            chat_template = template.is_some(),
            device = ?device,
            weights_in_place = memory.mapped,
            weights_copied = memory.copied,
            "gguf model loaded"
        );
        Ok(Self {
            model_name: model_name.to_string(),
            weights,
            memory,
            tokenizer,
            template,
            device,
            context_len,
            opts,
            jobs: batch::Seqs::new(),
        })
    }

    /// Where the weights live: bytes read in place from the mapped file (shared by every
    /// process that maps it) and bytes read into this process.
    pub fn weight_memory(&self) -> WeightMemory {
        self.memory
    }

    /// The exact text fed to the model for a user prompt: the chat template applied when the
    /// model has one, the prompt itself otherwise.
    pub fn format_prompt(&self, prompt: &str) -> Result<String, EngineError> {
        match &self.template {
            Some(t) => t
                .render_user(prompt)
                .map(|r| r.text)
                .map_err(|e| EngineError::Prompt(e.to_string())),
            None => Ok(prompt.to_string()),
        }
    }

    /// Replaces the model's chat template (a base model's file may have none): checked as the
    /// file's own template is at load.
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), EngineError> {
        let t = ChatTemplate::new(
            source.to_string(),
            self.tokenizer.special_text(self.tokenizer.bos()),
            self.tokenizer.special_text(self.tokenizer.eos()),
        )
        .map_err(|e| EngineError::Load(e.to_string()))?;
        self.template = Some(t);
        Ok(())
    }

    /// The token ids a job's `prompt` is fed to the model as: the chat template's markup with
    /// its control tokens, and the user's text as plain text, in which `<|im_start|>` or
    /// `<start_of_turn>` is just characters. BOS is added when the model wants it.
    pub fn prompt_tokens(&self, prompt: &str) -> Result<PromptTokens, EngineError> {
        let (text, user) = match &self.template {
            Some(t) => {
                let r = t
                    .render_user(prompt)
                    .map_err(|e| EngineError::Prompt(e.to_string()))?;
                (r.text, r.user)
            }
            None => (prompt.to_string(), 0..prompt.len()),
        };
        self.tokenizer
            .encode_chat(&text, &user)
            .map_err(|e| EngineError::Prompt(e.to_string()))
    }

    /// Token ids of trusted `text` as llama.cpp would produce them with special-token parsing
    /// on and no BOS added (`llama_tokenize(.., add_special = false, parse_special = true)`).
    /// Never for a user's text: see `encode_text` and `prompt_tokens`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer
            .encode(text)
            .map_err(|e| EngineError::Prompt(e.to_string()))
    }

    /// Token ids of untrusted `text`, with no special token parsed (control tokens' texts are
    /// plain text) and no BOS added.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer
            .encode_text(text)
            .map_err(|e| EngineError::Prompt(e.to_string()))
    }

    /// Whether `id` is a control token (`<|im_start|>`, `<start_of_turn>`, `<bos>`, ...).
    pub fn is_control_token(&self, id: u32) -> bool {
        self.tokenizer.is_control(id)
    }

    /// Text of token ids (control tokens dropped, invalid UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids)
    }

    /// The vocabulary entry of a token id as stored in the GGUF file.
    pub fn token(&self, id: u32) -> Option<String> {
        self.tokenizer.token(id)
    }

    /// Whether sampling this token ends generation (EOS, `<|im_end|>`, ...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.tokenizer.is_eog(id)
    }

    /// Up to `n` greedily chosen token ids after the chat-formatted `prompt`, stopping before an
    /// end-of-generation token. Ignores temperature and stop sequences: it exists to compare the
    /// raw model against a reference implementation.
    pub fn greedy_token_ids(&mut self, prompt: &str, n: usize) -> Result<Vec<u32>, EngineError> {
        let ids = self.prompt_ids(prompt)?;
        let mut sampler = LogitsProcessor::new(0, None, None);
        let mut out = Vec::with_capacity(n);
        let mut logits = self.start(&ids)?;
        let mut pos = ids.len();
        while out.len() < n && pos < self.context_len {
            let next = sampler.sample(&logits).map_err(inference)?;
            if self.tokenizer.is_eog(next) {
                break;
            }
            out.push(next);
            logits = self.step(next, pos)?;
            pos += 1;
        }
        Ok(out)
    }

    /// Like `greedy_token_ids`, with each step's margin: how far the chosen token's logit is
    /// ahead of the runner-up's. Where two implementations' tokens differ, a small margin there
    /// says it was a near-tie that rounding can flip.
    pub fn greedy_with_margins(
        &mut self,
        prompt: &str,
        n: usize,
    ) -> Result<Vec<(u32, f32)>, EngineError> {
        let ids = self.prompt_ids(prompt)?;
        let mut out = Vec::with_capacity(n);
        let mut logits = self.start(&ids)?;
        let mut pos = ids.len();
        while out.len() < n && pos < self.context_len {
            let v = logits.to_vec1::<f32>().map_err(inference)?;
            let (mut best, mut second) = ((0usize, f32::NEG_INFINITY), f32::NEG_INFINITY);
            for (i, &x) in v.iter().enumerate() {
                if x > best.1 {
                    second = best.1;
                    best = (i, x);
                } else if x > second {
                    second = x;
                }
            }
            let next = best.0 as u32;
            if self.tokenizer.is_eog(next) {
                break;
            }
            out.push((next, best.1 - second));
            logits = self.step(next, pos)?;
            pos += 1;
        }
        Ok(out)
    }

    /// Greedy generation of up to `n` tokens after `text` (already formatted; BOS added when the
    /// model wants it), timed: the prompt pass (up to the first token's logits) and the steps
    /// after it. For benchmarks against other implementations on identical token sequences;
    /// `opts` cuts the prompt and lets generation run through end-of-generation tokens.
    pub fn profile(
        &mut self,
        text: &str,
        n: usize,
        opts: ProfileOpts,
    ) -> Result<Profile, EngineError> {
        let mut ids = self
            .tokenizer
            .encode_prompt(text)
            .map_err(|e| EngineError::Prompt(e.to_string()))?;
        if let Some(k) = opts.prompt_tokens {
            if ids.len() < k {
                return Err(EngineError::Prompt(format!(
                    "the text has {} tokens, fewer than {k}",
                    ids.len()
                )));
            }
            ids.truncate(k);
        }
        let mut sampler = LogitsProcessor::new(0, None, None);
        let started = std::time::Instant::now();
        let mut logits = self.start(&ids)?;
        let prompt = started.elapsed();
        let started = std::time::Instant::now();
        let mut out = Vec::with_capacity(n);
        let mut pos = ids.len();
        loop {
            let next = sampler.sample(&logits).map_err(inference)?;
            if !opts.past_eog && self.tokenizer.is_eog(next) {
                break;
            }
            out.push(next);
            if out.len() == n || pos + 1 >= self.context_len {
                break;
            }
            logits = self.step(next, pos)?;
            pos += 1;
        }
        Ok(Profile {
            prompt_tokens: ids.len(),
            prompt,
            // Steps after the first token, as llama.cpp's generation time counts them.
            gen_tokens: out.len().saturating_sub(1),
            generation: started.elapsed(),
            prompt_ids: ids,
            ids: out,
        })
    }

    fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, EngineError> {
        let ids = self.prompt_tokens(prompt)?.ids;
        if ids.is_empty() {
            return Err(EngineError::Prompt("the prompt has no tokens".into()));
        }
        if ids.len() >= self.context_len {
            return Err(EngineError::Prompt(format!(
                "the prompt is {} tokens; the model's context holds {}",
                ids.len(),
                self.context_len
            )));
        }
        Ok(ids)
    }

    /// Forgets the previous job and runs the prompt; returns the logits for the next token.
    fn start(&mut self, ids: &[u32]) -> Result<Tensor, EngineError> {
        match self.start_checked(ids, &mut || ControlFlow::Continue(()))? {
            ControlFlow::Continue(logits) => Ok(logits),
            ControlFlow::Break(_) => Err(EngineError::Prompt("the prompt pass stopped".into())),
        }
    }

    /// As `start`, in chunks, asking `between` whether to go on after each but the last.
    fn start_checked(
        &mut self,
        ids: &[u32],
        between: &mut dyn FnMut() -> ControlFlow<Stop>,
    ) -> Result<ControlFlow<Stop, Tensor>, EngineError> {
        // index_pos 0 already overwrites each layer's cache, but clearing also frees the last
        // job's cache memory while the worker is idle.
        self.weights.clear_kv_cache();
        let mut chunks = ids.chunks(self.opts.prefill_chunk.max(1)).peekable();
        let mut pos = 0;
        while let Some(chunk) = chunks.next() {
            let logits = self.logits(chunk, pos)?;
            pos += chunk.len();
            if chunks.peek().is_none() {
                return Ok(ControlFlow::Continue(logits));
            }
            if let ControlFlow::Break(reason) = between() {
                return Ok(ControlFlow::Break(reason));
            }
        }
        Err(EngineError::Prompt("the prompt has no tokens".into()))
    }

    /// Feeds one token at position `pos`; returns the logits for the next one.
    fn step(&mut self, token: u32, pos: usize) -> Result<Tensor, EngineError> {
        self.logits(&[token], pos)
    }

    fn logits(&mut self, ids: &[u32], pos: usize) -> Result<Tensor, EngineError> {
        self.weights
            .forward(ids, pos)
            .and_then(|l| l.squeeze(0))
            .map_err(inference)
    }
}

impl Engine for GgufEngine {
    fn model(&self) -> &str {
        &self.model_name
    }

    fn generate_checked(
        &mut self,
        req: &GenerateRequest,
        emit: &mut dyn FnMut(u32, &str) -> ControlFlow<Stop>,
        between: &mut dyn FnMut() -> ControlFlow<Stop>,
    ) -> Result<Finish, EngineError> {
        if req.max_tokens == 0 {
            return Ok(Finish::Complete {
                tokens: 0,
                prompt_tokens: 0,
            });
        }
        let ids = self.prompt_ids(&req.prompt)?;
        let prompt_tokens = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        let mut sampler = sampler(&req.sampling);
        let mut text = TextStream::new(&self.opts.stop);
        let mut logits = match self.start_checked(&ids, between)? {
            ControlFlow::Continue(logits) => logits,
            ControlFlow::Break(reason) => return Ok(Finish::Stopped { tokens: 0, reason }),
        };
        let mut pos = ids.len();
        let mut tokens = 0u32;
        let mut last;
        loop {
            let next = sampler.sample(&logits).map_err(inference)?;
            last = next;
            if self.tokenizer.is_eog(next) {
                break;
            }
            tokens += 1;
            let bytes = self.tokenizer.piece(next).ok_or_else(|| {
                EngineError::Inference(format!(
                    "the model produced token {next}, outside its vocabulary of {}",
                    self.tokenizer.vocab_size()
                ))
            })?;
            let pushed = text.push(bytes);
            // Text held back (half a character, a possible stop-sequence prefix) is emitted with
            // a later token, so emit only ever sees non-empty, whole-character text.
            if !pushed.text.is_empty()
                && let ControlFlow::Break(reason) = emit(next, &pushed.text)
            {
                return Ok(Finish::Stopped { tokens, reason });
            }
            if pushed.stopped {
                return Ok(Finish::Complete {
                    tokens,
                    prompt_tokens,
                });
            }
            if tokens >= req.max_tokens || pos >= self.context_len {
                break;
            }
            logits = self.step(next, pos)?;
            pos += 1;
        }
        let rest = text.finish();
        if !rest.is_empty()
            && let ControlFlow::Break(reason) = emit(last, &rest)
        {
            return Ok(Finish::Stopped { tokens, reason });
        }
        Ok(Finish::Complete {
            tokens,
            prompt_tokens,
        })
    }
}

/// A job's sampler, started afresh from its seed: greedy (argmax, the seed unused) at
/// temperature 0, otherwise temperature sampling, cut to the nucleus when top_p is in (0, 1).
/// The same settings and seed give the same tokens, job after job.
fn sampler(s: &Sampling) -> LogitsProcessor {
    if s.is_greedy() {
        return LogitsProcessor::new(s.seed, None, None);
    }
    LogitsProcessor::new(
        s.seed,
        Some(f64::from(s.temperature)),
        s.nucleus().map(f64::from),
    )
}

/// candle's device: always the host. A GPU, when asked for (`GgufOptions::device`), is driven
/// by skep's own backend (`gpu`), not by candle, whose CUDA build needs the toolkit.
fn pick_device() -> Result<Device, GgufError> {
    Ok(Device::Cpu)
}

/// Context cap for Gemma 3: its KV cache grows with the sequence and nothing larger is needed
/// for chat jobs on home machines.
const GEMMA3_MAX_CONTEXT: usize = 8192;
/// Context cap for Llama-family models, for the same reason.
const LLAMA_MAX_CONTEXT: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Arch {
    Llama,
    Gemma3,
}

fn architecture(ct: &Content) -> Result<Arch, GgufError> {
    let arch = ct
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("");
    match arch {
        "llama" => Ok(Arch::Llama),
        "gemma3" => Ok(Arch::Gemma3),
        _ => Err(GgufError::Unsupported(format!(
            "general.architecture = {arch:?}; this engine runs \"llama\" and \"gemma3\" models"
        ))),
    }
}

/// Checks what the decoder assumes about the hyper-parameters before it divides or
/// indexes with them, and returns the usable context length.
fn check_llama_metadata(ct: &Content) -> Result<usize, GgufError> {
    let get = |key: &str| -> Result<usize, GgufError> {
        match ct.metadata.get(key) {
            Some(Value::U32(v)) => Ok(*v as usize),
            Some(Value::U64(v)) => usize::try_from(*v).map_err(|_| bad(key, v)),
            Some(v) => Err(bad(key, v)),
            None => Err(GgufError::Metadata(format!("{key} is missing"))),
        }
    };
    let heads = get("llama.attention.head_count")?;
    let kv_heads = get("llama.attention.head_count_kv")?;
    let embd = get("llama.embedding_length")?;
    let rope_dim = get("llama.rope.dimension_count")?;
    let blocks = get("llama.block_count")?;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || embd == 0 || embd % heads != 0 {
        return Err(GgufError::Metadata(format!(
            "inconsistent attention shape: {heads} heads, {kv_heads} kv heads, width {embd}"
        )));
    }
    if rope_dim == 0 || rope_dim % 2 != 0 || rope_dim != embd / heads || blocks == 0 {
        return Err(GgufError::Metadata(format!(
            "unsupported shape: rope dimension {rope_dim}, head size {}, {blocks} blocks",
            embd / heads
        )));
    }
    if let Some(Value::U32(0)) = ct.metadata.get("general.alignment") {
        return Err(GgufError::Metadata("general.alignment is 0".into()));
    }
    let trained = match ct.metadata.get("llama.context_length") {
        Some(Value::U32(v)) if *v > 0 => *v as usize,
        _ => LLAMA_MAX_CONTEXT,
    };
    Ok(trained.min(LLAMA_MAX_CONTEXT))
}

fn bad(key: &str, v: impl std::fmt::Debug) -> GgufError {
    GgufError::Metadata(format!("{key} has an unusable value {v:?}"))
}

fn inference(e: candle_core::Error) -> EngineError {
    #[cfg(feature = "cuda")]
    if gpu::is_device_error(&e) {
        return EngineError::Device(e.to_string());
    }
    EngineError::Inference(e.to_string())
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
