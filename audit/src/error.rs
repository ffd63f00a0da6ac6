//! The writer's error type. The verifier never errors: it returns a `Verdict`.

use std::path::PathBuf;

use skep_common::secret::SecretError;

use crate::MAX_LINE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit key: {0}")]
    Key(#[from] SecretError),
    #[error("audit log I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid audit event type {0:?}: expected 1-64 chars of a-z, 0-9, '.', '_'")]
    InvalidEvent(String),
    #[error("invalid audit actor {0:?}: expected 1-128 chars of A-Z, a-z, 0-9, '.', '_', ':', '-'")]
    InvalidActor(String),
    #[error(
        "audit field {key:?} looks like a raw secret or prompt; log a fingerprint or Fields::prompt instead"
    )]
    Sensitive { key: String },
    #[error("audit entry would be {len} bytes, over the {MAX_LINE_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("cannot resume audit log at {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("an earlier write to the audit log failed and could not be undone; reopen the log")]
    Poisoned,
    #[error("audit sequence number exhausted")]
    SeqExhausted,
}

impl AuditError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
        move |source| AuditError::Io {
            path: path.to_owned(),
            source,
        }
    }
}
