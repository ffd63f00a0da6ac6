//! The keeper thread, which keeps every group's workers in line with the model set, and the
//! start-up measurement of each model's speed at full batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use skep_common::deadline::Deadline;
use skep_common::sampling::Sampling;
use tracing::{error, info, warn};

use super::requests::Ticket;
use super::worker::{Death, LaneJob, Lease, Worker};
use super::{HEALTH_EVERY, Launch, POLL, RESTART_BACKOFF, STARTUP_GRACE, Slots, record_death};
use crate::audit::{Audit, events};
use crate::models::ModelSet;
use crate::{Event, Figures, Speed};
use skep_audit::Fields;

/// The warm-up job: short, on the real path, generous deadline (a gguf model may still load).
const WARM_UP_PROMPT: &str = "warm-up";
const WARM_UP_TOKENS: u32 = 8;
const WARM_UP_DEADLINE: Duration = Duration::from_secs(120);
/// Warm-ups tried (one per worker generation) before group 0 gives up measuring.
const WARM_UP_ATTEMPTS: u32 = 3;
/// Worker starts a model may fail in a row before its jobs are failed and it is unloaded.
const LOAD_ATTEMPTS: u32 = 3;

/// Loads every model once, last first (so that with a tight budget the first one named ends
/// warm), waits until it is warm, runs one warm-up job per slot of group 0 at once on its
/// worker and records their figures; then publishes the first model's figures, which
/// membership waits for before registering.
pub(super) fn measure_models(slots: &Slots, models: &ModelSet, speed: &Speed, audit: &Audit) {
    let mut first = None;
    for spec in models.specs().iter().rev() {
        let name = &spec.name;
        if slots.closed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = models.request(name, &[], &slots.models_in_use()) {
            warn!(model = %name, error = %e, "cannot load the model to measure it");
            continue;
        }
        let begun = Instant::now();
        while !models.is_warm(name) && models.is_wanted(name) {
            if slots.closed.load(Ordering::Acquire) || begun.elapsed() > STARTUP_GRACE {
                break;
            }
            std::thread::sleep(POLL);
        }
        if !models.is_warm(name) {
            warn!(model = %name, "the model did not load; it stays cold");
            continue;
        }
        let mut figures = None;
        for _ in 0..WARM_UP_ATTEMPTS {
            let Some(w) = wait_for_worker(slots, models, 0, name) else {
                break;
            };
            let (f, death) = warm_up(slots, &w, name);
            if let Some(death) = death {
                warn!(model = %name, reason = %death, "worker lost during warm-up");
                slots.retire(&w, &death, models, audit);
            }
            if f.is_some() {
                figures = f;
                break;
            }
        }
        if let Some(f) = figures {
            info!(
                model = %name,
                load_ms = models.load_us(name) / 1000,
                first_token_us = f.first_token_us,
                per_token_us = f.per_token_us,
                batch = slots.batch(),
                "model measured"
            );
            models.set_figures(name, f);
            first = Some(f);
        }
    }
    // The first model named was measured last; any figures tell membership start-up is over.
    let named_first = models.specs().first().and_then(|s| models.figures(&s.name));
    if let Some(f) = named_first.or(first) {
        speed.publish(f);
    }
}

/// Leases `group`'s loaded worker for `model`, waiting while it loads.
fn wait_for_worker(slots: &Slots, models: &ModelSet, group: u32, model: &str) -> Option<Lease> {
    let begun = Instant::now();
    loop {
        if slots.closed.load(Ordering::Acquire)
            || !models.is_wanted(model)
            || begun.elapsed() > STARTUP_GRACE
        {
            return None;
        }
        if let Some(lease) = slots.lease(group, model) {
            return Some(lease);
        }
        std::thread::sleep(POLL);
    }
}

/// Runs `slots.batch()` warm-up jobs at once on `w` (stopped like a cancel once the pool
/// closes), each on a lease of its own. Returns the figures at full batch if every job
/// finished, and why the worker must be replaced, if it must.
fn warm_up(slots: &Slots, w: &Lease, model: &str) -> (Option<Figures>, Option<Death>) {
    let outcomes: Vec<(Event, Option<Death>)> = std::thread::scope(|scope| {
        let runs: Vec<_> = (0..slots.batch() as u32)
            .map(|i| {
                // Each counts as one of the worker's jobs, as a slot's would.
                let lease = Lease::new(w);
                scope.spawn(move || {
                    let ticket = Ticket::new(Arc::clone(lease.requests()));
                    let req = LaneJob {
                        job_id: "warm-up",
                        model,
                        prompt: WARM_UP_PROMPT,
                        max_tokens: WARM_UP_TOKENS,
                        sampling: Sampling::default(),
                        deadline: Deadline::after(WARM_UP_DEADLINE),
                        arrived: Instant::now(),
                    };
                    lease.run(i, &ticket, &req, &slots.closed, &mut |_| true)
                })
            })
            .collect();
        runs.into_iter()
            .map(|r| {
                r.join().unwrap_or_else(|_| {
                    let death = Death::Lane("warm-up thread panicked".into());
                    let error = crate::Error::WorkerLost(death.to_string());
                    (Event::Failed { error, tokens: 0 }, Some(death))
                })
            })
            .collect()
    });
    let mut death = None;
    let mut finished = Vec::with_capacity(outcomes.len());
    for (outcome, d) in outcomes {
        death = death.or(d);
        match outcome {
            Event::Finished {
                tokens,
                first_token_us,
                generation_us,
                ..
            } => finished.push(figures(tokens, first_token_us, generation_us)),
            Event::Failed { error, tokens } => {
                warn!(error = %error, tokens, "warm-up job failed");
            }
            // `run` ends with a terminal event only.
            Event::Started { .. } | Event::Token { .. } => {}
        }
    }
    if finished.len() < slots.batch() {
        return (None, death);
    }
    (batch_figures(&finished), death)
}

/// The engine's speed from one finished job: the first token, then the time per later token.
pub(super) fn figures(tokens: u32, first_token_us: u64, generation_us: u64) -> Figures {
    Figures {
        first_token_us,
        per_token_us: generation_us / u64::from(tokens.saturating_sub(1).max(1)),
    }
}

/// The figures of jobs run together: the first of their first tokens and the mean time per
/// later token. The worker gives the prompt chunk to its most urgent job first, so the first
/// first token is what the most urgent job of a full batch sees — the job a tight deadline
/// belongs to; the queen learns the slower first tokens of less urgent jobs from real jobs
/// (per prompt size) within a few jobs. None for no jobs.
pub(super) fn batch_figures(jobs: &[Figures]) -> Option<Figures> {
    let first_token_us = jobs.iter().map(|f| f.first_token_us).min()?;
    let total: u64 = jobs
        .iter()
        .map(|f| f.per_token_us)
        .fold(0, u64::saturating_add);
    Some(Figures {
        first_token_us,
        per_token_us: total / jobs.len() as u64,
    })
}

/// Keeps each group's workers in line with the model set: starts workers for wanted models,
/// stops idle workers of unloaded ones, health-checks them all, and records loads as they
/// finish.
pub(super) struct Keeper {
    pub(super) launch: Arc<Launch>,
    pub(super) slots: Arc<Slots>,
    pub(super) models: Arc<ModelSet>,
    pub(super) audit: Audit,
}

impl Keeper {
    pub(super) fn run(self) {
        let n = self.slots.groups() as u32;
        let mut generation = vec![0u64; n as usize];
        // Per (group, model): failed starts in a row, and when to try again.
        let mut failures: HashMap<(u32, String), (u32, Instant)> = HashMap::new();
        // Per model: why its last worker start failed (for the jobs it fails).
        let mut last_error: HashMap<String, String> = HashMap::new();
        let mut checked = Instant::now();
        while !self.slots.closed.load(Ordering::Acquire) {
            let wanted = self.models.wanted();
            let health = checked.elapsed() >= HEALTH_EVERY;
            // Models that turned warm in this round, measured once no map is locked.
            let mut warmed = Vec::new();
            // Workers out of service, dropped (killed) once no map is locked.
            let mut gone: Vec<Arc<Worker>> = Vec::new();
            // Workers that said they loaded: they take jobs once their loads are recorded.
            let mut loaded: Vec<Arc<Worker>> = Vec::new();
            if health {
                checked = Instant::now();
            }
            for group in 0..n {
                let mut map = self.slots.workers(group);
                // Unloaded models' workers go once no job runs on them (a lease is only
                // taken with this map locked, so an idle one stays idle while it goes).
                let unloaded: Vec<String> = map
                    .iter()
                    .filter(|(m, w)| !wanted.contains(m) && !w.is_busy())
                    .map(|(m, _)| m.clone())
                    .collect();
                for m in unloaded {
                    let w = map.remove(&m).expect("found above");
                    info!(group, model = %m, generation = w.generation, "model unloaded; worker stopped");
                    gone.push(w);
                }
                let mut dead = Vec::new();
                for (m, w) in map.iter() {
                    if w.is_loaded() && !health {
                        continue;
                    }
                    match w.check() {
                        Ok(()) if w.has_loaded() => {
                            if self.models.set_ready(m, group, true) {
                                warmed.push(m.clone());
                            }
                            if !w.is_loaded() {
                                loaded.push(Arc::clone(w));
                            }
                        }
                        Ok(()) => {}
                        Err(death) => dead.push((m.clone(), death)),
                    }
                }
                for (m, death) in dead {
                    let w = map.remove(&m).expect("found above");
                    self.models.set_ready(&m, group, false);
                    // Its jobs (if any) end worker-lost as its routes close.
                    if w.retire(&death) {
                        record_death(&self.slots, &self.audit, group, w.generation, &death);
                    }
                    if !w.has_loaded() {
                        last_error.insert(m.clone(), format!("its worker did not load: {death}"));
                        failures
                            .entry((group, m.clone()))
                            .or_insert((0, Instant::now()))
                            .0 += 1;
                    }
                    gone.push(w);
                }
                for m in &wanted {
                    if map.contains_key(m) {
                        continue;
                    }
                    let key = (group, m.clone());
                    if let Some((count, next)) = failures.get(&key) {
                        if *count >= LOAD_ATTEMPTS {
                            continue;
                        }
                        if Instant::now() < *next {
                            continue;
                        }
                    }
                    let Some(spec) = self.models.spec(m) else {
                        continue;
                    };
                    generation[group as usize] += 1;
                    let g = generation[group as usize];
                    let batch = self.slots.batch();
                    match Worker::start(&self.launch, m, &spec.args, group, batch, g) {
                        Ok(w) => {
                            info!(group, model = %m, generation = g, batch, pid = w.pid(), "worker started");
                            map.insert(m.clone(), Arc::new(w));
                        }
                        Err(e) => {
                            error!(group, model = %m, generation = g, error = %e, "cannot start worker");
                            last_error
                                .insert(m.clone(), format!("its worker could not start: {e}"));
                            let f = failures.entry(key).or_insert((0, Instant::now()));
                            f.0 += 1;
                            f.1 = Instant::now() + RESTART_BACKOFF;
                        }
                    }
                }
                drop(map);
            }
            drop(gone);
            for m in warmed {
                self.on_warm(&m);
            }
            for w in loaded {
                w.serve();
            }
            // A model whose workers keep failing to start: its jobs fail now, not at their
            // deadlines, and it is unloaded so another pool can be chosen.
            let given_up: Vec<String> = failures
                .iter()
                .filter(|(_, (c, _))| *c >= LOAD_ATTEMPTS)
                .map(|((_, m), _)| m.clone())
                .collect();
            for m in given_up {
                failures.retain(|(_, fm), _| *fm != m);
                error!(model = %m, "model could not be loaded; failing its jobs");
                self.models.drop_model(&m);
                let why = last_error
                    .remove(&m)
                    .unwrap_or_else(|| "its workers failed to start".into());
                self.slots.fail_model(&m, &why);
            }
            // Ready workers reset their failure counts.
            failures
                .retain(|(g, m), _| !self.slots.workers(*g).get(m).is_some_and(|w| w.is_loaded()));
            std::thread::sleep(POLL);
        }
    }

    /// A model just turned warm: measure what it takes (its file once, plus every worker's
    /// own memory) and audit the load.
    fn on_warm(&self, model: &str) {
        let file = self.models.spec(model).map_or(0, |s| s.file_bytes);
        let mut own = 0u64;
        for g in 0..self.slots.groups() as u32 {
            let pid = self.slots.workers(g).get(model).map(|w| w.pid());
            if let Some(pid) = pid {
                own = own.saturating_add(super::private_bytes(pid));
            }
        }
        let footprint = file.saturating_add(own);
        let unloaded = self
            .models
            .set_footprint(model, footprint, &self.slots.models_in_use());
        for m in unloaded {
            info!(model = %m, loaded = model, "model unloaded to keep the memory budget");
            let fields = Fields::new().model(&m).str("for_model", model);
            self.audit
                .record(events::MODEL_EVICTED, events::ACTOR_SYSTEM, fields);
        }
        let load_us = self.models.load_us(model);
        info!(model, load_ms = load_us / 1000, footprint, "model warm");
        let fields = Fields::new()
            .model(model)
            .num("load_us", load_us)
            .num("footprint_bytes", footprint);
        self.audit
            .record(events::MODEL_LOADED, events::ACTOR_SYSTEM, fields);
    }
}
