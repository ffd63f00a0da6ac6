//! Bearer credentials: strict parsing, SHA-256 digests, constant-time checks, fingerprints and the
//! bind policy.
//!
//! Raw tokens are hashed as soon as they are parsed and only digests are kept or compared, so a
//! comparison leaks neither the token nor its length. Logs and errors carry a 6-hex fingerprint.
//! What callers may do with an identity (roles, scopes) is decided by the services, not here.

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::secret::Secret;

/// Longest `authorization` value we parse; real tokens are ~70 bytes.
pub const MAX_AUTHORIZATION_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `authorization: Bearer <token>`")]
    Missing,
    #[error("malformed authorization header: expected exactly `Bearer <token>`")]
    Malformed,
    #[error("invalid token")]
    Invalid,
    #[error(
        "refusing to serve plaintext on non-loopback address {0}: tokens, keys and prompts would cross the network in clear; serve TLS, bind to 127.0.0.1, or pass --insecure-plaintext to accept that"
    )]
    InsecureBind(SocketAddr),
}

/// SHA-256 of a token. Only digests are stored and compared.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

// === impl TokenDigest ===

impl TokenDigest {
    pub fn of(token: &str) -> TokenDigest {
        TokenDigest(Sha256::digest(token.as_bytes()).into())
    }

    /// Constant-time equality: the time taken does not depend on where the digests differ.
    pub fn ct_eq(&self, other: &TokenDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// First 6 hex digits of the digest: enough to tell tokens apart in logs, useless to an attacker.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.0[..3])
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<TokenDigest> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(TokenDigest(out))
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenDigest({})", self.fingerprint())
    }
}

/// Fingerprint of a raw token, for log lines.
pub fn fingerprint(token: &str) -> String {
    TokenDigest::of(token).fingerprint()
}

/// Parses an `authorization` header value strictly per RFC 6750 §2.1: exactly `Bearer`, one
/// space, then a token68 (`[A-Za-z0-9-._~+/]+=*`). Everything else is `Malformed`.
pub fn parse_bearer(value: &[u8]) -> Result<&str, AuthError> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(AuthError::Malformed);
    }
    let rest = value.strip_prefix(b"Bearer ").ok_or(AuthError::Malformed)?;
    let body_len = rest.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    if body_len == 0 {
        return Err(AuthError::Malformed);
    }
    let token68 = |b: &u8| b.is_ascii_alphanumeric() || b"-._~+/".contains(b);
    if !rest[..body_len].iter().all(token68) {
        return Err(AuthError::Malformed);
    }
    // All bytes are ASCII at this point, so this cannot fail; map rather than unwrap regardless.
    std::str::from_utf8(rest).map_err(|_| AuthError::Malformed)
}

/// Extracts and digests the bearer token of a request.
pub fn bearer_digest(md: &MetadataMap) -> Result<TokenDigest, AuthError> {
    let value = md.get("authorization").ok_or(AuthError::Missing)?;
    parse_bearer(value.as_bytes()).map(TokenDigest::of)
}

/// Finds `presented` among `known` in constant time per entry, visiting every entry so the time
/// does not reveal which (if any) matched.
pub fn find_digest<'a, T>(
    presented: &TokenDigest,
    known: impl IntoIterator<Item = (&'a TokenDigest, T)>,
) -> Option<T> {
    let mut found = None;
    for (digest, item) in known {
        if digest.ct_eq(presented) && found.is_none() {
            found = Some(item);
        }
    }
    found
}

/// The `authorization` header value for a client call.
pub fn bearer_header(token: &Secret) -> Result<MetadataValue<tonic::metadata::Ascii>, AuthError> {
    parse_bearer(format!("Bearer {}", token.expose()).as_bytes())?;
    format!("Bearer {}", token.expose())
        .parse()
        .map_err(|_| AuthError::Malformed)
}

/// Bind policy: a daemon serving `plaintext` may listen only on loopback, where sniffing already
/// takes root. Anywhere else bearer tokens, keys and prompts would cross the network in clear, so
/// it is refused unless the operator said `--insecure-plaintext` (`insecure_ok`), and then warned
/// about loudly. Returns whether the listener is exposed in clear (the warning was logged).
pub fn check_bind(addr: SocketAddr, plaintext: bool, insecure_ok: bool) -> Result<bool, AuthError> {
    if addr.ip().is_loopback() || !plaintext {
        return Ok(false);
    }
    if !insecure_ok {
        return Err(AuthError::InsecureBind(addr));
    }
    tracing::warn!(
        listen = %addr,
        "--insecure-plaintext: serving WITHOUT TLS on a non-loopback address; bearer tokens, keys and prompts cross the network in clear"
    );
    Ok(true)
}

#[cfg(test)]
mod tests;
