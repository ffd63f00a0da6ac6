//! The one place pool-manager errors become gRPC statuses.
use tonic::Status;

use crate::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        use skep_common::auth::AuthError;
        let msg = e.to_string();
        match e {
            Error::Auth(AuthError::InsecureBind(_)) => Status::failed_precondition(msg),
            Error::Auth(_) => Status::unauthenticated(msg),
            Error::Deadline(_) | Error::Invalid(_) => Status::invalid_argument(msg),
            Error::NotRegistered | Error::ShuttingDown => Status::unavailable(msg),
            Error::Busy { .. } => Status::resource_exhausted(msg),
            Error::UnknownModel(_) => Status::not_found(msg),
            Error::LateArrival | Error::DeadlineExceeded | Error::Infeasible { .. } => {
                Status::deadline_exceeded(msg)
            }
            Error::Worker { code, message } => Status::new(tonic::Code::from(code), message),
            Error::WorkerLost(_) => Status::unavailable(msg),
        }
    }
}
