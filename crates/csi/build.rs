//! Generates the CSI messages and services from proto/csi.proto (needs `protoc`: Debian's
//! protobuf-compiler, which scripts/setup installs).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/csi.proto"], &["proto"])?;
    Ok(())
}
