//! The skep worker: one process per slot, spawned and supervised by its pool manager.
//!
//! It reads job requests from its request lane, runs them on an engine loaded once at start, and
//! streams tokens into its response lane, checking the deadline and the cancel flag between
//! tokens. It has no network listener at all: the lanes are its only interface.

pub mod engine;
pub mod schedule;
pub mod serve;
pub mod synth;

pub use serve::{ServeConfig, serve};
