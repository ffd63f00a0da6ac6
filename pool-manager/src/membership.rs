//! Membership: enrolls this pool manager with its queen once, then registers and heartbeats with
//! its own per-node runtime key.
//!
//! First start: the token file (a single-use enrollment token, or an admin token) is exchanged
//! through `Nodes/Enroll` for a node id and a runtime key, kept 0600 in the data dir. Every
//! registration also carries a fresh dispatch key, whose digest is set here before the queen can
//! use it. If the queen forgets us (restart) or cannot be reached, we register again with capped
//! exponential backoff; if it refuses our key (revoked), we stop for good.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use skep_common::auth::{self, TokenDigest};
use skep_common::secret::{Secret, SecretError};
use skep_proto::v1::nodes_client::NodesClient;
use skep_proto::v1::{EnrollRequest, HeartbeatRequest, RegisterRequest};
use tokio::sync::{Semaphore, watch};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::inventory;

const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const NODE_ID_FILE: &str = "node.id";
const RUNTIME_KEY_FILE: &str = "runtime.key";

pub struct Membership {
    pub queen_url: String,
    /// The token file given on the command line: used only to enroll.
    pub bootstrap: PathBuf,
    pub data_dir: PathBuf,
    pub name: String,
    pub pool_url: String,
    pub slots: usize,
    pub free: Arc<Semaphore>,
    pub models: Vec<String>,
    pub key: watch::Sender<Option<TokenDigest>>,
}

/// Failures that retrying cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(
        "the queen refused to enroll this node ({0}); create a fresh token with `skep token create --enroll`"
    )]
    EnrollRefused(String),
    #[error(
        "the queen refused this node's key ({0}); it may have been revoked: remove {1} and enroll again"
    )]
    KeyRefused(String, String),
    #[error("node credentials: {0}")]
    Credentials(#[from] SecretError),
    #[error("node credentials: {0}")]
    Io(#[from] std::io::Error),
}

/// Adds the bearer header to every call.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = NodesClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

struct Credentials {
    node_id: String,
    key: Secret,
}

fn permanent(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument
    )
}

// === impl Membership ===

impl Membership {
    /// Enrolls if needed, then registers and heartbeats until a permanent failure.
    pub async fn run(self) -> Result<(), MembershipError> {
        let mut backoff = FIRST_BACKOFF;
        let creds = loop {
            match self.credentials().await {
                Ok(c) => break c,
                Err(Ok(fatal)) => return Err(fatal),
                Err(Err(e)) => {
                    warn!(queen = %self.queen_url, error = %e, "cannot enroll yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        backoff = FIRST_BACKOFF;
        loop {
            match self.session(&creds).await {
                Ok(()) => backoff = FIRST_BACKOFF,
                Err(s) if permanent(&s) => {
                    let file = self.data_dir.join(RUNTIME_KEY_FILE).display().to_string();
                    return Err(MembershipError::KeyRefused(s.message().to_owned(), file));
                }
                Err(e) => {
                    warn!(queen = %self.queen_url, error = %e, retry_in_ms = backoff.as_millis() as u64, "queen unreachable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn client(&self, token: &Secret) -> Result<Client, Status> {
        let channel = Channel::from_shared(self.queen_url.clone())
            .map_err(|e| Status::invalid_argument(format!("bad queen URL: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let header =
            auth::bearer_header(token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(NodesClient::with_interceptor(channel, Bearer(header)))
    }

    /// Stored credentials, or new ones from enrolling. `Err(Ok(_))` is permanent.
    async fn credentials(&self) -> Result<Credentials, Result<MembershipError, Status>> {
        let id_path = self.data_dir.join(NODE_ID_FILE);
        let key_path = self.data_dir.join(RUNTIME_KEY_FILE);
        if key_path.exists() {
            let key = Secret::from_file(&key_path).map_err(|e| Ok(e.into()))?;
            let node_id = std::fs::read_to_string(&id_path).map_err(|e| Ok(e.into()))?;
            return Ok(Credentials {
                node_id: node_id.trim().to_owned(),
                key,
            });
        }
        let bootstrap = Secret::from_file(&self.bootstrap).map_err(|e| Ok(e.into()))?;
        let mut client = self.client(&bootstrap).await.map_err(Err)?;
        let enrolled = match client
            .enroll(EnrollRequest {
                name: self.name.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if permanent(&s) => {
                return Err(Ok(MembershipError::EnrollRefused(s.message().to_owned())));
            }
            Err(s) => return Err(Err(s)),
        };
        let key = Secret::from_string(enrolled.runtime_key);
        key.write_new(&key_path).map_err(|e| Ok(e.into()))?;
        write_private(&id_path, &enrolled.node_id).map_err(|e| Ok(e.into()))?;
        info!(node = %enrolled.node_id, "enrolled with queen");
        Ok(Credentials {
            node_id: enrolled.node_id,
            key,
        })
    }

    /// One registration and the heartbeats that follow; returns when the queen forgets us.
    async fn session(&self, creds: &Credentials) -> Result<(), Status> {
        let mut client = self.client(&creds.key).await?;
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
                node_id: creds.node_id.clone(),
            })
            .await?
            .into_inner();
        info!(node = %reg.node_id, "registered with queen");
        let every = Duration::from_millis(reg.heartbeat_interval_ms.clamp(100, 10_000) as u64);
        let gpus = inventory::gpus();
        loop {
            tokio::time::sleep(every).await;
            let ack = client
                .heartbeat(HeartbeatRequest {
                    node_id: reg.node_id.clone(),
                    free_slots: self.free.available_permits() as u32,
                    models: self.models.clone(),
                    // Each worker loads its model once at start and keeps it warm.
                    inventory: Some(inventory::read(&gpus, &self.models)),
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

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
