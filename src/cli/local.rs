//! `raftchat local`: a cluster of node processes on loopback in one step, data and logs
//! under one folder. Ctrl-C (or SIGTERM) stops every node with SIGTERM and waits for each
//! to flush and exit.

use crate::fixture::{Cluster, Spec};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct LocalArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Folder for every node's data, config and log.
    #[arg(long, default_value = "raftchat-local")]
    pub dir: PathBuf,
    /// Shard count (fixed once the cluster's data exists).
    #[arg(long, default_value_t = 8)]
    pub shards: u32,
    /// HTTP port of node 1; node N listens on this + N - 1 (gRPC: 7081 + N - 1, peers:
    /// 7091 + N - 1).
    #[arg(long, default_value_t = 8081)]
    pub http_port: u16,
    #[arg(long, default_value_t = 7081)]
    pub grpc_port: u16,
    #[arg(long, default_value_t = 7091)]
    pub peer_port: u16,
    /// Serve HTTPS/WSS and talk mutual TLS, with a CA and node certificates made under
    /// `<dir>/tls` (clients pass `--ca-file <dir>/tls/ca.pem`).
    #[arg(long)]
    pub tls: bool,
}

pub async fn run(a: LocalArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=9).contains(&a.nodes), "--nodes must be in 1..=9");
    let bin = std::env::current_exe()?;
    let ports = (0..a.nodes as u16).map(|i| (a.http_port + i, a.grpc_port + i, a.peer_port + i)).collect();
    let spec = Spec { shards: a.shards, ports: Some(ports), tls: a.tls, ..Spec::new(a.nodes, &a.dir) };
    let mut cluster = Cluster::start(&bin, &spec)?;
    eprintln!("raftchat local: starting {} nodes, data and logs in {}", a.nodes, a.dir.display());
    if let Err(e) = cluster.wait_all_ready(Duration::from_secs(60)).await {
        eprintln!("raftchat local: {e:#}");
    }
    for i in 0..cluster.len() {
        eprintln!("  node {}: {}  (grpc {})", i + 1, cluster.url(i), cluster.configs[i].grpc_addr);
    }
    let ca = match &cluster.configs[0].tls_ca_file {
        Some(ca) => format!(" --ca-file {}", ca.display()),
        None => String::new(),
    };
    eprintln!(
        "try:  raftchat add-user bob --server {0}{1} && raftchat send --server {0}{1} --as alice --to bob 'hi'",
        cluster.url(0),
        ca
    );
    eprintln!("Ctrl-C stops every node.");
    super::terminated().await;
    eprintln!("raftchat local: stopping nodes");
    let mut failed = false;
    for i in 0..cluster.len() {
        match cluster.stop(i, Duration::from_secs(20)) {
            Ok(st) => eprintln!("  node {} stopped ({st})", i + 1),
            Err(e) => {
                failed = true;
                eprintln!("  node {}: {e:#}", i + 1)
            }
        }
    }
    anyhow::ensure!(!failed, "some nodes did not stop cleanly");
    Ok(())
}
