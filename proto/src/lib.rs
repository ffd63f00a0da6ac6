//! skep's wire contract: the generated `skep.v1` message types and gRPC client/server stubs.
//!
//! Every hop speaks these types, so the client, queen, pool manager and worker cannot drift apart.
//! Domain logic does not live here; each service crate converts at its edge.

/// Generated from `proto/skep/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("skep.v1");
}
