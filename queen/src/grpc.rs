//! The queen's gRPC surface: `Jobs` for clients and `Nodes` for pool managers.
//!
//! This module and its children are the only places that name tonic types. Every service sits
//! behind the same authenticating interceptor, so no RPC is reachable without a valid token.

mod convert;
mod decode;
mod jobs;
mod models;
mod nodes;
pub mod session;
mod status;
mod tokens;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use skep_common::daemon::ConnLimits;
use skep_common::ratelimit::{Coalescer, DEFAULT_REFUSAL_INTERVAL, RateLimits, Summary};
use skep_common::validate;
use skep_proto::v1::jobs_server::JobsServer;
use skep_proto::v1::models_server::ModelsServer;
use skep_proto::v1::nodes_server::NodesServer;
use skep_proto::v1::tokens_server::TokensServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};
use tracing::{debug, warn};

use crate::Error;
use crate::audit::{AuditHandle, events};
use crate::auth::{Authenticator, Identity, Role};
use crate::job::Services;
use crate::model::unix_ms;
use skep_audit::Fields;

/// Largest request accepted: a maximal prompt plus room for the other fields.
const MAX_MESSAGE: usize = validate::MAX_PROMPT_BYTES + 4096;

/// Serves the queen on `listener`, admitting connections under `conns`, until `shutdown`
/// resolves.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    limits: Arc<RateLimits>,
    conns: ConnLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let tls = services.tls.as_ref().map(|t| t.server_config());
    let authenticator = services.tokens.authenticator();
    let audit = services.audit.clone();
    let refusals = Arc::new(Coalescer::new(DEFAULT_REFUSAL_INTERVAL));
    let reporter = tokio::spawn(report_refusals(Arc::clone(&refusals), audit.clone()));
    // Every call, before any handler: token, then the identity's budget (or, for a bad token,
    // the penalty box).
    let door = Arc::clone(&refusals);
    let auth = move |mut req: Request<()>| {
        let identity =
            admit_call(&authenticator, &limits, &door, &audit, &req).map_err(Status::from)?;
        req.extensions_mut().insert(identity);
        Ok(req)
    };
    let jobs = JobsServer::new(jobs::JobsService::new(services.clone()))
        .max_decoding_message_size(MAX_MESSAGE);
    let nodes = NodesServer::new(nodes::NodesService::new(services.clone()))
        .max_decoding_message_size(MAX_MESSAGE);
    // Model uploads come in chunks of at most `CHUNK` bytes.
    let models = ModelsServer::new(models::ModelsService::new(services.clone()))
        .max_decoding_message_size(models::CHUNK + 4096);
    let decode = decode::DecodeErrorLayer::new(services.audit.clone());
    let audit = services.audit.clone();
    let tokens = TokensServer::new(tokens::TokensService::new(services))
        .max_decoding_message_size(MAX_MESSAGE);
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let served = server
        // Tokens stream for as long as a job runs; keepalives find dead clients (and give every
        // live connection traffic, so the connection idle timeout only closes dead ones).
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // A request that does not decode is the caller's fault: INVALID_ARGUMENT, audited.
        .layer(decode)
        .add_service(InterceptedService::new(jobs, auth.clone()))
        .add_service(InterceptedService::new(nodes, auth.clone()))
        .add_service(InterceptedService::new(models, auth.clone()))
        .add_service(InterceptedService::new(tokens, auth))
        .serve_with_incoming_shutdown(
            skep_common::daemon::incoming_with(listener, conns),
            shutdown,
        )
        .await;
    reporter.abort();
    for s in refusals.drain() {
        record_summary(&audit, s);
    }
    served
}

/// HTTP/2 pings to every client; a client that does not answer within the timeout is gone.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Authenticates one call. The credential is checked first, so a valid one is never refused by
/// a penalty that bad ones earned (from the same address, say: a NAT, or a pool on this host);
/// only a failed authentication meets the penalty box.
fn admit_call(
    authenticator: &Authenticator,
    limits: &RateLimits,
    refusals: &Coalescer<Option<IpAddr>>,
    audit: &AuditHandle,
    req: &Request<()>,
) -> Result<Identity, Error> {
    // Two `authorization` headers are ambiguous (which one is the caller?): refuse them rather
    // than let the first win.
    let checked = if req
        .metadata()
        .get_all("authorization")
        .iter()
        .nth(1)
        .is_some()
    {
        Err(skep_common::auth::AuthError::Malformed)
    } else {
        authenticator.check(req.metadata(), unix_ms())
    };
    let identity = match checked {
        Ok(id) => id,
        Err(e) => return Err(refuse(limits, refusals, audit, req, e)),
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

/// A failed authentication: counted against its source and its token's fingerprint, audited
/// (coalesced per source), and answered UNAUTHENTICATED, or RESOURCE_EXHAUSTED with a retry hint
/// once an offender is over the bad-token budget.
fn refuse(
    limits: &RateLimits,
    refusals: &Coalescer<Option<IpAddr>>,
    audit: &AuditHandle,
    req: &Request<()>,
    e: skep_common::auth::AuthError,
) -> Error {
    debug!(error = %e, "rejected call");
    let peer = req.remote_addr().map(|a| a.ip());
    // The presented token's fingerprint when there is a well-formed one.
    let presented = skep_common::auth::bearer_digest(req.metadata())
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
async fn report_refusals(refusals: Arc<Coalescer<Option<IpAddr>>>, audit: AuditHandle) {
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
fn record_summary(audit: &AuditHandle, s: Summary<Option<IpAddr>>) {
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

/// The caller's identity, if its role is `role`. Admin may do everything.
fn require<T>(req: &Request<T>, role: Role) -> Result<Identity, crate::Error> {
    require_any(req, &[role])
}

/// The caller's identity, if its role is one of `roles`. Admin may do everything.
fn require_any<T>(req: &Request<T>, roles: &[Role]) -> Result<Identity, crate::Error> {
    let id = req
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or(crate::Error::Auth(skep_common::auth::AuthError::Missing))?;
    if id.role == Role::Admin || roles.contains(&id.role) {
        Ok(id)
    } else {
        Err(crate::Error::PermissionDenied(
            roles.first().map_or("admin", |r| r.as_str()),
        ))
    }
}
