//! The `raftchat` binary: parse flags, set up logs, run the command.
use clap::Parser;

// glibc's malloc spent a fifth of a node's CPU under load (arena contention between the
// runtime's threads, consolidation); mimalloc is a drop-in replacement.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = raftchat::cli::Cli::parse();
    raftchat::logs::init(cli.log_format == "json");
    match raftchat::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftchat: {}", raftchat::cli::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
