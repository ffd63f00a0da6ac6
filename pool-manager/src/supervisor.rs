//! Worker supervision: one OS thread per slot, owning its worker process, its two lanes and the
//! run of every job queued on that slot.
//!
//! Each slot has a queue (`Mutex<VecDeque>` + `Condvar`) kept sorted by the queen's `order` key,
//! ties in arrival order: when the slot frees, the waiting job with the smallest `order` runs
//! next (a running job is never preempted). The queen's reservation ledger predicts exactly this,
//! so nothing else reorders here (no priorities of our own, no work stealing between slots). A
//! slot holds at most 1 running + `per_slot` waiting jobs; the queen's credits keep it under that.
//!
//! The thread blocks on its lane (and on the queue's condvar with a timeout when idle, so the
//! idle worker is still health-checked every 250 ms): no async runtime, `spawn_blocking` or
//! per-job channel on the hot path. A job's events go straight into its session's outbound
//! `Sink`. Lanes are sealed memfds passed to the worker by fd, so the worker cannot resize them
//! under this process, and every lane request is MACed over all its fields with a `seq` that
//! only rises. A worker that exits, stops beating or corrupts a lane is killed and replaced by a fresh
//! process on a new generation, whose lanes reject anything the old incarnation wrote; the job it
//! held and the jobs queued behind it fail UNAVAILABLE, so the queen can place them elsewhere
//! rather than wait for a model to reload.
//!
//! A pool serves a set of models (`models::ModelSet`): each slot keeps one worker per wanted
//! model, so a warm model's job starts at once and N slots of one model cost one copy of its
//! weights (mapped read-only by every worker) plus N workers' own memory. The *keeper* thread
//! starts the workers of models being loaded, stops those of unloaded models, health-checks idle
//! workers and tells the model set when a model turned warm (its load is then timed and its
//! memory measured). A slot thread takes the worker of its head job's model while it runs the
//! job; a head job whose model is still loading waits (the queen predicted its start after the
//! load), nothing else passes it.
//!
//! At start, every model is loaded once in turn (`measure_models`): its load time, its memory
//! and, through one warm-up job on slot 0, its speed, which membership sends to the queen.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prost::Message;
use skep_common::deadline::{Deadline, micros};
use skep_common::sampling::Sampling;
use skep_common::secret::Secret;
use skep_common::session;
use skep_common::validate;
use skep_lane::{Lane, LaneConfig, LaneError, monotonic_ns};
use skep_proto::v1::{LaneRequest, LaneResponse, lane_response};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::audit::{Audit, events};
use crate::models::{ModelSet, ModelSpec};
use crate::{Error, Event, Figures, Sink, Speed};
use skep_audit::Fields;

/// gRPC status code DEADLINE_EXCEEDED, as carried in lane errors.
const CODE_DEADLINE_EXCEEDED: i32 = 4;
/// How often an idle slot checks that its worker still lives.
const HEALTH_EVERY: Duration = Duration::from_millis(250);
/// A worker whose heartbeat is older than this is considered hung.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a new worker gets to load its model before it must beat.
const STARTUP_GRACE: Duration = Duration::from_secs(120);
/// How long a worker gets to acknowledge a cancel before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// How far past the deadline a worker may stay silent before it is killed.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);
/// Pause between failed worker starts.
const RESTART_BACKOFF: Duration = Duration::from_millis(500);
/// How long a response read blocks before liveness, cancel and deadline are re-checked.
const POLL: Duration = Duration::from_millis(20);
/// The warm-up job: short, on the real path, generous deadline (a gguf model may still load).
const WARM_UP_PROMPT: &str = "warm-up";
const WARM_UP_TOKENS: u32 = 8;
const WARM_UP_DEADLINE: Duration = Duration::from_secs(120);
/// Warm-ups tried (one per worker generation) before slot 0 gives up measuring.
const WARM_UP_ATTEMPTS: u32 = 3;

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

/// How to start any worker of a pool: the binary and its lanes; the engine flags come from the
/// model set.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub lane: LaneConfig,
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
}

impl QueuedJob {
    /// Sends one event to the job's session; false once the session is gone.
    fn send(&self, event: Event) -> bool {
        self.events.send((self.handle, event)).is_ok()
    }
}

/// The job a slot's worker is running, as seen by cancels.
#[derive(Debug)]
struct Running {
    session: u64,
    handle: u64,
    model: String,
    seq: u64,
    requests: Arc<Lane>,
    cancelled: Arc<AtomicBool>,
}

impl Running {
    /// Asks the worker to stop (lane cancel word) and tells the slot thread why it stops.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.requests.request_cancel(self.seq);
    }
}

#[derive(Debug, Default)]
struct SlotState {
    queue: VecDeque<QueuedJob>,
    running: Option<Running>,
    closed: bool,
}

/// One slot's queue, shared by the sessions (producers, cancels) and the slot's thread.
#[derive(Debug, Default)]
pub struct Slot {
    state: Mutex<SlotState>,
    wake: Condvar,
}

/// What the slot thread gets from its queue.
#[derive(Debug)]
enum Next<W = Worker> {
    /// The head job, now recorded as running on the worker taken for it.
    Job(QueuedJob, Arc<AtomicBool>, W),
    /// The head job, past its deadline before a worker took it.
    Expired(QueuedJob),
    /// Nothing arrived within the wait, or the head job's model is not ready yet.
    Idle,
    Closed,
}

// === impl Slot ===

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic elsewhere must not take the queue down with it: the state stays consistent
        // (every mutation is a single push/pop/assignment).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job` behind every waiting job with an `order` no larger than its own (so equal
    /// keys keep arrival order); refused once the slot holds `limit` jobs (running one
    /// included).
    fn push(&self, slot: u32, job: QueuedJob, limit: usize) -> Result<(), Error> {
        let mut st = self.lock();
        if st.closed {
            return Err(Error::ShuttingDown);
        }
        let same = |s: u64, h: u64| s == job.session && h == job.handle;
        if st.queue.iter().any(|q| same(q.session, q.handle))
            || st
                .running
                .as_ref()
                .is_some_and(|r| same(r.session, r.handle))
        {
            return Err(Error::DuplicateHandle(job.handle));
        }
        if st.queue.len() + usize::from(st.running.is_some()) >= limit {
            return Err(Error::SlotFull { slot, limit });
        }
        let at = st.queue.partition_point(|q| q.order <= job.order);
        st.queue.insert(at, job);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Cancels one job: a queued one is removed and returned (to be answered CANCELLED), a
    /// running one gets the lane cancel. False if the slot has no such job.
    fn cancel(&self, session: u64, handle: u64) -> Option<Cancelled> {
        let mut st = self.lock();
        if let Some(i) = st
            .queue
            .iter()
            .position(|q| q.session == session && q.handle == handle)
        {
            return st.queue.remove(i).map(Cancelled::Queued);
        }
        match &st.running {
            Some(r) if r.session == session && r.handle == handle => {
                r.cancel();
                Some(Cancelled::Running)
            }
            _ => None,
        }
    }

    /// Drops every queued job of `session` (nobody is left to tell) and cancels its running
    /// one. Returns how many jobs were touched.
    fn cancel_session(&self, session: u64) -> usize {
        let mut st = self.lock();
        let before = st.queue.len();
        st.queue.retain(|q| q.session != session);
        let mut n = before - st.queue.len();
        if let Some(r) = st.running.as_ref().filter(|r| r.session == session) {
            r.cancel();
            n += 1;
        }
        n
    }

    /// Takes every queued job out (worker lost, shutting down).
    fn drain(&self) -> Vec<QueuedJob> {
        self.lock().queue.drain(..).collect()
    }

    /// Waits up to `wait` for a job whose model has a ready worker here (`take` hands it
    /// over); the job returned is recorded as running on that worker's next `seq`, so a cancel
    /// can reach it from now on. Only the head job is considered: the queen predicted this
    /// order, loads included.
    fn next<W: Claim>(&self, wait: Duration, take: impl FnOnce(&str) -> Option<W>) -> Next<W> {
        let mut st = self.lock();
        if st.queue.is_empty() && !st.closed {
            st = self
                .wake
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if st.closed {
            return Next::Closed;
        }
        let Some(head) = st.queue.front() else {
            return Next::Idle;
        };
        if head.deadline.is_expired() {
            let job = st.queue.pop_front().expect("head present");
            return Next::Expired(job);
        }
        let Some(mut worker) = take(&head.model) else {
            // Its model is still loading: look again after a short wait.
            drop(st);
            std::thread::sleep(POLL);
            return Next::Idle;
        };
        let job = st.queue.pop_front().expect("head present");
        let (requests, seq) = worker.claim();
        let cancelled = Arc::new(AtomicBool::new(false));
        st.running = Some(Running {
            session: job.session,
            handle: job.handle,
            model: job.model.clone(),
            seq,
            requests,
            cancelled: Arc::clone(&cancelled),
        });
        Next::Job(job, cancelled, worker)
    }

    /// Models of the jobs running or queued here.
    fn models_in_use(&self, into: &mut HashSet<String>) {
        let st = self.lock();
        into.extend(st.queue.iter().map(|q| q.model.clone()));
        if let Some(r) = &st.running {
            into.insert(r.model.clone());
        }
    }

    /// Takes out the queued jobs of `model` (its load failed).
    fn drain_model(&self, model: &str) -> Vec<QueuedJob> {
        let mut st = self.lock();
        let (gone, kept): (VecDeque<_>, VecDeque<_>) =
            st.queue.drain(..).partition(|q| q.model == model);
        st.queue = kept;
        gone.into()
    }

    /// The running job is over: clear it *before* its terminal event leaves, so a queen that
    /// sends the next frame on seeing that event never finds the slot still full.
    fn finish(&self, job: &QueuedJob, terminal: Event) {
        self.lock().running = None;
        job.send(terminal);
    }

    /// Jobs queued or running: 0 means the slot is idle.
    fn load(&self) -> usize {
        let st = self.lock();
        st.queue.len() + usize::from(st.running.is_some())
    }

    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        if let Some(r) = &st.running {
            r.cancel();
        }
        drop(st);
        self.wake.notify_all();
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// A worker a job is about to run on: its next request `seq` and the lane a cancel writes to.
trait Claim {
    fn claim(&mut self) -> (Arc<Lane>, u64);
}

impl Claim for Worker {
    fn claim(&mut self) -> (Arc<Lane>, u64) {
        self.seq += 1;
        (Arc::clone(&self.requests), self.seq)
    }
}

/// What `Slot::cancel` found.
#[derive(Debug)]
enum Cancelled {
    Queued(QueuedJob),
    Running,
}

/// All slots of this pool: what the sessions queue jobs on and cancel them through.
pub struct Slots {
    slots: Vec<Slot>,
    /// Per slot, its idle workers by model (a running job's worker is out, with its thread).
    /// Lock order: a slot's queue before its map, never the other way round.
    workers: Vec<Mutex<HashMap<String, Worker>>>,
    per_slot: u32,
    /// Set by `close`: also stops the warm-up job, which no session can cancel.
    closed: AtomicBool,
    /// Slots whose worker is up (its heartbeat seen, not since retired): the pool's health
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
    /// `count` slots, each holding at most 1 running + `per_slot` waiting jobs.
    pub fn new(count: usize, per_slot: u32) -> Arc<Slots> {
        Arc::new(Slots {
            slots: (0..count).map(|_| Slot::default()).collect(),
            workers: (0..count).map(|_| Mutex::new(HashMap::new())).collect(),
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

    /// Credits: waiting jobs a slot accepts beyond the running one.
    pub fn per_slot(&self) -> u32 {
        self.per_slot
    }

    fn limit(&self) -> usize {
        1 + self.per_slot as usize
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
                Some(Cancelled::Running) => return,
                None => {}
            }
        }
    }

    /// The session is gone: drop its queued jobs and cancel its running ones.
    pub fn cancel_session(&self, session: u64) -> usize {
        self.slots.iter().map(|s| s.cancel_session(session)).sum()
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

    fn workers(&self, slot: u32) -> MutexGuard<'_, HashMap<String, Worker>> {
        self.workers[slot as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Slots with nothing running and nothing queued (reported in heartbeats).
    pub fn idle(&self) -> u32 {
        self.slots.iter().filter(|s| s.load() == 0).count() as u32
    }

    /// Stops accepting jobs and cancels running ones; the slot threads then exit.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for s in &self.slots {
            s.close();
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
    /// waits for the threads, whose workers are killed as they exit.
    pub fn shutdown(self) {
        self.slots.close();
        for t in self.threads {
            let _ = t.join();
        }
        // Idle workers are killed as they drop.
        for s in 0..self.slots.count() as u32 {
            self.slots.workers(s).clear();
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
        slots.count(),
    ));
    let launch = Launch {
        program: spec.program.clone(),
        lane: spec.lane,
    };
    spawn_pool(launch, models, slots, speed, audit)
}

/// Starts one thread per slot of `slots`, the keeper, and the start-up measurement of every
/// model (whose end `speed` announces).
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
            slots: Arc::clone(&slots),
            models: Arc::clone(&models),
            audit: audit.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("slot-{slot}"))
            .spawn(move || thread.run())?;
        threads.push(handle);
    }
    let keeper = Keeper {
        launch,
        slots: Arc::clone(&slots),
        models: Arc::clone(&models),
        audit,
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
            .spawn(move || measure_models(&s, &m, &speed))?,
    );
    Ok(Supervisor { slots, threads })
}

/// Loads every model once, last first (so that with a tight budget the first one named ends
/// warm), waits until it is warm, runs one warm-up job on slot 0 and records its figures; then
/// publishes the first model's figures, which membership waits for before registering.
fn measure_models(slots: &Slots, models: &ModelSet, speed: &Speed) {
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
            let Some(mut w) = wait_for_worker(slots, models, 0, name) else {
                break;
            };
            let (f, death) = warm_up(&mut w, name, &slots.closed);
            match death {
                Some(death) => {
                    warn!(model = %name, reason = %death, "worker lost during warm-up");
                    models.set_ready(name, 0, false);
                }
                None => {
                    slots.workers(0).insert(name.clone(), w);
                }
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

/// Takes `slot`'s ready worker for `model` out of the pool, waiting while it loads.
fn wait_for_worker(slots: &Slots, models: &ModelSet, slot: u32, model: &str) -> Option<Worker> {
    let begun = Instant::now();
    loop {
        if slots.closed.load(Ordering::Acquire)
            || !models.is_wanted(model)
            || begun.elapsed() > STARTUP_GRACE
        {
            return None;
        }
        {
            let mut map = slots.workers(slot);
            if map.get(model).is_some_and(|w| w.loaded) {
                return map.remove(model);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Keeps each slot's workers in line with the model set: starts workers for wanted models,
/// stops those of unloaded ones, health-checks the idle ones, and records loads as they finish.
struct Keeper {
    launch: Arc<Launch>,
    slots: Arc<Slots>,
    models: Arc<ModelSet>,
    audit: Audit,
}

/// Worker starts a model may fail in a row before its jobs are failed and it is unloaded.
const LOAD_ATTEMPTS: u32 = 3;

impl Keeper {
    fn run(self) {
        let n = self.slots.count() as u32;
        let mut generation = vec![0u64; n as usize];
        // Per (slot, model): failed starts in a row, and when to try again.
        let mut failures: HashMap<(u32, String), (u32, Instant)> = HashMap::new();
        // Per model: why its last worker start failed (for the jobs it fails).
        let mut last_error: HashMap<String, String> = HashMap::new();
        let mut checked = Instant::now();
        while !self.slots.closed.load(Ordering::Acquire) {
            let wanted = self.models.wanted();
            let health = checked.elapsed() >= HEALTH_EVERY;
            // Models that turned warm in this round, measured once no map is locked.
            let mut warmed = Vec::new();
            if health {
                checked = Instant::now();
            }
            for slot in 0..n {
                // The running job's worker is out of the map: not started twice. Read before
                // the map is locked: the slot thread locks its queue, then the map.
                let running = self.slots.slots[slot as usize]
                    .lock()
                    .running
                    .as_ref()
                    .map(|r| r.model.clone());
                let mut map = self.slots.workers(slot);
                // Unloaded models' idle workers go (a running one goes when its job ends).
                map.retain(|m, w| {
                    let keep = wanted.contains(m);
                    if !keep {
                        info!(slot, model = %m, generation = w.generation, "model unloaded; worker stopped");
                    }
                    keep
                });
                let mut dead = Vec::new();
                for (m, w) in map.iter_mut() {
                    if w.loaded && !health {
                        continue;
                    }
                    match w.check().and_then(|()| w.poll_loaded()) {
                        Ok(true) => {
                            if self.models.set_ready(m, slot, true) {
                                warmed.push(m.clone());
                            }
                        }
                        Ok(false) => {}
                        Err(death) => dead.push((m.clone(), death)),
                    }
                }
                for (m, death) in dead {
                    let w = map.remove(&m).expect("found above");
                    self.models.set_ready(&m, slot, false);
                    record_death(&self.slots, &self.audit, slot, w.generation, &death);
                    if !w.loaded {
                        last_error.insert(m.clone(), format!("its worker did not load: {death}"));
                        failures
                            .entry((slot, m.clone()))
                            .or_insert((0, Instant::now()))
                            .0 += 1;
                    }
                }
                for m in &wanted {
                    if map.contains_key(m) || running.as_deref() == Some(m.as_str()) {
                        continue;
                    }
                    let key = (slot, m.clone());
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
                    generation[slot as usize] += 1;
                    let g = generation[slot as usize];
                    match Worker::start(&self.launch, &spec.args, slot, g) {
                        Ok(w) => {
                            info!(slot, model = %m, generation = g, pid = w.child.id(), "worker started");
                            map.insert(m.clone(), w);
                        }
                        Err(e) => {
                            error!(slot, model = %m, generation = g, error = %e, "cannot start worker");
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
            for m in warmed {
                self.on_warm(&m);
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
            failures.retain(|(s, m), _| !self.slots.workers(*s).get(m).is_some_and(|w| w.loaded));
            std::thread::sleep(POLL);
        }
    }

    /// A model just turned warm: measure what it takes (its file once, plus every worker's
    /// own memory) and audit the load.
    fn on_warm(&self, model: &str) {
        let file = self.models.spec(model).map_or(0, |s| s.file_bytes);
        let mut own = 0u64;
        for s in 0..self.slots.count() as u32 {
            if let Some(w) = self.slots.workers(s).get(model) {
                own = own.saturating_add(private_bytes(w.child.id()));
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

/// Counts a lost worker (idle or mid-job) for the metrics and audits a corrupt lane; its
/// successor is started by the keeper.
fn record_death(slots: &Slots, audit: &Audit, slot: u32, generation: u64, death: &Death) {
    if let Some(c) = slots.counters.get() {
        c.restarts.inc();
        if matches!(death, Death::Lane(_)) {
            c.lane_corruptions.inc();
        }
    }
    if let Death::Lane(why) = death {
        let fields = Fields::new()
            .num("slot", u64::from(slot))
            .num("generation", generation)
            .reason(why);
        audit.record(events::LANE_CORRUPT, events::ACTOR_SYSTEM, fields);
    }
    warn!(slot, generation, reason = %death, "restarting worker");
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
            // Health follows whether this slot has any worker ready.
            let any_ready = self.slots.workers(slot).values().any(|w| w.loaded);
            if any_ready != up {
                up = any_ready;
                self.slots
                    .workers_up
                    .send_modify(|n| *n = if up { *n + 1 } else { n.saturating_sub(1) });
            }
            let next = self.queue().next(HEALTH_EVERY, |model| {
                let mut map = self.slots.workers(slot);
                if map.get(model).is_some_and(|w| w.loaded) {
                    map.remove(model)
                } else {
                    None
                }
            });
            match next {
                Next::Closed => break,
                Next::Idle => {}
                Next::Expired(job) => {
                    let error = Error::LateArrival;
                    self.queue()
                        .finish(&job, Event::Failed { error, tokens: 0 });
                }
                Next::Job(job, cancelled, mut w) => {
                    self.models.touch(&job.model);
                    let seq = w.seq;
                    let (terminal, death) = self.run_job(&mut w, seq, &job, &cancelled);
                    if let Event::Finished { first_token_us, .. } = &terminal {
                        self.models.observe_first_token(&job.model, *first_token_us);
                    }
                    self.queue().finish(&job, terminal);
                    match death {
                        Some(death) => {
                            self.models.set_ready(&job.model, slot, false);
                            self.retire(w, &death);
                        }
                        None => {
                            // Unloaded while it ran: it goes now.
                            if self.models.is_wanted(&job.model) {
                                self.slots.workers(slot).insert(job.model.clone(), w);
                            }
                        }
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
    fn run_job(
        &self,
        w: &mut Worker,
        seq: u64,
        job: &QueuedJob,
        cancelled: &AtomicBool,
    ) -> (Event, Option<Death>) {
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
        w.run(seq, &req, cancelled, &mut emit)
    }

    /// Replaces a broken worker (the keeper starts its successor): audits lane corruption and
    /// fails the jobs queued behind it (UNAVAILABLE) so the queen can place them on a live
    /// worker.
    fn retire(&self, w: Worker, death: &Death) {
        record_death(&self.slots, &self.audit, self.slot, w.generation, death);
        drop(w);
        self.fail_queued(&death.to_string());
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

/// Runs the warm-up job on slot 0's first ready worker (stopped like a cancel once `closed` is
/// set). Returns the figures if it finished, and why the worker must be replaced, if it must.
fn warm_up(w: &mut Worker, model: &str, closed: &AtomicBool) -> (Option<Figures>, Option<Death>) {
    w.seq += 1;
    let seq = w.seq;
    let req = LaneJob {
        job_id: "warm-up",
        model,
        prompt: WARM_UP_PROMPT,
        max_tokens: WARM_UP_TOKENS,
        sampling: Sampling::default(),
        deadline: Deadline::after(WARM_UP_DEADLINE),
        arrived: Instant::now(),
    };
    let (outcome, death) = w.run(seq, &req, closed, &mut |_| true);
    match outcome {
        Event::Finished {
            tokens,
            first_token_us,
            generation_us,
            ..
        } => {
            let figures = figures(tokens, first_token_us, generation_us);
            (Some(figures), death)
        }
        Event::Failed { error, tokens } => {
            warn!(error = %error, tokens, "warm-up job failed");
            (None, death)
        }
        // `run` ends with a terminal event only.
        Event::Started { .. } | Event::Token { .. } => (None, death),
    }
}

/// The engine's speed from one finished job: the first token, then the time per later token.
fn figures(tokens: u32, first_token_us: u64, generation_us: u64) -> Figures {
    Figures {
        first_token_us,
        per_token_us: generation_us / u64::from(tokens.saturating_sub(1).max(1)),
    }
}

/// One request as the lane needs it.
struct LaneJob<'a> {
    job_id: &'a str,
    model: &'a str,
    prompt: &'a str,
    max_tokens: u32,
    sampling: Sampling,
    deadline: Deadline,
    arrived: Instant,
}

struct Worker {
    /// This incarnation's lane session secret; the worker runs only requests MACed with it.
    session: Secret,
    slot: u32,
    generation: u64,
    child: Child,
    /// Shared with `Running` so a cancel can set the cancel word without this thread.
    requests: Arc<Lane>,
    responses: Lane,
    started: Instant,
    /// Beating (alive), maybe still loading.
    ready: bool,
    /// Its engine said it has loaded: it can take jobs.
    loaded: bool,
    seq: u64,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("slot", &self.slot)
            .field("generation", &self.generation)
            .field("pid", &self.child.id())
            .field("loaded", &self.loaded)
            .finish_non_exhaustive()
    }
}

/// Why a worker is no longer usable.
#[derive(Debug)]
enum Death {
    Exited(std::process::ExitStatus),
    Hung(Duration),
    Lane(String),
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Death::Exited(s) => write!(f, "worker exited ({s})"),
            Death::Hung(age) => write!(f, "worker silent for {}ms", age.as_millis()),
            Death::Lane(e) => write!(f, "worker lane broken: {e}"),
        }
    }
}

// === impl Worker ===

impl Worker {
    fn start(
        launch: &Launch,
        args: &[String],
        slot: u32,
        generation: u64,
    ) -> Result<Worker, LaneError> {
        // Sealed memfds, not files: no peer (the worker included) can shrink them under this
        // process, which would kill it with SIGBUS, and nothing else can open them by name.
        let requests =
            Lane::create_sealed(&format!("skep-slot-{slot}-req"), launch.lane, generation)?;
        let responses =
            Lane::create_sealed(&format!("skep-slot-{slot}-resp"), launch.lane, generation)?;
        let mut command = Command::new(&launch.program);
        // Exactly these two fds reach this worker; other slots' workers never inherit them.
        let request_fd = requests.pass_to(&mut command);
        let response_fd = responses.pass_to(&mut command);
        let child = command
            .args(args)
            .arg("--request-lane-fd")
            .arg(request_fd.to_string())
            .arg("--response-lane-fd")
            .arg(response_fd.to_string())
            .arg("--generation")
            .arg(generation.to_string())
            // The session secret goes down this pipe: never argv, env or a file.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .env_clear()
            .envs(
                std::env::vars_os().filter(|(k, _)| k == "RUST_LOG" || k == "PATH" || k == "HOME"),
            )
            .spawn()
            .map_err(LaneError::Io)?;
        let session = Secret::generate();
        let mut child = child;
        let handed_over = child.stdin.take().map(|mut stdin| {
            stdin
                .write_all(session.expose().as_bytes())
                .and_then(|_| stdin.write_all(b"\n"))
        });
        if !matches!(handed_over, Some(Ok(()))) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LaneError::Io(std::io::Error::other(
                "could not hand the session secret to the worker",
            )));
        }
        Ok(Worker {
            session,
            slot,
            generation,
            child,
            requests: Arc::new(requests),
            responses,
            started: Instant::now(),
            ready: false,
            loaded: false,
            seq: 0,
        })
    }

    /// Is the worker still usable? Exited, silent or corrupt workers are not.
    fn check(&mut self) -> Result<(), Death> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(Death::Exited(status));
        }
        if self.requests.is_dead() || self.responses.is_dead() {
            return Err(Death::Lane("lane marked dead".into()));
        }
        let age = self.responses.heartbeat_age();
        if age < HEARTBEAT_TIMEOUT {
            self.ready = true;
            return Ok(());
        }
        if self.ready || self.started.elapsed() > STARTUP_GRACE {
            return Err(Death::Hung(age));
        }
        Ok(())
    }

    /// Reads the worker's one-time "engine loaded" message, if it has come; true once loaded.
    /// Anything else on an idle worker's response lane breaks the protocol. A worker that beats
    /// but has not loaded within the start-up grace is hung.
    fn poll_loaded(&mut self) -> Result<bool, Death> {
        if self.loaded {
            return Ok(true);
        }
        let mut buf = Vec::new();
        match self.responses.pop_timeout(&mut buf, Duration::ZERO) {
            Ok(false) if self.started.elapsed() > STARTUP_GRACE => {
                Err(Death::Hung(self.started.elapsed()))
            }
            Ok(false) => Ok(false),
            Ok(true) => match LaneResponse::decode(buf.as_slice()) {
                Ok(r) if r.seq == 0 && matches!(r.kind, Some(lane_response::Kind::Ready(_))) => {
                    self.loaded = true;
                    Ok(true)
                }
                _ => Err(Death::Lane(
                    "a message other than its ready message before any job".into(),
                )),
            },
            Err(e) => Err(Death::Lane(e.to_string())),
        }
    }

    /// Runs one request as `seq`, handing `Started` and `Token` events to `emit` (false = the
    /// receiver is gone: the job is cancelled). Returns how it ended and why the worker must be
    /// replaced, if it must. Once cancelled, the job ends CANCELLED whatever the worker says.
    fn run(
        &mut self,
        seq: u64,
        job: &LaneJob<'_>,
        cancelled: &AtomicBool,
        emit: &mut dyn FnMut(Event) -> bool,
    ) -> (Event, Option<Death>) {
        let remaining = u64::try_from(job.deadline.remaining().as_nanos()).unwrap_or(u64::MAX);
        let deadline_ns = monotonic_ns().saturating_add(remaining);
        // The MAC covers every field the worker reads; `seq` rises with every request of this
        // generation, so the worker refuses a replay.
        let fields = session::RequestFields {
            seq,
            job_id: job.job_id,
            model: job.model,
            prompt: job.prompt,
            max_tokens: job.max_tokens,
            deadline_ns,
            temperature: job.sampling.temperature,
            top_p: job.sampling.top_p,
            seed: job.sampling.seed,
            cancel_seq: 0,
        };
        let mac = session::request_mac(&self.session, &fields);
        let lane_req = LaneRequest {
            seq,
            job_id: job.job_id.to_owned(),
            model: job.model.to_owned(),
            prompt: job.prompt.to_owned(),
            max_tokens: job.max_tokens,
            deadline_mono_ns: deadline_ns,
            mac: mac.to_vec(),
            temperature: job.sampling.temperature,
            top_p: job.sampling.top_p,
            seed: job.sampling.seed,
            cancel_seq: 0,
        };
        let mut tokens = 0u32;
        let mut cancelled_at: Option<Instant> = None;
        // Every failure reads CANCELLED once the job was cancelled: that is what the queen
        // asked for, and nobody may be listening for anything else.
        // The canceller sets the flag and the lane's cancel word together, so the worker's
        // answer can arrive before this loop has looked at the flag: read both.
        let failed = |error: Error, tokens: u32, cancelled_at: Option<Instant>| {
            let error = if cancelled_at.is_some() || cancelled.load(Ordering::Acquire) {
                Error::Cancelled
            } else {
                error
            };
            Event::Failed { error, tokens }
        };
        let entry = lane_req.encode_to_vec();
        if entry.len() > self.requests.max_entry() as usize {
            // Cannot happen while `check_lane_config` holds; refused without touching the
            // worker, which stays up.
            let max = self.requests.max_entry() as usize;
            let error = Error::Invalid(validate::ValidationError::LaneRequestTooLarge { max });
            return (failed(error, 0, None), None);
        }
        if let Err(e) = self.requests.push_timeout(&entry, CANCEL_GRACE) {
            let why = e.to_string();
            return (
                failed(Error::WorkerLost(why.clone()), 0, None),
                Some(Death::Lane(why)),
            );
        }
        let pool_us = micros(job.arrived.elapsed());
        if !emit(Event::Started {
            slot: self.slot,
            generation: self.generation,
            pool_us,
        }) {
            self.requests.request_cancel(seq);
            cancelled_at = Some(Instant::now());
        }
        let mut buf = Vec::new();
        loop {
            if cancelled_at.is_none() && cancelled.load(Ordering::Acquire) {
                // The canceller already set the lane's cancel word; setting it again is harmless.
                debug!(slot = self.slot, seq, "job cancelled; stopping worker");
                self.requests.request_cancel(seq);
                cancelled_at = Some(Instant::now());
            }
            match self.responses.pop_timeout(&mut buf, POLL) {
                Ok(true) => {}
                Ok(false) => {
                    if let Err(death) = self.check() {
                        let lost = Error::WorkerLost(death.to_string());
                        return (failed(lost, tokens, cancelled_at), Some(death));
                    }
                    if cancelled_at.is_some_and(|t| t.elapsed() > CANCEL_GRACE) {
                        let death = Death::Hung(CANCEL_GRACE);
                        return (failed(Error::Cancelled, tokens, cancelled_at), Some(death));
                    }
                    if job
                        .deadline
                        .exceeded_by(Instant::now())
                        .is_some_and(|d| d > DEADLINE_GRACE)
                    {
                        let death = Death::Hung(DEADLINE_GRACE);
                        let late = Error::DeadlineExceeded;
                        return (failed(late, tokens, cancelled_at), Some(death));
                    }
                    continue;
                }
                Err(e) => {
                    let why = e.to_string();
                    let lost = Error::WorkerLost(why.clone());
                    return (failed(lost, tokens, cancelled_at), Some(Death::Lane(why)));
                }
            }
            let resp = match LaneResponse::decode(buf.as_slice()) {
                Ok(r) if r.seq == seq => r,
                Ok(r) => {
                    let why = format!("response for job seq {} while running {seq}", r.seq);
                    let lost = Error::WorkerLost(why.clone());
                    return (failed(lost, tokens, cancelled_at), Some(Death::Lane(why)));
                }
                Err(e) => {
                    let why = format!("undecodable response: {e}");
                    let lost = Error::WorkerLost(why.clone());
                    return (failed(lost, tokens, cancelled_at), Some(Death::Lane(why)));
                }
            };
            match resp.kind {
                Some(lane_response::Kind::Token(t)) => {
                    tokens = tokens.saturating_add(1);
                    if cancelled_at.is_none()
                        && !cancelled.load(Ordering::Acquire)
                        && !emit(Event::Token {
                            index: t.index,
                            text: t.text,
                            id: t.id,
                        })
                    {
                        debug!(slot = self.slot, seq, "session gone; cancelling worker");
                        self.requests.request_cancel(seq);
                        cancelled_at = Some(Instant::now());
                    }
                }
                Some(lane_response::Kind::Done(d)) => {
                    if cancelled_at.is_some() || cancelled.load(Ordering::Acquire) {
                        return (failed(Error::Cancelled, d.tokens, cancelled_at), None);
                    }
                    let done = Event::Finished {
                        tokens: d.tokens,
                        prompt_tokens: d.prompt_tokens,
                        pool_us,
                        first_token_us: d.first_token_us,
                        generation_us: d.generation_us,
                    };
                    return (done, None);
                }
                Some(lane_response::Kind::Error(e)) => {
                    if e.code == CODE_DEADLINE_EXCEEDED {
                        // Kept in the log so the soak benchmark can report worker time past
                        // deadlines.
                        info!(
                            slot = self.slot,
                            seq,
                            overrun_us = e.overrun_us,
                            "worker stopped at the deadline"
                        );
                    }
                    let worker = Error::Worker {
                        code: e.code,
                        message: e.message,
                    };
                    return (failed(worker, tokens, cancelled_at), None);
                }
                Some(lane_response::Kind::Ready(_)) => {
                    let why = "a second ready message".to_owned();
                    let lost = Error::WorkerLost(why.clone());
                    return (failed(lost, tokens, cancelled_at), Some(Death::Lane(why)));
                }
                None => {
                    let lost = Error::WorkerLost("empty response".into());
                    let death = Death::Lane("empty response".into());
                    return (failed(lost, tokens, cancelled_at), Some(death));
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.requests.mark_dead();
        self.responses.mark_dead();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests;
