//! `skep.v1.Jobs`: submit, follow, inspect and cancel jobs.

use std::pin::Pin;
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
use crate::auth::Role;
use crate::job::{self, EVENT_BUFFER, NewJob, Services};
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

    async fn submit(
        &self,
        req: Request<SubmitRequest>,
    ) -> Result<(String, ReceiverStream<job::Event>), Error> {
        let arrived = Instant::now();
        let who = require(&req, Role::Submit)?;
        let audit = &self.svc.audit;
        let r = req.get_ref();
        let checked = (|| {
            let header = deadline::from_metadata(req.metadata())?;
            validate::model_name(&r.model)?;
            validate::prompt(&r.prompt)?;
            let max_tokens = validate::max_tokens(r.max_tokens)?;
            Ok::<_, Error>((max_tokens, deadline::budget(header, r.deadline_ms)?))
        })();
        let (max_tokens, budget) = checked.inspect_err(|e| {
            let why = Fields::new().reason(&e.to_string());
            audit.record(events::VALIDATION_REJECTED, &who.fingerprint, why);
        })?;
        let r = req.into_inner();
        let id = uuid::Uuid::new_v4().to_string();
        let rejected = |e: &Error| {
            let why = Fields::new()
                .job(&id)
                .model(&r.model)
                .reason(&e.to_string());
            audit.record(events::JOB_REJECTED, &who.fingerprint, why);
        };
        let load = self.svc.scheduler.load(&r.model, arrived + budget).await?;
        let admitted = self
            .svc
            .admission
            .admit(&id, &r.model, max_tokens, budget, load)
            .await
            .inspect_err(rejected)?;
        // Take a place in the queue before answering, so a full queue is a clean rejection.
        let enqueued = match self.svc.scheduler.enqueue(&r.model, arrived + budget).await {
            Ok(e) => e,
            Err(e) => {
                rejected(&e);
                let _ = self.svc.admission.finished(&id, &r.model, None).await;
                return Err(e);
            }
        };
        info!(job = %id, caller = %who.fingerprint, model = %r.model, max_tokens, budget_ms = budget.as_millis() as u64, "job admitted");
        let submitted = Fields::new()
            .job(&id)
            .model(&r.model)
            .prompt(&r.prompt)
            .num("max_tokens", u64::from(max_tokens))
            .num(
                "budget_ms",
                u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
            );
        audit.record(events::JOB_SUBMITTED, &who.fingerprint, submitted);
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let new = NewJob {
            id: id.clone(),
            model: r.model,
            prompt: r.prompt,
            max_tokens,
            budget,
            arrived,
            caller: who.fingerprint.clone(),
        };
        let start = job::Start::Enqueued(enqueued);
        tokio::spawn(job::run(self.svc.clone(), new, admitted, start, tx));
        Ok((id, ReceiverStream::new(rx)))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for JobsService {
    type SubmitStream = EventStream;

    async fn submit(&self, req: Request<SubmitRequest>) -> Result<Response<EventStream>, Status> {
        let (id, events) = JobsService::submit(self, req).await?;
        let stream = events.flat_map(move |ev| futures_util::stream::iter(convert::event(&id, ev)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        require(&req, Role::Submit)?;
        let id = req.into_inner().job_id;
        validate::identifier("job_id", &id).map_err(Error::from)?;
        let job = self
            .svc
            .store
            .get(&id)
            .await?
            .ok_or(Error::JobNotFound(id))?;
        Ok(Response::new(convert::job(job)))
    }

    async fn cancel(
        &self,
        req: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        require(&req, Role::Submit)?;
        let id = req.into_inner().job_id;
        validate::identifier("job_id", &id).map_err(Error::from)?;
        if self.svc.admission.cancel(&id).await? {
            return Ok(Response::new(CancelJobResponse {
                state: PbState::Cancelled as i32,
            }));
        }
        match self.svc.store.get(&id).await? {
            Some(j) if j.state.is_terminal() => Err(Status::failed_precondition(format!(
                "job {id} already ended: {}",
                j.state.as_str()
            ))),
            Some(j) => Ok(Response::new(CancelJobResponse {
                state: convert::job_state(j.state) as i32,
            })),
            None => Err(Error::JobNotFound(id).into()),
        }
    }

    async fn list(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        require(&req, Role::Submit)?;
        let limit = match req.into_inner().limit {
            0 => 50,
            n => n.min(MAX_LIST),
        };
        let jobs = self.svc.store.list(limit).await?;
        Ok(Response::new(ListJobsResponse {
            jobs: jobs.into_iter().map(convert::job).collect(),
        }))
    }
}
