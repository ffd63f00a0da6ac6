//! The status page on the HTTP door: `GET /` serves one embedded HTML file (plain JS, no build
//! step), `GET /status.json` the read-only snapshot it polls: nodes, live and recent jobs with
//! their per-hop timings, and admission refusals by reason.
//!
//! The page holds no data and no credential: it asks for an admin token, keeps it in
//! `sessionStorage` and sends it as `Authorization: Bearer` (never a cookie, never in a URL), so
//! the JSON goes through the door's one gate like every other call. Admin only, since it shows
//! every tenant's jobs. The page's inline script and style are allowed by their SHA-256 in the
//! Content-Security-Policy, and nothing else is. It changes nothing in the queen.

use std::net::IpAddr;
use std::sync::LazyLock;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Door, HttpError, Peer};
use crate::admit;
use crate::auth::Role;
use crate::model::{JobRecord, JobState};
use crate::registry::{NodeHealth, NodeInfo};

/// The page, embedded in the binary.
const PAGE: &str = include_str!("status.html");
/// Jobs the snapshot shows: the newest, live ones first among them.
const MAX_JOBS: u32 = 50;

/// The page's Content-Security-Policy: its own inline script and style by hash, fetches to this
/// origin only, no frames, forms, plugins or base rewriting.
static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
         img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        inline_hash(PAGE, "script"),
        inline_hash(PAGE, "style"),
    )
});

/// `GET /`: the page. No token: it holds nothing until the reader enters one.
pub(super) async fn page() -> Response {
    let mut r = PAGE.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(csp) = HeaderValue::from_str(&CSP) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    harden(h);
    r
}

/// `GET /status.json`: the snapshot, for an admin token.
pub(super) async fn snapshot(
    State(door): State<Door>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let mut r = match build(&door, &headers, peer.0).await {
        Ok(body) => super::json(StatusCode::OK, &body),
        Err(e) => e.into_response(),
    };
    harden(r.headers_mut());
    r
}

async fn build(door: &Door, headers: &HeaderMap, peer: Option<IpAddr>) -> Result<Value, HttpError> {
    let who = door.admit(headers, peer)?;
    admit::require_any(&who, &[Role::Admin]).map_err(|e| HttpError {
        message: "the status page needs an admin token: it shows every tenant's jobs".to_owned(),
        ..HttpError::from(e)
    })?;
    let svc = &door.svc;
    let running = svc.dispatch.running().await?;
    let nodes: Vec<Value> = svc
        .registry
        .list()
        .await?
        .into_iter()
        .map(|n| {
            let r = running.get(&n.id).copied().unwrap_or(0);
            node(n, r)
        })
        .collect();
    let mut jobs = Vec::new();
    for mut j in svc.store.list(MAX_JOBS).await? {
        // No `running` row is written; the dispatch actor knows which queued jobs are at a pool.
        if j.state == JobState::Queued && svc.dispatch.state(&j.id).await? == Some(true) {
            j.state = JobState::Running;
        }
        jobs.push(job(j));
    }
    // Live jobs first, then the rest, each newest first (the store's order).
    jobs.sort_by_key(|j| j["finished_unix_ms"].as_u64().unwrap_or(0) != 0);
    let refusals: serde_json::Map<String, Value> = svc
        .metrics
        .rejections()
        .into_iter()
        .map(|(reason, n)| (reason.to_owned(), json!(n)))
        .collect();
    Ok(json!({
        "now_unix_ms": crate::model::unix_ms(),
        "nodes": nodes,
        "jobs": jobs,
        "refusals": refusals,
    }))
}

fn node(n: NodeInfo, running: u32) -> Value {
    let state = match n.health {
        NodeHealth::Healthy => "healthy",
        NodeHealth::Suspect => "suspect",
        NodeHealth::Dead => "dead",
    };
    let inv = n.inventory.as_ref();
    json!({
        "id": n.id,
        "name": n.name,
        "state": state,
        "models": n.models,
        "models_loaded": inv.map(|i| i.models_loaded.clone()).unwrap_or_default(),
        "slots": n.slots,
        "free_slots": n.free_slots,
        "running": running,
        "load1": inv.map(|i| i.load1),
        "cpus": inv.map(|i| i.cpus),
        "last_heartbeat_ms_ago": super::ms(n.last_heartbeat),
    })
}

fn job(j: JobRecord) -> Value {
    let t = j.timings;
    json!({
        "id": j.id,
        "model": j.model,
        "state": j.state.as_str(),
        "created_unix_ms": j.created_unix_ms,
        "finished_unix_ms": j.finished_unix_ms,
        "deadline_ms": j.deadline_ms,
        "max_tokens": j.max_tokens,
        "tokens": j.tokens,
        "node_id": j.node_id,
        "error": j.error,
        "timings": {
            "admission_us": t.admission_us,
            "queue_wait_us": t.queue_wait_us,
            "dispatch_us": t.dispatch_us,
            "pool_us": t.pool_us,
            "worker_first_token_us": t.worker_first_token_us,
            "generation_us": t.generation_us,
            "total_us": t.total_us,
        },
    })
}

/// Headers on both answers: not to be sniffed, framed, cached or followed by a referrer.
fn harden(h: &mut HeaderMap) {
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The CSP source (`sha256-…`) of the page's one inline `<tag>` element's contents.
fn inline_hash(page: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let body = page
        .split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&close))
        .map_or("", |(body, _)| body);
    format!("sha256-{}", base64(&Sha256::digest(body.as_bytes())))
}

/// Standard base64 with padding (RFC 4648), as CSP hashes are written.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (raw, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), want, "{raw:?}");
        }
    }

    #[test]
    fn the_policy_allows_exactly_the_page_s_inline_script_and_style() {
        // One of each, so the hashes cover everything the page runs and styles.
        for tag in ["script", "style"] {
            assert_eq!(PAGE.matches(&format!("<{tag}")).count(), 1, "{tag}");
        }
        let script = inline_hash(PAGE, "script");
        assert_ne!(script, inline_hash("", "script"), "the script was found");
        assert!(CSP.contains(&format!("script-src '{script}'")));
        assert!(!CSP.contains("unsafe"));
        // Data goes in as text only.
        assert!(!PAGE.contains("innerHTML") && !PAGE.contains("outerHTML"));
        assert!(!PAGE.contains("document.cookie") && !PAGE.contains("localStorage"));
    }

    #[test]
    fn refusals_are_counted_by_reason_over_models() {
        use crate::metrics::{Metrics, Rejection};
        let m = Metrics::new();
        m.rejected("a", Rejection::Infeasible);
        m.rejected("b", Rejection::Infeasible);
        m.rejected("a", Rejection::QueueFull);
        assert_eq!(
            m.rejections(),
            [
                ("infeasible", 2),
                ("no_pool", 0),
                ("queue_full", 1),
                ("caller_share", 0)
            ]
        );
    }
}
