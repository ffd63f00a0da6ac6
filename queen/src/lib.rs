//! The skep queen: admits jobs with deadlines, places them on pool managers, streams results.
//!
//! Mutable state lives in actors, each behind a typed handle so callers never touch actix:
//! `admission` (live jobs, estimates, capacity), `scheduler` (EDF queues and pool slots),
//! `registry` (node membership and liveness) and `store` (SQLite, on a blocking thread).
//! `job` drives one job from admission to its terminal state; `grpc` is the only module that
//! speaks tonic.

pub mod admission;
pub mod audit;
pub mod auth;
pub mod catalogue;
pub mod error;
pub mod grpc;
pub mod job;
pub mod model;
pub mod registry;
pub mod scheduler;
pub mod store;

pub use error::Error;
