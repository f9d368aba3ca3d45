//! Generates the tonic/prost code and the descriptor set used by gRPC reflection.
//! protoc comes from the `protoc-bin-vendored` crate, so no system install is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded, so setting the variable cannot race.
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("shardpress_descriptor.bin"))
        .compile_protos(&["proto/shardpress.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/shardpress.proto");
    Ok(())
}
