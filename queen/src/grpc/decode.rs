//! A tower layer that answers a request that does not decode with INVALID_ARGUMENT, and audits it.
//!
//! Why a layer: tonic's prost codec reports a message that does not decode (invalid UTF-8 in a
//! string field, a wrong wire type, a truncated field) as INTERNAL, as if the queen had failed,
//! and no handler ever sees it, so nothing audits it. The codec is fixed in the generated
//! servers; the answer is rewritten on its way out instead. A request is decoded before its
//! handler runs, so such an answer is always a trailers-only response: `grpc-status: 13` in the
//! headers, with the codec's "failed to decode Protobuf message" text. The text names the
//! message type and field, never the bytes sent. Nothing else is touched: a handler's own
//! INTERNAL carries another text.

use std::net::IpAddr;
use std::task::{Context, Poll};

use skep_audit::Fields;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::metadata::MetadataMap;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::debug;

use crate::audit::{AuditHandle, events};

/// How tonic's codec begins the message of a decode failure (prost's `DecodeError`), as it
/// appears in `grpc-message` (percent-encoded: spaces are `%20`).
const DECODE_FAILURE: &[u8] = b"failed%20to%20decode%20Protobuf%20message";

/// Wraps the whole server: see the module doc.
#[derive(Clone)]
pub struct DecodeErrorLayer {
    audit: AuditHandle,
}

impl DecodeErrorLayer {
    pub fn new(audit: AuditHandle) -> DecodeErrorLayer {
        DecodeErrorLayer { audit }
    }
}

impl<S> tower::Layer<S> for DecodeErrorLayer {
    type Service = DecodeError<S>;

    fn layer(&self, inner: S) -> DecodeError<S> {
        DecodeError {
            inner,
            audit: self.audit.clone(),
        }
    }
}

#[derive(Clone)]
pub struct DecodeError<S> {
    inner: S,
    audit: AuditHandle,
}

impl<S, B, RB> Service<http::Request<B>> for DecodeError<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<http::Response<RB>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Kept for the audit line, should the request not decode: the caller (an authenticated
        // one: the interceptor runs before the decoder), its address and the method.
        let bearer = req.headers().get("authorization").cloned();
        let peer = peer(req.extensions());
        let method = req.uri().path().to_owned();
        let audit = self.audit.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            if is_decode_failure(res.headers()) {
                res.headers_mut().insert(
                    "grpc-status",
                    http::HeaderValue::from(tonic::Code::InvalidArgument as i32),
                );
                let actor = bearer.map_or_else(|| "anonymous".to_owned(), fingerprint);
                debug!(caller = %actor, %method, "request does not decode");
                let mut fields = Fields::new()
                    .reason("request does not decode")
                    .str("method", &method);
                if let Some(ip) = peer {
                    fields = fields.str("peer", &ip.to_string());
                }
                audit.record(events::VALIDATION_REJECTED, &actor, fields);
            }
            Ok(res)
        })
    }
}

fn is_decode_failure(headers: &http::HeaderMap) -> bool {
    headers.get("grpc-status").map(|v| v.as_bytes()) == Some(b"13")
        && headers
            .get("grpc-message")
            .is_some_and(|m| m.as_bytes().starts_with(DECODE_FAILURE))
}

/// The fingerprint of a presented bearer token, or "anonymous".
fn fingerprint(value: http::HeaderValue) -> String {
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", value);
    skep_common::auth::bearer_digest(&MetadataMap::from_headers(headers))
        .map_or_else(|_| "anonymous".to_owned(), |d| d.fingerprint())
}

fn peer(ext: &http::Extensions) -> Option<IpAddr> {
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}
