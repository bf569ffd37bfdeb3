//! `cargo run -p jepsen -- test ...`: run the consistency harness; `check <run folder>`:
//! re-check a recorded history. Exit status: 0 valid, 1 anomalies found, 2 error.
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "jepsen", about = "raftchat's Jepsen-style consistency harness (needs root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a test: nodes in network namespaces, clients, faults, then check.
    Test {
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Seconds of load under faults (then heal, quiet, final reads).
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Comma-separated fault families: partition, isolate, kill, pause, clock, restart, power, power-all, upgrade (or "none").
        #[arg(long, default_value = "partition,kill,pause,clock")]
        nemesis: String,
        /// Target operations per second over all workers.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        concurrency: usize,
        #[arg(long, default_value_t = 5)]
        users: usize,
        #[arg(long, default_value_t = 8)]
        shards: u32,
        /// Seconds without faults before the final reads.
        #[arg(long, default_value_t = 10)]
        quiet: u64,
        /// A config key for every node, as in its TOML file (repeatable), e.g. `--set
        /// prevote=false` to compare a setting under the same faults.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = raftchat::fixture::parse_set)]
        set: Vec<(String, toml::Value)>,
        /// The raftchat binary under test.
        #[arg(long, default_value = "target/release/raftchat")]
        bin: PathBuf,
        /// An older raftchat build: nodes 1, 3, 5... start on it, the others on --bin, and the
        /// `upgrade` nemesis moves one node at a time to the other build (a rolling upgrade,
        /// and back). Needed by `upgrade`.
        #[arg(long)]
        old_bin: Option<PathBuf>,
        /// Run folder (default: jepsen/store/<timestamp>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Re-check a run folder's history.jsonl (or a history file).
    Check { path: PathBuf },
    /// Mount a lazy filesystem by hand: MOUNT shows BACKING, writes stay in memory until
    /// fsynced; SIGUSR1 drops every unsynced write (a power loss), Ctrl-C unmounts.
    Lazyfs {
        #[arg(long)]
        backing: PathBuf,
        #[arg(long)]
        mount: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jepsen: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Test { nodes, time, nemesis, rate, concurrency, users, shards, quiet, set, bin, old_bin, out } => {
                anyhow::ensure!((3..=9).contains(&nodes), "--nodes must be in 3..=9");
                anyhow::ensure!(users >= 2, "--users must be at least 2");
                let nemesis: Vec<String> = nemesis
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && *s != "none")
                    .map(String::from)
                    .collect();
                anyhow::ensure!(
                    !(nemesis.iter().any(|n| n == "membership") && nemesis.iter().any(|n| n == "upgrade")),
                    "--nemesis membership and upgrade do not mix: builds before cluster version 3 cannot move replicas"
                );
                let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
                let out = out.unwrap_or_else(|| PathBuf::from(format!("jepsen/store/run-{stamp}")));
                let o = jepsen::run::Opts {
                    nodes,
                    time,
                    nemesis,
                    rate,
                    concurrency,
                    users,
                    shards,
                    quiet,
                    set,
                    bin,
                    old_bin,
                    out,
                };
                Ok(jepsen::run::run(o).await?.valid)
            }
            Cmd::Lazyfs { backing, mount } => {
                let m = jepsen::lazyfs::LazyFs::mount(&backing, &mount)?;
                eprintln!("lazyfs: {} mounted from {}; kill -USR1 {} drops unsynced writes, Ctrl-C unmounts", mount.display(), backing.display(), std::process::id());
                let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
                loop {
                    tokio::select! {
                        _ = usr1.recv() => eprintln!("lazyfs: power loss, {} unsynced bytes dropped", m.fs.power_loss()),
                        _ = tokio::signal::ctrl_c() => break,
                    }
                }
                drop(m);
                Ok(true)
            }
            Cmd::Check { path } => {
                let file = if path.is_dir() { path.join("history.jsonl") } else { path };
                let ops = jepsen::history::read_jsonl(&std::fs::read_to_string(&file)?)?;
                let v = jepsen::checker::check(&ops);
                println!("{}", serde_json::to_string_pretty(&v)?);
                Ok(v.valid)
            }
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("jepsen: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
