//! The `skep.v1.Pool` service: authenticates the queen and serves its `Session` streams.
//!
//! Only this module (and `membership`) names tonic types. A session is one bidirectional stream
//! per queen connection carrying every job: a reader task validates each `JobFrame` (budget
//! measured from the frame's arrival) and queues it on the slot the queen chose, where waiting
//! jobs run smallest `order` first, ties in arrival order (the queen's reservation ledger
//! predicts exactly that; see `supervisor`); the outbound stream drains the session's single event queue, putting every event that is
//! ready together into one `PoolFrame`. When the queen goes away or the pool's dispatch key
//! changes (it registered again), every job of the session is cancelled and the stream closes.
//! Several sessions may be open at once (a restarted queen reconnecting while the old connection
//! dies); each job's events go back on the session it came from.

mod status;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures_util::{Stream, StreamExt};
use skep_common::auth::{self, TokenDigest};
use skep_common::deadline::{Deadline, DeadlineError};
use skep_common::ratelimit::RateLimits;
use skep_common::sampling::Sampling;
use skep_common::validate;
use skep_proto::v1::pool_server::{Pool, PoolServer};
use skep_proto::v1::{
    Credit, JobFailed, JobFrame, ModelStates, PoolEvent, PoolFrame, QueenFrame, WorkerFinished,
    WorkerStarted, WorkerToken, pool_event, queen_frame,
};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::audit::{Audit, events};
use crate::metrics::{PoolMetrics, SessionMeter};
use crate::models::ModelSet;
use crate::supervisor::{QueuedJob, Slots};
use crate::{Error, Event, Sink};
use skep_audit::Fields;

/// Largest request accepted: a maximal prompt plus room for the other fields.
const MAX_MESSAGE: usize = validate::MAX_PROMPT_BYTES + 4096;
// A frame carrying the largest valid job (the lane request's fields, plus handle, budget, slot,
// order and the frame's own tag) must get through.
const _: () = assert!(validate::MAX_LANE_REQUEST_BYTES + 64 <= MAX_MESSAGE);
/// Most events in one outbound frame: keeps a frame far below the queen's message limit.
const MAX_BATCH: usize = 256;

/// The queen's dispatch-key digest, set once registration succeeds (and replaced on re-register).
pub type DispatchKey = watch::Receiver<Option<TokenDigest>>;

pub struct PoolService {
    slots: Arc<Slots>,
    models: Arc<ModelSet>,
    key: DispatchKey,
    /// Session ids; 0 is never used.
    sessions: AtomicU64,
    /// Where a frame that does not decode is recorded (set by `into_server`).
    audit: Option<Audit>,
    /// Jobs, tokens and sessions, and the readiness health reports.
    metrics: PoolMetrics,
}

// === impl PoolService ===

impl PoolService {
    pub fn new(slots: Arc<Slots>, models: Arc<ModelSet>, key: DispatchKey) -> Self {
        PoolService {
            slots,
            models,
            key,
            sessions: AtomicU64::new(0),
            audit: None,
            metrics: PoolMetrics::new(),
        }
    }

    /// Counts into `metrics` (and reports sessions to its readiness) instead of a private set.
    pub fn with_metrics(mut self, metrics: PoolMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The service behind an interceptor that refuses any caller but the queen. The key is
    /// checked first, so the queen is never refused by a penalty that others earned from its
    /// address; a caller presenting anything else is counted in `limits`' penalty box (by source
    /// and by token fingerprint), and audited coalesced per source.
    pub fn into_server(
        mut self,
        audit: Audit,
        limits: Arc<RateLimits>,
    ) -> tonic::service::interceptor::InterceptedService<
        PoolServer<PoolService>,
        impl tonic::service::Interceptor + Clone,
    > {
        let key = self.key.clone();
        self.audit = Some(audit.clone());
        let server = PoolServer::new(self).max_decoding_message_size(MAX_MESSAGE);
        tonic::service::interceptor::InterceptedService::new(server, move |req: Request<()>| {
            match authorize(&key, &req) {
                Ok(()) => Ok(req),
                Err(e) => Err(refuse(&limits, &audit, &req, e)),
            }
        })
    }
}

/// A caller that is not the queen: audited (coalesced per source), counted against its source
/// and its token, and answered UNAUTHENTICATED, or RESOURCE_EXHAUSTED with a retry hint once
/// over the bad-credential budget.
fn refuse(limits: &RateLimits, audit: &Audit, req: &Request<()>, e: Error) -> Status {
    let peer = req.remote_addr().map(|a| a.ip());
    let presented = auth::bearer_digest(req.metadata())
        .ok()
        .map(|d| d.fingerprint());
    let actor = presented.as_deref().unwrap_or("anonymous");
    audit.refused(peer, actor, &e.to_string());
    // Not registered yet is this pool's state, not a bad credential.
    if matches!(e, Error::NotRegistered) {
        return Status::from(e);
    }
    match limits.record_auth_failure(peer, presented.as_deref()) {
        Ok(()) => Status::from(e),
        Err(p) => {
            if p.fresh {
                warn!(peer = ?peer, caller = %actor, "too many bad keys; throttling them");
            }
            status::penalised(p.retry_after)
        }
    }
}

fn authorize<T>(key: &DispatchKey, req: &Request<T>) -> Result<(), Error> {
    // Two `authorization` headers are ambiguous: refuse them rather than let the first win.
    if req
        .metadata()
        .get_all("authorization")
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(Error::Auth(auth::AuthError::Malformed));
    }
    let presented = auth::bearer_digest(req.metadata())?;
    let expected = (*key.borrow()).ok_or(Error::NotRegistered)?;
    if presented.ct_eq(&expected) {
        Ok(())
    } else {
        Err(Error::Auth(auth::AuthError::Invalid))
    }
}

/// What a session needs to admit frames; owned by its reader task.
struct Session {
    id: u64,
    slots: Arc<Slots>,
    models: Arc<ModelSet>,
    names: Vec<String>,
    events: Sink,
    audit: Option<Audit>,
}

/// Why a session ended, for its outbound stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// The queen closed its side, or the connection failed: end quietly.
    QueenGone,
    /// The pool registered again: the key this session was opened with is no longer valid.
    KeyChanged,
    /// A frame did not decode (invalid UTF-8, a wrong wire type): the queen's input is wrong.
    BadFrame,
}

// === impl Session ===

impl Session {
    fn on_frame(&self, frame: QueenFrame, arrived: Instant) {
        match frame.kind {
            Some(queen_frame::Kind::Job(job)) => {
                let handle = job.handle;
                if let Err(error) = self.admit(job, arrived) {
                    debug!(session = self.id, handle, error = %error, "job frame refused");
                    let _ = self
                        .events
                        .send((handle, Event::Failed { error, tokens: 0 }));
                }
            }
            Some(queen_frame::Kind::Cancel(c)) => self.slots.cancel(self.id, c.handle),
            None => warn!(session = self.id, "empty queen frame ignored"),
        }
    }

    /// Validates a job frame and queues it on its slot.
    fn admit(&self, job: JobFrame, arrived: Instant) -> Result<(), Error> {
        let deadline = check_frame(
            &job,
            arrived,
            self.slots.count(),
            &self.names,
            self.models.first_token_floor(&job.model),
        )?;
        if job.evict.len() > self.names.len() {
            return Err(Error::Invalid(validate::ValidationError::TooMany {
                field: "evict",
                max: self.names.len(),
            }));
        }
        // A model not loaded yet starts loading now, alongside whatever runs, so the job waits
        // only for the rest of the load when its turn comes (what the queen predicted). The
        // models in use (every slot's lock) are gathered only when a load may unload one.
        let unloaded = if self.models.is_wanted(&job.model) {
            self.models.touch(&job.model);
            Vec::new()
        } else {
            self.models
                .request(&job.model, &job.evict, &self.slots.models_in_use())?
        };
        for m in unloaded {
            info!(model = %m, loading = %job.model, "model unloaded to make room");
            if let Some(audit) = &self.audit {
                let fields = Fields::new().model(&m).str("for_model", &job.model);
                audit.record(events::MODEL_EVICTED, events::ACTOR_SYSTEM, fields);
            }
        }
        let slot = job.slot;
        let remaining_ms = deadline.remaining().as_millis() as u64;
        let id = job.job_id.clone();
        let queued = QueuedJob {
            session: self.id,
            handle: job.handle,
            order: job.order,
            job_id: job.job_id,
            model: job.model,
            prompt: job.prompt,
            max_tokens: job.max_tokens,
            sampling: Sampling {
                temperature: job.temperature,
                top_p: job.top_p,
                seed: job.seed,
            },
            deadline,
            arrived,
            events: self.events.clone(),
        };
        self.slots.enqueue(slot, queued)?;
        // Counted by the integration tests: one "execute" line per job that reached this pool.
        info!(job = %id, session = self.id, slot, remaining_ms, "execute");
        Ok(())
    }
}

/// Checks one job frame; its deadline is measured from `arrived`. Refused: invalid fields, a
/// slot this pool lacks, a model it does not serve, no budget, or a budget too short for the
/// worker's first token (the queen's estimate may be stale; this pool knows its own workers).
fn check_frame(
    job: &JobFrame,
    arrived: Instant,
    slots: usize,
    models: &[String],
    first_token: std::time::Duration,
) -> Result<Deadline, Error> {
    if job.handle == 0 {
        return Err(Error::ReservedHandle);
    }
    validate::identifier("job_id", &job.job_id)?;
    validate::model_name(&job.model)?;
    validate::prompt(&job.prompt)?;
    // Sized so that it cannot fail once the fields above are valid (the slots refuse to start
    // on a smaller lane); kept so a mismatch is refused here rather than lose a worker.
    validate::lane_request(
        job.job_id.len(),
        job.model.len(),
        job.prompt.len(),
        validate::MAX_LANE_REQUEST_BYTES,
    )?;
    if job.max_tokens == 0 {
        // 0 means "default" for clients; the queen always resolves it, so 0 here is a bug.
        validate::max_tokens(u32::MAX)?;
    }
    validate::max_tokens(job.max_tokens)?;
    validate::sampling(&Sampling {
        temperature: job.temperature,
        top_p: job.top_p,
        seed: job.seed,
    })?;
    if job.slot as usize >= slots {
        return Err(Error::NoSuchSlot {
            slot: job.slot,
            slots,
        });
    }
    if !models.iter().any(|m| m == &job.model) {
        return Err(Error::UnknownModel(job.model.clone()));
    }
    if job.budget_us == 0 {
        return Err(Error::Deadline(DeadlineError::Zero));
    }
    // Capped at MAX_BUDGET by `from_start`, so no budget can overflow the clock.
    let deadline = Deadline::from_start(arrived, std::time::Duration::from_micros(job.budget_us));
    let remaining = deadline.remaining();
    if remaining < first_token {
        return Err(Error::Infeasible {
            remaining,
            first_token,
        });
    }
    Ok(deadline)
}

/// Reads the queen's frames until it goes away or the dispatch key changes, then cancels every
/// job of the session and tells the outbound stream how to close.
async fn read_session(
    session: Session,
    mut inbound: Streaming<QueenFrame>,
    mut key: DispatchKey,
    close: oneshot::Sender<Close>,
) {
    let why = loop {
        tokio::select! {
            frame = inbound.message() => match frame {
                Ok(Some(frame)) => session.on_frame(frame, Instant::now()),
                Ok(None) => break Close::QueenGone,
                Err(e) if is_decode_failure(&e) => {
                    warn!(session = session.id, "a frame does not decode; closing the session");
                    if let Some(audit) = &session.audit {
                        let why = Fields::new().reason("frame does not decode");
                        audit.record(events::VALIDATION_REJECTED, "queen", why);
                    }
                    break Close::BadFrame;
                }
                Err(e) => {
                    debug!(session = session.id, error = %e, "session stream failed");
                    break Close::QueenGone;
                }
            },
            // A dropped sender (shutdown) reads as a change too.
            _ = key.changed() => break Close::KeyChanged,
            // The outbound stream was dropped: nobody reads our events any more.
            () = session.events.closed() => break Close::QueenGone,
        }
    };
    let cancelled = session.slots.cancel_session(session.id);
    info!(session = session.id, reason = ?why, cancelled, "session closed");
    let _ = close.send(why);
}

/// A frame the codec could not decode. tonic reports it as INTERNAL, with prost's text; the
/// fault is the sender's, so the session answers INVALID_ARGUMENT.
fn is_decode_failure(e: &Status) -> bool {
    e.code() == tonic::Code::Internal
        && e.message().starts_with("failed to decode Protobuf message")
}

/// The next outbound frame: waits for one event, then takes every other event already waiting
/// (up to `MAX_BATCH`). `None` once every sender is gone.
async fn next_frame(rx: &mut mpsc::UnboundedReceiver<(u64, Event)>) -> Option<PoolFrame> {
    let first = rx.recv().await?;
    let mut events = vec![pool_event(first)];
    while events.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(e) => events.push(pool_event(e)),
            Err(_) => break,
        }
    }
    Some(PoolFrame { events })
}

/// The wire form of one job event.
fn pool_event((handle, event): (u64, Event)) -> PoolEvent {
    use pool_event::Kind;
    let kind = match event {
        Event::Started {
            slot,
            generation,
            pool_us,
        } => Kind::Started(WorkerStarted {
            slot,
            generation,
            pool_us,
        }),
        Event::Token { index, text, id } => Kind::Token(WorkerToken { index, text, id }),
        Event::Finished {
            tokens,
            prompt_tokens,
            pool_us,
            first_token_us,
            generation_us,
        } => Kind::Finished(WorkerFinished {
            tokens,
            prompt_tokens,
            pool_us,
            worker_first_token_us: first_token_us,
            generation_us,
        }),
        Event::Failed { error, tokens } => {
            let code = status::code(&error) as i32;
            let message = match error {
                Error::Worker { message, .. } => message,
                e => e.to_string(),
            };
            Kind::Failed(JobFailed {
                code,
                message,
                tokens,
            })
        }
    };
    PoolEvent {
        handle,
        kind: Some(kind),
    }
}

/// The models' state as a session-level event.
fn models_event(models: &ModelSet) -> PoolEvent {
    PoolEvent {
        handle: 0,
        kind: Some(pool_event::Kind::Models(ModelStates {
            states: models.states(),
            memory_budget_bytes: models.budget(),
        })),
    }
}

/// The session's outbound stream: the credit frame with the models' state, then batched events
/// (and the models' state again whenever it changes) until the session closes (with
/// UNAUTHENTICATED when the dispatch key changed) or every sender is gone.
fn outbound(
    credit: PoolEvent,
    models: Arc<ModelSet>,
    rx: mpsc::UnboundedReceiver<(u64, Event)>,
    close: oneshot::Receiver<Close>,
) -> impl Stream<Item = Result<PoolFrame, Status>> + Send + 'static {
    struct State {
        credit: Option<PoolEvent>,
        models: Arc<ModelSet>,
        changes: watch::Receiver<u64>,
        rx: mpsc::UnboundedReceiver<(u64, Event)>,
        close: oneshot::Receiver<Close>,
        done: bool,
    }
    let mut changes = models.subscribe();
    changes.mark_unchanged();
    let state = State {
        credit: Some(credit),
        models,
        changes,
        rx,
        close,
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(credit) = st.credit.take() {
            let frame = PoolFrame {
                events: vec![credit, models_event(&st.models)],
            };
            return Some((Ok(frame), st));
        }
        tokio::select! {
            biased;
            Ok(()) = st.changes.changed() => {
                st.changes.mark_unchanged();
                let frame = PoolFrame { events: vec![models_event(&st.models)] };
                Some((Ok(frame), st))
            }
            why = &mut st.close => {
                st.done = true;
                match why {
                    Ok(Close::KeyChanged) => {
                        let s = Status::unauthenticated(
                            "this pool registered again: its dispatch key changed",
                        );
                        Some((Err(s), st))
                    }
                    Ok(Close::BadFrame) => {
                        let s = Status::invalid_argument("a session frame does not decode");
                        Some((Err(s), st))
                    }
                    _ => None,
                }
            }
            frame = next_frame(&mut st.rx) => frame.map(|f| (Ok(f), st)),
        }
    })
}

/// Counts the jobs a frame starts and ends, as the queen will see them.
fn count_frame(meter: &SessionMeter, frame: &PoolFrame) {
    for event in &frame.events {
        match &event.kind {
            Some(pool_event::Kind::Started(_)) => meter.started(),
            Some(pool_event::Kind::Finished(f)) => meter.finished(
                f.tokens,
                f.pool_us,
                f.worker_first_token_us,
                f.generation_us,
            ),
            Some(pool_event::Kind::Failed(f)) => meter.failed(code_name(f.code), f.tokens),
            _ => {}
        }
    }
}

/// A gRPC status code's name, as a metric label (a fixed set).
fn code_name(code: i32) -> &'static str {
    use tonic::Code;
    match Code::from_i32(code) {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// `grpc.health.v1.Health` for probes, following `metrics`' readiness: NOT_SERVING until the
/// pool is warm, registered and in session with its queen, and again whenever it is not. It
/// answers only the overall status (service ""); it sits outside the dispatch-key check, since
/// probes carry no credential.
pub fn health_server(
    metrics: &PoolMetrics,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, server) = tonic_health::server::health_reporter();
    let mut readiness = metrics.subscribe();
    tokio::spawn(async move {
        loop {
            let status = if readiness.borrow_and_update().serving() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            if readiness.changed().await.is_err() {
                return;
            }
        }
    });
    server
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<PoolFrame, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Pool for PoolService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<QueenFrame>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut key = self.key.clone();
        key.mark_unchanged();
        // Checked again against the key now current: a re-register between the interceptor and
        // here must not leave a session open under the old key.
        authorize(&key, &request)?;
        let id = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        // Open (for the metrics and readiness) for as long as its outbound stream lives.
        let names = self.models.names();
        let model = names.first().map_or("", String::as_str);
        let meter = self.metrics.session(model);
        let (events, rx) = mpsc::unbounded_channel();
        let (close_tx, close_rx) = oneshot::channel();
        let credit = PoolEvent {
            handle: 0,
            kind: Some(pool_event::Kind::Credit(Credit {
                slots: self.slots.count() as u32,
                per_slot: self.slots.per_slot(),
            })),
        };
        let session = Session {
            id,
            slots: Arc::clone(&self.slots),
            names: self.models.names(),
            models: Arc::clone(&self.models),
            events,
            audit: self.audit.clone(),
        };
        info!(session = id, "session opened");
        tokio::spawn(read_session(session, request.into_inner(), key, close_tx));
        let frames =
            outbound(credit, Arc::clone(&self.models), rx, close_rx).inspect(move |frame| {
                if let Ok(frame) = frame {
                    count_frame(&meter, frame);
                }
            });
        Ok(Response::new(Box::pin(frames)))
    }
}

#[cfg(test)]
mod tests;
