//! The queen's OpenAI-compatible HTTP door (`--http-listen`): chat and text completions, the
//! model list, health and metrics, next to gRPC on the same runtime.
//!
//! It is a second door, not a second path: callers are admitted by `crate::admit` (the gRPC
//! door's token book, roles, penalty box and audit) and jobs go through `crate::submit`. What it
//! adds is the OpenAI wire format, the deadline headers and HTTP refusal codes. It serves TLS
//! with the queen's certificate off loopback. It does not speak tonic or serve gRPC.

mod error;
mod openai;
mod run;
mod status;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use skep_common::daemon::ConnLimits;
use skep_common::ratelimit::{Coalescer, DEFAULT_REFUSAL_INTERVAL, RateLimits};
use tokio::net::TcpListener;
use tonic::transport::server::Connected;
use tower::ServiceExt;
use tracing::{debug, info};

use crate::Error;
use crate::admit::{self, Refusals};
use crate::auth::{Authenticator, Identity, Role};
use crate::job::Services;

pub use error::HttpError;

/// Largest request body: a maximal prompt, JSON-escaped (up to 6 bytes per byte), plus room for
/// the other fields.
const MAX_BODY: usize = 6 * skep_common::validate::MAX_PROMPT_BYTES + 64 * 1024;
/// Time a client has to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's headers, also on an idle keep-alive connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 pings to every HTTP/2 client; one that does not answer in time is gone.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How the door serves.
#[derive(Clone)]
pub struct HttpConfig {
    /// The budget of a request that names none (`--http-default-deadline`).
    pub default_deadline: Duration,
    /// TLS with the queen's certificate, or `None` for plaintext (loopback).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub conns: ConnLimits,
}

/// The door's shared state: the services, and the gate every call passes.
#[derive(Clone)]
struct Door {
    svc: Services,
    authenticator: Authenticator,
    limits: Arc<RateLimits>,
    refusals: Arc<Refusals>,
    default_deadline: Duration,
}

/// The peer address of a connection, as a request extension.
#[derive(Clone, Copy)]
struct Peer(Option<IpAddr>);

/// The TLS server config for a door on `addr`: the gRPC door's certificate when the queen has
/// one, else a certificate from the same CA (`<data-dir>/tls`) naming `queen.skep`, `localhost`,
/// the address and `names`.
pub fn tls_config(
    svc: &Services,
    data_dir: &Path,
    addr: SocketAddr,
    names: &[String],
) -> Result<Arc<rustls::ServerConfig>, skep_tls::TlsError> {
    let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
    let config = match &svc.tls {
        Some(tls) => tls.rustls_server_config(alpn)?,
        None => {
            let mut names = names.to_vec();
            if !addr.ip().is_unspecified() {
                names.push(addr.ip().to_string());
            }
            skep_tls::QueenTls::load_or_create(&data_dir.join("tls"), &names)?
                .rustls_server_config(alpn)?
        }
    };
    Ok(Arc::new(config))
}

/// Writes the door's bound address to `<dir>/http.addr` atomically (as `listen.addr` for gRPC).
pub fn write_addr_file(dir: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let tmp = dir.join("http.addr.tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(tmp, dir.join("http.addr"))
}

/// Serves the door on `listener` until `shutdown` resolves. `limits` is the gRPC door's: one
/// penalty box and one budget per identity across both doors.
pub async fn serve(
    listener: TcpListener,
    services: Services,
    limits: Arc<RateLimits>,
    config: HttpConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    let refusals = Arc::new(Coalescer::new(DEFAULT_REFUSAL_INTERVAL));
    let reporter = tokio::spawn(admit::report_refusals(
        Arc::clone(&refusals),
        services.audit.clone(),
    ));
    let audit = services.audit.clone();
    let door = Door {
        authenticator: services.tokens.authenticator(),
        svc: services,
        limits,
        refusals: Arc::clone(&refusals),
        default_deadline: config.default_deadline,
    };
    let app = router(door);
    let acceptor = config.tls.map(tokio_rustls::TlsAcceptor::from);
    // The daemons' accept loop: connection cap, preface timeout, accept back-off. No idle
    // timeout: an HTTP/1 client streaming a long answer sends nothing while it reads.
    let mut incoming = skep_common::daemon::incoming_with(
        listener,
        ConnLimits {
            idle_timeout: None,
            ..config.conns
        },
    );
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            () = &mut shutdown => break,
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    debug!(error = %e, "accept");
                    continue;
                }
                None => break,
            },
        };
        let peer = Peer(conn.connect_info().remote_addr().map(|a| a.ip()));
        let app = app.clone().map_request(move |mut req: Request<_>| {
            req.extensions_mut().insert(peer);
            req
        });
        let service = TowerToHyperService::new(app);
        let (acceptor, builder) = (acceptor.clone(), Arc::clone(&builder));
        tokio::spawn(async move {
            let served = match acceptor {
                None => {
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(conn), service)
                        .await
                }
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(conn))
                            .await
                        {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => return debug!(error = %e, "TLS handshake"),
                            Err(_) => return debug!("TLS handshake timed out"),
                        };
                    builder
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await
                }
            };
            if let Err(e) = served {
                debug!(error = %e, "HTTP connection ended");
            }
        });
    }
    reporter.abort();
    for s in refusals.drain() {
        admit::record_summary(&audit, s);
    }
    info!("HTTP door stopped");
}

/// The door's routes.
fn router(door: Door) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        // The status page (no token) and the admin-only snapshot it polls (docs/HTTP.md).
        .route("/", get(status::page))
        .route("/status.json", get(status::snapshot))
        .fallback(not_found)
        // Bodies are read whole (`Bytes`); a larger one is refused with 413 before it is read.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        // axum answers a wrong method and an oversized body itself, in plain text; OpenAI
        // clients expect their error shape (and no retry of a body that will never fit).
        .layer(axum::middleware::map_response(openai_shaped))
        .with_state(door)
}

/// Rewrites axum's own plain-text refusals as OpenAI error bodies, keeping its headers.
async fn openai_shaped(r: Response) -> Response {
    let json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let shaped = match r.status() {
        _ if json => return r,
        StatusCode::METHOD_NOT_ALLOWED => HttpError::method_not_allowed(),
        StatusCode::PAYLOAD_TOO_LARGE => HttpError::too_large(MAX_BODY),
        _ => return r,
    };
    let (parts, _) = r.into_parts();
    let mut out = shaped.into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

// === impl Door ===

impl Door {
    /// The caller behind the `authorization` header, through the queen's one gate.
    fn admit(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Result<Identity, HttpError> {
        // Only the `authorization` values travel to the gate; nothing else is copied.
        let mut md = tonic::metadata::MetadataMap::new();
        for v in headers.get_all(header::AUTHORIZATION) {
            // A value that is not ASCII is malformed as a bearer anyway; it stays counted.
            let v = tonic::metadata::AsciiMetadataValue::try_from(v.as_bytes())
                .unwrap_or_else(|_| tonic::metadata::AsciiMetadataValue::from_static("malformed"));
            md.append("authorization", v);
        }
        admit::admit_call(
            &self.authenticator,
            &self.limits,
            &self.refusals,
            &self.svc.audit,
            &md,
            peer,
        )
        .map_err(HttpError::from)
    }
}

async fn chat_completions(
    State(door): State<Door>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run::complete(door, peer.0, headers, body, openai::Kind::Chat).await
}

async fn completions(
    State(door): State<Door>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run::complete(door, peer.0, headers, body, openai::Kind::Text).await
}

/// `GET /v1/models`: the catalogue's models and those pools serve now (Open WebUI lists these).
async fn models(
    State(door): State<Door>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let listed = async {
        let who = door.admit(&headers, peer.0)?;
        admit::require_any(&who, &[Role::Submit])?;
        let mut models = std::collections::BTreeMap::new();
        for m in door.svc.catalogue.list().await? {
            models.insert(m.name, m.added_unix_ms / 1000);
        }
        for node in door.svc.registry.list().await? {
            if node.health == crate::registry::NodeHealth::Dead {
                continue;
            }
            for m in node.models {
                models.entry(m).or_insert(0);
            }
        }
        Ok::<_, HttpError>(openai::model_list(models))
    };
    match listed.await {
        Ok(body) => json(axum::http::StatusCode::OK, &body),
        Err(e) => e.into_response(),
    }
}

/// `GET /health`: the door answers. No token.
async fn health() -> Response {
    json(
        axum::http::StatusCode::OK,
        &serde_json::json!({"status": "ok"}),
    )
}

/// `GET /metrics`: the queen's Prometheus metrics. No token, as Prometheus scrapes.
async fn metrics(State(door): State<Door>) -> Response {
    let mut r = door.svc.metrics.render().into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    r
}

async fn not_found() -> Response {
    HttpError::not_found("no such endpoint; see docs/HTTP.md").into_response()
}

/// A JSON response.
fn json(status: axum::http::StatusCode, body: &serde_json::Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Milliseconds, saturating.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Seconds since the Unix epoch, for OpenAI's `created`.
fn unix_secs() -> u64 {
    crate::model::unix_ms() / 1000
}

impl From<Error> for HttpError {
    fn from(e: Error) -> HttpError {
        error::from_error(e)
    }
}
