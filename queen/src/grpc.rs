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
use std::sync::Arc;
use std::time::Duration;

use skep_common::daemon::ConnLimits;
use skep_common::ratelimit::{Coalescer, DEFAULT_REFUSAL_INTERVAL, RateLimits};
use skep_common::validate;
use skep_proto::v1::jobs_server::JobsServer;
use skep_proto::v1::models_server::ModelsServer;
use skep_proto::v1::nodes_server::NodesServer;
use skep_proto::v1::tokens_server::TokensServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Status};

use crate::Error;
use crate::admit::{self, Refusals, record_summary, report_refusals};
use crate::audit::AuditHandle;
use crate::auth::{Authenticator, Identity, Role};
use crate::job::Services;

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
    // grpc.health.v1 for probes: outside the interceptor (probes carry no token), answering only
    // the overall status ("" = SERVING from here on); any other service name is NOT_FOUND.
    let (_, health) = tonic_health::server::health_reporter();
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
        .add_service(health)
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

/// Authenticates one call through the queen's one gate (`crate::admit`), shared with the HTTP
/// door: same token book, roles, penalty box and audit.
fn admit_call(
    authenticator: &Authenticator,
    limits: &RateLimits,
    refusals: &Refusals,
    audit: &AuditHandle,
    req: &Request<()>,
) -> Result<Identity, Error> {
    let peer = req.remote_addr().map(|a| a.ip());
    admit::admit_call(authenticator, limits, refusals, audit, req.metadata(), peer)
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
    admit::require_any(&id, roles)?;
    Ok(id)
}
