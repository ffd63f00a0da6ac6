//! skep's tamper-evident audit log: an append-only, hash-chained, HMAC-signed JSON-lines writer
//! (`AuditLog`) and a verifier (`verify`) that needs nothing but the files (and, to check the
//! MACs, the key).
//!
//! Every entry names the SHA-256 of the entry before it (`prev`) and carries an HMAC-SHA256 of
//! itself (`mac`), so editing, deleting, reordering, inserting or splicing lines breaks either the
//! chain or a MAC, and the verifier says which, where, and at which sequence number. Cutting the
//! tail off is only visible against a `Checkpoint` kept elsewhere (the queen's SQLite). The format
//! and its guarantees are specified in `docs/AUDIT.md`; this crate is the reference for it.
//!
//! Nothing secret belongs in an entry: actors are token fingerprints or node ids, prompts are
//! logged as length + SHA-256 (`Fields::prompt`), and `append` refuses values that look like raw
//! skep tokens or fields named like secrets.

mod entry;
mod error;
mod files;
mod key;
mod verify;
mod writer;

pub mod events;

pub use entry::{Entry, Fields, Head, prompt_fields};
pub use error::AuditError;
pub use files::{audit_files, file_name, read_entries};
pub use key::{AuditKey, Checkpoint};
pub use verify::{TamperKind, TornTail, Verdict, verify};
pub use writer::{AuditLog, AuditOptions, FsyncPolicy};

/// Format version written in every entry's `v` field.
pub const FORMAT_VERSION: u32 = 1;
/// The `prev` of the very first entry of a log: 64 zeros (there is no entry before it).
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest line (entry plus its `\n`) the writer produces and the verifier accepts.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
