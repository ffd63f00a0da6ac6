//! The one place pool-manager errors become gRPC status codes (statuses and `JobFailed.code`).
use tonic::{Code, Status};

use crate::Error;

/// The gRPC code for an error.
pub(crate) fn code(e: &Error) -> Code {
    use skep_common::auth::AuthError;
    match e {
        Error::Auth(AuthError::InsecureBind(_)) => Code::FailedPrecondition,
        Error::Auth(_) => Code::Unauthenticated,
        Error::Deadline(_)
        | Error::Invalid(_)
        | Error::ReservedHandle
        | Error::DuplicateHandle(_)
        | Error::NoSuchSlot { .. } => Code::InvalidArgument,
        Error::NotRegistered
        | Error::ShuttingDown
        | Error::WorkerLost(_)
        | Error::OverBudget { .. }
        | Error::LoadFailed { .. } => Code::Unavailable,
        Error::SlotFull { .. } => Code::ResourceExhausted,
        Error::UnknownModel(_) => Code::NotFound,
        Error::LateArrival | Error::DeadlineExceeded | Error::Infeasible { .. } => {
            Code::DeadlineExceeded
        }
        Error::Cancelled => Code::Cancelled,
        // Passed through as the worker said it; an unknown number becomes UNKNOWN.
        Error::Worker { code, .. } => Code::from(*code),
    }
}

/// A caller over its bad-credential budget: RESOURCE_EXHAUSTED with the retry hint in
/// `grpc-retry-pushback-ms`, as the queen answers.
pub(crate) fn penalised(retry_after: std::time::Duration) -> Status {
    let mut s = Status::resource_exhausted(format!(
        "too many bad credentials; retry after {}ms",
        retry_after.as_millis()
    ));
    if let Ok(v) = retry_after.as_millis().to_string().parse() {
        s.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    s
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = code(&e);
        match e {
            Error::Worker { message, .. } => Status::new(code, message),
            e => Status::new(code, e.to_string()),
        }
    }
}
