//! `raftchat local`: a cluster of node processes on loopback in one step, data and logs
//! under one folder. It says when the cluster is ready, reports a node's death the moment
//! it happens (with its exit status, its log and how to start it again), takes `restart N`
//! and `stop N` on stdin, and on Ctrl-C (or SIGTERM) stops every node with SIGTERM and
//! waits for each to flush and exit.

use crate::fixture::{Cluster, Spec};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Args)]
pub struct LocalArgs {
    /// Number of nodes (1 to 9).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Folder for every node's data, config and log.
    #[arg(long, default_value = "raftchat-local")]
    pub dir: PathBuf,
    /// Shard count (fixed once the cluster's data exists).
    #[arg(long, default_value_t = 8)]
    pub shards: u32,
    /// HTTP port of node 1; node N listens on this + N - 1.
    #[arg(long, default_value_t = 8081)]
    pub http_port: u16,
    /// Client gRPC port of node 1; node N listens on this + N - 1.
    #[arg(long, default_value_t = 7081)]
    pub grpc_port: u16,
    /// Peer (Raft) port of node 1; node N listens on this + N - 1.
    #[arg(long, default_value_t = 7091)]
    pub peer_port: u16,
    /// Serve HTTPS/WSS and talk mutual TLS, with a CA and node certificates made under
    /// `<dir>/tls` (clients pass `--ca-file <dir>/tls/ca.pem`).
    #[arg(long)]
    pub tls: bool,
}

pub async fn run(a: LocalArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=9).contains(&a.nodes), "--nodes must be in 1..=9");
    // Signals are caught from here on: a Ctrl-C during start-up still stops the nodes.
    let stop = super::terminated();
    let bin = std::env::current_exe()?;
    let ports = (0..a.nodes as u16).map(|i| (a.http_port + i, a.grpc_port + i, a.peer_port + i)).collect();
    let spec =
        Spec { shards: a.shards, ports: Some(ports), tls: a.tls, share_cores: true, ..Spec::new(a.nodes, &a.dir) };
    let mut cluster = Cluster::start(&bin, &spec)?;
    eprintln!("raftchat local: starting {} nodes, data and logs in {}", a.nodes, a.dir.display());
    match cluster.wait_all_ready(Duration::from_secs(60)).await {
        Ok(()) => eprintln!("raftchat local: the cluster is ready"),
        Err(e) => eprintln!("raftchat local: {e:#}"),
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
    eprintln!("Type `restart N` to start node N again after it died, `stop N` to stop it; Ctrl-C stops every node.");
    supervise(&mut cluster, &a.dir, stop).await;
    eprintln!("raftchat local: stopping nodes");
    let mut failed = false;
    for i in 0..cluster.len() {
        if !cluster.is_running(i) {
            continue;
        }
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

/// Watches the nodes until Ctrl-C/SIGTERM: reports deaths at once, obeys `restart N` and
/// `stop N` typed on stdin.
async fn supervise(cluster: &mut Cluster, dir: &Path, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {
                for i in 0..cluster.len() {
                    if let Some(status) = cluster.reap(i) {
                        eprintln!(
                            "raftchat local: node {n} died ({status}); log: {log}; type `restart {n}` (or run `raftchat serve --config {cfg}`)",
                            n = i + 1,
                            log = dir.join(format!("node{}.log", i + 1)).display(),
                            cfg = dir.join(format!("node{}.toml", i + 1)).display(),
                        );
                    }
                }
            }
            line = lines.next_line(), if stdin_open => {
                let Ok(Some(line)) = line else { stdin_open = false; continue };
                command(cluster, line.trim()).await;
            }
        }
    }
}

async fn command(cluster: &mut Cluster, line: &str) {
    let mut words = line.split_whitespace();
    let (verb, n) = (words.next().unwrap_or(""), words.next().and_then(|n| n.parse::<usize>().ok()));
    let i = match n {
        Some(n) if (1..=cluster.len()).contains(&n) => n - 1,
        _ if verb.is_empty() => return,
        _ => {
            eprintln!("raftchat local: commands are `restart N` and `stop N`, N in 1..={}", cluster.len());
            return;
        }
    };
    match verb {
        "restart" | "start" => {
            if cluster.is_running(i) {
                eprintln!("raftchat local: node {} is running", i + 1);
                return;
            }
            if let Err(e) = cluster.spawn(i) {
                eprintln!("raftchat local: cannot start node {}: {e:#}", i + 1);
                return;
            }
            match cluster.wait_ready(i, Duration::from_secs(60)).await {
                Ok(()) => eprintln!("raftchat local: node {} is back and ready at {}", i + 1, cluster.url(i)),
                Err(e) => eprintln!("raftchat local: {e:#}"),
            }
        }
        "stop" => match cluster.stop(i, Duration::from_secs(20)) {
            Ok(st) => eprintln!("raftchat local: node {} stopped ({st}); `restart {}` starts it again", i + 1, i + 1),
            Err(e) => eprintln!("raftchat local: node {}: {e:#}", i + 1),
        },
        _ => eprintln!("raftchat local: commands are `restart N` and `stop N`"),
    }
}
