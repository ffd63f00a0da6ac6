//! Submitting a job, for every door of the queen (gRPC `Jobs/Submit` and the HTTP door): one
//! code path for validation, the budget, the one dispatch decision, the store insert, the audit
//! and the job's event stream.
//!
//! It knows no transport: a door authenticates the caller (`crate::admit`), turns its request
//! into a `JobRequest` and its answer from the `Submitted` events. Dropping those events cancels
//! the job (the dispatch actor and the pool session see the channel close).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use skep_audit::Fields;
use skep_common::deadline::{self, DeadlineError};
use skep_common::sampling::Sampling;
use skep_common::validate;
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tracing::info;

use crate::Error;
use crate::audit::events;
use crate::auth::{Identity, Role};
use crate::dispatch::actor::Decision;
use crate::job::{self, EVENT_BUFFER, NewJob, Services};
use crate::model::{JobRecord, JobState, unix_ms};

/// A job as a door received it, not yet validated.
#[derive(Debug)]
pub struct JobRequest {
    pub model: String,
    pub prompt: String,
    /// 0 = the default.
    pub max_tokens: u32,
    /// The budget the transport carried (`grpc-timeout`; the HTTP door's deadline headers), or
    /// why it could not be read.
    pub header_budget: Result<Option<Duration>, DeadlineError>,
    /// The budget in the request body, in milliseconds; 0 = unset.
    pub deadline_ms: u64,
    /// Temperature, top_p and seed, not yet range-checked.
    pub sampling: Sampling,
}

/// The events of one job, ending with its terminal event.
pub type Events = Pin<Box<dyn Stream<Item = job::Event> + Send>>;

/// An accepted job.
pub struct Submitted {
    pub id: String,
    pub budget: Duration,
    pub max_tokens: u32,
    /// Where it was placed and when it is predicted to finish.
    pub decision: Decision,
    /// Starts with `Accepted` (and `Queued` when it waits); dropping it cancels the job.
    pub events: Events,
}

/// Validates, budgets, admits (one decision of the dispatch actor), persists and audits one job
/// for `who`, whose request arrived at `arrived` (the budget runs from there).
pub async fn submit(
    svc: &Services,
    who: &Identity,
    arrived: Instant,
    r: JobRequest,
) -> Result<Submitted, Error> {
    crate::admit::require_any(who, &[Role::Submit])?;
    let audit = &svc.audit;
    let checked = (|| {
        let header = r.header_budget?;
        validate::model_name(&r.model)?;
        validate::prompt(&r.prompt)?;
        // Whatever id the job gets (at most MAX_ID_LEN), it fits any pool's lanes.
        validate::lane_request(
            validate::MAX_ID_LEN,
            r.model.len(),
            r.prompt.len(),
            validate::MAX_LANE_REQUEST_BYTES,
        )?;
        let max_tokens = validate::max_tokens(r.max_tokens)?;
        validate::sampling(&r.sampling)?;
        Ok::<_, Error>((max_tokens, deadline::budget(header, r.deadline_ms)?))
    })();
    let (max_tokens, budget) = checked.inspect_err(|e| {
        let why = Fields::new().reason(&e.to_string());
        audit.record(events::VALIDATION_REJECTED, &who.fingerprint, why);
    })?;
    let id = uuid::Uuid::new_v4().to_string();
    let prompt: Arc<str> = Arc::from(r.prompt);
    let job = NewJob {
        id: id.clone(),
        model: r.model,
        prompt: Arc::clone(&prompt),
        max_tokens,
        sampling: r.sampling,
        budget,
        arrived,
        caller: who.fingerprint.clone(),
        owner: who.digest.to_hex(),
        caller_share: who.max_jobs,
    };
    // The stream holds a whole job (twice: a failover that restarts the output resends it), so
    // a pool session never waits on a slow reader.
    let (tx, rx) = mpsc::channel(2 * max_tokens as usize + EVENT_BUFFER);
    // One message in, one decision out: admitted with a reservation (and possibly already on its
    // way to the pool), or refused.
    let (_, decision) = svc
        .dispatch
        .submit(job.clone(), tx)
        .await
        .inspect_err(|e| {
            let why = Fields::new()
                .job(&id)
                .model(&job.model)
                .reason(&e.to_string());
            audit.record(events::JOB_REJECTED, &who.fingerprint, why);
        })?;
    // The accepted record commits while the job is being dispatched; `Accepted` goes out only
    // once it has: a crash before then means the job was never accepted.
    let record = JobRecord {
        id: id.clone(),
        model: job.model.clone(),
        state: JobState::Queued,
        created_unix_ms: unix_ms(),
        finished_unix_ms: 0,
        deadline_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
        max_tokens,
        tokens: 0,
        node_id: String::new(),
        error: String::new(),
        timings: Default::default(),
    };
    if let Err(e) = svc
        .store
        .insert(record, &prompt, &job.owner, job.sampling)
        .await
    {
        let _ = svc.dispatch.cancel(&id).await;
        return Err(e);
    }
    info!(job = %id, caller = %who.fingerprint, model = %job.model, max_tokens, budget_ms = budget.as_millis() as u64, node = %decision.node, "job admitted");
    let submitted = Fields::new()
        .job(&id)
        .model(&job.model)
        .prompt(&prompt)
        .num("max_tokens", u64::from(max_tokens))
        .num(
            "budget_ms",
            u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
        );
    audit.record(events::JOB_SUBMITTED, &who.fingerprint, submitted);
    let mut first = vec![job::Event::Accepted {
        budget,
        estimate: decision.predicted_finish,
        node_id: decision.node.clone(),
    }];
    if decision.position > 0 {
        first.push(job::Event::Queued {
            position: decision.position,
            predicted_start: decision.predicted_start,
        });
    }
    // The stream ends with the job's terminal event, whatever still holds a sender.
    let mut ended = false;
    let events = futures_util::stream::iter(first)
        .chain(ReceiverStream::new(rx))
        .take_while(move |ev| {
            let go = !ended;
            ended |= ev.is_terminal();
            futures_util::future::ready(go)
        });
    Ok(Submitted {
        id,
        budget,
        max_tokens,
        decision,
        events: Box::pin(events),
    })
}
