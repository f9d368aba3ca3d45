//! gRPC definitions of the job service (clients) and the worker service (workers), generated
//! from `proto/shardpress.proto`.

pub mod auth;
pub mod metrics;

/// Version 1 of the API.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("shardpress.v1");

    /// Encoded descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("shardpress_descriptor");
}
