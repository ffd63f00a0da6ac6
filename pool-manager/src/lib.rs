//! The skep pool manager: one per machine. It registers with the queen, accepts `Pool/Execute`
//! calls from it alone, and runs each job on a local worker process over shared-memory lanes.
//!
//! Workers are supervised here: a worker that dies or corrupts its lanes is killed and started
//! again on a new generation, and the job it held fails cleanly instead of hanging.

pub mod audit;
pub mod grpc;
pub mod inventory;
pub mod membership;
pub mod provision;
pub mod supervisor;

use std::time::Instant;

use skep_common::deadline::Deadline;
use skep_proto::v1::{ExecuteEvent, ExecuteRequest};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// Events of one job flowing back towards the gRPC stream.
pub type EventSender = mpsc::Sender<Result<ExecuteEvent, tonic::Status>>;

/// A job accepted by the gRPC layer and waiting for a worker slot.
pub struct Job {
    pub request: ExecuteRequest,
    pub deadline: Deadline,
    pub arrived: Instant,
    pub events: EventSender,
    /// Held while the job occupies a slot; its release is what frees capacity.
    pub permit: OwnedSemaphorePermit,
}

/// What the pool has observed of its workers' speed, shared by the slots (writers) and the gRPC
/// layer (reader) through an atomic: a plain number, no lock.
#[derive(Debug, Default)]
pub struct Speed {
    first_token_us: std::sync::atomic::AtomicU64,
}

impl Speed {
    /// Folds in one observation (moving average, weight 1/4 for the newest).
    pub fn observe_first_token(&self, us: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let old = self.first_token_us.load(Relaxed);
        let new = if old == 0 { us } else { old - old / 4 + us / 4 };
        self.first_token_us.store(new.max(1), Relaxed);
    }

    /// Typical time to a first token; zero until a job has run.
    pub fn first_token(&self) -> std::time::Duration {
        std::time::Duration::from_micros(
            self.first_token_us
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

/// Pool-manager errors, mapped to gRPC status codes in `grpc/status.rs` only.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Auth(#[from] skep_common::auth::AuthError),
    #[error("{0}")]
    Deadline(#[from] skep_common::deadline::DeadlineError),
    #[error("{0}")]
    Invalid(#[from] skep_common::validate::ValidationError),
    #[error("this pool manager is not registered with a queen yet")]
    NotRegistered,
    #[error("all {slots} worker slots are busy; retry later")]
    Busy { slots: usize },
    #[error("model {0:?} is not served by this pool")]
    UnknownModel(String),
    #[error("the deadline passed before the job reached a worker")]
    LateArrival,
    #[error(
        "cannot produce a first token in time: {}ms left, workers need about {}ms",
        .remaining.as_millis(), .first_token.as_millis()
    )]
    Infeasible {
        remaining: std::time::Duration,
        first_token: std::time::Duration,
    },
    #[error("pool manager is shutting down")]
    ShuttingDown,
    #[error("deadline exceeded in the pool")]
    DeadlineExceeded,
    /// The worker answered with an error status of its own.
    #[error("{message}")]
    Worker { code: i32, message: String },
    /// The worker died or broke its lane mid-job; it is being restarted.
    #[error("worker lost mid-job: {0}; it is being restarted, retry the job")]
    WorkerLost(String),
}
