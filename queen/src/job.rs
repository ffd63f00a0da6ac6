//! One job's life on the queen, from admission to its terminal state.
//!
//! Each admitted job gets its own task running `run`. It persists every state change, waits for a
//! slot (never past the deadline), dispatches to the assigned pool with the remaining budget,
//! forwards tokens, and always ends with exactly one terminal event: done, or an error. Whatever
//! happens, the slot goes back to the scheduler and admission hears that the job finished.

use std::time::{Duration, Instant};

use skep_common::deadline::Deadline;
use tokio::sync::mpsc;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Error;
use crate::admission::{AdmissionHandle, Admitted, Observed};
use crate::audit::events;
use crate::grpc::dispatch::{self, PoolEvent};
use crate::model::{JobRecord, JobState, Timings, micros, unix_ms};
use crate::registry::RegistryHandle;
use crate::scheduler::{Assignment, Enqueued, SchedulerHandle};
use crate::store::{JobUpdate, StoreHandle};
use skep_audit::Fields;

/// Events buffered per client stream.
pub const EVENT_BUFFER: usize = 64;

/// The queen's actors, as seen by request handlers and job tasks.
#[derive(Clone)]
pub struct Services {
    pub admission: AdmissionHandle,
    pub scheduler: SchedulerHandle,
    pub registry: RegistryHandle,
    pub store: StoreHandle,
    pub tokens: crate::auth::TokenBook,
    pub audit: crate::audit::AuditHandle,
    /// The queen's TLS material when it serves TLS: its CA signs pools' certificates.
    pub tls: Option<std::sync::Arc<skep_tls::QueenTls>>,
    pub catalogue: crate::catalogue::Catalogue,
}

/// A validated job request.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub budget: Duration,
    /// When the request reached the queen: the budget runs from here.
    pub arrived: Instant,
    /// Fingerprint of the submitter's token, for the audit trail.
    pub caller: String,
}

/// What the client sees of a job, in order.
#[derive(Debug)]
pub enum Event {
    Accepted {
        budget: Duration,
        estimate: Duration,
    },
    Queued {
        position: usize,
    },
    Dispatched {
        node_id: String,
        attempt: u32,
    },
    Token {
        index: u32,
        text: String,
    },
    Done {
        tokens: u32,
        timings: Timings,
    },
    Failed {
        error: Error,
        timings: Timings,
    },
}

/// How an admitted job gets its place in the scheduler's queue.
pub enum Start {
    /// Enqueued by the submit handler before it answered the client.
    Enqueued(Enqueued),
    /// Recovered after a queen restart: it waits (within its deadline) for a pool serving its
    /// model to come back, then takes a place in the queue.
    Recovered,
}

struct Progress {
    timings: Timings,
    tokens: u32,
    node_id: String,
    observed: Option<Observed>,
}

/// Drives an admitted job to its end. Never panics, never returns early without a terminal event.
pub async fn run(
    svc: Services,
    job: NewJob,
    admitted: Admitted,
    start: Start,
    events: mpsc::Sender<Event>,
) {
    let deadline = Deadline::from_start(job.arrived, job.budget);
    let mut p = Progress {
        timings: Timings {
            admission_us: micros(job.arrived.elapsed()),
            ..Timings::default()
        },
        tokens: 0,
        node_id: String::new(),
        observed: None,
    };
    let _ = events
        .send(Event::Accepted {
            budget: job.budget,
            estimate: admitted.estimate,
        })
        .await;
    let result = drive(
        &svc,
        &job,
        deadline,
        &admitted.cancel,
        start,
        &events,
        &mut p,
    )
    .await;
    if result.is_err() {
        p.timings.total_us = micros(job.arrived.elapsed());
    }

    let (state, error) = match &result {
        Ok(()) => (JobState::Done, String::new()),
        Err(Error::DeadlineExceeded { .. }) => (JobState::DeadlineExceeded, result_msg(&result)),
        Err(Error::Cancelled) => (JobState::Cancelled, result_msg(&result)),
        Err(_) => (JobState::Failed, result_msg(&result)),
    };
    info!(job = %job.id, state = state.as_str(), tokens = p.tokens, total_ms = p.timings.total_us / 1000, "job finished");
    let update = JobUpdate {
        id: job.id.clone(),
        state,
        tokens: p.tokens,
        node_id: p.node_id.clone(),
        error,
        timings: p.timings,
        finished_unix_ms: unix_ms(),
    };
    if let Err(e) = svc.store.update(update).await {
        warn!(job = %job.id, error = %e, "could not persist final state");
    }
    let event = match state {
        JobState::Done => events::JOB_COMPLETED,
        JobState::DeadlineExceeded => events::JOB_DEADLINE_EXCEEDED,
        JobState::Cancelled => events::JOB_CANCELLED,
        _ => events::JOB_FAILED,
    };
    let mut fields = Fields::new()
        .job(&job.id)
        .model(&job.model)
        .num("tokens", u64::from(p.tokens));
    if !p.node_id.is_empty() {
        fields = fields.node(&p.node_id);
    }
    if let Err(e) = &result {
        fields = fields.reason(&e.to_string());
    }
    svc.audit.record(event, &job.caller, fields);
    let _ = svc
        .admission
        .finished(&job.id, &job.model, p.observed)
        .await;
    let last = match result {
        Ok(()) => Event::Done {
            tokens: p.tokens,
            timings: p.timings,
        },
        Err(error) => Event::Failed {
            error,
            timings: p.timings,
        },
    };
    let _ = events.send(last).await;
}

fn result_msg(r: &Result<(), Error>) -> String {
    r.as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default()
}

async fn drive(
    svc: &Services,
    job: &NewJob,
    deadline: Deadline,
    cancel: &CancellationToken,
    start: Start,
    events: &mpsc::Sender<Event>,
    p: &mut Progress,
) -> Result<(), Error> {
    let late = || Error::DeadlineExceeded {
        budget: job.budget,
        elapsed: job.arrived.elapsed(),
    };
    let record = JobRecord {
        id: job.id.clone(),
        model: job.model.clone(),
        state: JobState::Queued,
        created_unix_ms: unix_ms(),
        finished_unix_ms: 0,
        deadline_ms: u64::try_from(job.budget.as_millis()).unwrap_or(u64::MAX),
        max_tokens: job.max_tokens,
        tokens: 0,
        node_id: String::new(),
        error: String::new(),
        timings: p.timings,
    };
    svc.store.insert(record, &job.prompt, &job.caller).await?;
    let enqueued = match start {
        Start::Enqueued(e) => e,
        Start::Recovered => wait_for_pool(svc, job, deadline, cancel).await?,
    };

    let queued_at = job.arrived;
    if enqueued.position > 0 {
        let _ = events
            .send(Event::Queued {
                position: enqueued.position,
            })
            .await;
    }
    let mut waiting = enqueued;
    let mut attempt = 1;
    let mut avoid = Vec::new();
    loop {
        let assignment: Assignment = tokio::select! {
            a = waiting.assignment => match a {
                Ok(a) => a,
                // The scheduler drops a waiter only once its deadline has passed.
                Err(_) if deadline.is_expired() => return Err(late()),
                Err(_) => return Err(Error::ActorStopped),
            },
            _ = sleep_until(deadline.instant().into()) => return Err(late()),
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            _ = events.closed() => return Err(Error::Cancelled),
        };
        if attempt == 1 {
            p.timings.queue_wait_us =
                micros(queued_at.elapsed()).saturating_sub(p.timings.admission_us);
        }
        let node_id = assignment.target.node_id.clone();
        p.node_id = node_id.clone();
        let on = Attempt {
            assignment: &assignment,
            number: attempt,
        };
        let result = execute(svc, job, deadline, cancel, events, on, p).await;
        svc.scheduler.release(&node_id).await?;
        let error = match result {
            Err(e) if retryable(&e) && attempt < MAX_ATTEMPTS && !deadline.is_expired() => e,
            other => return other,
        };
        // Try another pool with what is left of the budget; the stream shows it as a new
        // `dispatched` event with the next attempt number.
        warn!(job = %job.id, node = %node_id, attempt, error = %error, "pool failed mid-job; retrying elsewhere");
        if matches!(
            error,
            Error::PoolUnreachable {
                transport: true,
                ..
            }
        ) {
            let _ = svc.registry.unreachable(&node_id).await;
        }
        avoid.push(node_id);
        attempt += 1;
        waiting = match svc
            .scheduler
            .enqueue_avoiding(&job.model, deadline.instant(), avoid.clone())
            .await
        {
            Ok(w) => w,
            // Nowhere else to go: the job fails with what actually went wrong.
            Err(Error::NoPool(_)) => return Err(error),
            Err(e) => return Err(e),
        };
    }
}

/// How often a recovered job looks for a pool serving its model.
const POOL_POLL: Duration = Duration::from_millis(100);

/// A place in the queue for a recovered job, once a pool serving its model has (re)joined.
async fn wait_for_pool(
    svc: &Services,
    job: &NewJob,
    deadline: Deadline,
    cancel: &CancellationToken,
) -> Result<Enqueued, Error> {
    loop {
        let no_pool = match svc.scheduler.enqueue(&job.model, deadline.instant()).await {
            Ok(e) => return Ok(e),
            Err(Error::NoPool(m)) => Error::NoPool(m),
            Err(e) => return Err(e),
        };
        tokio::select! {
            _ = tokio::time::sleep(POOL_POLL) => {}
            _ = sleep_until(deadline.instant().into()) => {
                // Say why: no pool came back in time is not the same as a slow pool.
                warn!(job = %job.id, error = %no_pool, "recovered job found no pool before its deadline");
                return Err(Error::DeadlineExceeded {
                    budget: job.budget,
                    elapsed: job.arrived.elapsed(),
                });
            }
            _ = cancel.cancelled() => return Err(Error::Cancelled),
        }
    }
}

/// Runs a job the previous queen process accepted but did not finish. Its client stream died
/// with that process, so events are drained here; the outcome is in the store (`jobs get`) and
/// the audit log. The deadline is the original one: the time the queen was down counts.
pub async fn resume(svc: Services, rec: crate::store::Interrupted) {
    let remaining = rec.deadline_unix_ms.saturating_sub(unix_ms());
    let job = NewJob {
        id: rec.id,
        model: rec.model,
        prompt: rec.prompt,
        max_tokens: rec.max_tokens,
        budget: Duration::from_millis(remaining),
        arrived: Instant::now(),
        caller: rec.caller,
    };
    info!(job = %job.id, remaining_ms = remaining, "resuming a job interrupted by a queen restart");
    svc.audit.record(
        events::JOB_RESUMED,
        "system",
        Fields::new()
            .job(&job.id)
            .model(&job.model)
            .num("remaining_ms", remaining),
    );
    let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    // Nobody is waiting on the queue position of a recovered job, so it is admitted against an
    // empty queue; admission still refuses it when the model is too slow for what is left.
    let admitted = match svc
        .admission
        .admit(
            &job.id,
            &job.model,
            job.max_tokens,
            job.budget,
            Default::default(),
        )
        .await
    {
        Ok(a) => a,
        Err(e) => return finish_unadmitted(&svc, &job, e).await,
    };
    run(svc, job, admitted, Start::Recovered, tx).await;
}

/// Ends a recovered job that admission refused (too little time left, or the queen is full).
async fn finish_unadmitted(svc: &Services, job: &NewJob, error: Error) {
    let state = match error {
        Error::DeadlineExceeded { .. } | Error::Infeasible { .. } => JobState::DeadlineExceeded,
        _ => JobState::Failed,
    };
    warn!(job = %job.id, error = %error, "recovered job could not be admitted again");
    let update = JobUpdate {
        id: job.id.clone(),
        state,
        tokens: 0,
        node_id: String::new(),
        error: error.to_string(),
        timings: Timings::default(),
        finished_unix_ms: unix_ms(),
    };
    if let Err(e) = svc.store.update(update).await {
        warn!(job = %job.id, error = %e, "could not persist final state");
    }
    let event = match state {
        JobState::DeadlineExceeded => events::JOB_DEADLINE_EXCEEDED,
        _ => events::JOB_FAILED,
    };
    let fields = Fields::new()
        .job(&job.id)
        .model(&job.model)
        .reason(&error.to_string());
    svc.audit.record(event, &job.caller, fields);
}

/// Where one attempt at a job runs, and which attempt it is (1-based).
struct Attempt<'a> {
    assignment: &'a Assignment,
    number: u32,
}

/// Attempts per job, the first included.
const MAX_ATTEMPTS: u32 = 3;

/// Failures of a pool (not of the job) that another pool may not have.
fn retryable(e: &Error) -> bool {
    match e {
        Error::PoolUnreachable { .. } => true,
        Error::Pool { code, .. } => {
            matches!(
                tonic_code(*code),
                RetryCode::Unavailable | RetryCode::Transport
            )
        }
        _ => false,
    }
}

enum RetryCode {
    Unavailable,
    Transport,
    Other,
}

/// gRPC codes by number, without naming tonic outside `grpc`: 14 unavailable; 2 unknown and
/// 13 internal are what a broken HTTP/2 connection surfaces as.
fn tonic_code(code: i32) -> RetryCode {
    match code {
        14 => RetryCode::Unavailable,
        2 | 13 => RetryCode::Transport,
        _ => RetryCode::Other,
    }
}

async fn execute(
    svc: &Services,
    job: &NewJob,
    deadline: Deadline,
    cancel: &CancellationToken,
    events: &mpsc::Sender<Event>,
    on: Attempt<'_>,
    p: &mut Progress,
) -> Result<(), Error> {
    let Attempt {
        assignment,
        number: attempt,
    } = on;
    let late = || Error::DeadlineExceeded {
        budget: job.budget,
        elapsed: job.arrived.elapsed(),
    };
    if deadline.is_expired() {
        return Err(late());
    }
    svc.store
        .update(JobUpdate {
            id: job.id.clone(),
            state: JobState::Running,
            tokens: 0,
            node_id: p.node_id.clone(),
            error: String::new(),
            timings: p.timings,
            finished_unix_ms: 0,
        })
        .await?;
    svc.audit.record(
        "job.dispatched",
        &job.caller,
        Fields::new().job(&job.id).node(&p.node_id),
    );
    let _ = events
        .send(Event::Dispatched {
            node_id: p.node_id.clone(),
            attempt,
        })
        .await;
    let dispatched = Instant::now();
    let call = dispatch::execute(&assignment.target, job, deadline.remaining());
    let mut stream = tokio::select! {
        s = call => match s {
            Ok(s) => s,
            // tonic enforces the grpc-timeout it sends and reports it as CANCELLED: when the
            // budget is what ran out, that is a deadline miss.
            Err(_) if deadline.is_expired() => return Err(late()),
            Err(e) => return Err(e),
        },
        _ = sleep_until(deadline.instant().into()) => return Err(late()),
        _ = cancel.cancelled() => return Err(Error::Cancelled),
    };
    // Dropping `stream` on any early return cancels the call, which stops the worker.
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = sleep_until(deadline.instant().into()) => return Err(late()),
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            _ = events.closed() => return Err(Error::Cancelled),
            _ = assignment.target.gone.cancelled() => return Err(Error::PoolUnreachable {
                node: p.node_id.clone(),
                message: "node left the cluster (dead or revoked)".into(),
                transport: false,
            }),
        };
        match ev {
            Some(Ok(PoolEvent::Started { pool_us })) => {
                p.timings.dispatch_us = micros(dispatched.elapsed()).saturating_sub(pool_us);
                p.timings.pool_us = pool_us;
            }
            Some(Ok(PoolEvent::Token { index, text })) => {
                // A token that arrives late is not delivered: no success after the deadline.
                if deadline.is_expired() {
                    return Err(late());
                }
                // After a failover the new pool starts over; generation is deterministic for a
                // prompt (greedy / seeded), so tokens the client already has are skipped.
                if index < p.tokens {
                    continue;
                }
                p.tokens += 1;
                if events.send(Event::Token { index, text }).await.is_err() {
                    return Err(Error::Cancelled);
                }
            }
            Some(Ok(PoolEvent::Finished {
                first_token,
                generation,
                tokens,
            })) => {
                // Success is decided once, on one clock reading: a result that lands after
                // the deadline is a deadline miss, not a late success.
                let now = Instant::now();
                if deadline.exceeded_by(now).is_some() {
                    return Err(late());
                }
                p.timings.total_us = micros(now.duration_since(job.arrived));
                p.timings.worker_first_token_us = micros(first_token);
                p.timings.generation_us = micros(generation);
                p.observed = Some(Observed {
                    first_token,
                    generation,
                    tokens,
                });
                return Ok(());
            }
            Some(Err(_)) | None if deadline.is_expired() => return Err(late()),
            Some(Err(e)) => return Err(e),
            None => {
                return Err(Error::PoolUnreachable {
                    node: p.node_id.clone(),
                    message: "stream ended without a result".into(),
                    transport: true,
                });
            }
        }
    }
}
