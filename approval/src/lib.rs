//! Approval credentials for skep's governed actions: the signed, single-use permission an approver
//! gives for one action on one exact thing (spec hash) in one cluster, until an expiry.
//!
//! An approval is not an API credential: it authenticates no call, and the queen still asks for
//! the caller's bearer token with the right role. It only says "this approver allows this action
//! on this spec". This crate holds the format, signing and the stateless checks; single use (the
//! nonce) is the verifier's store's business, because it needs durable state.
//!
//! Signatures are Ed25519 (`ring`). What is signed is a versioned, domain-separated encoding
//! (`SIGNING_DOMAIN`, then each field length-prefixed), so an approval's signature can never be
//! taken for any other signed thing, and no two different claims encode to the same bytes.
//!
//! Files (all text, one line each field, see `docs/APPROVALS.md`):
//! - private key: `skep-approver-secret-v1 <64 hex: the Ed25519 seed>` (mode 0600; the caller
//!   writes it, this crate only formats it in zeroizing memory)
//! - public key: `skep-approver-public-v1 <64 hex>`
//! - approval: `skep-approval-v1` and then `action`, `spec-hash`, `env`, `expires-unix-ms`,
//!   `nonce`, `key`, `signature` lines, in that order.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Prefix of every signed message: names the format and its version. A future format changes
/// the version, so a v1 signature can never verify as anything else.
pub const SIGNING_DOMAIN: &[u8] = b"skep approval credential v1\0";
/// First line of an approval file.
pub const APPROVAL_HEADER: &str = "skep-approval-v1";
/// Tag of a public key file.
pub const PUBLIC_TAG: &str = "skep-approver-public-v1";
/// Tag of a private key file.
pub const SECRET_TAG: &str = "skep-approver-secret-v1";
/// Longest approval text accepted: a real one is about 450 bytes.
pub const MAX_APPROVAL_LEN: usize = 2048;
/// Longest time an approval may be valid for. The verifier keeps each used nonce at least this
/// long, so a bound keeps that table small.
pub const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// Longest environment (cluster id).
const MAX_ENV_LEN: usize = 64;

/// A governed action: one that needs an approval where the queen is told so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Adding or replacing a model in the catalogue. Spec hash: SHA-256 of the file.
    ModelAdd,
    /// Enrolling a node. Spec hash: SHA-256 of the node's name (its UTF-8 bytes).
    NodeEnroll,
    /// Revoking the last usable admin token. Spec hash: SHA-256 of its 6-hex fingerprint
    /// (lower case, as `skep token list` shows it).
    TokenRevokeLastAdmin,
}

pub const ACTIONS: [Action; 3] = [
    Action::ModelAdd,
    Action::NodeEnroll,
    Action::TokenRevokeLastAdmin,
];

/// A SHA-256 digest naming exactly what an approval is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecHash(pub [u8; 32]);

/// An approver's Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

/// An approver's private key. Neither `Debug` nor `Display` shows the key; the seed is zeroized
/// on drop (ring's own key pair holds a copy it does not zeroize: see `docs/APPROVALS.md`).
pub struct SigningKey {
    seed: Zeroizing<[u8; 32]>,
    pair: Ed25519KeyPair,
}

/// What an approval allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub action: Action,
    pub spec_hash: SpecHash,
    /// The environment: the queen's cluster id.
    pub env: String,
    pub expires_unix_ms: u64,
    /// Random, so two approvals for the same thing differ and each can be used once.
    pub nonce: [u8; 16],
}

/// A signed approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub claims: Claims,
    /// The key that signed it (checked against the trusted keys, never trusted by itself).
    pub key: PublicKey,
    signature: [u8; 64],
}

/// What the verifier expects an approval to say.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub action: Action,
    pub spec_hash: &'a SpecHash,
    pub env: &'a str,
    pub now_unix_ms: u64,
}

/// Why an approval does not hold. For the audit log only: callers are told none of this (it
/// would say which other parts matched).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("signature does not verify")]
    BadSignature,
    #[error("signed by a key that is not trusted")]
    UntrustedKey,
    #[error("approval is for another action")]
    WrongAction,
    #[error("approval is for another spec hash")]
    WrongSpecHash,
    #[error("approval is for another environment")]
    WrongEnvironment,
    #[error("approval has expired")]
    Expired,
    #[error("approval is valid for longer than the 30-day limit")]
    TooLong,
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a skep approval credential")]
    NotAnApproval,
    #[error("approval credential is malformed: {0}")]
    Malformed(&'static str),
    #[error("unknown action {0:?} (known: model.add, node.enroll, token.revoke_last_admin)")]
    UnknownAction(String),
    #[error("spec hash must be sha256: followed by 64 lower-case hex digits")]
    SpecHash,
    #[error("environment must be 1-64 characters of A-Z a-z 0-9 . _ -")]
    Env,
    #[error("not a skep approver {0} key")]
    Key(&'static str),
    #[error("cannot make a key: {0}")]
    Crypto(&'static str),
}

// === impl Action ===

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::ModelAdd => "model.add",
            Action::NodeEnroll => "node.enroll",
            Action::TokenRevokeLastAdmin => "token.revoke_last_admin",
        }
    }
}

impl FromStr for Action {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Action, FormatError> {
        ACTIONS
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| FormatError::UnknownAction(s.chars().take(40).collect()))
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl SpecHash ===

impl SpecHash {
    /// SHA-256 of `bytes`: a model file, a node's name, a token fingerprint.
    pub fn of(bytes: &[u8]) -> SpecHash {
        SpecHash(Sha256::digest(bytes).into())
    }

    /// From 64 lower-case hex digits (a digest the queen computed).
    pub fn from_hex(s: &str) -> Result<SpecHash, FormatError> {
        if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(FormatError::SpecHash);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| FormatError::SpecHash)?;
        Ok(SpecHash(out))
    }
}

impl FromStr for SpecHash {
    type Err = FormatError;
    /// `sha256:<64 lower-case hex>`.
    fn from_str(s: &str) -> Result<SpecHash, FormatError> {
        SpecHash::from_hex(s.strip_prefix("sha256:").ok_or(FormatError::SpecHash)?)
    }
}

impl fmt::Display for SpecHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

// === impl PublicKey ===

impl PublicKey {
    /// Reads a public key file's text: `skep-approver-public-v1 <64 hex>`.
    pub fn from_text(text: &str) -> Result<PublicKey, FormatError> {
        let hex_part = text
            .trim()
            .strip_prefix(PUBLIC_TAG)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(FormatError::Key("public"))?;
        Ok(PublicKey(
            decode_32(hex_part).ok_or(FormatError::Key("public"))?,
        ))
    }

    /// The public key file's text (with a trailing newline).
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_TAG} {}\n", hex::encode(self.0))
    }

    /// A short name for logs and the audit: the first 12 hex digits of the key's SHA-256.
    pub fn fingerprint(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..6])
    }

    /// Constant-time equality (key lookups must not say how much of a key matched).
    fn ct_eq(&self, other: &PublicKey) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

// === impl SigningKey ===

impl SigningKey {
    /// A fresh key from the system's random source.
    pub fn generate() -> Result<SigningKey, FormatError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(seed.as_mut())
            .map_err(|_| FormatError::Crypto("no system randomness"))?;
        SigningKey::from_seed(seed)
    }

    /// Reads a private key file's text: `skep-approver-secret-v1 <64 hex>`.
    pub fn from_text(text: &str) -> Result<SigningKey, FormatError> {
        let hex_part = text
            .trim()
            .strip_prefix(SECRET_TAG)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(FormatError::Key("private"))?;
        // Decoded straight into zeroizing memory: no stray copy of the seed.
        let mut seed = Zeroizing::new([0u8; 32]);
        decode_lower(hex_part, seed.as_mut()).ok_or(FormatError::Key("private"))?;
        SigningKey::from_seed(seed)
    }

    fn from_seed(seed: Zeroizing<[u8; 32]>) -> Result<SigningKey, FormatError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
            .map_err(|_| FormatError::Key("private"))?;
        Ok(SigningKey { seed, pair })
    }

    /// The private key file's text, in memory that is zeroized when dropped.
    pub fn to_text(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(SECRET_TAG.len() + 66));
        s.push_str(SECRET_TAG);
        s.push(' ');
        let hex = Zeroizing::new(hex::encode(self.seed.as_ref()));
        s.push_str(&hex);
        s.push('\n');
        s
    }

    pub fn public(&self) -> PublicKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(out)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public {})", self.public().fingerprint())
    }
}

// === impl Claims ===

impl Claims {
    /// Claims with a fresh random nonce.
    pub fn new(
        action: Action,
        spec_hash: SpecHash,
        env: &str,
        expires_unix_ms: u64,
    ) -> Result<Claims, FormatError> {
        check_env(env)?;
        let mut nonce = [0u8; 16];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| FormatError::Crypto("no system randomness"))?;
        Ok(Claims {
            action,
            spec_hash,
            env: env.to_owned(),
            expires_unix_ms,
            nonce,
        })
    }

    /// The bytes that are signed: the domain, then every field as a 4-byte big-endian length
    /// and its bytes, in a fixed order. Length prefixes make the encoding unambiguous.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNING_DOMAIN.len() + 160);
        out.extend_from_slice(SIGNING_DOMAIN);
        for field in [
            self.action.as_str().as_bytes(),
            &self.spec_hash.0[..],
            self.env.as_bytes(),
            &self.expires_unix_ms.to_be_bytes()[..],
            &self.nonce[..],
        ] {
            // Every field is bounded (env ≤ 64 bytes), so the length fits.
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field);
        }
        out
    }

    /// The nonce in hex: the key the verifier records it under.
    pub fn nonce_hex(&self) -> String {
        hex::encode(self.nonce)
    }
}

// === impl Approval ===

impl Approval {
    pub fn sign(claims: Claims, key: &SigningKey) -> Approval {
        let sig = key.pair.sign(&claims.signing_bytes());
        let mut signature = [0u8; 64];
        signature.copy_from_slice(sig.as_ref());
        Approval {
            claims,
            key: key.public(),
            signature,
        }
    }

    /// The approval file's text.
    pub fn to_text(&self) -> String {
        let c = &self.claims;
        format!(
            "{APPROVAL_HEADER}\naction {}\nspec-hash {}\nenv {}\nexpires-unix-ms {}\nnonce {}\nkey {}\nsignature {}\n",
            c.action,
            c.spec_hash,
            c.env,
            c.expires_unix_ms,
            c.nonce_hex(),
            hex::encode(self.key.0),
            hex::encode(self.signature),
        )
    }

    /// Parses an approval file's text strictly: exactly the lines `to_text` writes, in order.
    pub fn parse(text: &str) -> Result<Approval, FormatError> {
        if text.len() > MAX_APPROVAL_LEN {
            return Err(FormatError::Malformed("too long"));
        }
        let mut lines = text.trim_end_matches('\n').split('\n');
        if lines.next() != Some(APPROVAL_HEADER) {
            return Err(FormatError::NotAnApproval);
        }
        let mut field = |name: &'static str| -> Result<&str, FormatError> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .ok_or(FormatError::Malformed(name))
        };
        let action = field("action")?.parse()?;
        let spec_hash = field("spec-hash")?.parse()?;
        let env = field("env")?.to_owned();
        check_env(&env)?;
        let expires = field("expires-unix-ms")?;
        if expires.is_empty() || !expires.bytes().all(|b| b.is_ascii_digit()) {
            return Err(FormatError::Malformed("expires-unix-ms"));
        }
        let expires_unix_ms = expires
            .parse()
            .map_err(|_| FormatError::Malformed("expires-unix-ms"))?;
        let mut nonce = [0u8; 16];
        decode_lower(field("nonce")?, &mut nonce).ok_or(FormatError::Malformed("nonce"))?;
        let key = PublicKey(decode_32(field("key")?).ok_or(FormatError::Malformed("key"))?);
        let mut signature = [0u8; 64];
        decode_lower(field("signature")?, &mut signature)
            .ok_or(FormatError::Malformed("signature"))?;
        if lines.next().is_some() {
            return Err(FormatError::Malformed("text after the signature"));
        }
        Ok(Approval {
            claims: Claims {
                action,
                spec_hash,
                env,
                expires_unix_ms,
                nonce,
            },
            key,
            signature,
        })
    }

    /// Checks everything but single use: signature, trusted key, action, spec hash, environment,
    /// expiry. Every check runs whatever the others found (and the comparisons are constant
    /// time), so neither the answer nor its timing says which parts matched; the first failure
    /// in that order is returned for the audit.
    pub fn verify(&self, trusted: &[PublicKey], expected: Expected<'_>) -> Result<(), Refusal> {
        let c = &self.claims;
        let signature_ok = UnparsedPublicKey::new(&ED25519, self.key.0)
            .verify(&c.signing_bytes(), &self.signature)
            .is_ok();
        let trusted_ok = trusted
            .iter()
            .fold(false, |found, k| found | k.ct_eq(&self.key));
        let action_ok: bool = (c.action as u8).ct_eq(&(expected.action as u8)).into();
        let spec_ok: bool = c.spec_hash.0.ct_eq(&expected.spec_hash.0).into();
        // Hashed first so the comparison takes the same time whatever the lengths.
        let env_ok: bool = Sha256::digest(c.env.as_bytes())
            .ct_eq(&Sha256::digest(expected.env.as_bytes()))
            .into();
        let live = expected.now_unix_ms < c.expires_unix_ms;
        let bounded = c.expires_unix_ms <= expected.now_unix_ms.saturating_add(MAX_TTL_MS);
        [
            (signature_ok, Refusal::BadSignature),
            (trusted_ok, Refusal::UntrustedKey),
            (action_ok, Refusal::WrongAction),
            (spec_ok, Refusal::WrongSpecHash),
            (env_ok, Refusal::WrongEnvironment),
            (live, Refusal::Expired),
            (bounded, Refusal::TooLong),
        ]
        .into_iter()
        .find(|(ok, _)| !ok)
        .map_or(Ok(()), |(_, why)| Err(why))
    }
}

/// An environment (cluster id) as an approval may name it.
pub fn check_env(env: &str) -> Result<(), FormatError> {
    let ok = !env.is_empty()
        && env.len() <= MAX_ENV_LEN
        && env
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(FormatError::Env) }
}

fn decode_32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    decode_lower(s, &mut out)?;
    Some(out)
}

/// Lower-case hex only, of exactly the buffer's length: one spelling per value.
fn decode_lower(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    hex::decode_to_slice(s, out).ok()
}

#[cfg(test)]
mod tests;
