//! The batched worker's step scheduler: which jobs advance in the next step, most urgent first.
//!
//! Every step is one pass over the weights for a set of jobs: each decoding job's next token,
//! plus at most one chunk of prompt tokens in all (so a long prompt stalls the decoding jobs for
//! at most one chunk per step). The scheduler decides, on the clock it is given:
//!
//! * **order**: jobs are considered earliest deadline first; the prompt chunk goes to the most
//!   urgent job still in its prompt pass;
//! * **preemption at token granularity**: when the step with every job in it would make a job
//!   finish later than halfway to its deadline, the jobs with the most slack (that can afford to
//!   skip a step) wait, their context kept, until the step is short enough for the urgent one or
//!   nobody else can wait. Aiming at half the time left rather than all of it keeps room for
//!   noise and for more urgent jobs still to come, and it makes urgent jobs finish early instead
//!   of just in time — the queen prices the next urgent job by how long the last ones took;
//! * **early stop**: a job that could not finish by its deadline even running alone is stopped at
//!   once when it shares the worker (its room goes to jobs that can still make it). Alone it runs
//!   on until its deadline, as an unbatched worker does: its partial output is still worth
//!   streaming, and it delays nobody.
//!
//! Costs come from `StepCost`, learned from the steps the worker actually ran. Nothing here reads
//! a clock, so the tests drive it on a simulated one.

use crate::engine::{SeqId, Work};

/// A job as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: SeqId,
    /// Absolute deadline on the scheduler's clock (ns).
    pub deadline_ns: u64,
    /// Prompt tokens not yet run.
    pub pending_prompt: usize,
    /// Tokens it may still generate (`max_tokens` minus those produced).
    pub tokens_left: u32,
}

/// What to do in the next step.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// Jobs that advance, in deadline order.
    pub advance: Vec<Work>,
    /// Jobs that cannot finish in time even alone, stopped now to make room.
    pub hopeless: Vec<SeqId>,
}

/// Step time as a function of the step's shape, learned from the steps run: a decode-only step
/// with `r` jobs costs `decode[r]`; each prompt token adds `per_prompt_token`. Unknown (never
/// observed) shapes cost what the nearest smaller observed shape cost, and nothing at all before
/// any step ran — the scheduler then lets everything through until it has learned.
#[derive(Debug, Clone)]
pub struct StepCost {
    /// Per batch size (index = decoding rows), exponentially weighted mean step time (µs).
    decode_us: Vec<Option<f64>>,
    per_prompt_token_us: Option<f64>,
}

/// Weight of the newest observation in the running means.
const ALPHA: f64 = 0.2;
/// Share of its time left by which the scheduler aims to finish a job (see the module doc).
const TARGET_SHARE: f64 = 0.5;

impl StepCost {
    /// A model for steps of up to `batch` decoding jobs, nothing observed yet.
    pub fn new(batch: usize) -> StepCost {
        StepCost {
            decode_us: vec![None; batch.max(1) + 1],
            per_prompt_token_us: None,
        }
    }

    /// A model with known costs (tests, and a worker seeded from measurements): a decode step
    /// with `r` jobs costs `base_us + r * per_row_us`.
    pub fn linear(batch: usize, base_us: f64, per_row_us: f64, per_prompt_token_us: f64) -> Self {
        let mut c = StepCost::new(batch);
        for (r, slot) in c.decode_us.iter_mut().enumerate().skip(1) {
            *slot = Some(base_us + r as f64 * per_row_us);
        }
        c.per_prompt_token_us = Some(per_prompt_token_us);
        c
    }

    /// Predicted time (µs) of a step with `rows` decoding jobs and `prompt` prompt tokens.
    pub fn estimate(&self, rows: usize, prompt: usize) -> f64 {
        self.decode(rows) + prompt as f64 * self.per_prompt_token_us.unwrap_or(0.0)
    }

    fn decode(&self, rows: usize) -> f64 {
        if rows == 0 {
            return 0.0;
        }
        let top = rows.min(self.decode_us.len() - 1);
        self.decode_us[..=top]
            .iter()
            .rev()
            .flatten()
            .next()
            .copied()
            .unwrap_or(0.0)
    }

    /// Learns from one step that ran `rows` decoding jobs and `prompt` prompt tokens in
    /// `took_us`.
    pub fn observe(&mut self, rows: usize, prompt: usize, took_us: f64) {
        let mix = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + ALPHA * (new - o)));
        if prompt == 0 {
            if rows > 0 {
                let r = rows.min(self.decode_us.len() - 1);
                self.decode_us[r] = mix(self.decode_us[r], took_us);
            }
            return;
        }
        let per_token = ((took_us - self.decode(rows)) / prompt as f64).max(0.0);
        self.per_prompt_token_us = mix(self.per_prompt_token_us, per_token);
    }
}

/// Steps job `j` still needs: its prompt in chunks (the last chunk also gives the first token),
/// then one per further token.
fn steps_needed(j: &Job, chunk: usize) -> u64 {
    let prompt_steps = j.pending_prompt.div_ceil(chunk.max(1)) as u64;
    let tokens = u64::from(j.tokens_left);
    if prompt_steps > 0 {
        prompt_steps + tokens.saturating_sub(1)
    } else {
        tokens
    }
}

/// Time (ns) job `j` needs running alone.
fn alone_ns(j: &Job, cost: &StepCost, chunk: usize) -> f64 {
    let prompt = j.pending_prompt as f64 * cost.estimate(0, 1);
    let decode_steps =
        steps_needed(j, chunk).saturating_sub(j.pending_prompt.div_ceil(chunk.max(1)) as u64);
    (prompt + decode_steps as f64 * cost.estimate(1, 0)) * 1000.0
}

/// Chooses the next step for `jobs` at time `now_ns`, with at most `chunk` prompt tokens in it.
pub fn plan(now_ns: u64, jobs: &[Job], cost: &StepCost, chunk: usize) -> Plan {
    let chunk = chunk.max(1);
    let mut order: Vec<&Job> = jobs.iter().collect();
    // Earliest deadline first; ties by id (arrival order), so a plan is deterministic.
    order.sort_by_key(|j| (j.deadline_ns, j.id));
    let left = |j: &Job| j.deadline_ns.saturating_sub(now_ns) as f64;

    let mut hopeless = Vec::new();
    if order.len() > 1 {
        order.retain(|j| {
            let doomed = alone_ns(j, cost, chunk) > left(j);
            if doomed {
                hopeless.push(j.id);
            }
            !doomed
        });
    }

    // Candidates with their share: decoding jobs advance one token; the one chunk of prompt
    // tokens goes to the most urgent job still in its prompt pass, the others wait their turn.
    let mut budget = chunk;
    let mut set: Vec<(&Job, usize)> = Vec::with_capacity(order.len());
    for j in order {
        if j.pending_prompt == 0 {
            set.push((j, 0));
        } else if budget > 0 {
            let take = j.pending_prompt.min(budget);
            budget -= take;
            set.push((j, take));
        }
    }

    // Preemption: while the step makes some job finish past its target, the job with the most
    // slack that can afford to skip this step waits.
    loop {
        let rows = set.iter().filter(|(_, p)| *p == 0).count();
        let prompt: usize = set.iter().map(|(_, p)| p).sum();
        let step_ns = cost.estimate(rows, prompt) * 1000.0;
        // Would a job miss its target if every step stayed like this one (prompt chunks and
        // all)? That is the worry of a job that decodes beside other jobs' prompts.
        let misses = |j: &Job| steps_needed(j, chunk) as f64 * step_ns > TARGET_SHARE * left(j);
        let Some(urgent) = set.iter().position(|(j, _)| misses(j)) else {
            break;
        };
        // A job's slack: its time left after its own prompt steps (at this step's cost) and its
        // tokens after that at the cost of a step of decoding alone. Pricing every one of its
        // tokens at the cost of a step carrying a prompt chunk would leave a long job no slack
        // at all, and it would never make way for an urgent one.
        let decode_ns = cost.estimate(set.len(), 0) * 1000.0;
        let slack = |j: &Job| {
            let prompt_steps = j.pending_prompt.div_ceil(chunk) as u64;
            let decode_steps = steps_needed(j, chunk) - prompt_steps;
            left(j) - prompt_steps as f64 * step_ns - decode_steps as f64 * decode_ns
        };
        let waiter = set
            .iter()
            .enumerate()
            .skip(urgent + 1)
            .filter(|(_, (j, _))| slack(j) >= step_ns)
            .max_by(|(_, (a, _)), (_, (b, _))| slack(a).total_cmp(&slack(b)))
            .map(|(i, _)| i);
        match waiter {
            Some(i) => {
                set.remove(i);
            }
            None => break,
        }
    }

    Plan {
        advance: set
            .into_iter()
            .map(|(j, p)| Work {
                id: j.id,
                prompt_tokens: p,
            })
            .collect(),
        hopeless,
    }
}

#[cfg(test)]
mod tests;
