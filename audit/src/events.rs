//! The event types skep records. `event` is an open string so a new kind of event needs no
//! format change; these constants keep the spelling of the known ones in one place.

/// A request carried a missing, malformed or unknown bearer token.
pub const AUTH_FAILURE: &str = "auth.failure";
/// A job was admitted and persisted.
pub const JOB_SUBMITTED: &str = "job.submitted";
/// A job the queen accepted before a restart is being run again by the new process.
pub const JOB_RESUMED: &str = "job.resumed";
/// A job finished successfully.
pub const JOB_COMPLETED: &str = "job.completed";
/// A job ended with an error.
pub const JOB_FAILED: &str = "job.failed";
/// A job was cancelled by its client or an admin.
pub const JOB_CANCELLED: &str = "job.cancelled";
/// A job ran out of its deadline.
pub const JOB_DEADLINE_EXCEEDED: &str = "job.deadline_exceeded";
/// Admission refused a job (capacity, or it could not finish in its budget).
pub const JOB_REJECTED: &str = "job.rejected";
/// An API token was issued.
pub const TOKEN_CREATED: &str = "token.created";
/// An API token was revoked.
pub const TOKEN_REVOKED: &str = "token.revoked";
/// A pool manager registered as a node.
pub const NODE_ENROLLED: &str = "node.enrolled";
/// A node was removed or its dispatch key revoked.
pub const NODE_REVOKED: &str = "node.revoked";
/// A caller hit a rate limit.
pub const RATELIMIT_EXCEEDED: &str = "ratelimit.exceeded";
/// Input failed validation (identifier, prompt, token count).
pub const VALIDATION_REJECTED: &str = "validation.rejected";
/// A model was added to a node.
pub const MODEL_ADDED: &str = "model.added";
/// A model file did not match its expected hash.
pub const MODEL_HASH_MISMATCH: &str = "model.hash_mismatch";
/// A pool loaded a model into its workers (with its measured load time and memory).
pub const MODEL_LOADED: &str = "model.loaded";
/// A pool unloaded a warm model to make room for another (the queen's or its own LRU choice).
pub const MODEL_EVICTED: &str = "model.evicted";
/// A shared-memory lane was found corrupt.
pub const LANE_CORRUPT: &str = "lane.corrupt";
/// Written by the log itself on open: a torn final line (crash mid-write) was cut off.
pub const AUDIT_TORN_TAIL: &str = "audit.torn_tail";

/// Actor for events the system originates (no caller).
pub const ACTOR_SYSTEM: &str = "system";

/// Conventional field names, so searches (`skep audit search --job`) find them.
pub mod field {
    pub const JOB_ID: &str = "job_id";
    pub const NODE_ID: &str = "node_id";
    pub const MODEL: &str = "model";
    pub const REASON: &str = "reason";
    pub const PROMPT_LEN: &str = "prompt_len";
    pub const PROMPT_SHA256: &str = "prompt_sha256";
    pub const TOKEN_FP: &str = "token_fp";
}
