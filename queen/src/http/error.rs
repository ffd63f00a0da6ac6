//! The one place queen errors become HTTP answers on the OpenAI door: status code, an
//! OpenAI-shaped error body, and the retry headers (`Retry-After`, `retry-after-ms`,
//! `x-should-retry`).
//!
//! Never 408 (clients retry it). A refusal retrying cannot fix says `x-should-retry: false`, so
//! the openai clients do not turn it into three attempts. Internal failures are logged here and
//! answered without detail.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::warn;

use crate::Error;

/// An HTTP error answer.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, …
    pub kind: &'static str,
    /// A stable machine-readable `code`.
    pub code: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub message: String,
    /// When trying again may help, after how long (`Retry-After`, `retry-after-ms`).
    pub retry_after: Option<Duration>,
    /// `x-should-retry: false`: retrying the same request cannot help.
    pub no_retry: bool,
}

// === impl HttpError ===

impl HttpError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        HttpError {
            status,
            kind,
            code,
            param: None,
            message,
            retry_after: None,
            no_retry: false,
        }
    }

    /// 400 for a request field.
    pub fn invalid(param: &str, message: impl Into<String>) -> HttpError {
        HttpError {
            param: Some(param.to_owned()),
            ..HttpError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                message.into(),
            )
        }
    }

    /// 400 for a feature skep does not offer yet, naming the field.
    pub fn unsupported(param: &str, what: &str) -> HttpError {
        HttpError {
            param: Some(param.to_owned()),
            ..HttpError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "unsupported_parameter",
                format!("`{param}` is not supported by skep: {what}; see docs/HTTP.md"),
            )
        }
    }

    pub fn not_found(message: &str) -> HttpError {
        HttpError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message.to_owned(),
        )
    }

    /// 405: the path exists, the method does not.
    pub fn method_not_allowed() -> HttpError {
        HttpError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "this path does not take that method; see docs/HTTP.md".to_owned(),
        )
    }

    /// 413: the body is over `limit` bytes.
    pub fn too_large(limit: usize) -> HttpError {
        HttpError {
            no_retry: true,
            ..HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!("the request body is over {limit} bytes"),
            )
        }
    }

    pub fn internal() -> HttpError {
        HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "internal error; see the queen's log".to_owned(),
        )
    }

    /// The OpenAI error object, also sent as an SSE event when a stream fails.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.body().to_string()).into_response();
        let h = r.headers_mut();
        h.insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up, as RFC 9110 wants; the millisecond figure for clients
            // that read it (the openai clients do).
            let secs = after.as_millis().div_ceil(1000).max(1);
            h.insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(secs as u64),
            );
            h.insert("retry-after-ms", HeaderValue::from(super::ms(after)));
        }
        if self.no_retry {
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        r
    }
}

/// The HTTP answer to a queen error.
pub fn from_error(e: Error) -> HttpError {
    use skep_common::auth::AuthError;
    let msg = e.to_string();
    let plain = |status, kind, code| HttpError::new(status, kind, code, msg.clone());
    match e {
        Error::Auth(AuthError::InsecureBind(_)) => HttpError::internal(),
        Error::Auth(_) => plain(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
        ),
        Error::PermissionDenied(_) => plain(
            StatusCode::FORBIDDEN,
            "permission_error",
            "permission_denied",
        ),
        Error::Invalid(_) => plain(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
        ),
        Error::BadDeadline(_) => HttpError {
            param: Some("skep-deadline".to_owned()),
            ..plain(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_deadline",
            )
        },
        // No slot can finish the job by its deadline without making another job late. The
        // same request is refused again until the queue drains by the shortfall at least; the
        // openai clients would retry at once, so they are told not to.
        Error::Infeasible { budget, estimate } => HttpError {
            message: format!(
                "503: refused at admission because the job cannot finish within its deadline: \
                 {msg}. Retrying with the same deadline fails until the queue drains by {}ms.",
                super::ms(estimate.saturating_sub(budget))
            ),
            retry_after: Some(estimate.saturating_sub(budget)),
            no_retry: true,
            ..plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "deadline_infeasible",
            )
        },
        Error::NoPool(_) => HttpError {
            message: format!("503: refused at admission: {msg}"),
            no_retry: true,
            ..plain(StatusCode::SERVICE_UNAVAILABLE, "server_error", "no_pool")
        },
        Error::QueueFull { retry_after } => HttpError {
            message: format!("429: refused at admission: {msg}"),
            retry_after: Some(retry_after),
            ..plain(StatusCode::TOO_MANY_REQUESTS, "server_error", "queue_full")
        },
        Error::CallerShare { retry_after, .. } => HttpError {
            message: format!("429: refused at admission: {msg}"),
            retry_after: Some(retry_after),
            ..plain(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "caller_share",
            )
        },
        Error::RateLimited { retry_after } => HttpError {
            retry_after: Some(retry_after),
            ..plain(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limited",
            )
        },
        // Stopped at its deadline (a non-streaming request; a stream ends with
        // finish_reason "length" instead). Never 408: clients retry it.
        Error::DeadlineExceeded { .. } => HttpError {
            message: format!("the job was stopped at its deadline: {msg}"),
            no_retry: true,
            ..plain(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "deadline_exceeded",
            )
        },
        Error::Cancelled => HttpError {
            no_retry: true,
            ..plain(StatusCode::CONFLICT, "invalid_request_error", "cancelled")
        },
        Error::Pool { .. } | Error::PoolUnreachable { .. } => HttpError {
            no_retry: true,
            ..plain(StatusCode::BAD_GATEWAY, "server_error", "pool_failed")
        },
        Error::JobNotFound(_) | Error::ModelNotFound(_) => {
            plain(StatusCode::NOT_FOUND, "invalid_request_error", "not_found")
        }
        other => {
            warn!(error = %other, "internal error on the HTTP door");
            HttpError::internal()
        }
    }
}
