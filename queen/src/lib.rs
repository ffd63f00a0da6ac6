//! The skep queen: admits jobs with deadlines, places them on pool managers, streams results.
//!
//! Mutable state lives in actors, each behind a typed handle so callers never touch actix:
//! `dispatch` (the one owner of the schedule: admission, EDF order, slot reservations and the
//! live jobs), `registry` (node membership and liveness), `store` (SQLite, one group-commit
//! writer thread) and `audit`. `job` holds a job's request and event types; `grpc` is the only
//! module that speaks tonic (pool sessions included).

pub mod admit;
pub mod approval;
pub mod audit;
pub mod auth;
pub mod catalogue;
pub mod dispatch;
pub mod error;
pub mod grpc;
pub mod http;
pub mod job;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod store;
pub mod submit;

pub use error::Error;
