//! Generates the gRPC types from `proto/` and a descriptor set for server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so building needs no system install.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: a build script is single-threaded; nothing reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("leaderlink_descriptor.bin"))
        // `bytes` fields become `bytes::Bytes`: leaderlink passes a caller's record batch along by
        // reference count and copies it once on its way to the socket, when the Produce
        // request's body is encoded into one buffer.
        .bytes(".")
        .compile_protos(
            &[
                "proto/leaderlink/v1/forwarder.proto",
                "proto/leaderlink/v1/admin.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
