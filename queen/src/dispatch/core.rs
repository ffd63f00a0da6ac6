//! The dispatch core: admission, per-slot reservation ledgers, EDF order and the live-job table,
//! as one deterministic state machine with no I/O and no clock of its own.
//!
//! Every input (a submit, a pool's report, a cancel, a node joining or leaving, a clock tick)
//! is one method call that runs to completion and leaves its consequences in `actions`: jobs to
//! send to a pool, cancels to send, and terminal outcomes. Time is passed in as microseconds on
//! the caller's monotonic clock, so the property tests drive it on a simulated clock.
//!
//! **The ledger.** Every job holds a reservation on one slot of one pool. A slot's jobs run in a
//! known order: first those already sent to the pool (the pool runs a slot's jobs in the order it
//! received them), then the ones still waiting here, earliest deadline first. With the cost model
//! (`cost.rs`) that order predicts when each job finishes. A job is admitted only if, on the slot
//! where it would finish earliest, it finishes by its deadline and no job that was predicted on
//! time becomes late; the reservation is made in the same call. At most `1 + credits` jobs of a
//! slot are at the pool at once, so the worker starts its next job without a round trip while
//! the queen keeps the freedom to order the rest.
//!
//! **Loads.** A pool serves a set of models, not all of them in memory (`core/models.rs`). A job
//! starts no earlier than its model is ready on its pool: at once when warm, at the predicted end
//! of the load under way, or a full cold-load time (the pool's own measure) after its slot frees
//! for it; a model that does not fit beside the models with work on the pool waits here until
//! that work has ended (a *drain*), and then loads. Admission, placement and the send all count
//! this, so a job goes where it finishes first, loads included, and a job that no placement can
//! finish in time, load included, is refused before anything is loaded. A job sent for a model
//! that is not warm names the idle models the pool evicts for it.
//!
//! **Invariants** (checked by the property tests in `core/tests.rs`): an admitted job's
//! predicted finish is within its deadline when it is admitted; no admission makes a job that
//! was predicted on time predicted late; a job whose predicted finish is past its deadline is
//! never sent; every admitted job ends in exactly one `Action::End`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

pub use self::models::ModelState;
use super::cost::{Cost, Figures, Sample};

/// Microseconds on the caller's monotonic clock.
pub type Micros = u64;
/// A job's identity inside the core; also its handle on the pool session.
pub type JobKey = u64;

/// gRPC codes the core interprets in pool reports.
const CODE_CANCELLED: i32 = 1;
const CODE_DEADLINE_EXCEEDED: i32 = 4;
const CODE_UNAVAILABLE: i32 = 14;

/// How jobs are admitted and ordered. `Reserve` is skep's; the other two exist so that the
/// benchmarks can compare against plain EDF and FCFS without admission in the same run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Admission by reservation, EDF order.
    Reserve,
    /// EDF order, no feasibility check at admission.
    Edf,
    /// Arrival order, no feasibility check at admission.
    Fcfs,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "reserve" => Ok(Policy::Reserve),
            "edf" => Ok(Policy::Edf),
            "fcfs" => Ok(Policy::Fcfs),
            _ => Err(format!(
                "unknown admission policy {s:?}: use reserve, edf or fcfs"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub policy: Policy,
    /// Jobs admitted and not yet ended.
    pub max_live: usize,
    /// Jobs admitted and not yet sent to a pool.
    pub max_queued: usize,
    /// Tail quantile of the cost model (e.g. 0.95).
    pub quantile: f64,
    /// Attempts per job, the first included.
    pub max_attempts: u32,
    /// How long past its deadline a sent job may stay unanswered before the core gives up on it.
    pub hung_grace: Micros,
    /// Retry hint when the queen is full.
    pub retry_after: Micros,
    /// Jobs one caller may have live at once unless their token says otherwise: with the
    /// default 1024 live and 256 queued, one tenant can hold a quarter of the queue at most.
    pub caller_share: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::Reserve,
            max_live: 1024,
            max_queued: 256,
            quantile: 0.95,
            max_attempts: 3,
            hung_grace: 2_000_000,
            retry_after: 500_000,
            caller_share: 64,
        }
    }
}

/// What admission needs to know of a job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub model: String,
    /// The prompt's size in bytes: its prompt pass is priced by prompts of its size.
    pub prompt_bytes: u32,
    /// Its budget per token asked for, at admission (µs): its tokens are priced by jobs of its
    /// urgency (`cost.rs`).
    pub pace_us: u64,
    pub max_tokens: u32,
    /// Absolute deadline on the core's clock.
    pub deadline: Micros,
    /// Who submitted it (their token's fingerprint): the unit of the per-caller share.
    pub caller: Arc<str>,
    /// Jobs this caller may have live (queued or running) at once, when their token sets its
    /// own share; `Config::caller_share` otherwise.
    pub caller_share: Option<u32>,
}

/// Progress of a sent job, written by the session that streams its events and read by the core
/// when it predicts the job's end: token progress updates the ledger without a message per
/// token. Times are stored plus one, so that zero means "not yet".
#[derive(Debug, Default)]
pub struct Progress {
    started: AtomicU64,
    first_token: AtomicU64,
    last_token: AtomicU64,
    tokens: AtomicU32,
}

impl Progress {
    pub fn started(&self, at: Micros) {
        self.started.store(at + 1, Relaxed);
    }
    pub fn token(&self, at: Micros) {
        let n = self.tokens.fetch_add(1, Relaxed);
        if n == 0 {
            self.first_token.store(at + 1, Relaxed);
        }
        self.last_token.store(at + 1, Relaxed);
    }
    fn get(v: &AtomicU64) -> Option<Micros> {
        v.load(Relaxed).checked_sub(1)
    }
    pub fn tokens(&self) -> u32 {
        self.tokens.load(Relaxed)
    }
    pub fn started_at(&self) -> Option<Micros> {
        Self::get(&self.started)
    }
}

/// A pool's report on a sent job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Finished {
        worker_first_token_us: u64,
        generation_us: u64,
        tokens: u32,
    },
    /// The pool ended the job without finishing it (gRPC code and message).
    Failed { code: i32, message: String },
    /// The pool's session broke: the job's fate there is unknown and it will not finish there.
    Lost { message: String },
}

/// How an admitted job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The deadline was or would have been missed; says where.
    Missed {
        reason: String,
    },
    Cancelled,
    Failed {
        code: i32,
        message: String,
    },
}

/// What the core asks its I/O layer to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the job to `slot` of `node` with `remaining` µs of budget.
    Send {
        key: JobKey,
        node: String,
        slot: u32,
        attempt: u32,
        remaining: Micros,
        /// The policy's sort key: the pool starts a slot's waiting job with the smallest.
        order: u64,
        /// Warm models the pool must unload before it loads the job's model (least recently
        /// used first; never one with a job at the pool, reserved here, or loading).
        evict: Vec<String>,
    },
    /// Tell `node` to stop the job (it stays on its slot's ledger until the pool says it ended).
    Cancel { key: JobKey, node: String },
    /// The job has ended for its client; exactly one per admitted job.
    End { key: JobKey, outcome: Outcome },
}

/// An admission decision that took a reservation.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub key: JobKey,
    pub node: String,
    pub slot: u32,
    pub predicted_finish: Micros,
    pub progress: Arc<Progress>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No slot can finish the job by its deadline without making another job late.
    /// `best_finish` is the earliest finish any slot offered.
    Infeasible {
        best_finish: Option<Micros>,
    },
    NoPool,
    QueueFull {
        retry_after: Micros,
    },
    /// The caller already has `share` jobs live: one tenant may not take the whole queen.
    CallerShare {
        share: u32,
        retry_after: Micros,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Pending {
        slot: u32,
    },
    Sent {
        slot: u32,
        sent_at: Micros,
    },
    /// Waiting for a pool serving its model (after a queen restart or a lost pool).
    Parked,
}

#[derive(Debug)]
struct Live {
    spec: JobSpec,
    node: String,
    place: Place,
    attempt: u32,
    avoid: Vec<String>,
    progress: Arc<Progress>,
    /// Ended for the client while still at a pool: it keeps its slot until the pool answers.
    zombie: bool,
    /// Admission order, for FCFS and ties.
    seq: u64,
    /// Sent while its model was not warm there: its service time includes a load, which must
    /// not be learnt as overhead.
    after_load: bool,
}

#[derive(Debug, Default, Clone)]
struct Slot {
    /// At the pool, in the order sent; the first is running (or about to).
    sent: VecDeque<JobKey>,
    /// Waiting here, in policy order: (order key, job).
    pending: BTreeSet<(u64, JobKey)>,
    /// When the slot's last job ended: the next one began no earlier.
    last_end: Micros,
    /// The job sent to this slot while it was idle: the pool starts it at once (it goes with
    /// order 0), so it runs first even before its `started` arrives, whatever the policy order
    /// of jobs sent after it. Meaningful only while it is `sent`'s first job.
    head: Option<JobKey>,
}

#[derive(Debug)]
struct Node {
    up: bool,
    models: Vec<String>,
    credits: u32,
    slots: Vec<Slot>,
    costs: HashMap<String, Cost>,
    /// What the pool reported of each model it can load (empty: it reports none, and every
    /// model it serves counts as warm), kept up to date by the queen's own sends.
    loads: HashMap<String, models::Load>,
    /// The pool's memory budget for warm models in bytes; 0 = unlimited (or not reported).
    budget: u64,
    /// A model this node loads only once every job of other models here has ended (it does
    /// not fit beside them): its jobs wait here until then. See `core/models.rs`.
    drain: Option<String>,
}

impl Node {
    /// A node known (by its figures or an earlier session) but not serving.
    fn down() -> Node {
        Node {
            up: false,
            models: Vec::new(),
            credits: 0,
            slots: Vec::new(),
            costs: HashMap::new(),
            loads: HashMap::new(),
            budget: 0,
            drain: None,
        }
    }
}

/// The dispatch core. See the module docs.
pub struct Core {
    cfg: Config,
    nodes: BTreeMap<String, Node>,
    jobs: HashMap<JobKey, Live, KeyHash>,
    parked: BTreeSet<JobKey>,
    queued: usize,
    /// Live jobs per caller, for the per-caller share; a caller with none has no entry.
    callers: HashMap<Arc<str>, u32>,
    next_key: JobKey,
    actions: Vec<Action>,
}

/// Job keys are consecutive integers: a multiplicative hash spreads them for the hash table at
/// a fraction of SipHash's cost (they are not attacker-chosen).
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type KeyHash = std::hash::BuildHasherDefault<KeyHasher>;

/// The key under which `predict` reports a job that is only being considered.
const EXTRA: JobKey = JobKey::MAX;

/// A job being considered for a slot: its policy order, deadline, cost and model.
#[derive(Debug, Clone, Copy)]
struct Extra<'a> {
    order: u64,
    deadline: Micros,
    cost: Micros,
    model: &'a str,
}

/// One job's predicted finish on a slot.
#[derive(Debug, Clone, Copy)]
struct Predicted {
    key: JobKey,
    finish: Micros,
    deadline: Micros,
}

impl Core {
    pub fn new(cfg: Config) -> Core {
        Core {
            cfg,
            nodes: BTreeMap::new(),
            jobs: HashMap::default(),
            parked: BTreeSet::new(),
            queued: 0,
            callers: HashMap::new(),
            next_key: 1,
            actions: Vec::new(),
        }
    }

    pub fn policy(&self) -> Policy {
        self.cfg.policy
    }

    /// The actions accumulated since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    pub fn live(&self) -> usize {
        self.jobs.len()
    }

    /// Jobs waiting here (not yet at a pool), parked ones included.
    pub fn queued(&self) -> usize {
        self.queued + self.parked.len()
    }

    /// Jobs at a pool, per node.
    pub fn running(&self) -> HashMap<String, u32> {
        self.nodes
            .iter()
            .map(|(id, n)| {
                (
                    id.clone(),
                    n.slots.iter().map(|s| s.sent.len() as u32).sum(),
                )
            })
            .collect()
    }

    /// The node a live job is placed on (empty while parked).
    pub fn node_of(&self, key: JobKey) -> Option<&str> {
        self.jobs.get(&key).map(|j| j.node.as_str())
    }

    /// Jobs ahead of a job on its slot, at the pool or here (0: it runs now).
    pub fn position(&self, key: JobKey) -> usize {
        let Some(job) = self.jobs.get(&key) else {
            return 0;
        };
        let (Place::Pending { slot } | Place::Sent { slot, .. }) = job.place else {
            return 0;
        };
        let Some(s) = self
            .nodes
            .get(&job.node)
            .and_then(|n| n.slots.get(slot as usize))
        else {
            return 0;
        };
        match s.sent.iter().position(|k| *k == key) {
            Some(i) => i,
            None => s.sent.len() + s.pending.iter().take_while(|(_, k)| *k != key).count(),
        }
    }

    /// True once the job has been sent to a pool.
    pub fn is_sent(&self, key: JobKey) -> bool {
        self.jobs
            .get(&key)
            .is_some_and(|j| matches!(j.place, Place::Sent { .. }))
    }

    /// Tail cost of a job on a node, as admission sees it.
    pub fn cost_of(&self, node: &str, model: &str, spec: &JobSpec) -> Option<Micros> {
        let n = self.nodes.get(node)?;
        Some(
            self.cost(n, model)
                .job(spec.prompt_bytes, spec.max_tokens, spec.pace_us),
        )
    }

    // --- inputs -------------------------------------------------------------------------------

    /// Admits a new job and reserves its slot, or refuses it. Never leaves a partial reservation.
    pub fn submit(&mut self, now: Micros, spec: JobSpec) -> Result<Admitted, Refusal> {
        if self.jobs.len() >= self.cfg.max_live {
            return Err(Refusal::QueueFull {
                retry_after: self.cfg.retry_after,
            });
        }
        // Before any search: a tenant at its share is refused however idle the cluster is, so
        // the answer does not depend on (or reveal) other tenants' load.
        let share = spec.caller_share.unwrap_or(self.cfg.caller_share);
        if self.live_of(&spec.caller) >= share {
            return Err(Refusal::CallerShare {
                share,
                retry_after: self.cfg.retry_after,
            });
        }
        let (node, slot, finish) = self.choose(now, &spec, &[], None)?;
        let to_pending = self.nodes[&node].slots[slot as usize].sent.len()
            > self.nodes[&node].credits as usize
            || !self.nodes[&node].slots[slot as usize].pending.is_empty();
        if to_pending && self.queued >= self.cfg.max_queued {
            return Err(Refusal::QueueFull {
                retry_after: self.cfg.retry_after,
            });
        }
        let (key, progress) = self.track(spec);
        self.enqueue(key, &node, slot);
        self.pump(now, &node, slot);
        Ok(Admitted {
            key,
            node,
            slot,
            predicted_finish: finish,
            progress,
        })
    }

    /// Takes a job the previous queen process accepted: placed like a new one if some slot can
    /// still finish it in time, parked until a pool serving its model joins otherwise.
    pub fn resume(&mut self, now: Micros, spec: JobSpec) -> (JobKey, Arc<Progress>) {
        let (key, progress) = self.track(spec);
        self.parked.insert(key);
        self.unpark(now);
        (key, progress)
    }

    /// Enters a new job in the live table, not yet placed.
    fn track(&mut self, spec: JobSpec) -> (JobKey, Arc<Progress>) {
        let key = self.next_key;
        self.next_key += 1;
        *self.callers.entry(Arc::clone(&spec.caller)).or_default() += 1;
        let progress = Arc::new(Progress::default());
        self.jobs.insert(
            key,
            Live {
                spec,
                node: String::new(),
                place: Place::Parked,
                attempt: 1,
                avoid: Vec::new(),
                progress: Arc::clone(&progress),
                zombie: false,
                seq: key,
                after_load: false,
            },
        );
        (key, progress)
    }

    /// A pool reported the end of a sent job.
    pub fn ended(&mut self, now: Micros, key: JobKey, node: &str, report: Report) {
        let Some(job) = self.jobs.get(&key) else {
            return;
        };
        // A report from a pool the job has already left (failed over) is stale.
        if job.node != node {
            return;
        }
        let Place::Sent { slot, sent_at } = job.place else {
            return;
        };
        let node_id = job.node.clone();
        self.learn(now, key, slot, sent_at, &report);
        if let Some(s) = self
            .nodes
            .get_mut(&node_id)
            .and_then(|n| n.slots.get_mut(slot as usize))
        {
            s.sent.retain(|k| *k != key);
            s.last_end = now;
        }
        self.used(now, &node_id, &self.jobs[&key].spec.model.clone());
        let job = self.jobs.get_mut(&key).expect("checked above");
        if job.zombie {
            self.forget(key);
        } else {
            let deadline = job.spec.deadline;
            match report {
                Report::Finished { .. } if now > deadline => self.end(
                    key,
                    Outcome::Missed {
                        reason: "the result arrived after the deadline".into(),
                    },
                ),
                Report::Finished { .. } => self.end(key, Outcome::Done),
                Report::Failed { code, message } if code == CODE_DEADLINE_EXCEEDED => {
                    self.end(key, Outcome::Missed { reason: message })
                }
                Report::Failed { code, .. } if code == CODE_CANCELLED => {
                    self.end(key, Outcome::Cancelled)
                }
                Report::Failed { code, message } if code == CODE_UNAVAILABLE => {
                    self.retry(now, key, CODE_UNAVAILABLE, message)
                }
                Report::Lost { message } => self.retry(now, key, CODE_UNAVAILABLE, message),
                Report::Failed { code, message } => {
                    self.end(key, Outcome::Failed { code, message })
                }
            }
        }
        // The end of a job may end the node's drain, and its drained jobs wait on any slot.
        let slots = self.nodes.get(&node_id).map_or(0, |n| n.slots.len() as u32);
        let draining = self.nodes.get(&node_id).is_some_and(|n| n.drain.is_some());
        self.pump(now, &node_id, slot);
        if draining {
            for s in (0..slots).filter(|s| *s != slot) {
                self.pump(now, &node_id, s);
            }
        }
    }

    /// Stops a job for its client. False if it is not live (unknown, or already ended).
    pub fn cancel(&mut self, now: Micros, key: JobKey) -> bool {
        let Some(job) = self.jobs.get_mut(&key) else {
            return false;
        };
        if job.zombie {
            return false;
        }
        match job.place {
            Place::Sent { .. } => {
                job.zombie = true;
                let node = job.node.clone();
                self.actions.push(Action::Cancel { key, node });
                self.actions.push(Action::End {
                    key,
                    outcome: Outcome::Cancelled,
                });
            }
            Place::Pending { slot } => {
                let node = job.node.clone();
                self.unqueue(key);
                self.end(key, Outcome::Cancelled);
                self.pump(now, &node, slot);
            }
            Place::Parked => {
                self.parked.remove(&key);
                self.end(key, Outcome::Cancelled);
            }
        }
        true
    }

    /// A pool's session is ready: `slots` worker slots, `credits` waiting jobs per slot.
    pub fn node_up(
        &mut self,
        now: Micros,
        id: &str,
        slots: u32,
        credits: u32,
        models: Vec<String>,
    ) {
        let quantile = self.cfg.quantile;
        let node = self.nodes.entry(id.to_owned()).or_insert_with(Node::down);
        if node.up && node.slots.len() == slots as usize {
            node.models = models;
            node.credits = credits;
        } else {
            if node.up {
                self.node_down(now, id);
            }
            let node = self.nodes.get_mut(id).expect("inserted above");
            node.up = true;
            node.models = models;
            node.credits = credits;
            node.slots = vec![Slot::default(); slots as usize];
        }
        let node = self.nodes.get_mut(id).expect("inserted above");
        for m in node.models.clone() {
            node.costs.entry(m).or_insert_with(|| Cost::new(quantile));
        }
        self.unpark(now);
        for s in 0..slots {
            self.pump(now, id, s);
        }
    }

    /// The speed a pool measured at warm-up; stands in until the queen has measured its own.
    pub fn figures(&mut self, id: &str, model: &str, f: Figures) {
        let quantile = self.cfg.quantile;
        let node = self.nodes.entry(id.to_owned()).or_insert_with(Node::down);
        node.costs
            .entry(model.to_owned())
            .or_insert_with(|| Cost::new(quantile))
            .set_figures(f);
    }

    /// A pool left (dead, revoked, unreachable, session closed): its jobs go elsewhere if their
    /// deadlines allow, or wait for a pool, or end.
    pub fn node_down(&mut self, now: Micros, id: &str) {
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        if !node.up {
            return;
        }
        node.up = false;
        node.drain = None;
        let slots = std::mem::take(&mut node.slots);
        for slot in slots {
            for key in slot.sent {
                let Some(job) = self.jobs.get_mut(&key) else {
                    continue;
                };
                if job.zombie {
                    self.forget(key);
                    continue;
                }
                // Not to the ledger: the slot is gone with the node.
                job.place = Place::Parked;
                self.retry(
                    now,
                    key,
                    CODE_UNAVAILABLE,
                    format!("pool {id} left the cluster"),
                );
            }
            for (_, key) in slot.pending {
                self.queued -= 1;
                if let Some(job) = self.jobs.get_mut(&key) {
                    job.place = Place::Parked;
                    job.node.clear();
                    self.parked.insert(key);
                }
            }
        }
        self.unpark(now);
    }

    /// Ends what time has made hopeless and keeps pools busy.
    pub fn tick(&mut self, now: Micros) {
        let mut expired = Vec::new();
        let mut hung = Vec::new();
        for (key, job) in &self.jobs {
            match job.place {
                Place::Pending { .. } | Place::Parked if job.spec.deadline <= now => {
                    expired.push(*key)
                }
                Place::Sent { .. }
                    if !job.zombie
                        && job.spec.deadline.saturating_add(self.cfg.hung_grace) <= now =>
                {
                    hung.push(*key)
                }
                _ => {}
            }
        }
        expired.sort_unstable();
        hung.sort_unstable();
        for key in expired {
            let parked = self.parked.remove(&key);
            if !parked {
                self.unqueue(key);
            }
            let reason = if parked {
                "no pool serving the model could take it before its deadline"
            } else {
                "its deadline passed before a slot was free"
            };
            self.end(
                key,
                Outcome::Missed {
                    reason: reason.into(),
                },
            );
        }
        // A pool that never answers for a stopped job must not hold its slot forever.
        let abandoned: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.zombie
                    && j.spec
                        .deadline
                        .saturating_add(self.cfg.hung_grace.saturating_mul(5))
                        <= now
            })
            .map(|(k, _)| *k)
            .collect();
        for key in abandoned {
            let job = self.forget(key).expect("collected above");
            if let Some(n) = self.nodes.get_mut(&job.node) {
                for s in &mut n.slots {
                    s.sent.retain(|k| *k != key);
                }
            }
        }
        for key in hung {
            let job = self.jobs.get_mut(&key).expect("collected above");
            job.zombie = true;
            let node = job.node.clone();
            self.actions.push(Action::Cancel { key, node });
            self.actions.push(Action::End {
                key,
                outcome: Outcome::Missed {
                    reason: "the pool did not answer by the deadline".into(),
                },
            });
        }
        let all: Vec<(String, u32)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.up)
            .flat_map(|(id, n)| (0..n.slots.len() as u32).map(move |s| (id.clone(), s)))
            .collect();
        for (id, s) in all {
            self.pump(now, &id, s);
        }
    }

    // --- admission ----------------------------------------------------------------------------

    /// The slot where `spec` would finish earliest while keeping everyone else on time (for
    /// `Reserve`), or just earliest (other policies). A node whose memory cannot take the
    /// model now (see `core/models.rs`) is no candidate.
    fn choose(
        &self,
        now: Micros,
        spec: &JobSpec,
        avoid: &[String],
        seq: Option<u64>,
    ) -> Result<(String, u32, Micros), Refusal> {
        let mut best: Option<(String, u32, Micros)> = None;
        let mut best_any: Option<Micros> = None;
        let mut serving = false;
        let order = self.order_key(spec.deadline, seq.unwrap_or(self.next_key));
        for (id, node) in &self.nodes {
            if !node.up || avoid.contains(id) || !node.models.contains(&spec.model) {
                continue;
            }
            serving = true;
            let cost =
                self.cost(node, &spec.model)
                    .job(spec.prompt_bytes, spec.max_tokens, spec.pace_us);
            for s in 0..node.slots.len() {
                let extra = Extra {
                    order,
                    deadline: spec.deadline,
                    cost,
                    model: &spec.model,
                };
                let Some((own, fits)) = self.try_slot(now, node, s, extra) else {
                    break;
                };
                best_any = Some(best_any.map_or(own, |b: Micros| b.min(own)));
                if fits && best.as_ref().is_none_or(|b| own < b.2) {
                    best = Some((id.clone(), s as u32, own));
                }
            }
        }
        match best {
            Some(b) => Ok(b),
            None if !serving => Err(Refusal::NoPool),
            None => Err(Refusal::Infeasible {
                best_finish: best_any,
            }),
        }
    }

    /// When a job would finish on a slot, and whether the policy lets it go there: under
    /// `Reserve` it must finish by its deadline and make no job late that was predicted on time
    /// (on this slot, or on any slot of the node when it moves the node's drain). `None` when
    /// the node cannot take the model now (memory; see `core/models.rs`).
    fn try_slot(
        &self,
        now: Micros,
        node: &Node,
        slot: usize,
        extra: Extra<'_>,
    ) -> Option<(Micros, bool)> {
        let fit = self.fit(node, extra.model)?;
        let s = &node.slots[slot];
        if s.sent.is_empty() && s.pending.is_empty() && fit.drain.is_none() {
            // An idle slot: the job starts as soon as its model is ready and delays nobody.
            let ready = self
                .ready(now, node, extra.model)
                .unwrap_or_else(|| now.saturating_add(self.load_time(node, extra.model)));
            let own = now.max(ready).saturating_add(extra.cost);
            let fits = match self.cfg.policy {
                Policy::Reserve => own <= extra.deadline,
                Policy::Edf | Policy::Fcfs => extra.deadline > now,
            };
            return Some((own, fits));
        }
        let base_gate = self.gate(now, node, node.drain.as_deref(), None);
        let with_gate = self.gate(now, node, fit.drain, Some((slot, extra)));
        let base = self.simulate(now, node, slot, None, base_gate.as_ref()).0;
        let with = self
            .simulate(now, node, slot, Some(extra), with_gate.as_ref())
            .0;
        let own = with
            .iter()
            .find(|p| p.key == EXTRA)
            .map_or(Micros::MAX, |p| p.finish);
        let fits = match self.cfg.policy {
            Policy::Reserve => {
                own <= extra.deadline
                    && !made_late(&base, &with)
                    && (!fit.everywhere
                        || (0..node.slots.len()).filter(|&o| o != slot).all(|o| {
                            let b = self.simulate(now, node, o, None, base_gate.as_ref()).0;
                            let w = self.simulate(now, node, o, None, with_gate.as_ref()).0;
                            !made_late(&b, &w)
                        }))
            }
            Policy::Edf | Policy::Fcfs => extra.deadline > now,
        };
        Some((own, fits))
    }

    fn order_key(&self, deadline: Micros, seq: u64) -> u64 {
        match self.cfg.policy {
            Policy::Reserve | Policy::Edf => deadline,
            Policy::Fcfs => seq,
        }
    }

    /// The order key of a live job (what the pool sorts its waiting jobs by).
    pub fn order_of(&self, key: JobKey) -> u64 {
        self.jobs
            .get(&key)
            .map_or(0, |j| self.order_key(j.spec.deadline, j.seq))
    }

    fn cost<'a>(&self, node: &'a Node, model: &str) -> std::borrow::Cow<'a, Cost> {
        match node.costs.get(model) {
            Some(c) => std::borrow::Cow::Borrowed(c),
            None => std::borrow::Cow::Owned(Cost::new(self.cfg.quantile)),
        }
    }

    /// When each job on a slot is predicted to finish (with the node's drain as it stands).
    fn predict(&self, now: Micros, node: &Node, slot: usize) -> Vec<Predicted> {
        let gate = self.gate(now, node, node.drain.as_deref(), None);
        self.simulate(now, node, slot, None, gate.as_ref()).0
    }

    /// When each job on a slot is predicted to finish, optionally with one extra job among the
    /// waiting ones (reported under the key `EXTRA`); also when the slot's last job of a model
    /// other than the drained one ends.
    ///
    /// This models the slot exactly as it runs: the job the pool has started runs to its end;
    /// whenever the slot frees, the pool starts the first (in policy order) of the jobs it
    /// holds; and while a job runs, the queen tops the pool's hold up to `credits` from its own
    /// queue, in policy order. A job that arrives later with an earlier deadline can thus pass
    /// jobs still here or in the pool's hold, but never the one running.
    ///
    /// Loads: a job starts no earlier than its model is ready there: at once when warm, at the
    /// predicted end of the load under way when loading, and when cold a full load time after
    /// the slot frees for it (the pool starts the load when the job arrives, which is no later
    /// than that). The drained model's jobs (`gate`: the model, and when it will be ready, if
    /// known) are held back here until every other job on the node has ended: they run after
    /// all the others, no earlier than the gate.
    fn simulate(
        &self,
        now: Micros,
        node: &Node,
        slot: usize,
        extra: Option<Extra<'_>>,
        gate: Option<&(String, Option<Micros>)>,
    ) -> (Vec<Predicted>, Micros) {
        let s = &node.slots[slot];
        let credits = node.credits as usize;
        let mut out = Vec::with_capacity(s.sent.len() + s.pending.len() + 1);
        let mut held: BTreeSet<(u64, JobKey)> = BTreeSet::new();
        let mut running = None;
        for key in &s.sent {
            let Some(job) = self.jobs.get(key) else {
                continue;
            };
            let head = s.head == Some(*key) && s.sent.front() == Some(key);
            if running.is_none() && (head || job.progress.started_at().is_some()) {
                running = Some((*key, job));
            } else {
                held.insert((self.order_key(job.spec.deadline, job.seq), *key));
            }
        }
        let model_of = |key: JobKey| -> &str {
            if key == EXTRA {
                extra.expect("extra present").model
            } else {
                &self.jobs[&key].spec.model
            }
        };
        let drained = |key: JobKey| gate.is_some_and(|(m, _)| m == model_of(key));
        // The queen's queue, with the extra job at its place; the drained model's jobs wait
        // apart (the queen sends none of them before the drain ends).
        let mut queue: Vec<(u64, JobKey)> = s.pending.iter().copied().collect();
        if let Some(e) = extra {
            let at = queue.partition_point(|q| *q < (e.order, EXTRA));
            queue.insert(at, (e.order, EXTRA));
        }
        let (later, queue): (Vec<_>, Vec<_>) = queue.into_iter().partition(|(_, k)| drained(*k));
        let mut queue = queue.into_iter();
        let cost_of = |key: JobKey| -> (Micros, Micros) {
            if key == EXTRA {
                let e = extra.expect("extra present");
                return (e.cost, e.deadline);
            }
            let job = &self.jobs[&key];
            if job.zombie {
                // Cancelled before it started: the pool drops it without running it.
                return (0, job.spec.deadline);
            }
            (
                self.cost(node, &job.spec.model).job(
                    job.spec.prompt_bytes,
                    job.spec.max_tokens,
                    job.spec.pace_us,
                ),
                job.spec.deadline,
            )
        };
        let refill = |held: &mut BTreeSet<(u64, JobKey)>,
                      queue: &mut std::vec::IntoIter<(u64, JobKey)>| {
            while held.len() < credits {
                match queue.next() {
                    Some(q) => {
                        held.insert(q);
                    }
                    None => break,
                }
            }
        };
        // When each model is ready on this slot's timeline: a cold one is loaded once, by the
        // first of its jobs to come up.
        let mut ready: HashMap<String, Micros> = HashMap::new();
        let start = |ready: &mut HashMap<String, Micros>, model: &str, t: Micros| -> Micros {
            let r = match ready.get(model) {
                Some(r) => *r,
                None => {
                    let r = self
                        .ready(now, node, model)
                        .unwrap_or_else(|| t.saturating_add(self.load_time(node, model)));
                    ready.insert(model.to_owned(), r);
                    r
                }
            };
            t.max(r)
        };
        let mut t = now;
        if let Some((key, r)) = running {
            let cost = self.cost(node, &r.spec.model);
            // A job the pool started has its model loaded.
            let begin = if r.progress.started_at().is_some() {
                ready.insert(r.spec.model.clone(), now);
                now
            } else {
                start(&mut ready, &r.spec.model, now)
            };
            t = head_end(now, r, &cost, begin);
            if r.zombie {
                // Cancelled: the worker stops at its next token.
                t = t.min(now.saturating_add(cost.per_token() + cost.overhead()));
            }
            out.push(Predicted {
                key,
                finish: t,
                deadline: r.spec.deadline,
            });
            refill(&mut held, &mut queue);
        }
        let sent_at = |key: JobKey| match self.jobs.get(&key).map(|j| j.place) {
            Some(Place::Sent { sent_at, .. }) if key != EXTRA => sent_at,
            _ => 0,
        };
        loop {
            if held.is_empty() {
                match queue.next() {
                    Some(q) => {
                        held.insert(q);
                    }
                    None => break,
                }
            }
            // The slot frees at `t`: the pool starts the smallest job it holds. If that job's
            // model is not ready, the pool waits, and meanwhile takes what the queen sends it
            // (up to its credit): the smallest of those then goes first.
            let &(_, first) = held.first().expect("filled above");
            let at = t.max(sent_at(first));
            if cost_of(first).0 > 0 && start(&mut ready, model_of(first), at) > at {
                while held.len() <= credits {
                    match queue.next() {
                        Some(q) => {
                            held.insert(q);
                        }
                        None => break,
                    }
                }
            }
            let (_, next) = held.pop_first().expect("filled above");
            refill(&mut held, &mut queue);
            let (cost, deadline) = cost_of(next);
            // A job sent but not yet started begins no earlier than it was sent.
            let begin = t.max(sent_at(next));
            let begin = if cost == 0 {
                begin
            } else {
                start(&mut ready, model_of(next), begin)
            };
            t = begin.saturating_add(cost);
            out.push(Predicted {
                key: next,
                finish: t,
                deadline,
            });
        }
        let others_end = t;
        if let Some((_, Some(open))) = gate {
            for (_, next) in later {
                let (cost, deadline) = cost_of(next);
                t = t.max(*open).saturating_add(cost);
                out.push(Predicted {
                    key: next,
                    finish: t,
                    deadline,
                });
            }
        }
        (out, others_end)
    }

    // --- the ledger ---------------------------------------------------------------------------

    fn enqueue(&mut self, key: JobKey, node: &str, slot: u32) {
        let job = self.jobs.get_mut(&key).expect("enqueue of a live job");
        job.node = node.to_owned();
        job.place = Place::Pending { slot };
        let order = match self.cfg.policy {
            Policy::Reserve | Policy::Edf => job.spec.deadline,
            Policy::Fcfs => job.seq,
        };
        if let Some(s) = self
            .nodes
            .get_mut(node)
            .and_then(|n| n.slots.get_mut(slot as usize))
        {
            s.pending.insert((order, key));
            self.queued += 1;
        }
        self.begin_drain(node, key);
    }

    fn unqueue(&mut self, key: JobKey) {
        let Some(job) = self.jobs.get(&key) else {
            return;
        };
        let Place::Pending { slot } = job.place else {
            return;
        };
        let order = self.order_key(job.spec.deadline, job.seq);
        if let Some(s) = self
            .nodes
            .get_mut(&job.node)
            .and_then(|n| n.slots.get_mut(slot as usize))
            && s.pending.remove(&(order, key))
        {
            self.queued -= 1;
        }
    }

    /// Sends waiting jobs to the pool while the slot has credit, dropping those that can no
    /// longer finish in time; an idle slot takes work reserved elsewhere when that is sooner.
    fn pump(&mut self, now: Micros, node_id: &str, slot: u32) {
        self.settle(now, node_id);
        loop {
            let Some(node) = self.nodes.get(node_id) else {
                return;
            };
            if !node.up {
                return;
            }
            let Some(s) = node.slots.get(slot as usize) else {
                return;
            };
            if s.sent.len() > node.credits as usize {
                return;
            }
            // The drained model's jobs stay here until the node's other work has ended.
            let drain = node.drain.as_deref();
            let first = s
                .pending
                .iter()
                .find(|(_, k)| drain != Some(self.jobs[k].spec.model.as_str()))
                .copied();
            let Some((order, key)) = first else {
                if !s.pending.is_empty() || !self.steal(now, node_id, slot) {
                    return;
                }
                continue;
            };
            let finish = self
                .predict(now, node, slot as usize)
                .iter()
                .find(|p| p.key == key)
                .map_or(Micros::MAX, |p| p.finish);
            let deadline = self.jobs[&key].spec.deadline;
            let hopeless = match self.cfg.policy {
                Policy::Reserve => finish > deadline,
                Policy::Edf | Policy::Fcfs => deadline <= now,
            };
            let model = self.jobs[&key].spec.model.clone();
            let load = if hopeless {
                None
            } else {
                match self.prepare_load(now, node_id, &model) {
                    Some(load) => Some(load),
                    // It cannot fit beside the models with work here: it waits for them.
                    None => continue,
                }
            };
            let s = self
                .nodes
                .get_mut(node_id)
                .and_then(|n| n.slots.get_mut(slot as usize))
                .expect("checked above");
            s.pending.remove(&(order, key));
            self.queued -= 1;
            let Some((evict, after_load)) = load else {
                self.end(
                    key,
                    Outcome::Missed {
                        reason: format!(
                            "not dispatched: predicted to finish {}ms after its deadline",
                            finish.saturating_sub(deadline).div_ceil(1000)
                        ),
                    },
                );
                continue;
            };
            // To an idle slot the job goes first whatever arrives with it: the pool runs the
            // smallest order first, and the ledger has it running from now.
            let head = s.sent.is_empty();
            if head {
                s.head = Some(key);
            }
            s.sent.push_back(key);
            self.loading(now, node_id, &model, &evict);
            let job = self.jobs.get_mut(&key).expect("live");
            job.place = Place::Sent { slot, sent_at: now };
            job.after_load = after_load;
            self.actions.push(Action::Send {
                key,
                node: node_id.to_owned(),
                slot,
                attempt: job.attempt,
                remaining: deadline.saturating_sub(now),
                order: if head { 0 } else { order },
                evict,
            });
        }
    }

    /// Moves to this slot the waiting job (reserved on another slot) that would finish sooner
    /// here, if the move keeps every job on this slot on time. Moving a job off a slot only
    /// makes that slot's other jobs earlier.
    fn steal(&mut self, now: Micros, node_id: &str, slot: u32) -> bool {
        let Some(node) = self.nodes.get(node_id) else {
            return false;
        };
        let mut best: Option<(Micros, JobKey)> = None;
        for (other_id, other) in &self.nodes {
            if !other.up {
                continue;
            }
            for (si, s) in other.slots.iter().enumerate() {
                if other_id == node_id && si == slot as usize {
                    continue;
                }
                let Some(&(order, key)) = s.pending.first() else {
                    continue;
                };
                let job = &self.jobs[&key];
                if !node.models.contains(&job.spec.model) || job.avoid.iter().any(|a| a == node_id)
                {
                    continue;
                }
                let there = self
                    .predict(now, other, si)
                    .iter()
                    .find(|p| p.key == key)
                    .map_or(Micros::MAX, |p| p.finish);
                let extra = Extra {
                    order,
                    deadline: job.spec.deadline,
                    cost: self.cost(node, &job.spec.model).job(
                        job.spec.prompt_bytes,
                        job.spec.max_tokens,
                        job.spec.pace_us,
                    ),
                    model: &job.spec.model,
                };
                let Some((here, fits)) = self.try_slot(now, node, slot as usize, extra) else {
                    continue;
                };
                if fits && here < there && best.is_none_or(|(gain, _)| there - here > gain) {
                    best = Some((there - here, key));
                }
            }
        }
        let Some((_, key)) = best else {
            return false;
        };
        self.unqueue(key);
        self.enqueue(key, node_id, slot);
        true
    }

    /// A job whose pool failed gets another pool, if its attempts and deadline allow.
    fn retry(&mut self, now: Micros, key: JobKey, code: i32, message: String) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        let failed_on = std::mem::take(&mut job.node);
        if !failed_on.is_empty() && !job.avoid.contains(&failed_on) {
            job.avoid.push(failed_on);
        }
        job.place = Place::Parked;
        if job.attempt >= self.cfg.max_attempts || job.spec.deadline <= now {
            return self.end(key, Outcome::Failed { code, message });
        }
        let spec = job.spec.clone();
        let avoid = job.avoid.clone();
        let seq = job.seq;
        match self.choose(now, &spec, &avoid, Some(seq)) {
            Ok((node, slot, _)) => {
                let job = self.jobs.get_mut(&key).expect("live");
                job.attempt += 1;
                self.enqueue(key, &node, slot);
                self.pump(now, &node, slot);
            }
            // Nowhere else to go in time: the job fails with what actually went wrong.
            Err(_) => self.end(key, Outcome::Failed { code, message }),
        }
    }

    /// Places parked jobs on pools that can still finish them in time.
    fn unpark(&mut self, now: Micros) {
        let parked: Vec<JobKey> = self.parked.iter().copied().collect();
        for key in parked {
            let job = &self.jobs[&key];
            let (spec, avoid, seq) = (job.spec.clone(), job.avoid.clone(), job.seq);
            match self.choose(now, &spec, &avoid, Some(seq)) {
                Ok((node, slot, _)) => {
                    self.parked.remove(&key);
                    self.enqueue(key, &node, slot);
                    self.pump(now, &node, slot);
                }
                // Some pool serves the model but cannot make it: it never will, as the
                // deadline only comes closer.
                Err(Refusal::Infeasible { .. }) if self.cfg.policy == Policy::Reserve => {
                    self.parked.remove(&key);
                    self.end(
                        key,
                        Outcome::Missed {
                            reason: "no pool can finish it before its deadline".into(),
                        },
                    );
                }
                Err(_) => {}
            }
        }
    }

    fn end(&mut self, key: JobKey, outcome: Outcome) {
        if self.forget(key).is_some() {
            self.actions.push(Action::End { key, outcome });
        }
    }

    /// Takes a job out of the live table: the one way out, so the per-caller counts stay true.
    fn forget(&mut self, key: JobKey) -> Option<Live> {
        let job = self.jobs.remove(&key)?;
        if let Some(n) = self.callers.get_mut(&job.spec.caller) {
            *n -= 1;
            if *n == 0 {
                self.callers.remove(&job.spec.caller);
            }
        }
        Some(job)
    }

    /// Live jobs of one caller (queued, running, or stopped and still holding a slot).
    pub fn live_of(&self, caller: &str) -> u32 {
        self.callers.get(caller).copied().unwrap_or(0)
    }

    /// Feeds a sent job's measured times into its pool's cost model, on the queen's clock.
    fn learn(&mut self, now: Micros, key: JobKey, slot: u32, sent_at: Micros, report: &Report) {
        let job = &self.jobs[&key];
        let Some(node) = self.nodes.get_mut(&job.node) else {
            return;
        };
        let last_end = node.slots.get(slot as usize).map_or(0, |s| s.last_end);
        let Some(cost) = node.costs.get_mut(&job.spec.model) else {
            return;
        };
        let p = &job.progress;
        let first = Progress::get(&p.first_token);
        let last = Progress::get(&p.last_token);
        let tokens = p.tokens();
        let mut sample = Sample {
            prompt_bytes: job.spec.prompt_bytes,
            pace_us: job.spec.pace_us,
            ..Sample::default()
        };
        match report {
            Report::Finished {
                worker_first_token_us,
                generation_us,
                tokens,
            } => {
                // The job began when it was sent or when the slot's previous job ended.
                let began = sent_at.max(last_end);
                let service = now.saturating_sub(began);
                // A job that waited for its model's load says nothing about the overhead.
                if !job.after_load {
                    sample.overhead_us =
                        Some(service.saturating_sub(worker_first_token_us + generation_us));
                }
                sample.first_token_us = Some(*worker_first_token_us);
                if *tokens > 1 {
                    sample.per_token_us = Some(generation_us / u64::from(tokens - 1));
                }
            }
            // A job stopped early still says how fast tokens came, on the queen's clock.
            Report::Failed { .. } | Report::Lost { .. } => {
                if let (Some(f), Some(l)) = (first, last)
                    && tokens > 1
                {
                    sample.per_token_us = Some(l.saturating_sub(f) / u64::from(tokens - 1));
                }
                if let (Some(s), Some(f)) = (p.started_at(), first) {
                    sample.first_token_us = Some(f.saturating_sub(s));
                }
            }
        }
        cost.observe(sample);
    }
}

/// Whether admitting changed a job predicted on time (`base`) into one predicted late (`with`).
fn made_late(base: &[Predicted], with: &[Predicted]) -> bool {
    let mut before: Vec<(JobKey, bool)> = base
        .iter()
        .map(|p| (p.key, p.finish <= p.deadline))
        .collect();
    before.sort_unstable();
    let was_on_time = |key| {
        before
            .binary_search_by_key(&key, |b| b.0)
            .is_ok_and(|i| before[i].1)
    };
    with.iter()
        .any(|p| p.key != EXTRA && p.finish > p.deadline && was_on_time(p.key))
}

/// When the job at the head of a slot will end, from what its progress says; `begin` is when
/// it can start if it has not (its model ready).
fn head_end(now: Micros, job: &Live, cost: &Cost, begin: Micros) -> Micros {
    let max = u64::from(job.spec.max_tokens);
    let p = &job.progress;
    let tokens = u64::from(p.tokens());
    let end =
        match (p.started_at(), Progress::get(&p.last_token)) {
            (_, Some(last)) if tokens > 0 => last.saturating_add(
                cost.per_token_at(job.spec.pace_us)
                    .saturating_mul(max.saturating_sub(tokens)),
            ),
            (Some(started), _) => started
                .saturating_add(cost.first_token(job.spec.prompt_bytes))
                .saturating_add(
                    cost.per_token_at(job.spec.pace_us)
                        .saturating_mul(max.saturating_sub(1)),
                ),
            _ => match job.place {
                Place::Sent { sent_at, .. } => sent_at.max(now).max(begin).saturating_add(
                    cost.job(job.spec.prompt_bytes, job.spec.max_tokens, job.spec.pace_us),
                ),
                _ => now.saturating_add(cost.job(
                    job.spec.prompt_bytes,
                    job.spec.max_tokens,
                    job.spec.pace_us,
                )),
            },
        };
    end.max(now)
}

mod models;
#[cfg(test)]
mod tests;
