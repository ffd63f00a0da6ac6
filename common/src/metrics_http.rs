//! `--metrics-listen` of the queen and the pools: a minimal HTTP/1 endpoint serving
//! `GET /metrics` and nothing else.
//!
//! No authentication (scrapers have none) and so nothing secret in what it serves; a handful of
//! connections at once, each with a header timeout and a lifetime, so a slow or idle client
//! cannot pin it. TLS is not offered: off loopback it needs `--insecure-plaintext`, like every
//! plaintext listener of skep.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

/// Connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 32;
/// Time a connection has to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept, keep-alive included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Writes `<dir>/metrics.addr` (atomically): where `--metrics-listen` was bound, for port 0.
pub fn write_addr_file(dir: &std::path::Path, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let tmp = dir.join("metrics.addr.tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(tmp, dir.join(ADDR_FILE))
}

/// The file `write_addr_file` writes in the data dir.
pub const ADDR_FILE: &str = "metrics.addr";

/// Serves `render()` as `GET /metrics` (with `content_type`) on `listener` until `shutdown`.
pub async fn serve<F>(
    listener: TcpListener,
    content_type: &'static str,
    render: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            debug!("metrics listener: too many connections; closing a new one");
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(req.method(), req.uri().path(), content_type, &*render);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // Past its lifetime the connection is simply dropped.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                debug!(error = %e, "metrics connection failed");
            }
        });
    }
}

/// The answer to one request: the metrics, or why not.
fn respond(
    method: &Method,
    path: &str,
    content_type: &'static str,
    render: &dyn Fn() -> String,
) -> Response<Full<Bytes>> {
    let status = match (path, method) {
        ("/metrics", &Method::GET | &Method::HEAD) => {
            let body = if method == Method::HEAD {
                Bytes::new()
            } else {
                Bytes::from(render())
            };
            let mut ok = Response::new(Full::new(body));
            ok.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            return ok;
        }
        ("/metrics", _) => StatusCode::METHOD_NOT_ALLOWED,
        _ => StatusCode::NOT_FOUND,
    };
    let mut refused = Response::new(Full::new(Bytes::from(
        status.canonical_reason().unwrap_or_default(),
    )));
    *refused.status_mut() = status;
    if status == StatusCode::METHOD_NOT_ALLOWED {
        refused
            .headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
    }
    refused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_serves_only_get_metrics() {
        let ct = "text/plain";
        let ok = respond(&Method::GET, "/metrics", ct, &|| "x".into());
        assert_eq!(ok.status(), StatusCode::OK);
        let post = respond(&Method::POST, "/metrics", ct, &|| "x".into());
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        let other = respond(&Method::GET, "/", ct, &|| "x".into());
        assert_eq!(other.status(), StatusCode::NOT_FOUND);
    }
}
