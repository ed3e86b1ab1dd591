//! Generates the csi.v1 Rust code from `csi.proto` without a system `protoc`:
//! `protox` (pure Rust) parses the file into a descriptor set, which
//! `tonic-prost-build` turns into prost messages plus tonic clients/servers.

use std::env;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let proto = manifest_dir.join("csi.proto");

    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-changed=build.rs");

    // prost-build needs the imported google/protobuf files in the set (as
    // with `protoc --include_imports`); it maps them to `prost_types` rather
    // than generating them. Source info carries our comments into rustdoc.
    let mut compiler = protox::Compiler::new([&manifest_dir])?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_file(&proto)?;
    let codegen_fds = compiler.file_descriptor_set();

    // Self-contained encoded set (imports included, custom options such as
    // csi_secret kept) for gRPC reflection and introspection.
    compiler.include_source_info(false);
    std::fs::write(
        out_dir.join("csi_v1_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(codegen_fds)?;

    Ok(())
}
