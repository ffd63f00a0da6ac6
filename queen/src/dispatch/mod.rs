//! Dispatch: the one owner of the schedule (admission, EDF order, slot reservations, live jobs)
//! and the pool sessions it sends jobs over.
//!
//! `core` is the deterministic state machine and `cost` its estimates; `actor` runs the core as
//! one actix actor and carries out its decisions; the sessions themselves (tonic) live in
//! `grpc/session.rs` and talk to the actor through the types below.

pub mod actor;
pub mod core;
pub mod cost;

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skep_common::secret::Secret;
use skep_proto::v1::pool_client::PoolClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

pub use self::actor::{DispatchHandle, Dispatcher, NodeModels};
pub use self::core::{Config, JobKey, ModelState, Policy};
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
    pub sampling: skep_common::sampling::Sampling,
    pub remaining: Duration,
    pub slot: u32,
    /// The policy's sort key among the slot's waiting jobs at the pool.
    pub order: u64,
    /// Warm models the pool unloads first so that the job's model fits its budget.
    pub evict: Vec<String>,
}

/// What a session needs to stream one job's events to its client.
pub struct Route {
    pub key: JobKey,
    pub job_id: String,
    pub events: mpsc::Sender<Event>,
    /// Token progress, read by the core for its predictions.
    pub progress: Arc<core::Progress>,
    /// Tokens the client already has (across attempts).
    pub delivered: Arc<Delivered>,
    pub deadline: Instant,
    pub sent_at: Instant,
    /// The core's clock origin, for `progress`.
    pub epoch: Instant,
    pub attempt: u32,
}

/// What a job's client has been sent, across attempts: each token's id and a digest of its
/// text. A failover attempt must reproduce exactly this before its own tokens are passed on,
/// because pools on different CPUs (or builds) may round differently and pick other tokens.
#[derive(Debug, Default)]
pub struct Delivered(Mutex<Vec<(u32, u64)>>);

impl Delivered {
    /// Tokens the client has.
    pub fn len(&self) -> u32 {
        u32::try_from(self.lock().len()).unwrap_or(u32::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Records a token the client was sent: its id and `Delivered::digest` of its text.
    pub fn push(&self, id: u32, digest: u64) {
        self.lock().push((id, digest));
    }

    /// Whether the client's token `index` is this one (id and text).
    pub fn matches(&self, index: u32, id: u32, text: &str) -> Option<bool> {
        let guard = self.lock();
        let &(have_id, have_text) = guard.get(index as usize)?;
        Some(have_id == id && have_text == Delivered::digest(text))
    }

    /// The client was told to discard everything: the next token is index 0 again.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u32, u64)>> {
        // Only the pushes of one session at a time reach it; a poisoned lock still holds
        // consistent data (each update is one push or clear).
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A text's digest for the prefix check. Not a security boundary (pools are trusted to
    /// report honestly); it catches honest divergence without keeping every text.
    pub fn digest(text: &str) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    }
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
