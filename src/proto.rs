//! Types generated from `proto/` by `build.rs`.

/// `leaderlink.v1`: the Forwarder contract.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("leaderlink.v1");
}

/// Encoded file descriptor set of every leaderlink proto, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("leaderlink_descriptor");
