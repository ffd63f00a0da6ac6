//! Membership: registers this pool manager with its queen and keeps it informed by heartbeats.
//!
//! Registration yields the dispatch key the queen will present on every `Pool/Execute`; only its
//! digest is kept. If the queen forgets us (restart) or cannot be reached, we register again with
//! capped exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use skep_common::auth::{self, TokenDigest};
use skep_common::secret::Secret;
use skep_proto::v1::nodes_client::NodesClient;
use skep_proto::v1::{HeartbeatRequest, RegisterRequest};
use tokio::sync::{Semaphore, watch};
use tonic::transport::Channel;
use tracing::{info, warn};

const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

pub struct Membership {
    pub queen_url: String,
    pub token: Secret,
    pub name: String,
    pub pool_url: String,
    pub slots: usize,
    pub free: Arc<Semaphore>,
    pub models: Vec<String>,
    pub key: watch::Sender<Option<TokenDigest>>,
}

// === impl Membership ===

impl Membership {
    /// Registers, then heartbeats, forever (until the task is dropped).
    pub async fn run(self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.session().await {
                Ok(()) => backoff = FIRST_BACKOFF,
                Err(e) => {
                    warn!(queen = %self.queen_url, error = %e, retry_in_ms = backoff.as_millis() as u64, "queen unreachable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One registration and the heartbeats that follow; returns when the queen forgets us.
    async fn session(&self) -> Result<(), tonic::Status> {
        let channel = Channel::from_shared(self.queen_url.clone())
            .map_err(|e| tonic::Status::invalid_argument(format!("bad queen URL: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let header = auth::bearer_header(&self.token)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut client =
            NodesClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            });
        // A fresh dispatch key per registration, known here before the queen can use it.
        let key = Secret::generate();
        self.key.send_replace(Some(TokenDigest::of(key.expose())));
        let reg = client
            .register(RegisterRequest {
                name: self.name.clone(),
                pool_url: self.pool_url.clone(),
                slots: self.slots as u32,
                models: self.models.clone(),
                dispatch_key: key.expose().to_owned(),
            })
            .await?
            .into_inner();
        info!(node = %reg.node_id, "registered with queen");
        let every = Duration::from_millis(reg.heartbeat_interval_ms.clamp(100, 10_000) as u64);
        loop {
            tokio::time::sleep(every).await;
            let ack = client
                .heartbeat(HeartbeatRequest {
                    node_id: reg.node_id.clone(),
                    free_slots: self.free.available_permits() as u32,
                    models: self.models.clone(),
                })
                .await?
                .into_inner();
            if !ack.known {
                warn!(node = %reg.node_id, "queen forgot this node; registering again");
                return Ok(());
            }
        }
    }
}
