//! The queen's gRPC surface: `Jobs` for clients and `Nodes` for pool managers.
//!
//! This module and its children are the only places that name tonic types. Every service sits
//! behind the same authenticating interceptor, so no RPC is reachable without a valid token.

mod convert;
mod jobs;
mod models;
mod nodes;
pub mod session;
mod status;
mod tokens;

use std::future::Future;

use std::sync::Arc;

use skep_common::ratelimit::RateLimits;
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

/// Serves the queen on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    limits: Arc<RateLimits>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let tls = services.tls.as_ref().map(|t| t.server_config());
    let authenticator = services.tokens.authenticator();
    let audit = services.audit.clone();
    // Every call, before any handler: peer throttle, token, identity budget.
    let auth = move |mut req: Request<()>| {
        let identity = admit_call(&authenticator, &limits, &audit, &req).map_err(Status::from)?;
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
    let tokens = TokensServer::new(tokens::TokensService::new(services))
        .max_decoding_message_size(MAX_MESSAGE);
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        // Tokens stream for as long as a job runs; keepalives find dead clients.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(InterceptedService::new(jobs, auth.clone()))
        .add_service(InterceptedService::new(nodes, auth.clone()))
        .add_service(InterceptedService::new(models, auth.clone()))
        .add_service(InterceptedService::new(tokens, auth))
        .serve_with_incoming_shutdown(skep_common::daemon::incoming(listener), shutdown)
        .await
}

fn admit_call(
    authenticator: &Authenticator,
    limits: &RateLimits,
    audit: &AuditHandle,
    req: &Request<()>,
) -> Result<Identity, Error> {
    let peer = req.remote_addr().map(|a| a.ip());
    if let Some(ip) = peer {
        limits
            .check_peer(ip)
            .map_err(|r| Error::RateLimited { retry_after: r.0 })?;
    }
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
        Err(e) => {
            debug!(error = %e, "rejected call");
            // The actor is the presented token's fingerprint when there is a well-formed one.
            let actor = skep_common::auth::bearer_digest(req.metadata())
                .map_or_else(|_| "anonymous".to_owned(), |d| d.fingerprint());
            let mut fields = Fields::new().reason(&e.to_string());
            if let Some(ip) = peer {
                fields = fields.str("peer", &ip.to_string());
            }
            audit.record(events::AUTH_FAILURE, &actor, fields);
            if let Some(ip) = peer
                && let Err(r) = limits.record_auth_failure(ip)
            {
                warn!(peer = %ip, "too many bad tokens; throttling this peer");
                return Err(Error::RateLimited { retry_after: r.0 });
            }
            return Err(e.into());
        }
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
