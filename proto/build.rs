//! Compiles `stagecoach/v1/*.proto` with the pure-Rust `protox` compiler, so
//! building needs no system `protoc`, and keeps the encoded descriptor set for
//! server reflection.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "stagecoach/v1/common.proto",
    "stagecoach/v1/migration.proto",
    "stagecoach/v1/worker.proto",
    "stagecoach/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("stagecoach_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
