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
