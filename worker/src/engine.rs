//! The `Engine` trait every inference backend implements, and the factory that picks one.
//!
//! An engine turns a prompt into a stream of token texts. It knows nothing of lanes, deadlines or
//! cancellation: the caller decides between tokens whether to go on, through the `emit` callback.

pub mod gguf;
pub mod synthetic;

use std::ops::ControlFlow;

pub use skep_common::sampling::Sampling;
pub use synthetic::{SyntheticConfig, SyntheticEngine};

/// What the caller asks an engine to produce.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub max_tokens: u32,
    /// When the job's time is up. The caller enforces it between tokens; an engine may also use
    /// it to stop waiting early (the synthetic engine does). Work inside one real token step
    /// cannot be interrupted.
    pub deadline: Option<std::time::Instant>,
    /// How to pick each token; the default (temperature 0) is greedy decoding.
    pub sampling: Sampling,
}

/// Why generation stopped early, as decided by the caller's `emit` callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    DeadlineExceeded,
    Cancelled,
    /// The consumer of the tokens went away (e.g. the lane died).
    Disconnected,
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Reached `max_tokens`, an end-of-sequence token or a stop sequence. `prompt_tokens` is
    /// how many tokens the prompt was, as this engine counts them.
    Complete { tokens: u32, prompt_tokens: u32 },
    /// The caller's `emit` returned `Break`.
    Stopped { tokens: u32, reason: Stop },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model {0:?} is not served by this engine")]
    UnknownModel(String),
    #[error("could not load model: {0}")]
    Load(String),
    #[error("prompt could not be processed: {0}")]
    Prompt(String),
    #[error("inference failed: {0}")]
    Inference(String),
    /// The device the model runs on failed (a lost GPU, a kernel fault): the process's device
    /// state cannot be trusted after it, so the worker fails its jobs and exits, and its pool
    /// starts a new one.
    #[error("the GPU failed: {0}")]
    Device(String),
}

/// A loaded model that generates tokens. Loaded once per worker and kept warm.
pub trait Engine: Send {
    /// Name of the model this engine serves.
    fn model(&self) -> &str;

    /// Generates up to `req.max_tokens` tokens, handing each piece of text to `emit` as soon as it
    /// exists, with the id of the model token that completed it (a failover compares ids and
    /// text to prove another pool reproduces what a client already has). `emit` is also where the
    /// caller checks its deadline and cancel flag: returning `Break(reason)` stops generation
    /// before the next token is computed.
    fn generate(
        &mut self,
        req: &GenerateRequest,
        emit: &mut dyn FnMut(u32, &str) -> ControlFlow<Stop>,
    ) -> Result<Finish, EngineError> {
        self.generate_checked(req, emit, &mut || ControlFlow::Continue(()))
    }

    /// As `generate`, and also asks `between` whether to go on between steps that emit nothing
    /// (the chunks of a long prompt pass), so a cancel or a deadline stops a job there too.
    fn generate_checked(
        &mut self,
        req: &GenerateRequest,
        emit: &mut dyn FnMut(u32, &str) -> ControlFlow<Stop>,
        between: &mut dyn FnMut() -> ControlFlow<Stop>,
    ) -> Result<Finish, EngineError>;
}

/// A job's handle inside a batched engine: the caller's own id for it (the lane `seq`).
pub type SeqId = u64;

/// One job's share of a batched step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    pub id: SeqId,
    /// Prompt tokens it may run in this step while its prompt pass lasts (at least 1 is run);
    /// ignored once the job decodes, when it advances by one token.
    pub prompt_tokens: usize,
}

/// What a batched step produced for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emitted {
    /// Text to stream (never empty), with the id of the model token that completed it.
    Token { id: u32, text: String },
    /// The job is over ([`Finish::Complete`]); the engine still holds it until `release`.
    Finished(Finish),
    /// This job failed (the others of the step are unaffected).
    Failed(String),
}

/// An engine that holds several jobs at once, each with its own context, and advances any set
/// of them in one step: one pass over the weights for every job's next token (or next chunk of
/// its prompt). The caller (the worker's step scheduler) decides which jobs advance each step;
/// the engine decides nothing about order, deadlines or cancellation.
pub trait BatchEngine: Send {
    /// Name of the model this engine serves.
    fn model(&self) -> &str;

    /// Takes a job in: checks and tokenizes its prompt. It then holds its context until
    /// `release`. Returns the prompt's length in tokens.
    fn admit(&mut self, id: SeqId, req: &GenerateRequest) -> Result<u32, EngineError>;

    /// Prompt tokens of job `id` not yet run (0 once it generates).
    fn pending_prompt(&self, id: SeqId) -> usize;

    /// Advances every job of `work` once, in one pass, appending what each produced to `out`.
    /// An `Err` means the pass itself failed: every job of `work` is then lost.
    fn step(&mut self, work: &[Work], out: &mut Vec<(SeqId, Emitted)>) -> Result<(), EngineError>;

    /// Forgets job `id` and frees its context.
    fn release(&mut self, id: SeqId);
}
