//! Domain types of a job, independent of the wire format (see `grpc/convert.rs`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
    DeadlineExceeded,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::DeadlineExceeded => "deadline_exceeded",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
            JobState::DeadlineExceeded,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// Where a job's time went, hop by hop, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub admission_us: u64,
    pub queue_wait_us: u64,
    pub dispatch_us: u64,
    pub pool_us: u64,
    pub worker_first_token_us: u64,
    pub generation_us: u64,
    pub total_us: u64,
}

/// A job as persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub model: String,
    pub state: JobState,
    pub created_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub deadline_ms: u64,
    pub max_tokens: u32,
    pub tokens: u32,
    pub node_id: String,
    pub error: String,
    pub timings: Timings,
}

pub use skep_common::deadline::micros;

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
