//! Who may call the queen: the token book (digests, roles, expiry, revocation) and the
//! authenticator the gRPC interceptor uses.
//!
//! The book publishes an immutable snapshot through a `watch` channel, so the interceptor reads
//! the current tokens without locks or awaits, and a revocation takes effect on the next call.
//! Only digests are held; a raw token exists only in the response that creates it.

use std::sync::Arc;

use skep_common::auth::{self, AuthError, TokenDigest};
use tokio::sync::watch;
use tonic::metadata::MetadataMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything, including nodes and tokens.
    Admin,
    /// Submit and follow jobs.
    Submit,
    /// Enroll one node, once.
    Enroll,
    /// An enrolled pool manager: register and heartbeat as its own node.
    Node,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submit => "submit",
            Role::Enroll => "enroll",
            Role::Node => "node",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "submit" => Some(Role::Submit),
            "enroll" => Some(Role::Enroll),
            "node" => Some(Role::Node),
            _ => None,
        }
    }
}

/// A token as the queen knows it: never the token itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEntry {
    pub digest: TokenDigest,
    pub role: Role,
    pub label: String,
    pub created_unix_ms: u64,
    /// 0 = never expires.
    pub expires_unix_ms: u64,
    pub revoked: bool,
    /// For `Node` tokens: the node they belong to; empty otherwise.
    pub node_id: String,
    /// Jobs the holder may have queued or running at once; 0 = the queen's default share.
    pub max_jobs: u32,
}

impl TokenEntry {
    pub fn fingerprint(&self) -> String {
        self.digest.fingerprint()
    }

    fn usable(&self, now_unix_ms: u64) -> bool {
        !self.revoked && (self.expires_unix_ms == 0 || now_unix_ms < self.expires_unix_ms)
    }
}

/// An authenticated caller. Only the fingerprint of its token is kept.
#[derive(Debug, Clone)]
pub struct Identity {
    pub fingerprint: String,
    pub role: Role,
    /// The token's digest, so a single-use token can be consumed by the handler.
    pub digest: TokenDigest,
    /// For node tokens, the node they speak for.
    pub node_id: String,
    /// The token's own share of live jobs, when it sets one.
    pub max_jobs: Option<u32>,
}

type Snapshot = Arc<Vec<TokenEntry>>;

/// The set of known tokens. Cheap to clone; all clones share one book.
#[derive(Clone)]
pub struct TokenBook {
    tx: Arc<watch::Sender<Snapshot>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BookError {
    #[error("no token with fingerprint {0}")]
    NotFound(String),
    #[error("fingerprint {0} matches several tokens; revoke is refused")]
    Ambiguous(String),
    #[error("refusing to revoke the last admin token: you would lock yourself out")]
    LastAdmin,
}

// === impl TokenBook ===

impl TokenBook {
    pub fn new(entries: Vec<TokenEntry>) -> TokenBook {
        TokenBook {
            tx: Arc::new(watch::Sender::new(Arc::new(entries))),
        }
    }

    pub fn authenticator(&self) -> Authenticator {
        Authenticator {
            rx: self.tx.subscribe(),
        }
    }

    pub fn list(&self) -> Vec<TokenEntry> {
        self.tx.borrow().as_ref().clone()
    }

    pub fn add(&self, entry: TokenEntry) {
        self.tx.send_modify(|s| {
            let mut v = s.as_ref().clone();
            v.retain(|e| e.digest != entry.digest);
            v.push(entry);
            *s = Arc::new(v);
        });
    }

    /// The live token a fingerprint names, if exactly one does.
    pub fn find(&self, fingerprint: &str) -> Result<TokenEntry, BookError> {
        let snap = self.tx.borrow().clone();
        let mut hits = snap
            .iter()
            .filter(|e| !e.revoked && e.fingerprint() == fingerprint);
        match (hits.next(), hits.next()) {
            (Some(e), None) => Ok(e.clone()),
            (Some(_), Some(_)) => Err(BookError::Ambiguous(fingerprint.to_owned())),
            (None, _) => Err(BookError::NotFound(fingerprint.to_owned())),
        }
    }

    /// Checks that revoking `entry` leaves at least one usable admin token.
    pub fn check_revocable(&self, entry: &TokenEntry, now_unix_ms: u64) -> Result<(), BookError> {
        let snap = self.tx.borrow().clone();
        let admins_left = snap
            .iter()
            .filter(|e| e.role == Role::Admin && e.usable(now_unix_ms) && e.digest != entry.digest)
            .count();
        if entry.role == Role::Admin && admins_left == 0 {
            return Err(BookError::LastAdmin);
        }
        Ok(())
    }

    /// Revokes a live token and says whether this call did it: the atomic check-and-set that
    /// makes an enrollment token single-use even under concurrent calls.
    pub fn consume(&self, digest: &TokenDigest) -> bool {
        self.tx.send_if_modified(|s| {
            let live = s.iter().any(|e| e.digest == *digest && !e.revoked);
            if live {
                *s = revoked_where(s, |e| e.digest == *digest);
            }
            live
        })
    }

    /// Revokes every token of `node_id`; returns their digests.
    pub fn revoke_node(&self, node_id: &str) -> Vec<TokenDigest> {
        let mine = |e: &TokenEntry| !node_id.is_empty() && e.node_id == node_id;
        let mut hit = Vec::new();
        self.tx.send_modify(|s| {
            hit = s
                .iter()
                .filter(|e| mine(e) && !e.revoked)
                .map(|e| e.digest)
                .collect();
            *s = revoked_where(s, mine);
        });
        hit
    }

    pub fn revoke(&self, digest: &TokenDigest) {
        self.tx
            .send_modify(|s| *s = revoked_where(s, |e| e.digest == *digest));
    }
}

/// Checks bearer tokens against the current snapshot of the book.
#[derive(Clone)]
pub struct Authenticator {
    rx: watch::Receiver<Snapshot>,
}

// === impl Authenticator ===

impl Authenticator {
    /// The identity behind the request's bearer token. Unknown, revoked and expired tokens all
    /// get the same answer, so a caller cannot probe which tokens exist.
    pub fn check(&self, md: &MetadataMap, now_unix_ms: u64) -> Result<Identity, AuthError> {
        let presented = auth::bearer_digest(md)?;
        let snap = self.rx.borrow().clone();
        let entry = auth::find_digest(&presented, snap.iter().map(|e| (&e.digest, e)))
            .filter(|e| e.usable(now_unix_ms))
            .ok_or(AuthError::Invalid)?;
        Ok(Identity {
            fingerprint: presented.fingerprint(),
            role: entry.role,
            digest: presented,
            node_id: entry.node_id.clone(),
            max_jobs: (entry.max_jobs > 0).then_some(entry.max_jobs),
        })
    }
}

/// A copy of the book with every entry matching `pred` revoked (the book is shared immutably, so
/// changes are whole new snapshots).
fn revoked_where(book: &[TokenEntry], pred: impl Fn(&TokenEntry) -> bool) -> Arc<Vec<TokenEntry>> {
    Arc::new(
        book.iter()
            .map(|e| TokenEntry {
                revoked: e.revoked || pred(e),
                ..e.clone()
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(token: &str, role: Role, expires: u64) -> TokenEntry {
        TokenEntry {
            digest: TokenDigest::of(token),
            role,
            label: "t".into(),
            created_unix_ms: 1,
            expires_unix_ms: expires,
            revoked: false,
            node_id: String::new(),
            max_jobs: 0,
        }
    }

    #[test]
    fn enrollment_tokens_are_consumed_once() {
        let book = TokenBook::new(vec![
            entry("adm", Role::Admin, 0),
            entry("enr", Role::Enroll, 0),
        ]);
        let d = TokenDigest::of("enr");
        assert!(book.consume(&d));
        assert!(!book.consume(&d), "second use must fail");
        assert_eq!(
            book.authenticator().check(&md("enr"), 1).unwrap_err(),
            AuthError::Invalid
        );
    }

    #[test]
    fn revoking_a_node_revokes_its_keys_only() {
        let mut k = entry("key-a", Role::Node, 0);
        k.node_id = "node-a".into();
        let book = TokenBook::new(vec![entry("adm", Role::Admin, 0), k]);
        assert_eq!(book.revoke_node("node-a"), vec![TokenDigest::of("key-a")]);
        let a = book.authenticator();
        assert!(a.check(&md("key-a"), 1).is_err());
        assert!(a.check(&md("adm"), 1).is_ok());
        assert!(book.revoke_node("").is_empty());
    }

    fn md(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[test]
    fn known_tokens_authenticate_with_their_role() {
        let book = TokenBook::new(vec![
            entry("adm", Role::Admin, 0),
            entry("sub", Role::Submit, 0),
        ]);
        let a = book.authenticator();
        assert_eq!(a.check(&md("adm"), 10).unwrap().role, Role::Admin);
        let id = a.check(&md("sub"), 10).unwrap();
        assert_eq!(id.role, Role::Submit);
        assert_eq!(id.fingerprint, TokenDigest::of("sub").fingerprint());
        assert_eq!(a.check(&md("nope"), 10).unwrap_err(), AuthError::Invalid);
    }

    #[test]
    fn expired_and_revoked_tokens_are_invalid() {
        let book = TokenBook::new(vec![
            entry("adm", Role::Admin, 0),
            entry("tmp", Role::Submit, 100),
        ]);
        let a = book.authenticator();
        assert!(a.check(&md("tmp"), 99).is_ok());
        assert_eq!(a.check(&md("tmp"), 100).unwrap_err(), AuthError::Invalid);
        let e = book.find(&TokenDigest::of("adm").fingerprint()).unwrap();
        assert_eq!(book.check_revocable(&e, 10), Err(BookError::LastAdmin));
        book.add(entry("adm2", Role::Admin, 0));
        book.check_revocable(&e, 10).unwrap();
        book.revoke(&e.digest);
        assert_eq!(a.check(&md("adm"), 10).unwrap_err(), AuthError::Invalid);
        assert!(a.check(&md("adm2"), 10).is_ok());
    }
}
