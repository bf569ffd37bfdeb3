//! Compiles `proto/*.proto` with a vendored `protoc`, so a fresh machine needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/raftchat.proto");
    println!("cargo:rerun-if-changed=proto/etcd_kv.proto");
    tonic_prost_build::configure().compile_protos(&["proto/raftchat.proto"], &["proto"])?;
    // Only the client side: `raftchat bench --peer etcd` drives etcd's KV.Put.
    tonic_prost_build::configure().build_server(false).compile_protos(&["proto/etcd_kv.proto"], &["proto"])?;
    // `raftchat_build_info{commit}`: the git commit when built from a checkout.
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=RAFTCHAT_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-changed=.git/packed-refs");
    println!("cargo:rerun-if-env-changed=RAFTCHAT_GIT_COMMIT");
    Ok(())
}
