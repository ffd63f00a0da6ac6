//! The deadline runs of `skep-bench batch`: open-loop arrivals of urgent and long jobs.
//!
//! Capacity is measured first, in the same run, on the baseline (llama-server when it runs, else
//! one-job-per-worker skep): the job rate it sustains on the same mix in a closed loop with as
//! many streams as it has slots. Each side then gets the same seeded Poisson schedules at
//! fractions of that rate. A job counts when it finished within its deadline on the client's
//! clock; refused, failed and late jobs all count as not finished.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{
    Ctx, JobSpec, Kind, LONG_TOKENS, MIX_PERIOD, MIX_URGENT, Outcome, Prompts, Server,
    URGENT_PROMPT, URGENT_TOKENS, check_prompt_tokens, drop_server, long_prompt,
};
use skep_integration::openloop::Rng;

/// Closed-loop periods of the mix each stream runs to measure capacity.
pub const CAPACITY_PERIODS: usize = 2;

/// Everything the deadline runs measured.
#[derive(Debug, Default)]
pub struct Deadlines {
    /// Whose capacity the loads are fractions of.
    pub capacity_of: Option<Kind>,
    pub capacity_jobs_s: f64,
    /// Each side's time for one job of each kind alone: (side, urgent, long).
    pub alone: Vec<(Kind, Duration, Duration)>,
    /// The slowest side's.
    pub urgent_alone: Duration,
    pub long_alone: Duration,
    pub urgent_deadline: Duration,
    pub long_deadline: Duration,
    pub runs: Vec<DeadlineRun>,
}

/// One side at one offered load.
#[derive(Debug, Clone)]
pub struct DeadlineRun {
    pub kind: Kind,
    pub load: f64,
    pub arrivals: usize,
    pub urgent: usize,
    pub urgent_in_time: usize,
    pub long_in_time: usize,
    /// Jobs that ended with an error before their deadline (refused or stopped early).
    pub refused: usize,
    /// Tokens of in-deadline jobs per second of the arrival schedule.
    pub goodput: f64,
    /// How the other jobs ended, with counts.
    pub errors: std::collections::BTreeMap<String, usize>,
}

impl DeadlineRun {
    pub fn attainment(&self) -> f64 {
        (self.urgent_in_time + self.long_in_time) as f64 / self.arrivals.max(1) as f64
    }
}

impl Ctx<'_> {
    pub fn deadline_runs(&self, kinds: &[Kind], prompts: &Prompts) -> anyhow::Result<Deadlines> {
        let slots = self.args.open_slots;
        let urgent = prompts.job(URGENT_PROMPT, URGENT_TOKENS);
        let long = prompts.job(&long_prompt(), LONG_TOKENS);
        let base = kinds[0];
        let mut d = Deadlines {
            capacity_of: Some(base),
            ..Deadlines::default()
        };
        // Each side alone first: the deadlines are multiples of the slowest side's times, so
        // that no side is set a deadline it could not meet even when idle.
        for &kind in kinds {
            let server = Arc::new(self.start(kind, slots)?);
            let (u, l) = self.rt.block_on(async {
                // The first run of each is the warm-up.
                alone(&server, &urgent).await?;
                alone(&server, &long).await?;
                anyhow::Ok((alone(&server, &urgent).await?, alone(&server, &long).await?))
            })?;
            println!(
                "{:<18} alone: urgent {:.0} ms, long {:.0} ms",
                kind.label(),
                ms(u),
                ms(l)
            );
            d.alone.push((kind, u, l));
            d.urgent_alone = d.urgent_alone.max(u);
            d.long_alone = d.long_alone.max(l);
            if kind == base {
                d.capacity_jobs_s = self.rt.block_on(capacity(&server, slots, &urgent, &long))?;
            }
            drop_server(server);
        }
        d.urgent_deadline = d.urgent_alone.mul_f64(self.args.urgent_slack);
        d.long_deadline = d.long_alone.mul_f64(self.args.long_slack);
        println!(
            "capacity ({}, {slots} slots): {:.2} jobs/s; alone: urgent {:.0} ms, long {:.0} ms; \
             deadlines {:.0} ms and {:.0} ms",
            base.label(),
            d.capacity_jobs_s,
            ms(d.urgent_alone),
            ms(d.long_alone),
            ms(d.urgent_deadline),
            ms(d.long_deadline)
        );
        let urgent = JobSpec {
            deadline: Some(d.urgent_deadline),
            ..urgent
        };
        let long = JobSpec {
            deadline: Some(d.long_deadline),
            ..long
        };
        let schedules: Vec<(f64, Vec<(Duration, JobSpec)>)> = self
            .args
            .loads
            .iter()
            .enumerate()
            .map(|(i, &load)| {
                let rate = load * d.capacity_jobs_s;
                let plan = schedule(
                    rate,
                    Duration::from_secs(self.args.open_secs),
                    self.args.seed.wrapping_add(i as u64),
                    &urgent,
                    &long,
                );
                (load, plan)
            })
            .collect();
        for &kind in kinds {
            let server = Arc::new(self.start(kind, slots)?);
            self.rt.block_on(async {
                for j in [&urgent, &long] {
                    let warm = JobSpec {
                        deadline: None,
                        ..j.clone()
                    };
                    server.run(&warm).await;
                }
            });
            for (load, plan) in &schedules {
                let outcomes = self.rt.block_on(open_loop(&server, plan));
                check_prompt_tokens(&outcomes, plan.iter().map(|(_, j)| j))
                    .with_context(|| format!("{} at {load}", kind.label()))?;
                let run = judge(kind, *load, plan, &outcomes, self.args.open_secs);
                println!(
                    "{:<18} load {:>3.0}%: {} arrivals, attainment {:.1}% (urgent {}/{}, long \
                     {}/{}), refused {}, goodput {:.1} tok/s",
                    kind.label(),
                    load * 100.0,
                    run.arrivals,
                    run.attainment() * 100.0,
                    run.urgent_in_time,
                    run.urgent,
                    run.long_in_time,
                    run.arrivals - run.urgent,
                    run.refused,
                    run.goodput
                );
                d.runs.push(run);
            }
            drop_server(server);
        }
        Ok(d)
    }
}

/// The job rate `server` sustains on the mix in a closed loop of `slots` streams.
async fn capacity(
    server: &Arc<Server>,
    slots: usize,
    urgent: &JobSpec,
    long: &JobSpec,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let tasks: Vec<_> = (0..slots)
        .map(|s| {
            let server = Arc::clone(server);
            // Each stream starts at another point of the mix, so the streams do not run their
            // long jobs in step.
            let jobs: Vec<JobSpec> = (0..CAPACITY_PERIODS * MIX_PERIOD)
                .map(|i| mix(i + s, urgent, long).clone())
                .collect();
            tokio::spawn(async move {
                for j in &jobs {
                    let o = server.run(j).await;
                    anyhow::ensure!(o.error.is_none(), "capacity job failed: {:?}", o.error);
                }
                anyhow::Ok(jobs.len())
            })
        })
        .collect();
    let mut jobs = 0;
    for task in tasks {
        jobs += task.await??;
    }
    Ok(jobs as f64 / t.elapsed().as_secs_f64())
}

/// The `i`th job of the mix: `MIX_URGENT` urgent jobs, then long ones, every `MIX_PERIOD`.
fn mix<'a>(i: usize, urgent: &'a JobSpec, long: &'a JobSpec) -> &'a JobSpec {
    if i % MIX_PERIOD < MIX_URGENT {
        urgent
    } else {
        long
    }
}

/// The time of one job alone on an idle side.
async fn alone(server: &Server, job: &JobSpec) -> anyhow::Result<Duration> {
    let o = server.run(job).await;
    anyhow::ensure!(o.error.is_none(), "job alone failed: {:?}", o.error);
    o.done.context("job alone did not finish")
}

/// Seeded Poisson arrivals at `rate` jobs/s over `length`, the jobs in the mix's order.
fn schedule(
    rate: f64,
    length: Duration,
    seed: u64,
    urgent: &JobSpec,
    long: &JobSpec,
) -> Vec<(Duration, JobSpec)> {
    let mut rng = Rng::new(seed);
    let mut at = 0.0;
    let mut plan = Vec::new();
    if rate <= 0.0 {
        return plan;
    }
    loop {
        at += -(1.0 - rng.unit()).ln() / rate;
        if at >= length.as_secs_f64() {
            return plan;
        }
        let job = mix(plan.len(), urgent, long);
        plan.push((Duration::from_secs_f64(at), job.clone()));
    }
}

/// Sends each job at its time whatever the side does, and waits for every one to end (each is
/// bounded by its deadline).
async fn open_loop(server: &Arc<Server>, plan: &[(Duration, JobSpec)]) -> Vec<Outcome> {
    let start = tokio::time::Instant::now();
    let tasks: Vec<_> = plan
        .iter()
        .cloned()
        .map(|(at, job)| {
            let server = Arc::clone(server);
            tokio::spawn(async move {
                tokio::time::sleep_until(start + at).await;
                server.run(&job).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Outcome {
            error: Some(format!("task: {e}")),
            ..Outcome::default()
        }));
    }
    out
}

fn judge(
    kind: Kind,
    load: f64,
    plan: &[(Duration, JobSpec)],
    outcomes: &[Outcome],
    secs: u64,
) -> DeadlineRun {
    let mut r = DeadlineRun {
        kind,
        load,
        arrivals: plan.len(),
        urgent: 0,
        urgent_in_time: 0,
        long_in_time: 0,
        refused: 0,
        goodput: 0.0,
        errors: Default::default(),
    };
    let mut tokens = 0u64;
    for ((_, job), o) in plan.iter().zip(outcomes) {
        if let Some(e) = &o.error {
            // Grouped without their numbers (budgets, estimates), which differ job to job.
            let key: String = e
                .chars()
                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                .collect();
            *r.errors.entry(key).or_default() += 1;
        }
        let is_urgent = job.max_tokens == URGENT_TOKENS;
        r.urgent += usize::from(is_urgent);
        let in_time = o.error.is_none() && o.done.is_some();
        if in_time {
            tokens += u64::from(o.tokens);
            if is_urgent {
                r.urgent_in_time += 1;
            } else {
                r.long_in_time += 1;
            }
        } else if o
            .error
            .as_deref()
            .is_some_and(|e| !e.contains("deadline passed"))
        {
            r.refused += 1;
        }
    }
    r.goodput = tokens as f64 / secs.max(1) as f64;
    r
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
