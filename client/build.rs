//! Generates the client types of leaderlink's Forwarder service from `../proto`.

use std::env;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so building needs no system install.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: a build script is single-threaded; nothing reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_protos(&["../proto/leaderlink/v1/forwarder.proto"], &["../proto"])?;
    println!("cargo:rerun-if-changed=../proto");
    Ok(())
}
