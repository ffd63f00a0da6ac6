//! `skep.v1.Jobs`: submit, follow, inspect and cancel jobs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use skep_common::{deadline, validate};
use skep_proto::v1::jobs_server::Jobs;
use skep_proto::v1::{
    CancelJobRequest, CancelJobResponse, GetJobRequest, Job, JobEvent, JobState as PbState,
    ListJobsRequest, ListJobsResponse, SubmitRequest,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use tracing::info;

use super::{convert, require};
use crate::Error;
use crate::audit::events;
use crate::auth::{Identity, Role};
use crate::job::{self, EVENT_BUFFER, NewJob, Services};
use crate::model::{JobRecord, JobState, unix_ms};
use skep_audit::Fields;

/// Most jobs `List` returns.
const MAX_LIST: u32 = 1000;

pub struct JobsService {
    svc: Services,
}

impl JobsService {
    pub fn new(svc: Services) -> Self {
        JobsService { svc }
    }

    async fn submit(&self, req: Request<SubmitRequest>) -> Result<(String, EventStream), Error> {
        let arrived = Instant::now();
        let who = require(&req, Role::Submit)?;
        let audit = &self.svc.audit;
        let r = req.get_ref();
        let checked = (|| {
            let header = deadline::from_metadata(req.metadata())?;
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
            Ok::<_, Error>((max_tokens, deadline::budget(header, r.deadline_ms)?))
        })();
        let (max_tokens, budget) = checked.inspect_err(|e| {
            let why = Fields::new().reason(&e.to_string());
            audit.record(events::VALIDATION_REJECTED, &who.fingerprint, why);
        })?;
        let r = req.into_inner();
        let id = uuid::Uuid::new_v4().to_string();
        let prompt: Arc<str> = Arc::from(r.prompt);
        let job = NewJob {
            id: id.clone(),
            model: r.model,
            prompt: Arc::clone(&prompt),
            max_tokens,
            budget,
            arrived,
            caller: who.fingerprint.clone(),
            caller_share: who.max_jobs,
        };
        // The stream holds a whole job (twice: a failover that restarts the output resends
        // it), so a pool session never waits on a slow reader.
        let (tx, rx) = mpsc::channel(2 * max_tokens as usize + EVENT_BUFFER);
        // One message in, one decision out: admitted with a reservation (and possibly already
        // on its way to the pool), or refused.
        let (_, decision) = self
            .svc
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
        // The accepted record commits while the job is being dispatched; `Accepted` goes out
        // only once it has: a crash before then means the job was never accepted.
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
        if let Err(e) = self.svc.store.insert(record, &prompt, &job.caller).await {
            let _ = self.svc.dispatch.cancel(&id).await;
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
            node_id: decision.node,
        }];
        if decision.position > 0 {
            first.push(job::Event::Queued {
                position: decision.position,
            });
        }
        let events = futures_util::stream::iter(first).chain(ReceiverStream::new(rx));
        let wire_id = id.clone();
        // The stream ends with the job's terminal event, whatever still holds a sender.
        let mut ended = false;
        let stream = events
            .take_while(move |ev| {
                let go = !ended;
                ended |= ev.is_terminal();
                futures_util::future::ready(go)
            })
            .flat_map(move |ev| futures_util::stream::iter(convert::event(&wire_id, ev)));
        Ok((id, Box::pin(stream)))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for JobsService {
    type SubmitStream = EventStream;

    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<EventStream>, Status> {
        let (_, stream) = JobsService::submit(self, req).await?;
        Ok(Response::new(stream))
    }

    async fn get(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let who = require(&req, Role::Submit)?;
        let id = req.into_inner().job_id;
        validate::identifier("job_id", &id).map_err(Error::from)?;
        // Someone else's job answers exactly as a missing one, so ids cannot be probed.
        let mut job = self
            .svc
            .store
            .get_owned(&id, owner_filter(&who))
            .await?
            .ok_or_else(|| Error::JobNotFound(id.clone()))?;
        // No `running` row update is written (it would sit on the hot path); the live state
        // comes from the dispatch actor instead.
        if job.state == JobState::Queued && self.svc.dispatch.state(&id).await? == Some(true) {
            job.state = JobState::Running;
        }
        Ok(Response::new(convert::job(job)))
    }

    async fn cancel(
        &self,
        req: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let who = require(&req, Role::Submit)?;
        let id = req.into_inner().job_id;
        validate::identifier("job_id", &id).map_err(Error::from)?;
        let caller = owner_filter(&who);
        // Ownership first, from the stored record (committed before the submitter ever saw
        // the id): someone else's job is NOT_FOUND, exactly like a missing one, and untouched.
        let Some(seen) = self.svc.store.get_owned(&id, caller).await? else {
            return Err(Error::JobNotFound(id).into());
        };
        if self.svc.dispatch.cancel(&id).await? {
            return Ok(Response::new(CancelJobResponse {
                state: PbState::Cancelled as i32,
            }));
        }
        // Not live: it may have ended since the first read.
        let job = self.svc.store.get_owned(&id, caller).await?.unwrap_or(seen);
        if job.state.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "job {id} already ended: {}",
                job.state.as_str()
            )));
        }
        Ok(Response::new(CancelJobResponse {
            state: convert::job_state(job.state) as i32,
        }))
    }

    async fn list(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let who = require(&req, Role::Submit)?;
        let limit = match req.get_ref().limit {
            0 => 50,
            n => n.min(MAX_LIST),
        };
        let jobs = self.svc.store.list_owned(limit, owner_filter(&who)).await?;
        Ok(Response::new(ListJobsResponse {
            jobs: jobs.into_iter().map(convert::job).collect(),
        }))
    }
}

/// Whose jobs a caller may see: an admin everyone's (`None`), anyone else only the jobs its
/// own token submitted.
fn owner_filter(who: &Identity) -> Option<&str> {
    (who.role != Role::Admin).then_some(who.fingerprint.as_str())
}
