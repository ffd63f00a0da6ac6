//! Cost model: how long a job of one model takes on one pool, as a tail estimate.
//!
//! Admission reserves time on a slot, so an estimate that is right on average is wrong half the
//! time. Each (pool, model) keeps recent samples of three parts of a job's service time and
//! estimates each by a configurable tail quantile (p95 by default):
//!
//! - *overhead*: what the queen's clock sees beyond the worker's own time (network, pool, lane);
//! - *first token*: the worker's time to its first token (the prompt pass), kept per prompt size
//!   class as well: a prompt pass grows with the prompt, and in a batched worker a job's first
//!   token also waits for the prompt chunks of more urgent jobs, so one tail over short and long
//!   prompts would price a short, urgent job like a long one;
//! - *per token*: the worker's time per further token, kept per *pace* class as well (the job's
//!   budget per token it asks for): a batched worker advances the most urgent jobs first and
//!   holds back those with slack, so a job's speed there depends on how tight its deadline is,
//!   and one tail over loose and tight jobs would price every urgent job at the speed of the
//!   jobs that were made to wait for urgent ones.
//!
//! Until a pool has run enough jobs, the figures it measured at warm-up (with a safety margin)
//! stand in; without even those, a stated, conservative prior does — never zero.

use std::collections::VecDeque;

/// Samples kept per part: enough for a p99 to mean something, few enough to follow change.
const WINDOW: usize = 128;
/// Below this many samples the estimate never drops under the prior.
const TRUST_AFTER: usize = 16;
/// Margin on warm-up figures: one short warm-up job says little about the tail.
const FIGURES_MARGIN: f64 = 1.5;
/// Prompt size classes of the first-token part: under 256 bytes, then one per doubling.
const PROMPT_CLASSES: usize = 10;

/// Pace classes of the per-token part: under 1 ms of budget per token, then one per doubling.
const PACE_CLASSES: usize = 16;

/// The pace class of a job with `pace_us` of budget per token.
fn pace_class(pace_us: u64) -> usize {
    ((u64::BITS - (pace_us >> 10).leading_zeros()) as usize).min(PACE_CLASSES - 1)
}

/// The prompt size class of a prompt of `bytes` bytes.
fn prompt_class(bytes: u32) -> usize {
    ((u32::BITS - (bytes >> 8).leading_zeros()) as usize).min(PROMPT_CLASSES - 1)
}

/// The conservative prior used for a model no pool has measured yet (see docs/ARCHITECTURE.md).
pub const PRIOR_OVERHEAD_US: u64 = 20_000;
pub const PRIOR_FIRST_TOKEN_US: u64 = 2_000_000;
pub const PRIOR_PER_TOKEN_US: u64 = 250_000;
/// Overhead assumed next to warm-up figures, before the queen has measured its own.
pub const FIGURES_OVERHEAD_US: u64 = 5_000;

/// Speed measured by a pool at warm-up, per model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    pub first_token_us: u64,
    pub per_token_us: u64,
}

/// What one finished (or stopped) job teaches the cost model. Parts that were not observed are
/// `None` (a job stopped before its first token teaches nothing about per-token time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// The job's prompt size in bytes (what the queen knows of it before a worker tokenizes it).
    pub prompt_bytes: u32,
    /// The job's budget per token asked for, at admission (µs).
    pub pace_us: u64,
    pub overhead_us: Option<u64>,
    pub first_token_us: Option<u64>,
    pub per_token_us: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct Part {
    samples: VecDeque<u64>,
    tail: u64,
}

impl Part {
    fn push(&mut self, v: u64, quantile: f64) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(v);
        let mut sorted: Vec<u64> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        // Nearest-rank quantile: the smallest sample with at least q of them at or below it.
        let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        self.tail = sorted[rank - 1];
    }

    fn estimate(&self, prior: u64) -> u64 {
        if self.samples.len() >= TRUST_AFTER {
            self.tail
        } else {
            self.tail.max(prior)
        }
    }
}

/// Tail cost of one model on one pool.
#[derive(Debug, Clone)]
pub struct Cost {
    quantile: f64,
    figures: Option<Figures>,
    overhead: Part,
    first_token: Part,
    /// The first-token samples again, per prompt size class.
    first_token_by_prompt: Vec<Part>,
    per_token: Part,
    /// The per-token samples again, per pace class.
    per_token_by_pace: Vec<Part>,
}

impl Cost {
    pub fn new(quantile: f64) -> Cost {
        Cost {
            quantile: quantile.clamp(0.5, 1.0),
            figures: None,
            overhead: Part::default(),
            first_token: Part::default(),
            first_token_by_prompt: vec![Part::default(); PROMPT_CLASSES],
            per_token: Part::default(),
            per_token_by_pace: vec![Part::default(); PACE_CLASSES],
        }
    }

    pub fn set_figures(&mut self, f: Figures) {
        self.figures = Some(f);
    }

    fn priors(&self) -> (u64, u64, u64) {
        match self.figures {
            Some(f) => (
                FIGURES_OVERHEAD_US,
                (f.first_token_us as f64 * FIGURES_MARGIN) as u64,
                (f.per_token_us as f64 * FIGURES_MARGIN) as u64,
            ),
            None => (PRIOR_OVERHEAD_US, PRIOR_FIRST_TOKEN_US, PRIOR_PER_TOKEN_US),
        }
    }

    pub fn observe(&mut self, s: Sample) {
        let q = self.quantile;
        if let Some(v) = s.overhead_us {
            self.overhead.push(v, q);
        }
        if let Some(v) = s.first_token_us {
            self.first_token.push(v, q);
            self.first_token_by_prompt[prompt_class(s.prompt_bytes)].push(v, q);
        }
        if let Some(v) = s.per_token_us {
            self.per_token.push(v, q);
            self.per_token_by_pace[pace_class(s.pace_us)].push(v, q);
        }
    }

    pub fn overhead(&self) -> u64 {
        self.overhead.estimate(self.priors().0)
    }
    /// Time to the first token of a job whose prompt is `prompt_bytes` long: the tail of its
    /// prompt size class once that class has enough samples of its own. Before that, the
    /// shortest prompts are priced by the prior (the warm-up job's prompt is one of them), or by
    /// their own samples if those are slower; longer ones by the nearest longer class that has
    /// enough samples (a longer prompt never takes less), else by the tail over all prompts —
    /// never below the prior while few samples are in.
    pub fn first_token(&self, prompt_bytes: u32) -> u64 {
        let own = prompt_class(prompt_bytes);
        let classes = &self.first_token_by_prompt;
        if classes[own].samples.len() >= TRUST_AFTER {
            return classes[own].tail;
        }
        if own == 0 {
            return classes[0].estimate(self.priors().1);
        }
        match classes[own..]
            .iter()
            .find(|c| c.samples.len() >= TRUST_AFTER)
        {
            Some(longer) => longer.tail.max(self.priors().1),
            None => self.first_token.estimate(self.priors().1),
        }
    }
    /// Time per token over all jobs (what a running job's remaining tokens are priced at when
    /// its own pace is not at hand).
    pub fn per_token(&self) -> u64 {
        self.per_token.estimate(self.priors().2)
    }

    /// Time per token of a job with `pace_us` of budget per token: the tail of its pace class
    /// once that class has enough samples. Before that, the nearest tighter class measured (a
    /// looser job is held back at least as often), never below the prior — the warm-up
    /// figures, measured with every job of the batch advancing each step, the speed the most
    /// urgent jobs get. So the tightest jobs are priced by the warm-up figures until they have
    /// samples of their own, not by the jobs that were made to wait for them.
    pub fn per_token_at(&self, pace_us: u64) -> u64 {
        let own = pace_class(pace_us);
        let classes = &self.per_token_by_pace;
        if classes[own].samples.len() >= TRUST_AFTER {
            return classes[own].tail;
        }
        let prior = self.priors().2;
        let tighter = classes[..own]
            .iter()
            .rev()
            .find(|c| c.samples.len() >= TRUST_AFTER)
            .map_or(0, |c| c.tail);
        tighter.max(prior).max(classes[own].tail)
    }

    /// Whole service time of a job with a `prompt_bytes` prompt asking for `max_tokens` with
    /// `pace_us` of budget per token.
    pub fn job(&self, prompt_bytes: u32, max_tokens: u32, pace_us: u64) -> u64 {
        self.overhead()
            .saturating_add(self.first_token(prompt_bytes))
            .saturating_add(
                self.per_token_at(pace_us)
                    .saturating_mul(u64::from(max_tokens.saturating_sub(1))),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_figures_means_the_conservative_prior_never_zero() {
        let c = Cost::new(0.95);
        assert_eq!(
            c.job(0, 8000, 0),
            PRIOR_OVERHEAD_US + PRIOR_FIRST_TOKEN_US + PRIOR_PER_TOKEN_US * 7999
        );
        assert!(c.job(0, 1, 0) > 0);
    }

    #[test]
    fn warm_up_figures_stand_in_with_a_margin() {
        let mut c = Cost::new(0.95);
        c.set_figures(Figures {
            first_token_us: 20_000,
            per_token_us: 5_000,
        });
        assert_eq!(c.first_token(0), 30_000);
        assert_eq!(c.per_token(), 7_500);
        // 200 tok/s cannot produce 8000 tokens in 200 ms.
        assert!(c.job(0, 8000, 0) > 200_000);
    }

    #[test]
    fn the_tail_not_the_mean_is_reserved() {
        let mut c = Cost::new(0.95);
        for i in 0..100u64 {
            // 95 fast jobs and 5 slow ones.
            let v = if i % 20 == 0 { 10_000 } else { 1_000 };
            c.observe(Sample {
                prompt_bytes: 0,
                pace_us: 0,
                overhead_us: Some(100),
                first_token_us: Some(v),
                per_token_us: Some(v),
            });
        }
        // p95 of 100 samples is the 95th smallest: still a fast one; p99 must see a slow one.
        assert_eq!(c.first_token(0), 1_000);
        let mut p99 = Cost::new(0.99);
        for i in 0..100u64 {
            let v = if i % 20 == 0 { 10_000 } else { 1_000 };
            p99.observe(Sample {
                prompt_bytes: 0,
                pace_us: 0,
                overhead_us: Some(100),
                first_token_us: Some(v),
                per_token_us: Some(v),
            });
        }
        assert_eq!(p99.first_token(0), 10_000);
    }

    #[test]
    fn few_samples_never_drop_below_the_prior() {
        let mut c = Cost::new(0.95);
        c.observe(Sample {
            prompt_bytes: 0,
            pace_us: 0,
            overhead_us: Some(1),
            first_token_us: Some(1),
            per_token_us: Some(1),
        });
        assert_eq!(c.first_token(0), PRIOR_FIRST_TOKEN_US);
        for _ in 0..TRUST_AFTER {
            c.observe(Sample {
                prompt_bytes: 0,
                pace_us: 0,
                overhead_us: Some(1),
                first_token_us: Some(1),
                per_token_us: Some(1),
            });
        }
        assert_eq!(c.first_token(0), 1);
    }

    #[test]
    fn a_short_prompt_is_priced_by_short_prompts_once_they_have_enough_samples() {
        let mut c = Cost::new(0.95);
        let sample = |prompt_bytes, first_token_us| Sample {
            prompt_bytes,
            pace_us: 0,
            overhead_us: Some(100),
            first_token_us: Some(first_token_us),
            per_token_us: Some(1_000),
        };
        c.set_figures(Figures {
            first_token_us: 40_000,
            per_token_us: 1_000,
        });
        // Long prompts (~1.2 KB) take 1.5 s to their first token.
        for _ in 0..TRUST_AFTER {
            c.observe(sample(1200, 1_500_000));
        }
        // The shortest prompts, not measured yet, are priced by the warm-up figures (a short
        // prompt's), with their margin — not by the long prompts' tail, which would refuse
        // every short urgent job, and so never learn what short jobs cost.
        assert_eq!(c.first_token(60), 60_000);
        // A middle size takes the nearest longer class's tail; a size longer than any seen, the
        // tail over every prompt.
        assert_eq!(c.first_token(600), 1_500_000);
        assert_eq!(c.first_token(40_000), 1_500_000);
        // Short prompts' own samples take over, slower than the figures or faster.
        for _ in 0..TRUST_AFTER - 1 {
            c.observe(sample(60, 100_000));
        }
        assert_eq!(c.first_token(60), 100_000);
        c.observe(sample(60, 20_000));
        assert_eq!(c.first_token(60), 100_000);
        assert_eq!(c.first_token(1200), 1_500_000);
        assert_eq!(c.job(60, 1, 0), 100 + 100_000);
    }

    #[test]
    fn prompt_classes_double() {
        assert_eq!(prompt_class(0), 0);
        assert_eq!(prompt_class(255), 0);
        assert_eq!(prompt_class(256), 1);
        assert_eq!(prompt_class(511), 1);
        assert_eq!(prompt_class(512), 2);
        assert_eq!(prompt_class(u32::MAX), PROMPT_CLASSES - 1);
    }

    #[test]
    fn an_urgent_job_is_priced_by_urgent_jobs_not_by_those_held_back_for_them() {
        let mut c = Cost::new(0.95);
        c.set_figures(Figures {
            first_token_us: 40_000,
            per_token_us: 10_000,
        });
        let sample = |pace_us, per_token_us| Sample {
            prompt_bytes: 0,
            pace_us,
            overhead_us: Some(100),
            first_token_us: Some(40_000),
            per_token_us: Some(per_token_us),
        };
        // Loose jobs (120 ms of budget per token) were held back for urgent ones: 50 ms a token.
        for _ in 0..TRUST_AFTER {
            c.observe(sample(120_000, 50_000));
        }
        // An urgent job (40 ms a token), none measured yet: the warm-up figures with their
        // margin, not the loose jobs' 50 ms (which would refuse it, so it never gets measured).
        assert_eq!(c.per_token_at(40_000), 15_000);
        assert_eq!(c.per_token_at(120_000), 50_000);
        // A looser class than any measured takes the nearest tighter one's tail.
        assert_eq!(c.per_token_at(2_000_000), 50_000);
        // Urgent jobs' own samples take over once there are enough.
        for _ in 0..TRUST_AFTER {
            c.observe(sample(40_000, 12_000));
        }
        assert_eq!(c.per_token_at(40_000), 12_000);
        assert_eq!(c.job(0, 11, 40_000), 100 + 40_000 + 10 * 12_000);
        // Slower samples than the prior count even before there are enough of them.
        let mut slow = Cost::new(0.95);
        slow.set_figures(Figures {
            first_token_us: 40_000,
            per_token_us: 10_000,
        });
        slow.observe(sample(40_000, 90_000));
        assert_eq!(slow.per_token_at(40_000), 90_000);
    }

    #[test]
    fn pace_classes_double_from_a_millisecond() {
        assert_eq!(pace_class(0), 0);
        assert_eq!(pace_class(1023), 0);
        assert_eq!(pace_class(1024), 1);
        assert_eq!(pace_class(2048), 2);
        assert_eq!(pace_class(u64::MAX), PACE_CLASSES - 1);
    }
}
