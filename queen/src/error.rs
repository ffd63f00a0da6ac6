//! The queen's error type. Conversion to gRPC statuses lives in `grpc/status.rs` only.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Auth(#[from] skep_common::auth::AuthError),
    #[error("this operation needs the {0} role")]
    PermissionDenied(&'static str),
    /// A governed action without a valid approval credential (see `approval`).
    #[error("{0}")]
    ApprovalRefused(String),
    #[error("{0}")]
    Invalid(#[from] skep_common::validate::ValidationError),
    #[error("{0}")]
    BadDeadline(#[from] skep_common::deadline::DeadlineError),
    #[error(
        "job cannot finish in time: budget {}ms, estimated {}ms; raise the deadline or lower max_tokens",
        .budget.as_millis(), .estimate.as_millis()
    )]
    Infeasible {
        budget: Duration,
        estimate: Duration,
    },
    #[error(
        "deadline exceeded: budget {}ms, elapsed {}ms (exceeded by {}ms)",
        .budget.as_millis(), .elapsed.as_millis(), .elapsed.saturating_sub(*.budget).as_millis()
    )]
    DeadlineExceeded { budget: Duration, elapsed: Duration },
    #[error("queue is full; retry in {}ms", .retry_after.as_millis())]
    QueueFull { retry_after: Duration },
    #[error(
        "this token already has {share} jobs queued or running, its share of the queen; wait \
         for one to end (retry in {}ms) or ask an admin for a token with a larger --max-jobs",
        .retry_after.as_millis()
    )]
    CallerShare { share: u32, retry_after: Duration },
    #[error("no pool serves model {0:?}; start a pool manager with that model")]
    NoPool(String),
    #[error("pool URL refused: {0}")]
    BadPoolUrl(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("node {0} is revoked; enroll it again")]
    NodeRevoked(String),
    #[error(
        "pool URL {url} is registered by another node ({holder}) that is alive; a node may only \
         replace its own registration: give this pool its own --advertise URL, or stop the other"
    )]
    UrlTaken { url: String, holder: String },
    #[error("node {0} not found")]
    NodeNotFound(String),
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("job was cancelled")]
    Cancelled,
    /// A pool manager answered with an error; its status is passed on.
    #[error("pool {node}: {message}")]
    Pool {
        node: String,
        code: i32,
        message: String,
    },
    #[error("pool {node} unreachable: {message}")]
    PoolUnreachable {
        node: String,
        message: String,
        /// The connection itself failed (refused, reset, closed without a result), as opposed
        /// to the pool answering UNAVAILABLE: the node may be down.
        transport: bool,
    },
    #[error("state store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("rate limit exceeded; retry in {}ms", .retry_after.as_millis())]
    RateLimited { retry_after: Duration },
    #[error("{0}")]
    Tokens(#[from] crate::auth::BookError),
    #[error("internal component stopped")]
    ActorStopped,
    #[error("model: {0}")]
    Model(String),
    #[error("no model {0} in the catalogue; add it with `skep model add`")]
    ModelNotFound(String),
    #[error("I/O: {0}")]
    Io(String),
}

impl From<actix::MailboxError> for Error {
    fn from(_: actix::MailboxError) -> Self {
        Error::ActorStopped
    }
}
