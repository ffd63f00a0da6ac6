//! Dispatch: the one owner of the schedule (admission, EDF order, slot reservations, live jobs)
//! and the pool sessions it sends jobs over.
//!
//! `core` is the deterministic state machine and `cost` its estimates; `actor` runs the core as
//! one actix actor and carries out its decisions; the sessions themselves (tonic) live in
//! `grpc/session.rs` and talk to the actor through the types below.

pub mod actor;
pub mod core;
pub mod cost;

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use skep_common::secret::Secret;
use skep_proto::v1::pool_client::PoolClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

pub use self::actor::{DispatchHandle, Dispatcher};
pub use self::core::{Config, JobKey, Policy};
pub use self::cost::Figures;
use crate::job::Event;
pub use crate::job::NewJob;

/// How to reach one pool manager.
#[derive(Clone)]
pub struct Target {
    pub node_id: String,
    pub client: PoolClient<Channel>,
    /// Presented as bearer when the session opens.
    pub dispatch_key: Arc<Secret>,
    /// Cancelled when this registration ends (node dead, revoked or replaced): its session
    /// closes and its jobs fail over.
    pub gone: tokio_util::sync::CancellationToken,
}

/// One attempt at a job, as the session sends it to the pool.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub handle: JobKey,
    pub job_id: String,
    pub model: String,
    pub prompt: Arc<str>,
    pub max_tokens: u32,
    pub remaining: Duration,
    pub slot: u32,
    /// The policy's sort key among the slot's waiting jobs at the pool.
    pub order: u64,
}

/// What a session needs to stream one job's events to its client.
pub struct Route {
    pub key: JobKey,
    pub job_id: String,
    pub events: mpsc::Sender<Event>,
    /// Token progress, read by the core for its predictions.
    pub progress: Arc<core::Progress>,
    /// Tokens the client already has (across attempts).
    pub delivered: Arc<AtomicU32>,
    pub deadline: Instant,
    pub sent_at: Instant,
    /// The core's clock origin, for `progress`.
    pub epoch: Instant,
    pub attempt: u32,
}

/// The actor's orders to a pool session.
pub enum SessionCmd {
    Job {
        attempt: Box<Attempt>,
        route: Box<Route>,
    },
    /// Stop the job; its client has already been told how it ended.
    Cancel { handle: JobKey },
}
