//! `raftchat bench`: flags, then [`crate::bench::run`]; prints the table and writes the
//! JSON report and the SVG plot.

use super::client::SecretArgs;
use crate::bench::{self, Nodes, Plan, Via};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Start a local cluster of this binary (3 nodes, 8 shards unless told) in a temporary
    /// folder, and stop it afterwards.
    #[arg(long)]
    pub local: bool,
    /// With --local: number of nodes to start.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// With --local: shard count of the cluster it starts.
    #[arg(long, default_value_t = 8)]
    pub shards: u32,
    /// Without --local: a running node's HTTP URL (repeat for every node to spread the load).
    #[arg(long = "server", default_value = "http://127.0.0.1:8080")]
    pub servers: Vec<String>,
    #[command(flatten)]
    pub secret: SecretArgs,
    /// With --local: the nodes serve HTTPS/WSS and talk mutual TLS (certificates made for
    /// the run), to measure what TLS costs.
    #[arg(long)]
    pub tls: bool,
    /// With --local: a config key for every node, as in its TOML file (repeatable), to compare
    /// settings in one command, e.g. `--set peer_pipe=false` or `--set batches_in_flight=2`
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = crate::fixture::parse_set)]
    pub set: Vec<(String, toml::Value)>,
    /// Without --local: CA certificate (PEM) to trust for `https://` servers.
    #[arg(long, env = "RAFTCHAT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Without --local: data folders of the running nodes, for the disk-per-message figures.
    #[arg(long = "data-dir")]
    pub data_dirs: Vec<PathBuf>,
    /// Users, sending to each other in random pairs.
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Offered sends per second (one step).
    #[arg(long, default_value_t = 1000.0, conflicts_with = "rates")]
    pub rate: f64,
    /// A sweep: offered rates, comma-separated, one step each (e.g. 1000,4000,8000).
    #[arg(long, value_delimiter = ',')]
    pub rates: Option<Vec<f64>>,
    /// Seconds per step.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    pub text_bytes: usize,
    /// How sends reach the nodes.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// Also read 50-message history pages at this rate during every send step.
    #[arg(long)]
    pub reads: Option<f64>,
    /// Run the same steps against a 3-member cluster of this peer (only `etcd`).
    #[arg(long, value_parser = ["etcd"])]
    pub peer: Option<String>,
    /// The etcd binary (Debian: etcd-server).
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: PathBuf,
    /// Operations outstanding at most (beyond that the generator counts an error).
    #[arg(long, default_value_t = 50_000)]
    pub max_inflight: usize,
    /// JSON report.
    #[arg(long, default_value = "bench.json")]
    pub out: PathBuf,
    /// SVG plot of p99 latency against throughput.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// No progress bar (logs, CI).
    #[arg(long)]
    pub quiet: bool,
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.users >= 2, "--users must be at least 2");
    anyhow::ensure!(a.duration > 0.0, "--duration must be positive");
    let rates = a.rates.clone().unwrap_or_else(|| vec![a.rate]);
    anyhow::ensure!(rates.iter().all(|r| *r > 0.0), "rates must be positive");
    let _tmp;
    let nodes = if a.local {
        let dir = tempfile::Builder::new().prefix("raftchat-bench").tempdir_in(".")?;
        let path = dir.path().to_path_buf();
        _tmp = Some(dir);
        Nodes::Local {
            bin: std::env::current_exe()?,
            nodes: a.nodes,
            shards: a.shards,
            dir: path,
            tls: a.tls,
            set: a.set.clone(),
        }
    } else {
        _tmp = None;
        Nodes::Running {
            urls: a.servers.clone(),
            keys: a.secret.keys_for(a.servers.first().map(String::as_str))?,
            data_dirs: a.data_dirs.clone(),
            ca: a.ca_file.clone(),
        }
    };
    let etcd = match a.peer.as_deref() {
        Some("etcd") => Some(which(&a.etcd_bin).context("--peer etcd: no etcd binary (apt-get install etcd-server)")?),
        _ => None,
    };
    let plan = Plan {
        nodes,
        users: a.users,
        rates,
        seconds: a.duration,
        text_bytes: a.text_bytes,
        via: a.via,
        reads: a.reads,
        etcd,
        max_inflight: a.max_inflight,
        progress: !a.quiet,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let report = bench::run(plan).await?;
    println!("\n{}", bench::report::table(&report.steps));
    for d in &report.disk {
        println!("disk: {:<18} {:>12} bytes  {:>8.0} bytes/message", d.node, d.bytes, d.bytes_per_message);
    }
    for (system, rate) in &report.best_rate_at_p99_50ms {
        println!("highest offered rate with p99 <= 50 ms and no errors: {system} {rate:.0}/s");
    }
    if let (Some(r), Some(e)) = (report.best_rate_at_p99_50ms.get("raftchat"), report.best_rate_at_p99_50ms.get("etcd"))
    {
        println!("ratio raftchat / etcd at p99 <= 50 ms: {:.2}", r / e);
    }
    std::fs::write(&a.out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("report: {}", a.out.display());
    if let Some(p) = &a.svg {
        std::fs::write(p, bench::report::svg(&report.steps, "raftchat send→ack vs etcd put, 3 nodes, open loop"))?;
        println!("plot: {}", p.display());
    }
    Ok(())
}

fn which(bin: &std::path::Path) -> anyhow::Result<PathBuf> {
    if bin.components().count() > 1 {
        anyhow::ensure!(bin.exists(), "{} does not exist", bin.display());
        return Ok(bin.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{} not found on PATH", bin.display()))
}
