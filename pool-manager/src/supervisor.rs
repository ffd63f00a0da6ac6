//! Worker supervision: one OS thread per slot running the jobs queued on that slot, on worker
//! processes each shared by a *group* of `batch` slots.
//!
//! Each slot has a queue (`Mutex<VecDeque>` + `Condvar`) kept sorted by the queen's `order` key,
//! ties in arrival order: when the slot frees, the waiting job with the smallest `order` runs
//! next (a running job is never preempted). The queen's reservation ledger predicts exactly this,
//! so nothing else reorders here (no priorities of our own, no work stealing between slots). A
//! slot holds at most 1 running + `per_slot` waiting jobs; the queen's credits keep it under that.
//!
//! Slot `s` belongs to group `s / batch`. A group keeps one worker process per wanted model,
//! started with `--batch <batch>`: the worker runs up to `batch` jobs at once, each slot of the
//! group running its own job on it beside its siblings (nobody takes the worker for itself). The
//! queen still sees slots that run one job at a time; with `--batch 1` a group is one slot and
//! its worker runs one job, as before batching. A slot thread waits on its job's responses, which
//! the worker's reader thread routes to it by `seq` (`worker.rs`); when idle it waits on its
//! queue's condvar with a timeout. Every lane request is MACed over all its fields with a `seq`
//! that only rises, claimed and pushed under one lock per worker (the worker refuses a seq not
//! above the last it took). A worker that exits, stops beating or corrupts a lane is killed and
//! replaced by a fresh process on a new generation, whose lanes reject anything the old
//! incarnation wrote; every job running on it fails UNAVAILABLE (worker lost), and so do the jobs
//! queued behind them, so the queen can place them elsewhere rather than wait for a reload.
//!
//! A pool serves a set of models (`models::ModelSet`, whose readiness is per group): a warm
//! model's job starts at once, and every worker of a model maps one copy of its weights
//! read-only. The *keeper* thread (`keeper.rs`) starts the workers of models being loaded, stops
//! idle workers of unloaded models (a worker with a job or warm-up on it is busy and stays),
//! health-checks every worker, and tells the model set when a model turned warm. A head job
//! whose model is still loading waits (the queen predicted its start after the load); nothing
//! else passes it.
//!
//! At start, every model is loaded once in turn (`keeper::measure_models`): its load time, its
//! memory and, through `batch` warm-up jobs run at once on group 0's worker, its speed at full
//! batch, which membership sends to the queen.
//!
//! Lock order (never the other way round): a slot's queue, then its group's worker map, then a
//! worker's request `seq`, then its routes; the model set's lock after a worker map. A worker's
//! process handle is a leaf. Cancels push their request after the queue lock is released.

mod keeper;
mod requests;
mod slot;
mod worker;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use skep_common::deadline::Deadline;
use skep_common::sampling::Sampling;
use skep_common::validate;
use skep_lane::LaneConfig;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::audit::{Audit, events};
use crate::models::{ModelSet, ModelSpec};
use crate::{Error, Event, Sink, Speed};
use requests::Ticket;
use skep_audit::Fields;
use slot::{Cancelled, Next, Slot};
use worker::{Death, LaneJob, Lease, Worker};

/// Jobs one worker runs at once unless `--batch` says otherwise (slots per worker group).
pub const DEFAULT_BATCH: u16 = 4;
/// Prompt tokens a batched worker runs per step unless `--prefill-chunk` says otherwise.
pub const DEFAULT_PREFILL_CHUNK: u32 = 128;

/// gRPC status code DEADLINE_EXCEEDED, as carried in lane errors.
const CODE_DEADLINE_EXCEEDED: i32 = 4;
/// How often the keeper checks that every worker still lives, and an idle slot looks at its
/// queue.
const HEALTH_EVERY: Duration = Duration::from_millis(250);
/// A worker whose heartbeat is older than this is considered hung.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a new worker gets to load its model before it must beat.
const STARTUP_GRACE: Duration = Duration::from_secs(120);
/// How long a worker gets to acknowledge a cancel before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// How far past the deadline a worker may stay silent on a job before it is killed.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);
/// Pause between failed worker starts.
const RESTART_BACKOFF: Duration = Duration::from_millis(500);
/// How long a job waits for a response before liveness, cancel and deadline are re-checked.
const POLL: Duration = Duration::from_millis(20);

// Every request that passes validation fits the default lane entry; `spawn_slots` checks the
// lane the pool was actually given.
const _: () = assert!(
    validate::MAX_LANE_REQUEST_BYTES <= skep_lane::DEFAULT_MAX_ENTRY as usize,
    "the default lane entry cannot hold the largest valid request"
);

/// Checks that a lane of `cfg` is well formed and holds the largest request validation admits:
/// a smaller one would turn a valid job into a lost worker.
pub fn check_lane_config(cfg: &LaneConfig) -> Result<(), String> {
    cfg.validate().map_err(|e| e.to_string())?;
    if (cfg.max_entry as usize) < validate::MAX_LANE_REQUEST_BYTES {
        return Err(format!(
            "lane max_entry {} is below the largest valid request ({} bytes)",
            cfg.max_entry,
            validate::MAX_LANE_REQUEST_BYTES
        ));
    }
    Ok(())
}

/// How to start a worker process of a one-model pool (`spawn_slots`). Engine flags only:
/// secrets never go through argv. Its lanes are sealed memfds handed over by fd, so they have no
/// path.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub lane: LaneConfig,
    /// The model the workers serve (named in the warm-up request).
    pub model: String,
}

/// How to start any worker of a pool: the binary, its lanes and its batching flags; the engine
/// flags come from the model set, the batch from the slots.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub lane: LaneConfig,
    /// Prompt tokens per step of a batched worker (`--prefill-chunk`).
    pub prefill_chunk: u32,
}

/// A job accepted from a session, waiting in (or at the head of) a slot's queue.
#[derive(Debug)]
pub struct QueuedJob {
    /// The session it came from, and its handle there: what cancels name.
    pub session: u64,
    pub handle: u64,
    /// The queen's sort key for the slot's waiting jobs (smallest runs first).
    pub order: u64,
    pub job_id: String,
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
    /// How the worker picks tokens (checked by `validate::sampling` at admission).
    pub sampling: Sampling,
    pub deadline: Deadline,
    /// When its frame arrived: `pool_us` is measured from here.
    pub arrived: Instant,
    pub events: Sink,
}

impl QueuedJob {
    /// The model this job needs loaded.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Sends one event to the job's session; false once the session is gone.
    fn send(&self, event: Event) -> bool {
        self.events.send((self.handle, event)).is_ok()
    }
}

/// All slots of this pool: what the sessions queue jobs on and cancel them through.
pub struct Slots {
    slots: Vec<Slot>,
    /// Slots per worker group: slot `s` runs its jobs on group `s / batch`'s workers.
    batch: usize,
    /// Per group, its workers by model. A worker stays here while jobs run on it (they hold
    /// leases); it leaves when it is retired or its model unloaded.
    workers: Vec<Mutex<HashMap<String, Arc<Worker>>>>,
    per_slot: u32,
    /// Set by `close`: also stops the warm-up jobs, which no session can cancel.
    closed: AtomicBool,
    /// Slots whose group has a worker up (loaded, not since retired): the pool's health
    /// follows it.
    workers_up: watch::Sender<u32>,
    /// Where worker replacements are counted, once metrics are attached.
    counters: OnceLock<WorkerCounters>,
}

/// What the slot threads count for the pool's metrics.
#[derive(Debug, Clone, Default)]
pub struct WorkerCounters {
    /// Workers replaced after they died, hung or broke a lane.
    pub restarts: Counter,
    /// Of those, workers whose lane was corrupt.
    pub lane_corruptions: Counter,
}

// === impl Slots ===

impl Slots {
    /// `count` slots, one worker each (no batching), each slot holding at most 1 running +
    /// `per_slot` waiting jobs.
    pub fn new(count: usize, per_slot: u32) -> Arc<Slots> {
        Slots::batched(count, 1, per_slot)
    }

    /// `workers × batch` slots: `workers` groups of `batch` slots, each group sharing one
    /// worker process per model that runs `batch` jobs at once.
    pub fn batched(workers: usize, batch: usize, per_slot: u32) -> Arc<Slots> {
        let batch = batch.max(1);
        Arc::new(Slots {
            slots: (0..workers * batch).map(|_| Slot::default()).collect(),
            batch,
            workers: (0..workers).map(|_| Mutex::new(HashMap::new())).collect(),
            per_slot,
            closed: AtomicBool::new(false),
            workers_up: watch::Sender::new(0),
            counters: OnceLock::new(),
        })
    }

    /// Follows how many slots have a worker up.
    pub fn workers_up(&self) -> watch::Receiver<u32> {
        self.workers_up.subscribe()
    }

    /// Counts worker replacements into `counters` from now on (once).
    pub fn count_workers_into(&self, counters: WorkerCounters) {
        let _ = self.counters.set(counters);
    }

    pub fn count(&self) -> usize {
        self.slots.len()
    }

    /// Slots per worker group: the jobs each worker runs at once.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Worker groups: workers per model.
    pub fn groups(&self) -> usize {
        self.workers.len()
    }

    /// Credits: waiting jobs a slot accepts beyond the running one.
    pub fn per_slot(&self) -> u32 {
        self.per_slot
    }

    fn limit(&self) -> usize {
        1 + self.per_slot as usize
    }

    fn group_of(&self, slot: u32) -> u32 {
        slot / self.batch as u32
    }

    /// Queues `job` on `slot`, in `order` among that slot's waiting jobs.
    pub fn enqueue(&self, slot: u32, job: QueuedJob) -> Result<(), Error> {
        let Some(s) = self.slots.get(slot as usize) else {
            return Err(Error::NoSuchSlot {
                slot,
                slots: self.slots.len(),
            });
        };
        s.push(slot, job, self.limit())
    }

    /// A `CancelFrame`: a queued job ends CANCELLED at once; a running one when its worker
    /// stops. An unknown handle (already finished, never sent) is ignored.
    pub fn cancel(&self, session: u64, handle: u64) {
        for s in &self.slots {
            match s.cancel(session, handle) {
                Some(Cancelled::Queued(job)) => {
                    job.send(Event::Failed {
                        error: Error::Cancelled,
                        tokens: 0,
                    });
                    return;
                }
                Some(Cancelled::Running(ticket)) => {
                    ticket.cancel();
                    return;
                }
                None => {}
            }
        }
    }

    /// The session is gone: drop its queued jobs and cancel its running ones.
    pub fn cancel_session(&self, session: u64) -> usize {
        let mut n = 0;
        for s in &self.slots {
            let (count, running) = s.cancel_session(session);
            n += count;
            if let Some(ticket) = running {
                ticket.cancel();
            }
        }
        n
    }

    /// Models with a job running or queued at this pool: never unloaded.
    pub fn models_in_use(&self) -> HashSet<String> {
        let mut set = HashSet::new();
        for s in &self.slots {
            s.models_in_use(&mut set);
        }
        set
    }

    /// Fails every queued job of `model` with `error` (its load failed).
    fn fail_model(&self, model: &str, why: &str) {
        for s in &self.slots {
            for job in s.drain_model(model) {
                let error = Error::LoadFailed {
                    model: model.to_owned(),
                    why: why.to_owned(),
                };
                job.send(Event::Failed { error, tokens: 0 });
            }
        }
    }

    fn workers(&self, group: u32) -> MutexGuard<'_, HashMap<String, Arc<Worker>>> {
        self.workers[group as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Leases `group`'s loaded worker for `model`, if it has one.
    fn lease(&self, group: u32, model: &str) -> Option<Lease> {
        let map = self.workers(group);
        map.get(model).filter(|w| w.is_loaded()).map(Lease::new)
    }

    /// Takes a broken worker out of service: killed, out of its group's map (the keeper starts
    /// its successor), counted and, for a corrupt lane, audited. Every job on it then ends
    /// worker-lost. Only the first of the worker's users to find it dead does this.
    fn retire(&self, w: &Worker, death: &Death, models: &ModelSet, audit: &Audit) {
        if !w.retire(death) {
            return;
        }
        models.set_ready(&w.model, w.group, false);
        let gone = {
            let mut map = self.workers(w.group);
            if map
                .get(&w.model)
                .is_some_and(|m| m.generation == w.generation)
            {
                map.remove(&w.model)
            } else {
                None
            }
        };
        // Dropped outside the map's lock (a last reference joins its reader).
        drop(gone);
        record_death(self, audit, w.group, w.generation, death);
    }

    /// Slots with nothing running and nothing queued (reported in heartbeats).
    pub fn idle(&self) -> u32 {
        self.slots.iter().filter(|s| s.load() == 0).count() as u32
    }

    /// Stops accepting jobs and cancels running ones; the slot threads then exit.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for s in &self.slots {
            if let Some(ticket) = s.close() {
                ticket.cancel();
            }
        }
    }
}

/// The slot threads and the keeper; `shutdown` stops them and their workers.
pub struct Supervisor {
    slots: Arc<Slots>,
    threads: Vec<JoinHandle<()>>,
}

impl Supervisor {
    /// Closes every slot (queued jobs are answered UNAVAILABLE, running ones cancelled) and
    /// waits for the threads; then the workers are killed.
    pub fn shutdown(self) {
        self.slots.close();
        for t in self.threads {
            let _ = t.join();
        }
        for g in 0..self.slots.groups() as u32 {
            let workers: Vec<_> = self.slots.workers(g).drain().collect();
            // Killed as they drop, outside the map's lock.
            drop(workers);
        }
    }
}

/// Starts a one-model pool: `spec`'s model on every slot of `slots`, measured at start.
pub fn spawn_slots(
    spec: Arc<WorkerSpec>,
    slots: Arc<Slots>,
    speed: Arc<Speed>,
    audit: Audit,
) -> std::io::Result<Supervisor> {
    let models = Arc::new(ModelSet::new(
        vec![ModelSpec {
            name: spec.model.clone(),
            args: spec.args.clone(),
            file_bytes: 0,
        }],
        0,
        slots.groups(),
    ));
    let launch = Launch {
        program: spec.program.clone(),
        lane: spec.lane,
        prefill_chunk: DEFAULT_PREFILL_CHUNK,
    };
    spawn_pool(launch, models, slots, speed, audit)
}

/// Starts one thread per slot of `slots`, the keeper, and the start-up measurement of every
/// model (whose end `speed` announces). `models` counts readiness per worker group
/// (`slots.groups()`).
pub fn spawn_pool(
    launch: Launch,
    models: Arc<ModelSet>,
    slots: Arc<Slots>,
    speed: Arc<Speed>,
    audit: Audit,
) -> std::io::Result<Supervisor> {
    check_lane_config(&launch.lane)
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
    let launch = Arc::new(launch);
    let mut threads = Vec::with_capacity(slots.count() + 2);
    for slot in 0..slots.count() as u32 {
        let thread = SlotThread {
            slot,
            group: slots.group_of(slot),
            slots: Arc::clone(&slots),
            models: Arc::clone(&models),
            audit: audit.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("slot-{slot}"))
            .spawn(move || thread.run())?;
        threads.push(handle);
    }
    let keeper = keeper::Keeper {
        launch,
        slots: Arc::clone(&slots),
        models: Arc::clone(&models),
        audit: audit.clone(),
    };
    threads.push(
        std::thread::Builder::new()
            .name("worker-keeper".into())
            .spawn(move || keeper.run())?,
    );
    let (s, m) = (Arc::clone(&slots), models);
    threads.push(
        std::thread::Builder::new()
            .name("model-measure".into())
            .spawn(move || keeper::measure_models(&s, &m, &speed, &audit))?,
    );
    Ok(Supervisor { slots, threads })
}

/// Counts a lost worker (idle or mid-job) for the metrics and audits a corrupt lane; its
/// successor is started by the keeper.
fn record_death(slots: &Slots, audit: &Audit, group: u32, generation: u64, death: &Death) {
    if let Some(c) = slots.counters.get() {
        c.restarts.inc();
        if matches!(death, Death::Lane(_)) {
            c.lane_corruptions.inc();
        }
    }
    if let Death::Lane(why) = death {
        let fields = Fields::new()
            .num("group", u64::from(group))
            .num("generation", generation)
            .reason(why);
        audit.record(events::LANE_CORRUPT, events::ACTOR_SYSTEM, fields);
    }
    warn!(group, generation, reason = %death, "restarting worker");
}

/// A process's own memory: its anonymous pages (heap, KV cache, repacked tensors), not the
/// file pages it shares with the other workers of its model. 0 when unreadable.
pub fn private_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("Anonymous:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

struct SlotThread {
    slot: u32,
    group: u32,
    slots: Arc<Slots>,
    models: Arc<ModelSet>,
    audit: Audit,
}

impl SlotThread {
    fn queue(&self) -> &Slot {
        &self.slots.slots[self.slot as usize]
    }

    fn run(self) {
        let slot = self.slot;
        let mut up = false;
        loop {
            // Health follows whether this slot's group has any worker ready.
            let any_ready = self
                .slots
                .workers(self.group)
                .values()
                .any(|w| w.is_loaded());
            if any_ready != up {
                up = any_ready;
                self.slots
                    .workers_up
                    .send_modify(|n| *n = if up { *n + 1 } else { n.saturating_sub(1) });
            }
            let next = self
                .queue()
                .next(HEALTH_EVERY, |model| self.slots.lease(self.group, model));
            match next {
                Next::Closed => break,
                Next::Idle => {}
                Next::Expired(job) => {
                    let error = Error::LateArrival;
                    self.queue()
                        .finish(&job, Event::Failed { error, tokens: 0 });
                }
                Next::Job(job, ticket, w) => {
                    self.models.touch(&job.model);
                    let (terminal, death) = self.run_job(&w, &job, &ticket);
                    if let Event::Finished { first_token_us, .. } = &terminal {
                        self.models.observe_first_token(&job.model, *first_token_us);
                    }
                    self.queue().finish(&job, terminal);
                    if let Some(death) = death {
                        // Whoever finds it first retires it; every slot whose job it lost
                        // fails the jobs queued behind.
                        self.slots.retire(&w, &death, &self.models, &self.audit);
                        drop(w);
                        self.fail_queued(&death.to_string());
                    }
                }
            }
        }
        self.fail_queued("the pool manager is shutting down");
        if up {
            self.slots
                .workers_up
                .send_modify(|n| *n = n.saturating_sub(1));
        }
        debug!(slot, "slot thread stopped");
    }

    /// Runs one session job, forwarding its events; returns its terminal event and why the
    /// worker must be replaced, if it must.
    fn run_job(&self, w: &Worker, job: &QueuedJob, ticket: &Ticket) -> (Event, Option<Death>) {
        let mut emit = |e: Event| job.send(e);
        let req = LaneJob {
            job_id: &job.job_id,
            model: &job.model,
            prompt: &job.prompt,
            max_tokens: job.max_tokens,
            sampling: job.sampling,
            deadline: job.deadline,
            arrived: job.arrived,
        };
        w.run(self.slot, ticket, &req, &self.slots.closed, &mut emit)
    }

    fn fail_queued(&self, why: &str) {
        for job in self.queue().drain() {
            let error = if self.queue().is_closed() {
                Error::ShuttingDown
            } else {
                Error::WorkerLost(format!("slot {}: {why}", self.slot))
            };
            job.send(Event::Failed { error, tokens: 0 });
        }
    }
}

#[cfg(test)]
mod tests;
