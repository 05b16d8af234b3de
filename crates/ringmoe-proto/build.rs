//! Generates the gRPC messages and services from `proto/`, plus the descriptor set that server
//! reflection serves.
//!
//! protoc: a `PROTOC` the user set, else the binary the protoc-bin-vendored crate ships, so no
//! system protoc is needed. The workspace's `.cargo/config.toml` sets `PROTOC` to
//! `scripts/protoc` for the crates.io build scripts that run protoc (etcd-client's); that wrapper
//! finds the vendored binary beside the registry crate calling it, which this path crate is not,
//! so here it is replaced by the vendored binary directly.
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../../proto/ringmoe/v1/ringmoe.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let wrapper = manifest.join("../../scripts/protoc");
    let protoc = match std::env::var_os("PROTOC").map(PathBuf::from) {
        Some(p) if !same_file(&p, &wrapper) => p,
        _ => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ringmoe_v1_descriptor.bin"))
        .compile_with_config(config, &[proto], &["../../proto"])?;
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}
