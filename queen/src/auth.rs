//! Who may call the queen: the known token digests and the role each grants.
//!
//! The interceptor in `grpc` authenticates every call through `Authenticator::check` and leaves
//! the resulting `Identity` in the request's extensions for handlers to authorize against.

use std::sync::Arc;

use skep_common::auth::{self, AuthError, TokenDigest};
use tonic::metadata::MetadataMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, including node and token management.
    Admin,
    /// Submit and follow jobs.
    Submit,
}

/// An authenticated caller. Only the fingerprint of its token is kept.
#[derive(Debug, Clone)]
pub struct Identity {
    pub fingerprint: String,
    pub role: Role,
}

#[derive(Clone)]
pub struct Authenticator {
    tokens: Arc<Vec<(TokenDigest, Role)>>,
}

// === impl Authenticator ===

impl Authenticator {
    pub fn new(tokens: Vec<(TokenDigest, Role)>) -> Self {
        Authenticator {
            tokens: Arc::new(tokens),
        }
    }

    pub fn check(&self, md: &MetadataMap) -> Result<Identity, AuthError> {
        let presented = auth::bearer_digest(md)?;
        let role = auth::find_digest(&presented, self.tokens.iter().map(|(d, r)| (d, *r)))
            .ok_or(AuthError::Invalid)?;
        Ok(Identity {
            fingerprint: presented.fingerprint(),
            role,
        })
    }
}
