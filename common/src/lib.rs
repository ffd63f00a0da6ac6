//! skep's shared building blocks, one module per concern, used by every daemon and the CLI.
//!
//! Nothing here knows about gRPC services or actors; these are the small, well-tested pieces the
//! hops have in common (so they cannot drift apart): how a bearer token is parsed and compared,
//! how secrets are loaded, how deadlines are carried, how input is validated, how logs are set up.

pub mod auth;
pub mod daemon;
pub mod deadline;
pub mod metrics_http;
pub mod ratelimit;
pub mod sampling;
pub mod secret;
pub mod session;
pub mod telemetry;
pub mod validate;
