//! Per-job sampling settings: temperature, nucleus (top-p) cut-off and seed.
//!
//! One type carried from the queen's doors to the worker's engine, so every hop agrees on what
//! "greedy" means: temperature 0 (the default) picks the most likely token, exactly as before
//! sampling existed, and the seed is then irrelevant. With temperature > 0 the engine samples,
//! and the same model, prompt, settings and seed give the same tokens (what failover's prefix
//! check relies on). Ranges are checked by `validate::sampling`, not here.

/// Highest temperature a job may ask for.
pub const MAX_TEMPERATURE: f32 = 2.0;

/// How a job picks each next token.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sampling {
    /// 0 is greedy decoding; otherwise logits are divided by it before sampling (0, 2].
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to `top_p`.
    /// 0 or 1 is off.
    pub top_p: f32,
    /// Seeds the sampler's random numbers; absent is 0.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding: the seed and top-p play no part.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// The nucleus cut-off when one applies (strictly between 0 and 1).
    pub fn nucleus(&self) -> Option<f32> {
        (self.top_p > 0.0 && self.top_p < 1.0).then_some(self.top_p)
    }
}
