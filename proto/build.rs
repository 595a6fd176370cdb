//! Compiles every `.proto` under `proto/crewmesh` with protox (no system protoc) and
//! writes the descriptor set used by server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let files: Vec<PathBuf> = [
        "crewmesh/types/v1/types.proto",
        "crewmesh/router/v1/router.proto",
        "crewmesh/agent/v1/agent.proto",
        "crewmesh/audit/v1/audit.proto",
        "crewmesh/config/v1/config.proto",
        "crewmesh/metrics/v1/metrics.proto",
        "crewmesh/tools/v1/tools.proto",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    println!("cargo:rerun-if-changed={}", root.join("crewmesh").display());

    let fds = protox::Compiler::new([&root])?
        .include_imports(true)
        .include_source_info(false)
        .open_files(&files)?
        .file_descriptor_set();

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("crewmesh_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    tonic_prost_build::configure()
        .codec_path("crate::codec::MeshCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
