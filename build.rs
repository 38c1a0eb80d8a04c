//! Generates the gRPC servers of the CSI driver from `proto/csi.proto` (CSI spec v1.12, as kubelet
//! v1.37 pins it) with protox: no protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/csi.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(false).compile_fds(fds)?;
    Ok(())
}
