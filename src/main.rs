//! The `raftchat` binary: parse flags, set up logs, run the command.
use clap::Parser;

// glibc's malloc spent a fifth of a node's CPU under load (arena contention between the
// runtime's threads, consolidation); mimalloc is a drop-in replacement.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = raftchat::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,sled=warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files (`raftchat local`, systemd, the harness) stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match raftchat::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftchat: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
