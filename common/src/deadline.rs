//! Deadline arithmetic: `grpc-timeout` parsing and encoding, budgets, and absolute deadlines.
//!
//! Across hosts a deadline travels as the *remaining* duration (as gRPC does), so clock skew does
//! not matter; inside a process it is an absolute monotonic `Instant`, so every hop subtracts what
//! it spent simply by asking how much remains.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// Longest budget we accept: a day. Anything longer is a mistake, and bounding it keeps the
/// arithmetic far from overflow.
pub const MAX_BUDGET: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeadlineError {
    #[error("malformed grpc-timeout {0:?}: expected 1-8 digits and a unit (H, M, S, m, u, n)")]
    MalformedTimeout(String),
    #[error("no deadline: set a deadline (e.g. --deadline 30s) or a grpc-timeout")]
    Missing,
    #[error("deadline is zero: the job could never finish")]
    Zero,
}

/// Parses a `grpc-timeout` header value (gRPC over HTTP/2 spec: `1*8DIGIT unit`).
pub fn parse_grpc_timeout(value: &str) -> Result<Duration, DeadlineError> {
    let bad = || DeadlineError::MalformedTimeout(value.chars().take(16).collect());
    let (digits, unit) = value
        .split_at_checked(value.len().saturating_sub(1))
        .ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    };
    Ok(d)
}

/// Encodes a duration as a `grpc-timeout` value, choosing the finest unit that fits 8 digits
/// (rounding up, so a receiver never sees more time than we had minus transit).
pub fn encode_grpc_timeout(d: Duration) -> String {
    let nanos = d.as_nanos();
    const UNITS: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    for (per, unit) in UNITS {
        let v = nanos / per;
        if v < 100_000_000 {
            return format!("{v}{unit}");
        }
    }
    "99999999H".to_owned()
}

/// The `grpc-timeout` of a request, if any.
pub fn from_metadata(md: &MetadataMap) -> Result<Option<Duration>, DeadlineError> {
    match md.get("grpc-timeout") {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| DeadlineError::MalformedTimeout(String::new()))?;
            parse_grpc_timeout(s).map(Some)
        }
    }
}

/// The budget of a request: the smaller of the header and the explicit field (0 = unset),
/// capped at `MAX_BUDGET`. A request with neither has no deadline and is refused.
pub fn budget(header: Option<Duration>, field_ms: u64) -> Result<Duration, DeadlineError> {
    let field = (field_ms > 0).then(|| Duration::from_millis(field_ms));
    let b = match (header, field) {
        (Some(h), Some(f)) => h.min(f),
        (Some(d), None) | (None, Some(d)) => d,
        (None, None) => return Err(DeadlineError::Missing),
    };
    if b.is_zero() {
        return Err(DeadlineError::Zero);
    }
    Ok(b.min(MAX_BUDGET))
}

/// A duration in whole microseconds, saturating: the unit of every timing skep reports.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// An absolute deadline on this host's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline {
    at: Instant,
}

// === impl Deadline ===

impl Deadline {
    pub fn after(budget: Duration) -> Deadline {
        Deadline::from_start(Instant::now(), budget)
    }

    pub fn from_start(start: Instant, budget: Duration) -> Deadline {
        let budget = budget.min(MAX_BUDGET);
        Deadline { at: start + budget }
    }

    pub fn instant(&self) -> Instant {
        self.at
    }

    /// Time left; zero once passed. This is what a hop forwards as `grpc-timeout`.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }

    /// How late `now` is, if it is past the deadline.
    pub fn exceeded_by(&self, now: Instant) -> Option<Duration> {
        now.checked_duration_since(self.at).filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests;
