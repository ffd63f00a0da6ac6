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
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{convert, require};
use crate::Error;
use crate::auth::{Identity, Role};
use crate::job::Services;
use crate::model::JobState;
use crate::submit::{self, JobRequest};

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
        let header_budget = deadline::from_metadata(req.metadata());
        let r = req.into_inner();
        let job = JobRequest {
            model: r.model,
            prompt: r.prompt,
            max_tokens: r.max_tokens,
            header_budget,
            deadline_ms: r.deadline_ms,
            sampling: skep_common::sampling::Sampling {
                temperature: r.temperature,
                top_p: r.top_p,
                seed: r.seed,
            },
        };
        let submitted = submit::submit(&self.svc, &who, arrived, job).await?;
        let wire_id = submitted.id.clone();
        let stream = submitted
            .events
            .flat_map(move |ev| futures_util::stream::iter(convert::event(&wire_id, ev)));
        Ok((submitted.id, Box::pin(stream)))
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
            .get_owned(&id, owner_filter(&who).as_deref())
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
        let owner = owner_filter(&who);
        let caller = owner.as_deref();
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
        let jobs = self
            .svc
            .store
            .list_owned(limit, owner_filter(&who).as_deref())
            .await?;
        Ok(Response::new(ListJobsResponse {
            jobs: jobs.into_iter().map(convert::job).collect(),
        }))
    }
}

/// Whose jobs a caller may see: an admin everyone's (`None`), anyone else only the jobs its
/// own token submitted, by the token's whole digest (two tokens may share a 6-hex fingerprint).
fn owner_filter(who: &Identity) -> Option<String> {
    (who.role != Role::Admin).then(|| who.digest.to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skep_common::auth::TokenDigest;

    fn who(role: Role) -> Identity {
        let digest = TokenDigest::of("skep_example-token");
        Identity {
            fingerprint: digest.fingerprint(),
            role,
            digest,
            node_id: String::new(),
            max_jobs: None,
        }
    }

    #[test]
    fn jobs_are_filtered_by_the_whole_digest_and_admins_see_all() {
        let submit = who(Role::Submit);
        let filter = owner_filter(&submit).expect("a submit token sees only its own jobs");
        // The whole digest, so two tokens sharing a 6-hex fingerprint stay apart.
        assert_eq!(filter, submit.digest.to_hex());
        assert_eq!(filter.len(), 64);
        assert!(owner_filter(&who(Role::Admin)).is_none());
    }
}
