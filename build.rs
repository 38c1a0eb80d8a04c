//! Generates the gRPC servers of the CSI driver (`proto/csi.proto`, CSI spec v1.12, as kubelet
//! v1.37 pins it) and of the kubelet's plugin registration (`proto/pluginregistration.proto`, from
//! k8s.io/kubelet), with protox: no protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/csi.proto", "proto/pluginregistration.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(false).compile_fds(fds)?;
    Ok(())
}
