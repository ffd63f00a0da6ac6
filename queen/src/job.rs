//! A job as the queen's request handlers and the dispatch actor see it: the validated request,
//! the events its client receives, and the handles both share.
//!
//! A job's life is driven by the dispatch core (`dispatch/core.rs`), not by a task of its own:
//! the submit handler makes one request to the dispatch actor, the pool session streams its
//! tokens, and the actor ends it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use skep_common::sampling::Sampling;

use crate::Error;
use crate::model::Timings;

/// Events buffered per client stream beyond a job's tokens: the stream holds a whole job, so a
/// slow reader never makes a pool session wait.
pub const EVENT_BUFFER: usize = 64;

/// The queen's actors, as seen by request handlers.
#[derive(Clone)]
pub struct Services {
    pub dispatch: crate::dispatch::DispatchHandle,
    pub registry: crate::registry::RegistryHandle,
    pub store: crate::store::StoreHandle,
    pub tokens: crate::auth::TokenBook,
    pub audit: crate::audit::AuditHandle,
    /// The queen's TLS material when it serves TLS: its CA signs pools' certificates.
    pub tls: Option<Arc<skep_tls::QueenTls>>,
    pub catalogue: crate::catalogue::Catalogue,
    /// Which actions need an approval credential, and who may approve them.
    pub approvals: crate::approval::Approvals,
    /// The queen's Prometheus metrics (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
}

/// A validated job request.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub model: String,
    pub prompt: Arc<str>,
    pub max_tokens: u32,
    /// How the worker picks tokens (validated).
    pub sampling: Sampling,
    pub budget: Duration,
    /// When the request reached the queen: the budget runs from here.
    pub arrived: Instant,
    /// Fingerprint of the submitter's token, for logs and the audit trail.
    pub caller: String,
    /// The submitter's token digest (hex): who may see the job, and whose share it counts in.
    /// Stored with the job; never logged.
    pub owner: String,
    /// The submitter's token's own share (jobs live at once), if it sets one.
    pub caller_share: Option<u32>,
}

/// What the client sees of a job, in order.
#[derive(Debug)]
pub enum Event {
    Accepted {
        budget: Duration,
        estimate: Duration,
        node_id: String,
    },
    Queued {
        position: usize,
        /// From the job's arrival.
        predicted_start: Duration,
    },
    Dispatched {
        node_id: String,
        attempt: u32,
    },
    Token {
        index: u32,
        text: String,
    },
    /// A failover attempt did not reproduce what the client has: discard it, the output starts
    /// again at index 0.
    Restarted {
        attempt: u32,
        node_id: String,
        reason: String,
    },
    Done {
        tokens: u32,
        /// Tokens the prompt was, as the engine that finished the job counted them.
        prompt_tokens: u32,
        timings: Timings,
    },
    Failed {
        error: Error,
        timings: Timings,
    },
}

impl Event {
    /// The last event of a job's stream.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Event::Done { .. } | Event::Failed { .. })
    }
}
