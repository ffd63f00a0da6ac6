//! One audit entry: its canonical bytes, its hash, its line form, and the `Fields` builder that
//! keeps raw prompts and tokens out of it.
//!
//! Canonical bytes ("the body") are the compact serde_json serialization of the entry *without*
//! `mac`, fields in the fixed order `v, seq, ts, event, actor, fields, kid, prev`. The entry's
//! hash is SHA-256 of the body, its MAC is HMAC-SHA256 of the body, and the line on disk is the
//! body with `,"mac":"<64 hex>"` spliced in before the final `}`. The verifier recovers the body
//! by cutting that fixed 74-byte suffix off again, so it hashes exactly the bytes that were
//! written and never depends on re-serializing JSON the same way.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use skep_common::secret::TOKEN_PREFIX;

use crate::events::field;
use crate::{AuditError, FORMAT_VERSION, GENESIS, MAX_LINE_BYTES};

/// `,"mac":"` + 64 hex + `"}`.
const MAC_SUFFIX_LEN: usize = 8 + 64 + 2;
/// Field names that must never carry raw material: log a fingerprint or a hash instead.
const FORBIDDEN_KEYS: &[&str] = &[
    "prompt",
    "token",
    "authorization",
    "secret",
    "password",
    "api_key",
    "bearer",
];
/// How deep `append` looks into nested field values for raw tokens.
const MAX_SCAN_DEPTH: usize = 16;

/// A parsed audit line, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Format version (`FORMAT_VERSION`).
    pub v: u32,
    /// 1 for the first entry of a log, +1 for every entry after it, across files.
    pub seq: u64,
    /// Wall-clock time of the append, RFC 3339 UTC with milliseconds (`2025-10-10T16:48:05.123Z`).
    /// Informational: clocks step, so the verifier does not require it to increase.
    pub ts: String,
    /// Event type (`events::*`), an open set.
    pub event: String,
    /// Who caused it: a token fingerprint, a node id or `system`.
    pub actor: String,
    /// Event details (`Fields`).
    pub fields: Map<String, Value>,
    /// Id of the MAC key (`AuditKey::id`).
    pub kid: String,
    /// Hex SHA-256 of the previous entry's body; `GENESIS` for seq 1.
    pub prev: String,
    /// Hex HMAC-SHA256 of this entry's body.
    pub mac: String,
}

/// The canonical body, borrowed, in the one field order that is ever hashed.
#[derive(Serialize)]
struct Body<'a> {
    v: u32,
    seq: u64,
    ts: &'a str,
    event: &'a str,
    actor: &'a str,
    fields: &'a Map<String, Value>,
    kid: &'a str,
    prev: &'a str,
}

/// Where a chain stands: the last entry's sequence number and hex hash (`0` / `GENESIS` when empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Head {
    pub(crate) fn genesis() -> Head {
        Head {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// A line that parsed, with the bytes and hash the chain is computed over.
pub(crate) struct Parsed {
    pub entry: Entry,
    pub body: Vec<u8>,
    pub hash: String,
}

/// Builds the body and the line (`\n` included) for a new entry; returns `(line, body hash)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode(
    seq: u64,
    ts: &str,
    event: &str,
    actor: &str,
    fields: &Map<String, Value>,
    kid: &str,
    prev: &str,
    mac: impl FnOnce(&[u8]) -> String,
) -> Result<(Vec<u8>, String), AuditError> {
    let body = serde_json::to_vec(&Body {
        v: FORMAT_VERSION,
        seq,
        ts,
        event,
        actor,
        fields,
        kid,
        prev,
    })
    // Serializing strings, integers and a JSON map cannot fail; map it rather than panic anyway.
    .map_err(|e| AuditError::Corrupt {
        path: Default::default(),
        detail: format!("cannot serialize entry: {e}"),
    })?;
    let len = body.len() - 1 + MAC_SUFFIX_LEN + 1;
    if len > MAX_LINE_BYTES {
        return Err(AuditError::TooLarge { len });
    }
    let tag = mac(&body);
    let mut line = Vec::with_capacity(len);
    line.extend_from_slice(&body[..body.len() - 1]);
    line.extend_from_slice(b",\"mac\":\"");
    line.extend_from_slice(tag.as_bytes());
    line.extend_from_slice(b"\"}\n");
    Ok((line, sha256_hex(&body)))
}

/// Parses one line (without its `\n`), checking the shape the writer produces.
pub(crate) fn parse(line: &[u8]) -> Result<Parsed, String> {
    if line.len() > MAX_LINE_BYTES {
        return Err(format!("line is {} bytes, over the limit", line.len()));
    }
    let Some(split) = line.len().checked_sub(MAC_SUFFIX_LEN) else {
        return Err("line is too short to be an audit entry".into());
    };
    let suffix = &line[split..];
    if !suffix.starts_with(b",\"mac\":\"") || !suffix.ends_with(b"\"}") {
        return Err("line does not end with the mac field".into());
    }
    if !is_hex(&suffix[8..72], 64) {
        return Err("mac is not 64 lowercase hex digits".into());
    }
    let entry: Entry =
        serde_json::from_slice(line).map_err(|e| format!("not a valid audit entry: {e}"))?;
    if entry.v != FORMAT_VERSION {
        return Err(format!("unknown format version {}", entry.v));
    }
    if !is_hex(entry.prev.as_bytes(), 64) || !is_hex(entry.kid.as_bytes(), 16) {
        return Err("prev or kid is not lowercase hex of the right length".into());
    }
    // The suffix could be a decoy inside a string with the real `mac` elsewhere; deny_unknown_fields
    // already refuses a second `mac` key, and this refuses a suffix that is not the mac field.
    if entry.mac.as_bytes() != &suffix[8..72] {
        return Err("mac field is not the last field".into());
    }
    let mut body = Vec::with_capacity(split + 1);
    body.extend_from_slice(&line[..split]);
    body.push(b'}');
    let hash = sha256_hex(&body);
    Ok(Parsed { entry, body, hash })
}

/// Length and hex SHA-256 of a prompt: what the audit log records instead of the prompt.
pub fn prompt_fields(prompt: &str) -> (usize, String) {
    (prompt.len(), sha256_hex(prompt.as_bytes()))
}

/// Builder for an entry's `fields`, with typed helpers for the conventional names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields(Map<String, Value>);

// === impl Fields ===

impl Fields {
    pub fn new() -> Fields {
        Fields::default()
    }

    pub fn job(self, job_id: &str) -> Fields {
        self.str(field::JOB_ID, job_id)
    }

    pub fn node(self, node_id: &str) -> Fields {
        self.str(field::NODE_ID, node_id)
    }

    pub fn model(self, model: &str) -> Fields {
        self.str(field::MODEL, model)
    }

    pub fn reason(self, reason: &str) -> Fields {
        self.str(field::REASON, reason)
    }

    /// Records the prompt as `prompt_len` and `prompt_sha256`, never its text.
    pub fn prompt(self, prompt: &str) -> Fields {
        let (len, sha) = prompt_fields(prompt);
        self.num(field::PROMPT_LEN, len as u64)
            .str(field::PROMPT_SHA256, &sha)
    }

    /// Records a token as its 6-hex fingerprint (`token_fp`), never the token.
    pub fn token(self, token: &str) -> Fields {
        self.str(field::TOKEN_FP, &skep_common::auth::fingerprint(token))
    }

    pub fn str(self, key: &str, value: &str) -> Fields {
        self.value(key, Value::String(value.to_owned()))
    }

    pub fn num(self, key: &str, value: u64) -> Fields {
        self.value(key, Value::from(value))
    }

    pub fn value(mut self, key: &str, value: Value) -> Fields {
        self.0.insert(key.to_owned(), value);
        self
    }

    pub fn into_map(self) -> Map<String, Value> {
        self.0
    }
}

impl From<Fields> for Map<String, Value> {
    fn from(f: Fields) -> Map<String, Value> {
        f.0
    }
}

/// Event types: 1-64 of `a-z 0-9 . _`, so they are safe to grep and to put in a file name.
pub(crate) fn check_event(event: &str) -> Result<(), AuditError> {
    let ok = (1..=64).contains(&event.len())
        && event
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(AuditError::InvalidEvent(truncate(event)))
    }
}

/// Actors: a fingerprint, a node id or `system`; 1-128 of `A-Z a-z 0-9 . _ : -`.
pub(crate) fn check_actor(actor: &str) -> Result<(), AuditError> {
    let ok = (1..=128).contains(&actor.len())
        && actor
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AuditError::InvalidActor(truncate(actor)))
    }
}

/// Refuses fields named like secrets and any string that embeds a raw skep token.
pub(crate) fn check_fields(fields: &Map<String, Value>) -> Result<(), AuditError> {
    for (k, v) in fields {
        let lower = k.to_ascii_lowercase();
        if FORBIDDEN_KEYS.contains(&lower.as_str()) || contains_token(k) {
            return Err(AuditError::Sensitive { key: truncate(k) });
        }
        if value_has_token(v, 0) {
            return Err(AuditError::Sensitive { key: truncate(k) });
        }
    }
    Ok(())
}

fn value_has_token(v: &Value, depth: usize) -> bool {
    if depth > MAX_SCAN_DEPTH {
        // Deeper than any field we log: refuse rather than skip what we did not look at.
        return true;
    }
    match v {
        Value::String(s) => contains_token(s),
        Value::Array(a) => a.iter().any(|v| value_has_token(v, depth + 1)),
        Value::Object(o) => o
            .iter()
            .any(|(k, v)| contains_token(k) || value_has_token(v, depth + 1)),
        _ => false,
    }
}

/// A skep token is `skep_` + 64 hex; 32 hex digits after the prefix are already too many to be
/// anything else.
fn contains_token(s: &str) -> bool {
    s.match_indices(TOKEN_PREFIX).any(|(i, _)| {
        let rest = &s.as_bytes()[i + TOKEN_PREFIX.len()..];
        rest.len() >= 32 && rest[..32].iter().all(u8::is_ascii_hexdigit)
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn is_hex(b: &[u8], len: usize) -> bool {
    b.len() == len
        && b.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

#[cfg(test)]
mod tests;
