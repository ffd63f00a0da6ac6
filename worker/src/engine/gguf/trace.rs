//! Step-by-step logits of a run, for comparing two backends on the same ids (the GPU check):
//! the prompt pass, then greedy steps that may be forced to another run's ids so that one
//! near-tie cannot make the two runs' later steps incomparable.

use std::time::{Duration, Instant};

use super::{GgufEngine, inference};
use crate::engine::EngineError;

/// What `GgufEngine::trace` saw.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The logits after the prompt, then after each step's token.
    pub logits: Vec<Vec<f32>>,
    /// The id each step fed (the greedy pick, or the forced one).
    pub ids: Vec<u32>,
    /// Time of the prompt pass, and of all the steps after it.
    pub prompt_time: Duration,
    pub steps_time: Duration,
}

/// Index of the largest value (the first of equals), as greedy sampling picks.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Gap between the largest and the second largest value.
pub fn top_two_gap(v: &[f32]) -> f32 {
    let top = argmax(v);
    let second = v
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != top)
        .fold(f32::NEG_INFINITY, |m, (_, &x)| m.max(x));
    v[top] - second
}

impl GgufEngine {
    /// Runs `prompt` (in `prefill_chunk` chunks), then `steps` tokens: each step feeds
    /// `forced[i]` when given, else the greedy pick of the logits before it.
    pub fn trace(
        &mut self,
        prompt: &[u32],
        steps: usize,
        forced: Option<&[u32]>,
    ) -> Result<Trace, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::Prompt("the prompt has no tokens".into()));
        }
        let as_vec = |t: candle_core::Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        let started = Instant::now();
        let first = self.start(prompt)?;
        let mut logits = vec![as_vec(first).map_err(inference)?];
        let prompt_time = started.elapsed();
        let started = Instant::now();
        let mut ids = Vec::with_capacity(steps);
        for i in 0..steps {
            let last = logits.last().map(|l| argmax(l) as u32).unwrap_or(0);
            let id = forced.and_then(|f| f.get(i).copied()).unwrap_or(last);
            let next = self.step(id, prompt.len() + i)?;
            logits.push(as_vec(next).map_err(inference)?);
            ids.push(id);
        }
        Ok(Trace {
            logits,
            ids,
            prompt_time,
            steps_time: started.elapsed(),
        })
    }

    /// Tokens in the model's vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    /// Bytes of weights on the GPU, when the model runs on one.
    pub fn gpu_weight_bytes(&self) -> Option<usize> {
        match &self.weights.backend {
            super::decoder::Backend::Cpu => None,
            #[cfg(feature = "cuda")]
            super::decoder::Backend::Cuda(g) => Some(g.weight_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_equals_and_the_gap_is_to_the_runner_up() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(top_two_gap(&[1.0, 3.0, 3.0, -1.0]), 0.0);
        assert_eq!(top_two_gap(&[0.5, 2.0, 1.25]), 0.75);
    }
}
