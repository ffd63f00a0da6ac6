//! The one place queen errors become gRPC statuses.
//!
//! Rejections carry a message the user can act on; capacity rejections carry a retry-after hint
//! in `grpc-retry-pushback-ms`. Internal failures are logged here and reported without detail.

use tonic::{Code, Status};
use tracing::warn;

use crate::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        use skep_common::auth::AuthError;
        let msg = e.to_string();
        match e {
            Error::Auth(AuthError::InsecureBind(_)) => Status::failed_precondition(msg),
            Error::Auth(_) => Status::unauthenticated(msg),
            Error::PermissionDenied(_) | Error::NodeRevoked(_) | Error::ApprovalRefused(_) => {
                Status::permission_denied(msg)
            }
            // Not permanent: the pool retries, and gets in once the holder stops heartbeating.
            Error::UrlTaken { .. } => Status::failed_precondition(msg),
            Error::Invalid(_) | Error::BadDeadline(_) | Error::BadPoolUrl(_) => {
                Status::invalid_argument(msg)
            }
            Error::Tls(_) => Status::failed_precondition(msg),
            Error::Infeasible { .. } | Error::DeadlineExceeded { .. } => {
                Status::deadline_exceeded(msg)
            }
            Error::Tokens(crate::auth::BookError::NotFound(_)) => Status::not_found(msg),
            Error::Tokens(crate::auth::BookError::Ambiguous(_)) => Status::invalid_argument(msg),
            Error::Tokens(crate::auth::BookError::LastAdmin) => Status::failed_precondition(msg),
            Error::QueueFull { retry_after }
            | Error::RateLimited { retry_after }
            | Error::CallerShare { retry_after, .. } => {
                let mut s = Status::resource_exhausted(msg);
                if let Ok(v) = retry_after.as_millis().to_string().parse() {
                    s.metadata_mut().insert("grpc-retry-pushback-ms", v);
                }
                s
            }
            Error::NoPool(_) | Error::PoolUnreachable { .. } => Status::unavailable(msg),
            Error::JobNotFound(_) | Error::NodeNotFound(_) => Status::not_found(msg),
            Error::Cancelled => Status::cancelled(msg),
            // A pool's own verdict passes through with its code.
            Error::Pool { code, .. } => Status::new(Code::from(code), msg),
            Error::Model(_) => Status::invalid_argument(msg),
            Error::ModelNotFound(_) => Status::not_found(msg),
            Error::Store(_) | Error::ActorStopped | Error::Io(_) => {
                warn!(error = %msg, "internal error");
                Status::internal("internal error; see the queen's log")
            }
        }
    }
}
