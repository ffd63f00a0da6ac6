//! Exit codes: how the CLI reports failures to scripts.

use std::process::ExitCode;

use tonic::{Code, Status};

pub const OTHER: u8 = 1;
pub const USAGE: u8 = 2;
pub const DEADLINE: u8 = 3;
pub const REJECTED: u8 = 4;
pub const AUTH: u8 = 5;
pub const UNAVAILABLE: u8 = 6;

/// A failure to report: a message for stderr (if not already shown) and an exit code.
pub struct Failure {
    code: u8,
    message: Option<String>,
}

impl Failure {
    pub fn usage(msg: impl Into<String>) -> Failure {
        Failure {
            code: USAGE,
            message: Some(msg.into()),
        }
    }

    pub fn unavailable(msg: impl Into<String>) -> Failure {
        Failure {
            code: UNAVAILABLE,
            message: Some(msg.into()),
        }
    }

    pub fn other(msg: impl Into<String>) -> Failure {
        Failure {
            code: OTHER,
            message: Some(msg.into()),
        }
    }

    /// The exit code of a status whose message was already printed.
    pub fn quiet(status: &Status) -> Failure {
        Failure {
            code: code_of(status.code()),
            message: None,
        }
    }

    /// What would be printed, for tests that check which failure it is.
    #[cfg(test)]
    pub fn text(&self) -> (u8, &str) {
        (self.code, self.message.as_deref().unwrap_or(""))
    }

    pub fn report(self) -> ExitCode {
        if let Some(m) = self.message {
            eprintln!("error: {m}");
        }
        ExitCode::from(self.code)
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Failure {
        let mut message = s.message().to_owned();
        if let Some(ms) = s
            .metadata()
            .get("grpc-retry-pushback-ms")
            .and_then(|v| v.to_str().ok())
        {
            message.push_str(&format!(" (retry after {ms}ms)"));
        }
        Failure {
            code: code_of(s.code()),
            message: Some(message),
        }
    }
}

pub fn code_of(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::InvalidArgument | Code::OutOfRange => USAGE,
        Code::DeadlineExceeded => DEADLINE,
        Code::ResourceExhausted => REJECTED,
        Code::Unauthenticated | Code::PermissionDenied => AUTH,
        Code::Unavailable => UNAVAILABLE,
        _ => OTHER,
    }
}
