//! The dispatch actor: runs the core on the actix thread and carries out what it decides.
//!
//! It owns the core, each live job's I/O (its client stream, prompt, timings) and the link to
//! each pool's session. A submit is one message in and one decision out; a pool's report on a
//! job is one message. The actor never awaits: sending a job is a push onto the pool session's
//! channel, and the terminal record is committed (group commit, see `store`) by a small task
//! that then sends the client its last event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use skep_audit::Fields;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::core::{self, Action, Core, JobKey, Micros, Outcome, Progress, Refusal, Report};
use super::cost::Figures;
use super::{Attempt, Delivered, NewJob, Route, SessionCmd, Target};
use crate::Error;
use crate::audit::{AuditHandle, events};
use crate::job::Event;
use crate::metrics::{Finish, JobEnd, Metrics, Rejection};
use crate::model::{JobState, Timings, micros, unix_ms};
use crate::registry::RegistryHandle;
use crate::store::{Interrupted, JobUpdate, StoreHandle};

/// How often the core's clock ticks: expiries, hung pools, clients that went away.
const TICK: Duration = Duration::from_millis(10);

/// What a live job needs beyond the core's view of it.
struct JobIo {
    job: NewJob,
    events: mpsc::Sender<Event>,
    progress: Arc<Progress>,
    /// Tokens the client has, across attempts (a retry must reproduce them).
    delivered: Arc<Delivered>,
    timings: Timings,
    node: String,
    /// Set when the client has been told the job was accepted (or it was recovered).
    admitted: Instant,
    /// The node it is at now (for the metrics' running/waiting gauges), `None` while it waits
    /// here.
    running_on: Option<String>,
    /// Whether it ever reached a pool.
    was_sent: bool,
    /// Tokens the prompt was, as the engine that finished it counted them (0 until then).
    prompt_tokens: u32,
}

struct Link {
    generation: u64,
    tx: mpsc::UnboundedSender<SessionCmd>,
    models: Vec<String>,
    ready: Option<(u32, u32)>,
}

pub struct Dispatcher {
    core: Core,
    epoch: Instant,
    jobs: HashMap<JobKey, JobIo>,
    ids: HashMap<String, JobKey>,
    links: HashMap<String, Link>,
    generation: u64,
    store: StoreHandle,
    audit: AuditHandle,
    registry: Option<RegistryHandle>,
    metrics: Metrics,
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Submits and reports must not wait behind a default-sized mailbox under load.
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(TICK, |this, ctx| {
            let now = this.now();
            // A client that hung up while its job waited here cancels the job.
            let gone: Vec<JobKey> = this
                .jobs
                .iter()
                .filter(|(_, io)| io.events.is_closed())
                .map(|(k, _)| *k)
                .collect();
            for key in gone {
                this.core.cancel(now, key);
            }
            this.core.tick(now);
            this.perform(ctx);
        });
    }
}

/// What a submit gets back when admitted.
pub struct Decision {
    pub node: String,
    pub predicted_finish: Duration,
    /// When it is predicted to start: its finish less its own predicted cost.
    pub predicted_start: Duration,
    /// Jobs ahead of it on its slot (0: sent to the pool at once).
    pub position: usize,
}

impl Dispatcher {
    pub fn start(
        cfg: core::Config,
        store: StoreHandle,
        audit: AuditHandle,
        metrics: Metrics,
    ) -> DispatchHandle {
        let addr = Dispatcher {
            core: Core::new(cfg),
            epoch: Instant::now(),
            jobs: HashMap::new(),
            ids: HashMap::new(),
            links: HashMap::new(),
            generation: 0,
            store,
            audit,
            registry: None,
            metrics,
        }
        .start();
        DispatchHandle { addr }
    }

    fn now(&self) -> Micros {
        micros(self.epoch.elapsed())
    }

    fn at(&self, when: Instant) -> Micros {
        micros(when.saturating_duration_since(self.epoch))
    }

    /// Metrics: each of `keys` that the metrics still count at a pool but the core has put back
    /// in the queue (its pool failed; it fails over) counts as waiting again.
    fn requeued(&mut self, keys: &[JobKey]) {
        for key in keys {
            let Some(io) = self.jobs.get_mut(key) else {
                continue;
            };
            if io.running_on.is_some() && !self.core.is_sent(*key) {
                let node = io.running_on.take().unwrap_or_default();
                self.metrics.requeued(&io.job.model, &node);
            }
        }
    }

    /// `requeued` for every live job the metrics count on `node`.
    fn requeued_from(&mut self, node: &str) {
        let keys: Vec<JobKey> = self
            .jobs
            .iter()
            .filter(|(_, io)| io.running_on.as_deref() == Some(node))
            .map(|(k, _)| *k)
            .collect();
        self.requeued(&keys);
    }

    /// Carries out everything the core decided, in order.
    fn perform(&mut self, ctx: &mut Context<Self>) {
        loop {
            let actions = self.core.take_actions();
            if actions.is_empty() {
                return;
            }
            for a in actions {
                match a {
                    Action::Send {
                        key,
                        node,
                        slot,
                        attempt,
                        remaining,
                        order,
                        evict,
                    } => self.send(key, node, (slot, order, evict), attempt, remaining),
                    Action::Cancel { key, node } => {
                        if let Some(link) = self.links.get(&node) {
                            let _ = link.tx.send(SessionCmd::Cancel { handle: key });
                        }
                    }
                    Action::End { key, outcome } => self.end(key, outcome, ctx),
                }
            }
        }
    }

    fn send(
        &mut self,
        key: JobKey,
        node: String,
        (slot, order, evict): (u32, u64, Vec<String>),
        attempt: u32,
        remaining: Micros,
    ) {
        let Some(io) = self.jobs.get_mut(&key) else {
            return;
        };
        if attempt == 1 {
            io.timings.queue_wait_us = micros(io.admitted.elapsed());
        }
        io.node = node.clone();
        let route = Route {
            key,
            job_id: io.job.id.clone(),
            events: io.events.clone(),
            progress: Arc::clone(&io.progress),
            delivered: Arc::clone(&io.delivered),
            deadline: io.job.arrived + io.job.budget,
            sent_at: Instant::now(),
            epoch: self.epoch,
            attempt,
        };
        let cmd = SessionCmd::Job {
            attempt: Box::new(Attempt {
                handle: key,
                job_id: io.job.id.clone(),
                model: io.job.model.clone(),
                prompt: Arc::clone(&io.job.prompt),
                max_tokens: io.job.max_tokens,
                sampling: io.job.sampling,
                remaining: Duration::from_micros(remaining),
                slot,
                order,
                evict,
            }),
            route: Box::new(route),
        };
        let sent = self
            .links
            .get(&node)
            .is_some_and(|l| l.tx.send(cmd).is_ok());
        if sent && let Some(io) = self.jobs.get_mut(&key) {
            let from = io.running_on.replace(node.clone());
            self.metrics.sent(&io.job.model, from.as_deref(), &node);
            io.was_sent = true;
        }
        if !sent {
            // The session is gone: the core hears it as a lost pool for this job.
            let now = self.now();
            self.core.ended(
                now,
                key,
                &node,
                Report::Lost {
                    message: format!("no session to pool {node}"),
                },
            );
        }
        self.audit.record(
            "job.dispatched",
            &self.jobs[&key].job.caller,
            Fields::new().job(&self.jobs[&key].job.id).node(&node),
        );
    }

    /// The job's terminal state: persisted (group commit) before the client's last event.
    fn end(&mut self, key: JobKey, outcome: Outcome, _ctx: &mut Context<Self>) {
        let Some(mut io) = self.jobs.remove(&key) else {
            return;
        };
        self.ids.remove(&io.job.id);
        io.timings.total_us = micros(io.job.arrived.elapsed());
        let tokens = io.delivered.len();
        let budget = io.job.budget;
        let elapsed = io.job.arrived.elapsed();
        let (state, error) = match outcome {
            Outcome::Done => (JobState::Done, None),
            Outcome::Missed { reason } => {
                info!(job = %io.job.id, %reason, "deadline missed");
                (
                    JobState::DeadlineExceeded,
                    Some(Error::DeadlineExceeded { budget, elapsed }),
                )
            }
            Outcome::Cancelled => (JobState::Cancelled, Some(Error::Cancelled)),
            Outcome::Failed { code, message } => (
                JobState::Failed,
                Some(if code == 14 {
                    Error::PoolUnreachable {
                        node: io.node.clone(),
                        message,
                        transport: false,
                    }
                } else {
                    Error::Pool {
                        node: io.node.clone(),
                        code,
                        message,
                    }
                }),
            ),
        };
        info!(job = %io.job.id, state = state.as_str(), tokens, total_ms = io.timings.total_us / 1000, "job finished");
        self.metrics.ended(&JobEnd {
            model: &io.job.model,
            running_on: io.running_on.as_deref(),
            node: &io.node,
            sent: io.was_sent,
            finish: match state {
                JobState::Done => Finish::Done,
                JobState::DeadlineExceeded => Finish::Missed,
                JobState::Cancelled => Finish::Cancelled,
                _ => Finish::Failed,
            },
            tokens,
            max_tokens: io.job.max_tokens,
            prompt_tokens: io.prompt_tokens,
            budget,
            timings: &io.timings,
        });
        let update = JobUpdate {
            id: io.job.id.clone(),
            state,
            tokens,
            node_id: io.node.clone(),
            error: error.as_ref().map(ToString::to_string).unwrap_or_default(),
            timings: io.timings,
            finished_unix_ms: unix_ms(),
        };
        let event = match state {
            JobState::Done => events::JOB_COMPLETED,
            JobState::DeadlineExceeded => events::JOB_DEADLINE_EXCEEDED,
            JobState::Cancelled => events::JOB_CANCELLED,
            _ => events::JOB_FAILED,
        };
        let mut fields = Fields::new()
            .job(&io.job.id)
            .model(&io.job.model)
            .num("tokens", u64::from(tokens));
        if !io.node.is_empty() {
            fields = fields.node(&io.node);
        }
        if let Some(e) = &error {
            fields = fields.reason(&e.to_string());
        }
        self.audit.record(event, &io.job.caller, fields);
        let store = self.store.clone();
        let last = match error {
            None => Event::Done {
                tokens,
                prompt_tokens: io.prompt_tokens,
                timings: io.timings,
            },
            Some(error) => Event::Failed {
                error,
                timings: io.timings,
            },
        };
        let id = io.job.id.clone();
        tokio::spawn(async move {
            if let Err(e) = store.update(update).await {
                warn!(job = %id, error = %e, "could not persist the final state");
            }
            let _ = io.events.send(last).await;
        });
    }
}

// --- messages -------------------------------------------------------------------------------

#[derive(Message)]
#[rtype(result = "Result<(JobKey, Decision), Error>")]
struct Submit {
    job: NewJob,
    events: mpsc::Sender<Event>,
}

impl Handler<Submit> for Dispatcher {
    type Result = Result<(JobKey, Decision), Error>;
    fn handle(&mut self, msg: Submit, ctx: &mut Self::Context) -> Self::Result {
        let now = self.now();
        let deadline = self.at(msg.job.arrived + msg.job.budget);
        let spec = core::JobSpec {
            model: msg.job.model.clone(),
            prompt_bytes: prompt_bytes(&msg.job.prompt),
            pace_us: pace_us(msg.job.budget, msg.job.max_tokens),
            max_tokens: msg.job.max_tokens,
            deadline,
            caller: Arc::from(msg.job.owner.as_str()),
            caller_share: msg.job.caller_share,
        };
        let admitted = self.core.submit(now, spec.clone()).map_err(|r| {
            let why = match r {
                Refusal::Infeasible { .. } => Rejection::Infeasible,
                Refusal::NoPool => Rejection::NoPool,
                Refusal::QueueFull { .. } => Rejection::QueueFull,
                Refusal::CallerShare { .. } => Rejection::CallerShare,
            };
            self.metrics.rejected(&msg.job.model, why);
            r
        });
        let admitted = admitted.map_err(|r| match r {
            Refusal::Infeasible { best_finish } => Error::Infeasible {
                budget: msg.job.budget,
                estimate: best_finish.map_or(Duration::MAX, |f| {
                    Duration::from_micros(f.saturating_sub(now)) + msg.job.arrived.elapsed()
                }),
            },
            Refusal::NoPool => Error::NoPool(msg.job.model.clone()),
            Refusal::QueueFull { retry_after } => Error::QueueFull {
                retry_after: Duration::from_micros(retry_after),
            },
            Refusal::CallerShare { share, retry_after } => Error::CallerShare {
                share,
                retry_after: Duration::from_micros(retry_after),
            },
        })?;
        let position = self.core.position(admitted.key);
        let since_arrival = msg.job.arrived.elapsed();
        let predicted_finish =
            Duration::from_micros(admitted.predicted_finish.saturating_sub(now)) + since_arrival;
        let own = self
            .core
            .cost_of(&admitted.node, &msg.job.model, &spec)
            .unwrap_or(0);
        let predicted_start = Duration::from_micros(
            admitted
                .predicted_finish
                .saturating_sub(own)
                .saturating_sub(now),
        ) + since_arrival;
        self.ids.insert(msg.job.id.clone(), admitted.key);
        self.metrics.admitted(&msg.job.model);
        self.jobs.insert(
            admitted.key,
            JobIo {
                timings: Timings {
                    admission_us: micros(msg.job.arrived.elapsed()),
                    ..Timings::default()
                },
                job: msg.job,
                events: msg.events,
                progress: admitted.progress,
                delivered: Arc::default(),
                node: admitted.node.clone(),
                admitted: Instant::now(),
                running_on: None,
                was_sent: false,
                prompt_tokens: 0,
            },
        );
        self.perform(ctx);
        Ok((
            admitted.key,
            Decision {
                node: admitted.node,
                predicted_finish,
                predicted_start,
                position,
            },
        ))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Resume {
    rec: Interrupted,
}

impl Handler<Resume> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: Resume, ctx: &mut Self::Context) {
        let rec = msg.rec;
        let remaining = rec.deadline_unix_ms.saturating_sub(unix_ms());
        let job = NewJob {
            id: rec.id,
            model: rec.model,
            prompt: Arc::from(rec.prompt),
            max_tokens: rec.max_tokens,
            sampling: rec.sampling,
            budget: Duration::from_millis(remaining),
            arrived: Instant::now(),
            // The store keeps the owner's digest; its first 6 hex digits are the fingerprint.
            caller: rec.caller.chars().take(6).collect(),
            owner: rec.caller,
            // Already admitted once: counted against its caller, never refused for it.
            caller_share: None,
        };
        info!(job = %job.id, remaining_ms = remaining, "resuming a job interrupted by a queen restart");
        self.audit.record(
            events::JOB_RESUMED,
            "system",
            Fields::new()
                .job(&job.id)
                .model(&job.model)
                .num("remaining_ms", remaining),
        );
        // The client's stream died with the old process: events are drained; the outcome is
        // in the store (`jobs get`) and the audit log.
        let (tx, mut rx) = mpsc::channel(crate::job::EVENT_BUFFER);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let now = self.now();
        let spec = core::JobSpec {
            model: job.model.clone(),
            prompt_bytes: prompt_bytes(&job.prompt),
            pace_us: pace_us(job.budget, job.max_tokens),
            max_tokens: job.max_tokens,
            deadline: self.at(job.arrived + job.budget),
            caller: Arc::from(job.owner.as_str()),
            caller_share: job.caller_share,
        };
        let (key, progress) = self.core.resume(now, spec);
        self.ids.insert(job.id.clone(), key);
        self.metrics.admitted(&job.model);
        self.jobs.insert(
            key,
            JobIo {
                job,
                events: tx,
                progress,
                delivered: Arc::default(),
                timings: Timings::default(),
                node: String::new(),
                admitted: Instant::now(),
                running_on: None,
                was_sent: false,
                prompt_tokens: 0,
            },
        );
        self.perform(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "bool")]
struct Cancel {
    id: String,
}

impl Handler<Cancel> for Dispatcher {
    type Result = bool;
    fn handle(&mut self, msg: Cancel, ctx: &mut Self::Context) -> bool {
        let Some(&key) = self.ids.get(&msg.id) else {
            return false;
        };
        let now = self.now();
        let done = self.core.cancel(now, key);
        self.perform(ctx);
        done
    }
}

#[derive(Message)]
#[rtype(result = "Option<bool>")]
struct State {
    id: String,
}

impl Handler<State> for Dispatcher {
    type Result = Option<bool>;
    fn handle(&mut self, msg: State, _: &mut Self::Context) -> Option<bool> {
        let key = self.ids.get(&msg.id)?;
        Some(self.core.is_sent(*key))
    }
}

/// A pool's report on one job, from its session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ended {
    pub node: String,
    pub generation: u64,
    pub key: JobKey,
    pub report: Report,
    /// What this attempt measured, hop by hop.
    pub timings: Option<AttemptTimings>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct AttemptTimings {
    pub dispatch_us: u64,
    pub pool_us: u64,
    pub worker_first_token_us: u64,
    pub generation_us: u64,
    /// Tokens the prompt was, per the worker's engine (a finished attempt's only).
    pub prompt_tokens: u32,
}

impl Handler<Ended> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: Ended, ctx: &mut Self::Context) {
        if self
            .links
            .get(&msg.node)
            .is_none_or(|l| l.generation != msg.generation)
        {
            // A report from a session that has been replaced: its jobs were already moved.
            return;
        }
        if let (Some(io), Some(t)) = (self.jobs.get_mut(&msg.key), msg.timings) {
            io.timings.dispatch_us = t.dispatch_us;
            io.timings.pool_us = t.pool_us;
            io.timings.worker_first_token_us = t.worker_first_token_us;
            io.timings.generation_us = t.generation_us;
            io.prompt_tokens = t.prompt_tokens;
        }
        let now = self.now();
        self.core.ended(now, msg.key, &msg.node, msg.report);
        self.perform(ctx);
        self.requeued(&[msg.key]);
    }
}

/// The client of a job hung up (seen by its session while streaming).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClientGone {
    pub key: JobKey,
}

impl Handler<ClientGone> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: ClientGone, ctx: &mut Self::Context) {
        let now = self.now();
        self.core.cancel(now, msg.key);
        self.perform(ctx);
    }
}

/// A session is open and the pool has said how many slots and credits it has.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionReady {
    pub node: String,
    pub generation: u64,
    pub slots: u32,
    pub credits: u32,
}

impl Handler<SessionReady> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SessionReady, ctx: &mut Self::Context) {
        let Some(link) = self
            .links
            .get_mut(&msg.node)
            .filter(|l| l.generation == msg.generation)
        else {
            return;
        };
        link.ready = Some((msg.slots, msg.credits));
        let models = link.models.clone();
        info!(node = %msg.node, slots = msg.slots, credits = msg.credits, "pool session ready");
        let now = self.now();
        self.core
            .node_up(now, &msg.node, msg.slots, msg.credits, models);
        self.perform(ctx);
    }
}

/// A session closed or failed. Its jobs fail over; the node is suspect until it heartbeats.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionLost {
    pub node: String,
    pub generation: u64,
    pub reason: String,
}

impl Handler<SessionLost> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SessionLost, ctx: &mut Self::Context) {
        if self
            .links
            .get(&msg.node)
            .is_none_or(|l| l.generation != msg.generation)
        {
            return;
        }
        warn!(node = %msg.node, reason = %msg.reason, "pool session lost");
        self.links.remove(&msg.node);
        let now = self.now();
        self.core.node_down(now, &msg.node);
        self.perform(ctx);
        self.requeued_from(&msg.node);
        if let Some(registry) = self.registry.clone() {
            tokio::spawn(async move {
                let _ = registry.unreachable(&msg.node).await;
            });
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct NodeUp {
    target: Target,
    models: Vec<String>,
    figures: Vec<(String, Figures)>,
    states: Option<NodeModels>,
}

impl Handler<NodeUp> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: NodeUp, ctx: &mut Self::Context) {
        let id = msg.target.node_id.clone();
        for (model, f) in &msg.figures {
            self.core.figures(&id, model, *f);
        }
        if let Some(m) = msg.states {
            let now = self.now();
            self.core.model_states(now, &id, m.states, m.budget);
            self.perform(ctx);
        }
        if let Some(link) = self.links.get_mut(&id)
            && !link.tx.is_closed()
        {
            // The same session carries on; only what the node serves may have changed.
            link.models = msg.models;
            if let Some((slots, credits)) = link.ready {
                let models = link.models.clone();
                let now = self.now();
                self.core.node_up(now, &id, slots, credits, models);
                self.perform(ctx);
            }
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        let (tx, rx) = mpsc::unbounded_channel();
        self.links.insert(
            id,
            Link {
                generation,
                tx,
                models: msg.models,
                ready: None,
            },
        );
        let me = ctx.address();
        tokio::spawn(crate::grpc::session::run(
            msg.target,
            generation,
            rx,
            DispatchHandle { addr: me },
        ));
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Figure {
    node: String,
    figures: Vec<(String, Figures)>,
    states: Option<NodeModels>,
}

impl Handler<Figure> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: Figure, ctx: &mut Self::Context) {
        for (model, f) in &msg.figures {
            self.core.figures(&msg.node, model, *f);
        }
        if let Some(m) = msg.states {
            let now = self.now();
            self.core.model_states(now, &msg.node, m.states, m.budget);
            self.perform(ctx);
        }
    }
}

/// The models of a pool and its memory budget (bytes; 0 = unlimited), as it reported them.
#[derive(Debug, Clone, Default)]
pub struct NodeModels {
    pub states: Vec<core::ModelState>,
    pub budget: u64,
}

/// A pool's session said its models changed (a load began or ended, a model was evicted).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ModelsChanged {
    pub node: String,
    pub generation: u64,
    pub models: NodeModels,
}

impl Handler<ModelsChanged> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: ModelsChanged, ctx: &mut Self::Context) {
        if self
            .links
            .get(&msg.node)
            .is_none_or(|l| l.generation != msg.generation)
        {
            return;
        }
        let now = self.now();
        self.core
            .model_states(now, &msg.node, msg.models.states, msg.models.budget);
        self.perform(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct NodeDown {
    node: String,
}

impl Handler<NodeDown> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: NodeDown, ctx: &mut Self::Context) {
        // Dropping the link closes the session: the pool cancels what it still holds for us.
        self.links.remove(&msg.node);
        let now = self.now();
        self.core.node_down(now, &msg.node);
        self.perform(ctx);
        self.requeued_from(&msg.node);
    }
}

#[derive(Message)]
#[rtype(result = "HashMap<String, u32>")]
struct Running;

impl Handler<Running> for Dispatcher {
    type Result = MessageResult<Running>;
    fn handle(&mut self, _: Running, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.core.running())
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct SetRegistry(RegistryHandle);

impl Handler<SetRegistry> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SetRegistry, _: &mut Self::Context) {
        self.registry = Some(msg.0);
    }
}

/// Async handle to the dispatch actor.
#[derive(Clone)]
pub struct DispatchHandle {
    addr: Addr<Dispatcher>,
}

// === impl DispatchHandle ===

impl DispatchHandle {
    /// One decision: admitted (with its reservation, possibly already sent) or refused.
    pub async fn submit(
        &self,
        job: NewJob,
        events: mpsc::Sender<Event>,
    ) -> Result<(JobKey, Decision), Error> {
        self.addr.send(Submit { job, events }).await?
    }

    pub async fn resume(&self, rec: Interrupted) -> Result<(), Error> {
        Ok(self.addr.send(Resume { rec }).await?)
    }

    /// True if the job was live and has now ended as cancelled.
    pub async fn cancel(&self, id: &str) -> Result<bool, Error> {
        Ok(self.addr.send(Cancel { id: id.to_owned() }).await?)
    }

    /// `Some(true)` while the job is at a pool, `Some(false)` while it waits here.
    pub async fn state(&self, id: &str) -> Result<Option<bool>, Error> {
        Ok(self.addr.send(State { id: id.to_owned() }).await?)
    }

    pub async fn node_up(
        &self,
        target: Target,
        models: Vec<String>,
        figures: Vec<(String, Figures)>,
        states: Option<NodeModels>,
    ) -> Result<(), Error> {
        Ok(self
            .addr
            .send(NodeUp {
                target,
                models,
                figures,
                states,
            })
            .await?)
    }

    /// A heartbeat's engine figures and model states (`None`: it reported none).
    pub async fn figures(
        &self,
        node: &str,
        figures: Vec<(String, Figures)>,
        states: Option<NodeModels>,
    ) -> Result<(), Error> {
        Ok(self
            .addr
            .send(Figure {
                node: node.to_owned(),
                figures,
                states,
            })
            .await?)
    }

    pub async fn node_down(&self, node: &str) -> Result<(), Error> {
        Ok(self
            .addr
            .send(NodeDown {
                node: node.to_owned(),
            })
            .await?)
    }

    /// Jobs at a pool, per node.
    pub async fn running(&self) -> Result<HashMap<String, u32>, Error> {
        Ok(self.addr.send(Running).await?)
    }

    pub async fn set_registry(&self, registry: RegistryHandle) -> Result<(), Error> {
        Ok(self.addr.send(SetRegistry(registry)).await?)
    }

    pub(crate) async fn ended(&self, msg: Ended) {
        let _ = self.addr.send(msg).await;
    }

    pub(crate) async fn client_gone(&self, key: JobKey) {
        let _ = self.addr.send(ClientGone { key }).await;
    }

    pub(crate) async fn session_ready(&self, msg: SessionReady) {
        let _ = self.addr.send(msg).await;
    }

    pub(crate) async fn session_lost(&self, msg: SessionLost) {
        let _ = self.addr.send(msg).await;
    }

    pub(crate) async fn models_changed(&self, msg: ModelsChanged) {
        let _ = self.addr.send(msg).await;
    }
}

/// A prompt's size as the cost model classes it (prompts are bounded far below `u32::MAX`).
fn prompt_bytes(prompt: &str) -> u32 {
    u32::try_from(prompt.len()).unwrap_or(u32::MAX)
}

/// A job's budget per token it asks for: how urgent it is, as the cost model classes it.
fn pace_us(budget: Duration, max_tokens: u32) -> u64 {
    u64::try_from(budget.as_micros()).unwrap_or(u64::MAX) / u64::from(max_tokens.max(1))
}
