//! The synthetic engine: deterministic text at a configurable pace, for tests and benchmarks.
//!
//! Output depends only on the prompt (a SHA-256-seeded word sequence), so a test can compute the
//! exact expected stream in-process. It is never used in place of a real model in the demo.
//!
//! Sampling: at temperature 0 (greedy) the text is exactly what it always was; at a positive
//! temperature the request's seed is mixed into the hash as well, so the same seed gives the
//! same text and another seed other text (the temperature's value and top_p play no further
//! part). The prompt's token count is its number of whitespace-separated words.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{
    BatchEngine, Emitted, Engine, EngineError, Finish, GenerateRequest, Sampling, SeqId, Stop, Work,
};

const WORDS: &[&str] = &[
    "the", "hive", "hums", "while", "queens", "plan", "and", "workers", "stream", "tokens",
    "through", "shared", "lanes", "before", "their", "deadline", "passes", "gently", "bees",
    "carry", "honey", "home", "across", "a", "quiet", "network", "of", "small", "machines", "that",
    "think", "together",
];

#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    pub model: String,
    /// Delay before the first token.
    pub time_to_first_token: Duration,
    /// Pace after the first token; 0 means as fast as possible.
    pub tokens_per_sec: f64,
    /// 0: the text depends only on the prompt. Another value gives other text for the same
    /// prompt, as a pool whose kernels round differently would (failover tests).
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            model: "synthetic".to_owned(),
            time_to_first_token: Duration::from_millis(20),
            tokens_per_sec: 200.0,
            seed: 0,
        }
    }
}

pub struct SyntheticEngine {
    config: SyntheticConfig,
    /// Jobs held as a `BatchEngine`.
    jobs: HashMap<SeqId, Paced>,
}

/// A batched job: its request and when its next token is due.
struct Paced {
    prompt: String,
    sampling: Sampling,
    max_tokens: u32,
    deadline: Option<Instant>,
    next: u32,
    due: Instant,
}

// === impl SyntheticEngine ===

impl SyntheticEngine {
    pub fn new(config: SyntheticConfig) -> SyntheticEngine {
        SyntheticEngine {
            config,
            jobs: HashMap::new(),
        }
    }

    /// How many tokens this engine counts a prompt as: its whitespace-separated words.
    pub fn prompt_tokens(prompt: &str) -> u32 {
        u32::try_from(prompt.split_whitespace().count()).unwrap_or(u32::MAX)
    }

    /// The i-th token (id and text) of a request's output under this engine's configured seed:
    /// greedy ignores the request's seed; sampling mixes it in.
    pub fn sampled(prompt: &str, config_seed: u64, sampling: &Sampling, i: u32) -> (u32, String) {
        if sampling.is_greedy() {
            return Self::seeded(prompt, config_seed, i);
        }
        let mut h = Sha256::new();
        h.update(b"sampled\0");
        h.update(config_seed.to_le_bytes());
        h.update(sampling.seed.to_le_bytes());
        let mixed = u64::from_le_bytes(h.finalize()[..8].try_into().unwrap_or([0; 8]));
        // Never 0, which `seeded` reads as "no seed".
        Self::seeded(prompt, mixed | 1, i)
    }

    /// The i-th token text for a prompt: a pure function, shared by the engine and by tests.
    pub fn token(prompt: &str, i: u32) -> String {
        Self::seeded(prompt, 0, i).1
    }

    /// The i-th token (its id, a word's index, and text) for a prompt under a seed.
    pub fn seeded(prompt: &str, seed: u64, i: u32) -> (u32, String) {
        let mut h = Sha256::new();
        h.update(prompt.as_bytes());
        h.update(i.to_le_bytes());
        // Seed 0 hashes exactly as before seeds existed, so expected texts stay valid.
        if seed != 0 {
            h.update(seed.to_le_bytes());
        }
        let d = h.finalize();
        let idx = u16::from_le_bytes([d[0], d[1]]) as usize % WORDS.len();
        let text = if i == 0 {
            WORDS[idx].to_owned()
        } else {
            format!(" {}", WORDS[idx])
        };
        (idx as u32, text)
    }

    fn pause(&self) -> Duration {
        if self.config.tokens_per_sec > 0.0 {
            Duration::from_secs_f64(1.0 / self.config.tokens_per_sec)
        } else {
            Duration::ZERO
        }
    }
}

impl Engine for SyntheticEngine {
    fn model(&self) -> &str {
        &self.config.model
    }

    fn generate_checked(
        &mut self,
        req: &GenerateRequest,
        emit: &mut dyn FnMut(u32, &str) -> ControlFlow<Stop>,
        // No prompt pass to interrupt: the wait for the first token ends at the deadline.
        _between: &mut dyn FnMut() -> ControlFlow<Stop>,
    ) -> Result<Finish, EngineError> {
        pace(self.config.time_to_first_token, req.deadline);
        for i in 0..req.max_tokens {
            if i > 0 {
                pace(self.pause(), req.deadline);
            }
            let (id, text) = Self::sampled(&req.prompt, self.config.seed, &req.sampling, i);
            if let ControlFlow::Break(reason) = emit(id, &text) {
                return Ok(Finish::Stopped { tokens: i, reason });
            }
        }
        Ok(Finish::Complete {
            tokens: req.max_tokens,
            prompt_tokens: Self::prompt_tokens(&req.prompt),
        })
    }
}

/// Batched, every job keeps its own pace: its first token `time_to_first_token` after it was
/// admitted, each later one a token interval after the one before, as a batched model whose step
/// time does not grow with the batch would. A step waits for the earliest token due among its
/// jobs (never past their earliest deadline) and emits every token due by then.
impl BatchEngine for SyntheticEngine {
    fn model(&self) -> &str {
        &self.config.model
    }

    fn admit(&mut self, id: SeqId, req: &GenerateRequest) -> Result<u32, EngineError> {
        if self.jobs.contains_key(&id) {
            return Err(EngineError::Prompt(format!("job {id} is already running")));
        }
        self.jobs.insert(
            id,
            Paced {
                prompt: req.prompt.clone(),
                sampling: req.sampling,
                max_tokens: req.max_tokens,
                deadline: req.deadline,
                next: 0,
                due: Instant::now() + self.config.time_to_first_token,
            },
        );
        Ok(Self::prompt_tokens(&req.prompt))
    }

    fn pending_prompt(&self, _id: SeqId) -> usize {
        // No prompt pass to schedule: the wait for the first token is the job's own.
        0
    }

    fn step(&mut self, work: &[Work], out: &mut Vec<(SeqId, Emitted)>) -> Result<(), EngineError> {
        let mine = || work.iter().filter_map(|w| self.jobs.get(&w.id));
        let Some(due) = mine().map(|j| j.due).min() else {
            return Ok(());
        };
        let wake = mine()
            .filter_map(|j| j.deadline)
            .min()
            .map_or(due, |d| d.min(due));
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        let now = Instant::now();
        let pause = self.pause();
        for w in work {
            let Some(j) = self.jobs.get_mut(&w.id) else {
                continue;
            };
            if j.due > now || j.next >= j.max_tokens {
                continue;
            }
            let (id, text) = Self::sampled(&j.prompt, self.config.seed, &j.sampling, j.next);
            out.push((w.id, Emitted::Token { id, text }));
            j.next += 1;
            j.due = now + pause;
            if j.next == j.max_tokens {
                out.push((
                    w.id,
                    Emitted::Finished(Finish::Complete {
                        tokens: j.max_tokens,
                        prompt_tokens: Self::prompt_tokens(&j.prompt),
                    }),
                ));
            }
        }
        Ok(())
    }

    fn release(&mut self, id: SeqId) {
        self.jobs.remove(&id);
    }
}

/// Sleeps for `d`, but not past the deadline: a synthetic token that could only arrive late is
/// not waited for (the caller's check then stops generation at once).
fn pace(d: Duration, deadline: Option<std::time::Instant>) {
    let d = match deadline {
        Some(at) => d.min(at.saturating_duration_since(std::time::Instant::now())),
        None => d,
    };
    std::thread::sleep(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        engine: &mut SyntheticEngine,
        prompt: &str,
        n: u32,
        stop_after: u32,
    ) -> (Vec<String>, Finish) {
        run_with(engine, prompt, n, stop_after, Sampling::default())
    }

    fn run_with(
        engine: &mut SyntheticEngine,
        prompt: &str,
        n: u32,
        stop_after: u32,
        sampling: Sampling,
    ) -> (Vec<String>, Finish) {
        let mut out = Vec::new();
        let fin = engine
            .generate(
                &GenerateRequest {
                    prompt: prompt.into(),
                    max_tokens: n,
                    deadline: None,
                    sampling,
                },
                &mut |_, t| {
                    if out.len() as u32 == stop_after {
                        return ControlFlow::Break(Stop::Cancelled);
                    }
                    out.push(t.to_owned());
                    ControlFlow::Continue(())
                },
            )
            .unwrap();
        (out, fin)
    }

    #[test]
    fn output_is_deterministic_per_prompt() {
        let cfg = SyntheticConfig {
            time_to_first_token: Duration::ZERO,
            tokens_per_sec: 0.0,
            ..Default::default()
        };
        let mut e = SyntheticEngine::new(cfg);
        let (a, fa) = run(&mut e, "hello", 16, u32::MAX);
        let (b, _) = run(&mut e, "hello", 16, u32::MAX);
        let (c, _) = run(&mut e, "other", 16, u32::MAX);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            fa,
            Finish::Complete {
                tokens: 16,
                prompt_tokens: 1
            }
        );
        assert_eq!(a[3], SyntheticEngine::token("hello", 3));
        // Another seed: other text for the same prompt, as deterministic.
        let mut seeded = SyntheticEngine::new(SyntheticConfig {
            time_to_first_token: Duration::ZERO,
            tokens_per_sec: 0.0,
            seed: 7,
            ..Default::default()
        });
        let (d, _) = run(&mut seeded, "hello", 16, u32::MAX);
        assert_ne!(d, a);
        assert_eq!(d[3], SyntheticEngine::seeded("hello", 7, 3).1);
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_differs_by_seed() {
        let mut e = SyntheticEngine::new(SyntheticConfig {
            time_to_first_token: Duration::ZERO,
            tokens_per_sec: 0.0,
            ..Default::default()
        });
        let prompt = "tell me about bees";
        let (greedy, fin) = run(&mut e, prompt, 16, u32::MAX);
        assert_eq!(
            fin,
            Finish::Complete {
                tokens: 16,
                prompt_tokens: 4
            }
        );
        // Temperature 0 is today's text exactly, whatever the seed and top_p.
        let expected: Vec<String> = (0..16).map(|i| SyntheticEngine::token(prompt, i)).collect();
        assert_eq!(greedy, expected);
        let greedy_seeded = Sampling {
            temperature: 0.0,
            top_p: 0.5,
            seed: 99,
        };
        assert_eq!(
            run_with(&mut e, prompt, 16, u32::MAX, greedy_seeded).0,
            greedy
        );
        let at = |seed| Sampling {
            temperature: 0.8,
            top_p: 0.0,
            seed,
        };
        let a = run_with(&mut e, prompt, 16, u32::MAX, at(42)).0;
        let b = run_with(&mut e, prompt, 16, u32::MAX, at(42)).0;
        let c = run_with(&mut e, prompt, 16, u32::MAX, at(43)).0;
        assert_eq!(a, b, "same seed, same text");
        assert_ne!(a, c, "another seed, other text");
        assert_ne!(a, greedy, "sampling is not greedy");
        assert_eq!(SyntheticEngine::prompt_tokens("  a\tb\n c "), 3);
    }

    #[test]
    fn break_stops_at_once() {
        let cfg = SyntheticConfig {
            time_to_first_token: Duration::ZERO,
            tokens_per_sec: 0.0,
            ..Default::default()
        };
        let mut e = SyntheticEngine::new(cfg);
        let (out, fin) = run(&mut e, "p", 100, 5);
        assert_eq!(out.len(), 5);
        assert_eq!(
            fin,
            Finish::Stopped {
                tokens: 5,
                reason: Stop::Cancelled
            }
        );
    }
}
