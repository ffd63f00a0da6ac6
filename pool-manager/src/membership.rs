//! Membership: enrolls this pool manager with its queen once, then registers and heartbeats with
//! its own per-node runtime key.
//!
//! First start: the token file (a single-use enrollment token, or an admin token) is exchanged
//! through `Nodes/Enroll` for a node id and a runtime key, kept 0600 in the data dir. Every
//! registration also carries a fresh dispatch key, whose digest is set here before the queen can
//! use it. If the queen forgets us (restart) or cannot be reached, we register again with capped
//! exponential backoff; if it refuses our key (revoked), we stop for good. The first
//! registration waits (up to a minute) for the engine's warm-up figures, which every
//! registration and heartbeat then carries, so the queen can judge jobs before any has run.
//!
//! With an `https` queen URL every call is TLS, trusting only the queen's CA: from `--queen-ca`,
//! from `queen-ca.pem` in the data dir (pinned on an earlier start), or fetched once and pinned
//! by the fingerprint the enrollment token carries (`skep_…@<sha256>`). The pool then asks the
//! queen for a server certificate for its node id, so the queen's calls to it are TLS too.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use skep_common::auth::{self, TokenDigest};
use skep_common::secret::{Secret, SecretError};
use skep_proto::v1::nodes_client::NodesClient;
use skep_proto::v1::{
    EngineFigures, EnrollRequest, HeartbeatRequest, IssueCertificateRequest, RegisterRequest,
};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::Speed;
use crate::inventory;
use crate::models::ModelSet;
use crate::supervisor::Slots;

const MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const NODE_ID_FILE: &str = "node.id";
const RUNTIME_KEY_FILE: &str = "runtime.key";
/// The queen's CA certificate, once pinned.
const QUEEN_CA_FILE: &str = "queen-ca.pem";
/// Longest the first registration waits for the warm-up figures (a large model loads slowly;
/// past this the pool registers without them and sends them in a later heartbeat).
const FIGURES_WAIT: Duration = Duration::from_secs(60);

pub struct Membership {
    pub queen_url: String,
    /// The token file given on the command line: used only to enroll.
    pub bootstrap: PathBuf,
    pub data_dir: PathBuf,
    pub name: String,
    pub pool_url: String,
    pub slots: usize,
    /// The slot queues: idle slots are reported in heartbeats.
    pub work: Arc<Slots>,
    /// The engine's warm-up figures, sent with every registration and heartbeat.
    pub speed: Arc<Speed>,
    /// Every model this pool serves, by name (known before any is provisioned).
    pub models: Vec<String>,
    /// Their state (warm, loading, load times, memory), once the workers are started.
    pub model_set: Option<Arc<ModelSet>>,
    pub key: watch::Sender<Option<TokenDigest>>,
    /// The queen's CA certificate (PEM) when the queen URL is https.
    pub queen_ca: Option<String>,
    /// An approval credential for `node.enroll` (over the SHA-256 of `name`), sent when
    /// enrolling where the queen requires one; used only then.
    pub approval: Option<PathBuf>,
    /// Told whether the registration holds (for readiness: the pool's health).
    pub metrics: crate::metrics::PoolMetrics,
    /// The GPU the workers run on (`--device cuda:N`), as the worker's probe found it: marked
    /// `in_use` in the inventory.
    pub gpu: Option<crate::device::ProbedGpu>,
}

/// Failures that retrying cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(
        "the queen refused to enroll this node ({0}); create a fresh token with `skep token create --enroll`, \
         and where the queen requires approval for node.enroll pass a fresh --approval"
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
    #[error("{0}")]
    Tls(#[from] skep_tls::TlsError),
    #[error(
        "the queen URL is https but this pool does not know the queen's CA: enroll with a token \
         from `skep token create --enroll` (it carries the CA fingerprint) or pass --queen-ca FILE"
    )]
    NoQueenCa,
    #[error("the queen refused to issue this node a TLS certificate: {0}")]
    CertificateRefused(String),
}

/// The queen's CA certificate for an https queen URL (see the module comment for where it comes
/// from); `None` for http. Retries while the queen is unreachable; a pin mismatch is final.
pub async fn queen_ca(
    queen_url: &str,
    data_dir: &std::path::Path,
    given: Option<&std::path::Path>,
    bootstrap: &std::path::Path,
) -> Result<Option<String>, MembershipError> {
    if !queen_url.starts_with("https://") {
        return Ok(None);
    }
    if let Some(path) = given {
        return Ok(Some(std::fs::read_to_string(path)?));
    }
    let pinned = data_dir.join(QUEEN_CA_FILE);
    if pinned.exists() {
        return Ok(Some(std::fs::read_to_string(&pinned)?));
    }
    let raw = Secret::from_file(bootstrap)?;
    let Some(pin) = skep_tls::split_pin(raw.expose())?.1.map(str::to_owned) else {
        return Err(MembershipError::NoQueenCa);
    };
    let uri: tonic::codegen::http::Uri = queen_url
        .parse()
        .map_err(|e| skep_tls::TlsError::Invalid(format!("queen URL {queen_url:?}: {e}")))?;
    let addr = match (uri.host(), uri.port_u16()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => format!("{h}:443"),
        _ => {
            let why = format!("queen URL {queen_url:?} has no host");
            return Err(skep_tls::TlsError::Invalid(why).into());
        }
    };
    let mut backoff = FIRST_BACKOFF;
    let ca = loop {
        match skep_tls::fetch_pinned_ca(&addr, &pin).await {
            Ok(ca) => break ca,
            Err(e @ skep_tls::TlsError::PinMismatch { .. }) => return Err(e.into()),
            Err(e) => {
                warn!(queen = %queen_url, error = %e, "cannot fetch the queen's CA yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    write_private(&pinned, &ca)?;
    info!(ca_fingerprint = %pin, file = %pinned.display(), "pinned the queen's CA");
    Ok(Some(ca))
}

/// Adds the bearer header to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = NodesClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;
/// The queen's model catalogue, as this node.
pub type ModelsClient = skep_proto::v1::models_client::ModelsClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

/// This node's identity at the queen.
pub struct Credentials {
    pub node_id: String,
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
    /// This node's credentials: stored ones, or new ones from enrolling (retried with backoff
    /// while the queen is unreachable).
    pub async fn join(&self) -> Result<Credentials, MembershipError> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.credentials().await {
                Ok(c) => return Ok(c),
                Err(Ok(fatal)) => return Err(fatal),
                Err(Err(e)) => {
                    warn!(queen = %self.queen_url, error = %e, "cannot enroll yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// A TLS server certificate for this node from the queen's CA, for `key`; returns the
    /// certificate and the CA certificate, PEM.
    pub async fn certificate(
        &self,
        creds: &Credentials,
        key: &skep_tls::PoolKey,
    ) -> Result<(String, String), MembershipError> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let issued = async {
                let mut client = self.client(&creds.key).await?;
                let req = IssueCertificateRequest {
                    node_id: creds.node_id.clone(),
                    public_key: key.public_key(),
                };
                client.issue_certificate(req).await
            };
            match issued.await {
                Ok(r) => {
                    let r = r.into_inner();
                    return Ok((r.certificate_pem, r.ca_pem));
                }
                Err(s) if permanent(&s) || s.code() == Code::FailedPrecondition => {
                    return Err(MembershipError::CertificateRefused(s.message().to_owned()));
                }
                Err(e) => {
                    warn!(queen = %self.queen_url, error = %e, "cannot get a certificate yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Registers and heartbeats until a permanent failure, registering again whenever the
    /// queen forgets this node or cannot be reached.
    pub async fn run(self, creds: Credentials) -> Result<(), MembershipError> {
        // The queen judges this pool's first jobs by these figures: wait for them, a while.
        // Every model is measured at start, one after another.
        let wait = FIGURES_WAIT.saturating_mul(self.models.len().max(1) as u32);
        if self.speed.wait_for_figures(wait).await.is_none() {
            warn!(
                waited_s = wait.as_secs(),
                "no warm-up figures yet; registering without them"
            );
        }
        let mut backoff = FIRST_BACKOFF;
        loop {
            let ended = self.session(&creds).await;
            // Registered no longer, until the next registration succeeds.
            self.metrics.set_registered(false);
            match ended {
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

    /// The warm-up figures of every model measured so far.
    fn figures(&self) -> Vec<EngineFigures> {
        let Some(set) = &self.model_set else {
            return Vec::new();
        };
        self.models
            .iter()
            .filter_map(|model| {
                let f = set.figures(model)?;
                Some(EngineFigures {
                    model: model.clone(),
                    first_token_us: f.first_token_us,
                    per_token_us: f.per_token_us,
                    slots: self.slots as u32,
                })
            })
            .collect()
    }

    /// Every model's state and the budget they share.
    fn model_states(&self) -> (Vec<skep_proto::v1::ModelState>, u64) {
        match &self.model_set {
            Some(set) => (set.states(), set.budget()),
            None => (Vec::new(), 0),
        }
    }

    /// Models warm now.
    fn warm(&self) -> Vec<String> {
        self.model_set
            .as_ref()
            .map(|s| s.warm())
            .unwrap_or_default()
    }

    /// The catalogue client, authenticated as this node.
    pub async fn models_client(&self, creds: &Credentials) -> Result<ModelsClient, Status> {
        let (channel, bearer) = self.connect(&creds.key).await?;
        let client = skep_proto::v1::models_client::ModelsClient::with_interceptor(channel, bearer);
        Ok(client.max_decoding_message_size(2 << 20))
    }

    async fn client(&self, token: &Secret) -> Result<Client, Status> {
        let (channel, bearer) = self.connect(token).await?;
        Ok(NodesClient::with_interceptor(channel, bearer))
    }

    async fn connect(&self, token: &Secret) -> Result<(Channel, Bearer), Status> {
        let mut endpoint = Channel::from_shared(self.queen_url.clone())
            .map_err(|e| Status::invalid_argument(format!("bad queen URL: {e}")))?;
        if let Some(ca) = &self.queen_ca {
            endpoint = endpoint
                .tls_config(skep_tls::client_config(ca, skep_tls::QUEEN_NAME))
                .map_err(|e| Status::invalid_argument(format!("TLS: {e}")))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let header =
            auth::bearer_header(token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok((channel, Bearer(header)))
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
        let raw = Secret::from_file(&self.bootstrap).map_err(|e| Ok(e.into()))?;
        // An enrollment token may carry the CA fingerprint after '@': not part of the bearer.
        let token = skep_tls::split_pin(raw.expose())
            .map_err(|e| Ok(e.into()))?
            .0;
        let bootstrap = Secret::from_string(token.to_owned());
        let approval = match &self.approval {
            Some(path) => std::fs::read_to_string(path).map_err(|e| Ok(e.into()))?,
            None => String::new(),
        };
        let mut client = self.client(&bootstrap).await.map_err(Err)?;
        let enrolled = match client
            .enroll(EnrollRequest {
                name: self.name.clone(),
                approval,
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
        let (model_states, memory_budget_bytes) = self.model_states();
        let reg = client
            .register(RegisterRequest {
                name: self.name.clone(),
                pool_url: self.pool_url.clone(),
                slots: self.slots as u32,
                models: self.models.clone(),
                dispatch_key: key.expose().to_owned(),
                node_id: creds.node_id.clone(),
                figures: self.figures(),
                model_states,
                memory_budget_bytes,
            })
            .await?
            .into_inner();
        info!(node = %reg.node_id, "registered with queen");
        self.metrics.set_registered(true);
        let every = Duration::from_millis(reg.heartbeat_interval_ms.clamp(100, 10_000) as u64);
        let gpus = inventory::gpus(self.gpu.as_ref());
        loop {
            tokio::time::sleep(every).await;
            let (model_states, memory_budget_bytes) = self.model_states();
            let ack = client
                .heartbeat(HeartbeatRequest {
                    node_id: reg.node_id.clone(),
                    free_slots: self.work.idle(),
                    models: self.models.clone(),
                    inventory: Some(inventory::read(
                        &gpus,
                        &self.warm(),
                        crate::provision::held(&self.data_dir.join("models")),
                    )),
                    figures: self.figures(),
                    model_states,
                    memory_budget_bytes,
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
