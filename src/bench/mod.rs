//! `raftchat bench`: the one load tool, as operators know `nats bench` and
//! `etcdctl check perf`.
//!
//! - [`load`]: the open-loop generator (fixed offered rate, latency from each operation's
//!   intended start, HDR histograms, a progress bar).
//! - [`targets`]: what it drives: raftchat sends over HTTP or WebSockets, history reads,
//!   and etcd puts.
//! - [`etcd`]: the peer, a 3-member etcd started from the `etcd` binary.
//! - [`report`]: the table, the JSON file and the SVG plot.
//!
//! A run: start a local cluster (`--local`) or use running nodes (`--server`), register N
//! users, then for each offered rate run a step of sends between random pairs of them
//! (optionally with history reads alongside); then, with `--peer etcd`, the same steps
//! against etcd. Nothing here asserts a speed: it measures and reports.

pub mod etcd;
pub mod load;
pub mod report;
pub mod targets;

use crate::auth::Keys;
use crate::chat::UserId;
use crate::fixture::{Cluster, Spec};
use anyhow::Context;
use load::{open_loop, StepSummary};
use report::{DiskUsage, Report};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use targets::{Http, Users, Ws};

/// How sends reach raftchat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    Http,
    Ws,
}

/// Where the nodes come from.
pub enum Nodes {
    /// Start `nodes` processes of `bin` with `shards` shards under `dir`.
    /// With `tls`, the nodes serve HTTPS/WSS and talk mutual TLS (`raftchat certs` material
    /// made under `dir`).
    Local { bin: PathBuf, nodes: usize, shards: u32, dir: PathBuf, tls: bool, set: Vec<(String, toml::Value)> },
    /// Use running nodes; tokens are minted with the cluster's keys; `ca` is trusted for
    /// `https://` / `wss://`.
    Running { urls: Vec<String>, keys: Keys, data_dirs: Vec<PathBuf>, ca: Option<PathBuf> },
}

pub struct Plan {
    pub nodes: Nodes,
    pub users: usize,
    pub rates: Vec<f64>,
    pub seconds: f64,
    pub text_bytes: usize,
    pub via: Via,
    /// History reads per second run alongside each send step (50-message pages).
    pub reads: Option<f64>,
    /// Also run every step against a 3-member etcd started from this binary.
    pub etcd: Option<PathBuf>,
    pub max_inflight: usize,
    pub progress: bool,
    pub command: String,
}

const READ_PAIRS: usize = 20;
const PAGE: u32 = 50;

/// Sum of the sizes of the files under `dir`.
pub fn disk_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

async fn register(http: &reqwest::Client, url: &str, admin: &str, names: &[String]) -> anyhow::Result<()> {
    for chunk in names.chunks(32) {
        let calls = chunk.iter().map(|n| async move {
            let r = http
                .post(format!("{url}/v1/users"))
                .bearer_auth(admin)
                .json(&serde_json::json!({ "user": n }))
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "registering {n}: {} {}", r.status(), r.text().await?);
            Ok(())
        });
        for r in futures::future::join_all(calls).await {
            r?;
        }
    }
    Ok(())
}

/// Runs the plan and returns its report (also printed by the caller).
pub async fn run(plan: Plan) -> anyhow::Result<Report> {
    let started_at = chrono_like_now();
    let run_id = rand::random::<u64>() >> 16;
    let mut steps: Vec<StepSummary> = Vec::new();
    let mut disk = Vec::new();

    // raftchat
    let (cluster, urls, keys, data_dirs, ca) = match &plan.nodes {
        Nodes::Local { bin, nodes, shards, dir, tls, set } => {
            let mut spec =
                Spec { shards: *shards, tls: *tls, set: set.clone(), share_cores: true, ..Spec::new(*nodes, dir) };
            // Load generation is not a person typing: no per-user send limit, and every
            // connection comes from one address.
            spec.base = |c| {
                c.user_send_rate = 0;
                c.max_connections_per_ip = c.max_connections;
            };
            let cluster = Cluster::start(bin, &spec).context("starting the local cluster")?;
            cluster.wait_all_ready(Duration::from_secs(90)).await?;
            let urls = (0..cluster.len()).map(|i| cluster.url(i)).collect::<Vec<_>>();
            let keys = cluster.keys().clone();
            let dirs = cluster.configs.iter().map(|c| c.data_dir.clone()).collect();
            let ca = cluster.configs[0].tls_ca_file.clone();
            (Some(cluster), urls, keys, dirs, ca)
        }
        Nodes::Running { urls, keys, data_dirs, ca } => {
            (None, urls.clone(), keys.clone(), data_dirs.clone(), ca.clone())
        }
    };
    let http = reqwest::Client::builder().pool_max_idle_per_host(4096).tcp_nodelay(true);
    let http = crate::tls::trust_ca(http, ca.as_deref())?.build()?;
    let names: Vec<String> = (0..plan.users).map(|i| format!("bench{i}")).collect();
    let admin = keys.mint(&UserId::parse("operator")?, 3600, true);
    register(&http, &urls[0], &admin, &names).await?;
    let tokens =
        names.iter().map(|n| Ok(keys.mint(&UserId::parse(n)?, 6 * 3600, false))).collect::<anyhow::Result<_>>()?;
    let users = Arc::new(Users { names, tokens });
    let target = Arc::new(Http {
        client: http.clone(),
        urls: urls.clone(),
        users: users.clone(),
        run_id,
        text_bytes: plan.text_bytes,
    });
    let ws = match plan.via {
        Via::Ws => Some(Arc::new(Ws::connect(&urls, users.clone(), run_id, plan.text_bytes, ca.as_deref()).await?)),
        Via::Http => None,
    };
    let before: u64 = data_dirs.iter().map(|d| disk_bytes(d)).sum();
    let mut acked = 0u64;

    // Conversations with more than a page of history, for the read steps.
    let read_pairs: Arc<Vec<(usize, usize)>> =
        Arc::new((0..READ_PAIRS.min(plan.users / 2)).map(|k| (2 * k, 2 * k + 1)).collect());
    if plan.reads.is_some() {
        let seeds = read_pairs.iter().map(|&(a, b)| {
            let (http, urls, users) = (http.clone(), urls.clone(), users.clone());
            async move {
                for m in 0..(PAGE as usize + 10) {
                    let r = http
                        .post(format!("{}/v1/messages", urls[m % urls.len()]))
                        .bearer_auth(&users.tokens[a])
                        .json(&serde_json::json!({"to": users.names[b], "client_msg_id": format!("seed{run_id:x}-{m}"), "text": targets::text(m as u64, 100)}))
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "seeding history: {}", r.status());
                }
                Ok(())
            }
        });
        for r in futures::future::join_all(seeds).await {
            r?;
        }
        acked += (read_pairs.len() * (PAGE as usize + 10)) as u64;
    }

    let drain = Duration::from_secs(15);
    for &rate in &plan.rates {
        let label = match plan.via {
            Via::Http => "send",
            Via::Ws => "send-ws",
        };
        let sends = {
            let (t, ws) = (target.clone(), ws.clone());
            open_loop(("raftchat", label), rate, plan.seconds, plan.max_inflight, drain, plan.progress, move |i| {
                let (t, ws) = (t.clone(), ws.clone());
                async move {
                    match ws {
                        Some(ws) => ws.send(i).await,
                        None => t.send(i).await,
                    }
                }
            })
        };
        let reads = plan.reads.map(|r| {
            let (t, pairs) = (target.clone(), read_pairs.clone());
            open_loop(("raftchat", "history"), r, plan.seconds, plan.max_inflight, drain, false, move |i| {
                let (t, pairs) = (t.clone(), pairs.clone());
                async move { t.history(i, &pairs, PAGE).await }
            })
        });
        let (s, r) = match reads {
            Some(reads) => {
                let (s, r) = tokio::join!(sends, reads);
                (s, Some(r))
            }
            None => (sends.await, None),
        };
        acked += s.ok;
        let sum = s.summary();
        eprintln!("{}", report::table(std::slice::from_ref(&sum)).lines().nth(1).unwrap_or_default());
        steps.push(sum);
        if let Some(r) = r {
            steps.push(r.summary());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Let the nodes flush and the outbox settle before measuring the disk.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, d) in data_dirs.iter().enumerate() {
        let bytes = disk_bytes(d);
        disk.push(DiskUsage {
            node: format!("raftchat node {}", i + 1),
            bytes,
            bytes_per_message: bytes as f64 / acked.max(1) as f64,
        });
    }
    if before > 0 {
        eprintln!("(data folders held {before} bytes before the run; per-message figures include them)");
    }
    drop(ws);
    drop(cluster);

    // etcd, the same steps.
    if let Some(bin) = &plan.etcd {
        let dir = tempfile::tempdir()?;
        let etcd = etcd::EtcdCluster::start(bin, dir.path(), 3).await?;
        let kv = Arc::new(targets::Etcd { clients: etcd.clients().await?, value_bytes: plan.text_bytes });
        let mut puts = 0u64;
        for &rate in &plan.rates {
            let kv2 = kv.clone();
            let s = open_loop(("etcd", "put"), rate, plan.seconds, plan.max_inflight, drain, plan.progress, move |i| {
                let kv = kv2.clone();
                async move { kv.put(i).await }
            })
            .await;
            puts += s.ok;
            let sum = s.summary();
            eprintln!("{}", report::table(std::slice::from_ref(&sum)).lines().nth(1).unwrap_or_default());
            steps.push(sum);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        for (i, d) in etcd.data_dirs.iter().enumerate() {
            let bytes = disk_bytes(d);
            disk.push(DiskUsage {
                node: format!("etcd member {}", i + 1),
                bytes,
                bytes_per_message: bytes as f64 / puts.max(1) as f64,
            });
        }
    }

    Ok(Report {
        started_at,
        machine: machine(),
        command: plan.command,
        best_rate_at_p99_50ms: report::best_rates(&steps, 50.0),
        steps,
        disk,
    })
}

fn chrono_like_now() -> String {
    let out = std::process::Command::new("date").arg("-u").arg("+%Y-%m-%dT%H:%M:%SZ").output();
    out.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}")
}
