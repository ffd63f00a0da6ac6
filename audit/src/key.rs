//! The audit MAC key (a 0600 file secret) and everything computed with it: entry MACs, the key id
//! and checkpoint MACs.
//!
//! Each use is domain-separated: an entry MAC covers bytes starting with `{"v":`, the key id and
//! checkpoint MACs cover strings starting with `skep-audit/`, so no MAC of one kind can be passed
//! off as another.

use std::path::Path;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use skep_common::secret::Secret;

use crate::AuditError;

type HmacSha256 = Hmac<Sha256>;

const KEY_ID_DOMAIN: &[u8] = b"skep-audit/v1/key-id";
const CHECKPOINT_DOMAIN: &str = "skep-audit/v1/checkpoint";

/// The HMAC key of an audit log. Deliberately no `Debug`, `Display` or `Clone`: the bytes live in
/// the zeroizing `Secret` and leave it only into the HMAC state.
pub struct AuditKey(Secret);

// === impl AuditKey ===

impl AuditKey {
    /// Loads the key from a file that only its owner can read (mode 0600 or stricter).
    pub fn from_file(path: &Path) -> Result<AuditKey, AuditError> {
        Ok(AuditKey(Secret::from_file(path)?))
    }

    /// Loads the key, first creating the file (0600, 32 random bytes) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<AuditKey, AuditError> {
        Ok(AuditKey(Secret::load_or_create(path)?))
    }

    /// Wraps a secret the caller already holds.
    pub fn from_secret(secret: Secret) -> AuditKey {
        AuditKey(secret)
    }

    /// 16 hex digits naming this key (an HMAC of a constant, so it reveals nothing about the
    /// key). Written in every entry so the verifier can tell "wrong key" from "forged entry".
    pub fn id(&self) -> String {
        let mut m = self.hmac();
        m.update(KEY_ID_DOMAIN);
        hex::encode(&m.finalize().into_bytes()[..8])
    }

    pub(crate) fn mac_hex(&self, bytes: &[u8]) -> String {
        let mut m = self.hmac();
        m.update(bytes);
        hex::encode(m.finalize().into_bytes())
    }

    /// Constant-time check of a hex MAC over `bytes`; malformed hex simply fails.
    pub(crate) fn mac_ok(&self, bytes: &[u8], mac_hex: &str) -> bool {
        let Ok(tag) = hex::decode(mac_hex) else {
            return false;
        };
        let mut m = self.hmac();
        m.update(bytes);
        m.verify_slice(&tag).is_ok()
    }

    fn hmac(&self) -> HmacSha256 {
        // HMAC takes keys of any length (long ones are hashed first): this error cannot happen.
        HmacSha256::new_from_slice(self.0.expose().as_bytes())
            .expect("HMAC-SHA256 accepts keys of any length")
    }
}

/// A signed statement "the log had `seq` entries and the last one hashed to `head`", to be stored
/// apart from the log (the queen keeps it in SQLite). Verifying against it is what reveals a cut
/// tail or a rolled-back log, which the chain alone cannot show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Sequence number of the last entry covered (0: the empty log).
    pub seq: u64,
    /// Hex SHA-256 of that entry's canonical bytes (`GENESIS` for the empty log).
    pub head: String,
    /// Hex HMAC-SHA256 of `skep-audit/v1/checkpoint\n{seq}\n{head}`.
    pub mac: String,
}

// === impl Checkpoint ===

impl Checkpoint {
    pub(crate) fn sign(key: &AuditKey, seq: u64, head: &str) -> Checkpoint {
        Checkpoint {
            seq,
            head: head.to_owned(),
            mac: key.mac_hex(Self::message(seq, head).as_bytes()),
        }
    }

    /// Whether `key` signed this checkpoint.
    pub fn is_signed_by(&self, key: &AuditKey) -> bool {
        key.mac_ok(Self::message(self.seq, &self.head).as_bytes(), &self.mac)
    }

    /// The checkpoint as one JSON object (how the CLI reads it back).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Checkpoint, serde_json::Error> {
        serde_json::from_str(s)
    }

    fn message(seq: u64, head: &str) -> String {
        format!("{CHECKPOINT_DOMAIN}\n{seq}\n{head}")
    }
}
