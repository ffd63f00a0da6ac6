//! Who may make a call, for every door of the queen (gRPC and HTTP): the token, then the caller's
//! rate-limit budget, or for a bad token the penalty box, with coalesced refusal audits.
//!
//! Both doors call `admit_call` with the request's headers and peer address, so they share one
//! token book, one set of roles, one penalty box and one audit trail. It knows no transport: the
//! headers are the `authorization` values as a `MetadataMap`, the auth module's currency.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use skep_audit::Fields;
use skep_common::ratelimit::{Coalescer, RateLimits, Summary};
use tonic::metadata::MetadataMap;
use tracing::{debug, warn};

use crate::Error;
use crate::audit::{AuditHandle, events};
use crate::auth::{Authenticator, Identity, Role};
use crate::model::unix_ms;

/// Refusals of one source, coalesced into one audit entry per interval.
pub type Refusals = Coalescer<Option<IpAddr>>;

/// Authenticates one call. The credential is checked first, so a valid one is never refused by
/// a penalty that bad ones earned (from the same address, say: a NAT, or a pool on this host);
/// only a failed authentication meets the penalty box.
pub fn admit_call(
    authenticator: &Authenticator,
    limits: &RateLimits,
    refusals: &Refusals,
    audit: &AuditHandle,
    headers: &MetadataMap,
    peer: Option<IpAddr>,
) -> Result<Identity, Error> {
    // Two `authorization` headers are ambiguous (which one is the caller?): refuse them rather
    // than let the first win.
    let checked = if headers.get_all("authorization").iter().nth(1).is_some() {
        Err(skep_common::auth::AuthError::Malformed)
    } else {
        authenticator.check(headers, unix_ms())
    };
    let identity = match checked {
        Ok(id) => id,
        Err(e) => return Err(refuse(limits, refusals, audit, headers, peer, e)),
    };
    limits.check_identity(&identity.fingerprint).map_err(|r| {
        warn!(caller = %identity.fingerprint, "rate limit exceeded");
        audit.record(
            events::RATELIMIT_EXCEEDED,
            &identity.fingerprint,
            Fields::new(),
        );
        Error::RateLimited { retry_after: r.0 }
    })?;
    Ok(identity)
}

/// The identity, if its role is one of `roles`. Admin may do everything.
pub fn require_any(id: &Identity, roles: &[Role]) -> Result<(), Error> {
    if id.role == Role::Admin || roles.contains(&id.role) {
        Ok(())
    } else {
        Err(Error::PermissionDenied(
            roles.first().map_or("admin", |r| r.as_str()),
        ))
    }
}

/// A failed authentication: counted against its source and its token's fingerprint, audited
/// (coalesced per source), and answered as unauthenticated, or rate-limited with a retry hint
/// once an offender is over the bad-token budget.
fn refuse(
    limits: &RateLimits,
    refusals: &Refusals,
    audit: &AuditHandle,
    headers: &MetadataMap,
    peer: Option<IpAddr>,
    e: skep_common::auth::AuthError,
) -> Error {
    debug!(error = %e, "rejected call");
    // The presented token's fingerprint when there is a well-formed one.
    let presented = skep_common::auth::bearer_digest(headers)
        .ok()
        .map(|d| d.fingerprint());
    let penalty = limits.record_auth_failure(peer, presented.as_deref());
    let actor = presented.as_deref().unwrap_or("anonymous");
    let reason = e.to_string();
    if refusals.note(peer, Instant::now(), actor, &reason) {
        let mut fields = Fields::new().reason(&reason).num("count", 1);
        if let Some(ip) = peer {
            fields = fields.str("peer", &ip.to_string());
        }
        audit.record(events::AUTH_FAILURE, actor, fields);
    }
    match penalty {
        Ok(()) => e.into(),
        Err(p) => {
            if p.fresh {
                warn!(peer = ?peer, caller = %actor, "too many bad tokens; throttling them");
            }
            Error::RateLimited {
                retry_after: p.retry_after,
            }
        }
    }
}

/// Writes the summaries of coalesced refusals as their windows close.
pub async fn report_refusals(refusals: Arc<Refusals>, audit: AuditHandle) {
    let mut tick = tokio::time::interval(refusals.interval().min(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for s in refusals.due(Instant::now()) {
            record_summary(&audit, s);
        }
    }
}

/// One audit entry for `count` refusals of one source over one interval.
pub fn record_summary(audit: &AuditHandle, s: Summary<Option<IpAddr>>) {
    let mut fields = Fields::new()
        .reason(&format!("repeated: {}", s.reason))
        .num("count", s.count)
        .num(
            "window_ms",
            u64::try_from(s.over.as_millis()).unwrap_or(u64::MAX),
        );
    if let Some(Some(ip)) = s.source {
        fields = fields.str("peer", &ip.to_string());
    }
    audit.record(events::AUTH_FAILURE, &s.actor, fields);
}
