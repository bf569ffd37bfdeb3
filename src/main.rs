//! The `raftchat` binary: parse flags, set up logs, run the command.
use clap::Parser;

// glibc's malloc spent a fifth of a node's CPU under load (arena contention between the
// runtime's threads, consolidation); mimalloc is a drop-in replacement.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// openraft logs several lines per shard every time replication to an unreachable peer is
/// retried (~50 a second for one dead peer); those modules are off by default and the peer
/// layer logs one line when a peer goes and one when it comes back (`raft::network`).
const DEFAULT_LOG_FILTER: &str =
    "info,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=off,sled=warn";

fn main() -> std::process::ExitCode {
    let cli = raftchat::cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        // Colour only on a terminal: log files (`raftchat local`, systemd, the harness) stay plain text.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
    match raftchat::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftchat: {}", raftchat::cli::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
