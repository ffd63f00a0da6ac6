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

use crate::{Error, Job};

/// Events buffered per job between the worker lane and the gRPC stream.
const EVENT_BUFFER: usize = 64;
/// Largest request accepted: a maximal prompt plus room for the other fields.
const MAX_MESSAGE: usize = validate::MAX_PROMPT_BYTES + 4096;

/// The queen's dispatch-key digest, set once registration succeeds (and replaced on re-register).
pub type DispatchKey = watch::Receiver<Option<TokenDigest>>;

pub struct PoolService {
    slots: Arc<Semaphore>,
    slot_count: usize,
    jobs: async_channel::Sender<Job>,
    models: Vec<String>,
}

// === impl PoolService ===

impl PoolService {
    pub fn new(
        slots: Arc<Semaphore>,
        slot_count: usize,
        jobs: async_channel::Sender<Job>,
        models: Vec<String>,
    ) -> Self {
        PoolService {
            slots,
            slot_count,
            jobs,
            models,
        }
    }

    /// The service behind an interceptor that refuses any caller but the queen.
    pub fn into_server(
        self,
        key: DispatchKey,
    ) -> tonic::service::interceptor::InterceptedService<
        PoolServer<PoolService>,
        impl tonic::service::Interceptor + Clone,
    > {
        let server = PoolServer::new(self).max_decoding_message_size(MAX_MESSAGE);
        tonic::service::interceptor::InterceptedService::new(server, move |req: Request<()>| {
            authorize(&key, &req).map_err(Status::from)?;
            Ok(req)
        })
    }

    fn admit(
        &self,
        req: &Request<ExecuteRequest>,
    ) -> Result<(Deadline, tokio::sync::OwnedSemaphorePermit), Error> {
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
        if !self.models.iter().any(|m| m == &r.model) {
            return Err(Error::UnknownModel(r.model.clone()));
        }
        let permit = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| Error::Busy {
                slots: self.slot_count,
            })?;
        Ok((deadline, permit))
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

#[tonic::async_trait]
impl Pool for PoolService {
    type ExecuteStream = ReceiverStream<Result<ExecuteEvent, Status>>;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStream>, Status> {
        let arrived = Instant::now();
        let (deadline, permit) = self.admit(&request)?;
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
