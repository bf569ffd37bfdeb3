//! Compiles `proto/*.proto` with a vendored `protoc`, so a fresh machine needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/raftchat.proto");
    println!("cargo:rerun-if-changed=proto/etcd_kv.proto");
    tonic_prost_build::configure().compile_protos(&["proto/raftchat.proto"], &["proto"])?;
    // Only the client side: `raftchat bench --peer etcd` drives etcd's KV.Put.
    tonic_prost_build::configure().build_server(false).compile_protos(&["proto/etcd_kv.proto"], &["proto"])?;
    Ok(())
}
