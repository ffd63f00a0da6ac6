//! The `skep.v1.Pool` service: authenticates the queen, checks the budget and hands jobs to slots.
//!
//! Only this module (and `membership`) names tonic types.

mod status;

use std::sync::Arc;
use std::time::Instant;

use skep_common::auth::{self, TokenDigest};
use skep_common::deadline::{self, Deadline};
use skep_common::validate;
use skep_proto::v1::pool_server::{Pool, PoolServer};
use skep_proto::v1::{ExecuteEvent, ExecuteRequest};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::audit::{Audit, events};
use crate::{Error, Job, Speed};
use skep_audit::Fields;

/// Events buffered per job between the worker lane and the gRPC stream.
const EVENT_BUFFER: usize = 64;
/// Longest a call waits for a slot that the queen believed free.
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// Largest request accepted: a maximal prompt plus room for the other fields.
const MAX_MESSAGE: usize = validate::MAX_PROMPT_BYTES + 4096;

/// The queen's dispatch-key digest, set once registration succeeds (and replaced on re-register).
pub type DispatchKey = watch::Receiver<Option<TokenDigest>>;

pub struct PoolService {
    slots: Arc<Semaphore>,
    slot_count: usize,
    jobs: async_channel::Sender<Job>,
    models: Vec<String>,
    speed: Arc<Speed>,
}

// === impl PoolService ===

impl PoolService {
    pub fn new(
        slots: Arc<Semaphore>,
        slot_count: usize,
        jobs: async_channel::Sender<Job>,
        models: Vec<String>,
        speed: Arc<Speed>,
    ) -> Self {
        PoolService {
            slots,
            slot_count,
            jobs,
            models,
            speed,
        }
    }

    /// The service behind an interceptor that refuses any caller but the queen.
    pub fn into_server(
        self,
        key: DispatchKey,
        audit: Audit,
    ) -> tonic::service::interceptor::InterceptedService<
        PoolServer<PoolService>,
        impl tonic::service::Interceptor + Clone,
    > {
        let server = PoolServer::new(self).max_decoding_message_size(MAX_MESSAGE);
        tonic::service::interceptor::InterceptedService::new(server, move |req: Request<()>| {
            authorize(&key, &req).map_err(|e| {
                // Anyone but the queen knocking on the pool is worth an audit line.
                let actor = auth::bearer_digest(req.metadata())
                    .map_or_else(|_| "anonymous".to_owned(), |d| d.fingerprint());
                let mut fields = Fields::new().reason(&e.to_string());
                if let Some(peer) = req.remote_addr() {
                    fields = fields.str("peer", &peer.ip().to_string());
                }
                audit.record(events::AUTH_FAILURE, &actor, fields);
                Status::from(e)
            })?;
            Ok(req)
        })
    }

    fn admit(&self, req: &Request<ExecuteRequest>) -> Result<Deadline, Error> {
        // The budget is measured from arrival: whatever the network took is already gone.
        let budget = deadline::budget(deadline::from_metadata(req.metadata())?, 0)?;
        let deadline = Deadline::after(budget);
        let r = req.get_ref();
        validate::identifier("job_id", &r.job_id)?;
        validate::model_name(&r.model)?;
        validate::prompt(&r.prompt)?;
        if r.max_tokens == 0 {
            validate::max_tokens(u32::MAX)?;
        }
        validate::max_tokens(r.max_tokens)?;
        // Re-check feasibility here: the queen's estimate may be stale, and this pool knows how
        // long its own workers take to say anything at all.
        let first_token = self.speed.first_token();
        if deadline.remaining() < first_token {
            return Err(Error::Infeasible {
                remaining: deadline.remaining(),
                first_token,
            });
        }
        if !self.models.iter().any(|m| m == &r.model) {
            return Err(Error::UnknownModel(r.model.clone()));
        }
        Ok(deadline)
    }
}

fn authorize<T>(key: &DispatchKey, req: &Request<T>) -> Result<(), Error> {
    let presented = auth::bearer_digest(req.metadata())?;
    let expected = (*key.borrow()).ok_or(Error::NotRegistered)?;
    if presented.ct_eq(&expected) {
        Ok(())
    } else {
        Err(Error::Auth(auth::AuthError::Invalid))
    }
}

impl PoolService {
    /// A free slot. The queen only sends work for free slots, but a slot it has just released
    /// may still be draining its last token here, so wait briefly rather than bounce the job.
    async fn slot(&self, deadline: Deadline) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        let busy = || Error::Busy {
            slots: self.slot_count,
        };
        let wait = deadline.remaining().min(SLOT_WAIT);
        match tokio::time::timeout(wait, Arc::clone(&self.slots).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) if deadline.is_expired() => Err(Error::LateArrival),
            Err(_) => Err(busy()),
        }
    }
}

#[tonic::async_trait]
impl Pool for PoolService {
    type ExecuteStream = ReceiverStream<Result<ExecuteEvent, Status>>;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let arrived = Instant::now();
        let deadline = self.admit(&request)?;
        let permit = self.slot(deadline).await?;
        let request = request.into_inner();
        info!(job = %request.job_id, remaining_ms = deadline.remaining().as_millis() as u64, "execute");
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        let job = Job {
            request,
            deadline,
            arrived,
            events,
            permit,
        };
        // Capacity is guaranteed by the permit, so this never waits for long.
        self.jobs.send(job).await.map_err(|_| Error::ShuttingDown)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
