//! The skep pool manager: one per machine. It registers with the queen, serves the queen's
//! `Pool/Session` stream (and nobody else's), and runs each job on a local worker process over
//! shared-memory lanes.
//!
//! Workers are supervised here: a worker that dies or corrupts its lanes is killed and started
//! again on a new generation, and the job it held fails cleanly instead of hanging.

pub mod audit;
pub mod device;
pub mod grpc;
pub mod inventory;
pub mod membership;
pub mod metrics;
pub mod models;
pub mod provision;
pub mod supervisor;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// What happens to one job, in order: `Started`, any number of `Token`s, then exactly one of
/// `Finished` or `Failed`. Domain twin of the wire's `PoolEvent`; `grpc` converts.
#[derive(Debug)]
pub enum Event {
    /// The request entered the worker's lane.
    Started {
        slot: u32,
        generation: u64,
        /// From the job frame's arrival to the lane.
        pool_us: u64,
    },
    Token {
        index: u32,
        text: String,
        /// The model's id of the token that completed `text`.
        id: u32,
    },
    Finished {
        tokens: u32,
        /// Tokens the prompt was, as the worker's engine counted them.
        prompt_tokens: u32,
        pool_us: u64,
        first_token_us: u64,
        generation_us: u64,
    },
    Failed {
        error: Error,
        /// Tokens the worker delivered before it stopped.
        tokens: u32,
    },
}

impl Event {
    /// Finished and Failed end a job; nothing follows them.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::Finished { .. } | Event::Failed { .. })
    }
}

/// A session's single outbound queue: `(job handle, event)` from the gRPC reader (refusals) and
/// from the slot threads. Unbounded on purpose: a slot thread must never block on a slow queen
/// while it holds a worker, and the backlog is bounded anyway by what the session may have in
/// flight (slots × (1 + credits per slot) jobs of at most `max_tokens` + 2 events each).
pub type Sink = mpsc::UnboundedSender<(u64, Event)>;

/// The engine's speed on this machine, measured by the warm-up job (see `supervisor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figures {
    pub first_token_us: u64,
    pub per_token_us: u64,
}

/// What the pool knows of its workers' speed, shared by the slots (writers), the gRPC layer and
/// membership (readers).
#[derive(Debug)]
pub struct Speed {
    /// Moving average of real jobs' first-token times: a plain number behind an atomic, read on
    /// every job frame.
    first_token_us: AtomicU64,
    /// The warm-up figures, once measured: membership waits for them before registering.
    figures: watch::Sender<Option<Figures>>,
}

impl Default for Speed {
    fn default() -> Self {
        Speed {
            first_token_us: AtomicU64::new(0),
            figures: watch::Sender::new(None),
        }
    }
}

impl Speed {
    /// Folds in one observation (moving average, weight 1/4 for the newest).
    pub fn observe_first_token(&self, us: u64) {
        let old = self.first_token_us.load(Relaxed);
        let new = if old == 0 { us } else { old - old / 4 + us / 4 };
        self.first_token_us.store(new.max(1), Relaxed);
    }

    /// Typical time to a first token; zero until a job has run.
    pub fn first_token(&self) -> Duration {
        Duration::from_micros(self.first_token_us.load(Relaxed))
    }

    /// Records the warm-up measurement; wakes whoever waits for it.
    pub fn publish(&self, figures: Figures) {
        self.figures.send_replace(Some(figures));
    }

    /// The warm-up figures, if measured yet.
    pub fn figures(&self) -> Option<Figures> {
        *self.figures.borrow()
    }

    /// Waits up to `limit` for the warm-up figures.
    pub async fn wait_for_figures(&self, limit: Duration) -> Option<Figures> {
        let mut rx = self.figures.subscribe();
        match tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await {
            Ok(Ok(f)) => *f,
            _ => None,
        }
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
    #[error("handle 0 is reserved for session events")]
    ReservedHandle,
    #[error("handle {0} is already in use on this slot")]
    DuplicateHandle(u64),
    #[error("slot {slot} does not exist: this pool has {slots} slots")]
    NoSuchSlot { slot: u32, slots: usize },
    #[error("slot {slot} already holds {limit} jobs (1 running + credits); protocol violation")]
    SlotFull { slot: u32, limit: usize },
    #[error("model {0:?} is not served by this pool")]
    UnknownModel(String),
    #[error("the deadline passed before the job reached a worker")]
    LateArrival,
    #[error(
        "cannot produce a first token in time: {}ms left, workers need about {}ms",
        .remaining.as_millis(), .first_token.as_millis()
    )]
    Infeasible {
        remaining: Duration,
        first_token: Duration,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("pool manager is shutting down")]
    ShuttingDown,
    #[error("deadline exceeded in the pool")]
    DeadlineExceeded,
    /// The worker answered with an error status of its own.
    #[error("{message}")]
    Worker { code: i32, message: String },
    /// The worker died or broke its lane (mid-job, or while the job waited behind it).
    #[error("worker lost: {0}; it is being restarted, retry the job")]
    WorkerLost(String),
    /// Loading the job's model would push the pool over its memory budget, and every model
    /// that could make room has jobs here.
    #[error(
        "model {model:?} needs {need} bytes warm and the pool's memory budget is {budget} bytes, \
         {in_use} of them held by models with jobs here; retry elsewhere or later"
    )]
    OverBudget {
        model: String,
        need: u64,
        budget: u64,
        in_use: u64,
    },
    /// The job's model could not be loaded (its workers fail to start).
    #[error("model {model:?} could not be loaded on this pool: {why}")]
    LoadFailed { model: String, why: String },
}
