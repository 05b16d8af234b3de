//! Generates the gRPC messages and services from `proto/` (needs `protoc`: Debian's
//! protobuf-compiler, or `PROTOC=/path/to/protoc`), plus the descriptor set that server
//! reflection serves.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/ringmoe/v1/ringmoe.proto";
    println!("cargo:rerun-if-changed={proto}");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ringmoe_v1_descriptor.bin"))
        .compile_protos(&[proto], &["../../proto"])?;
    Ok(())
}
