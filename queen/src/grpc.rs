//! The queen's gRPC surface: `Jobs` for clients and `Nodes` for pool managers.
//!
//! This module and its children are the only places that name tonic types. Every service sits
//! behind the same authenticating interceptor, so no RPC is reachable without a valid token.

mod convert;
pub mod dispatch;
mod jobs;
mod nodes;
mod status;

use std::future::Future;

use skep_common::validate;
use skep_proto::v1::jobs_server::JobsServer;
use skep_proto::v1::nodes_server::NodesServer;
use tokio::net::TcpListener;
use tonic::{Request, Status};

use crate::auth::{Authenticator, Identity, Role};
use crate::job::Services;

/// Largest request accepted: a maximal prompt plus room for the other fields.
const MAX_MESSAGE: usize = validate::MAX_PROMPT_BYTES + 4096;

/// Serves the queen on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    authenticator: Authenticator,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let auth = move |mut req: Request<()>| {
        let identity = authenticator.check(req.metadata()).map_err(|e| {
            tracing::debug!(error = %e, "rejected call");
            Status::from(crate::Error::from(e))
        })?;
        req.extensions_mut().insert(identity);
        Ok(req)
    };
    let jobs = JobsServer::new(jobs::JobsService::new(services.clone()))
        .max_decoding_message_size(MAX_MESSAGE);
    let nodes =
        NodesServer::new(nodes::NodesService::new(services)).max_decoding_message_size(MAX_MESSAGE);
    tonic::transport::Server::builder()
        // Tokens stream for as long as a job runs; keepalives find dead clients.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            jobs,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            nodes, auth,
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}

/// The caller's identity, checked against the role an RPC needs. Admin may do everything.
fn require<T>(req: &Request<T>, role: Role) -> Result<Identity, crate::Error> {
    let id = req
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or(crate::Error::Auth(skep_common::auth::AuthError::Missing))?;
    match (id.role, role) {
        (Role::Admin, _) | (Role::Submit, Role::Submit) => Ok(id),
        (Role::Submit, Role::Admin) => Err(crate::Error::PermissionDenied("admin")),
    }
}
