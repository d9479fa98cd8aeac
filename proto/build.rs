//! Compiles the .proto files with protox (a protobuf compiler in Rust), so building needs no
//! system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "wglb/v1/balancer.proto",
        "wglb/v1/topology.proto",
        "wglb/v1/agent.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
