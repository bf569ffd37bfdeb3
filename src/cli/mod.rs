//! The `raftchat` command line: `serve` (one node), `local` (a 3-node cluster on loopback
//! in one step) and client commands that talk to a node's HTTP API.

mod admin;
mod bench;
mod certs;
mod chat;
mod client;
mod local;
mod placement;

use crate::config::Config;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "raftchat", version, about = "A strongly consistent, sharded 1:1 chat cluster")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as `text` (default) or `json` (one object per line, for log shippers).
    /// The level comes from RUST_LOG (default: info, with openraft's and sled's
    /// chatter trimmed; see docs/operations.md).
    #[arg(long, global = true, env = "RAFTCHAT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one node. With no config at all: a single-node cluster with data in ./raftchat-data.
    Serve(ServeArgs),
    /// Start a local cluster (3 nodes on loopback by default) in one step; Ctrl-C stops it.
    Local(local::LocalArgs),
    /// Mint a bearer token for a user (needs the cluster secret).
    Token(client::TokenArgs),
    /// Send a message.
    Send(client::SendArgs),
    /// Page through a conversation's history.
    History(client::HistoryArgs),
    /// List a user's recent conversations, most recent first.
    Conversations(client::ConversationsArgs),
    /// Move a user's read marker in a conversation.
    MarkRead(client::MarkReadArgs),
    /// Register a user so others can message them (operator token minted from the secret).
    AddUser(client::AddUserArgs),
    /// Make a password account for a user (operator; works whatever the registration policy).
    AddAccount(client::AddAccountArgs),
    /// Make a single-use sign-up invite (operator; for `registration = "invite"`).
    Invite(client::InviteArgs),
    /// Chat interactively over the WebSocket: history, live messages, receipts.
    Chat(chat::ChatArgs),
    /// Open-loop load: sends (and reads) at fixed rates, latency percentiles, an etcd peer.
    Bench(bench::BenchArgs),
    /// Make a cluster CA and node certificates for TLS; print a certificate's fingerprint.
    Certs(certs::CertsArgs),
    /// Operator views of a running cluster: `status` (nodes, shards, leaders, lag), `members`.
    Admin(admin::AdminArgs),
}

/// Flags of `serve`; each also reads `RAFTCHAT_<NAME>` from the environment and overrides
/// the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see cluster/node1.toml).
    #[arg(long, short, env = "RAFTCHAT_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id; must be one of the config's [[nodes]].
    #[arg(long, env = "RAFTCHAT_NODE_ID")]
    pub node_id: Option<u64>,
    /// Folder for the node's sled data and write-ahead log (default ./raftchat-data).
    #[arg(long, env = "RAFTCHAT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client HTTP/WebSocket address, also /metrics and health (default 127.0.0.1:8080).
    #[arg(long, env = "RAFTCHAT_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Client gRPC address (default 127.0.0.1:7070).
    #[arg(long, env = "RAFTCHAT_GRPC_ADDR")]
    pub grpc_addr: Option<std::net::SocketAddr>,
    /// Node-to-node address (Raft and forwarding).
    #[arg(long, env = "RAFTCHAT_PEER_ADDR")]
    pub peer_addr: Option<std::net::SocketAddr>,
    /// Shard count; fixed when the cluster is created.
    #[arg(long, env = "RAFTCHAT_SHARDS")]
    pub shards: Option<u32>,
    /// File with the cluster secret that signs tokens (made, mode 0600, if missing).
    #[arg(long, env = "RAFTCHAT_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Snapshot a shard after this many applied log entries.
    #[arg(long, env = "RAFTCHAT_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Log entries kept behind a snapshot for slow followers.
    #[arg(long, env = "RAFTCHAT_KEEP_LOGS")]
    pub keep_logs: Option<u64>,
    /// Largest message text accepted, in bytes of UTF-8.
    #[arg(long, env = "RAFTCHAT_MAX_TEXT_BYTES")]
    pub max_text_bytes: Option<usize>,
    /// Serve without TLS on addresses other than loopback.
    #[arg(long)]
    pub insecure: bool,
}

impl ServeArgs {
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(node_id, data_dir, http_addr, grpc_addr, peer_addr, shards, snapshot_every, keep_logs, max_text_bytes);
        if self.secret_file.is_some() {
            c.secret_file = self.secret_file.clone();
        }
        c.insecure |= self.insecure;
        c.validate()?;
        Ok(c)
    }
}

/// An error and its causes on one line, `a: b: c`, leaving out a cause whose text its
/// parent already ends with (errors that print their source, as most `thiserror` types here
/// do, would otherwise show it twice).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Resolves when the process gets SIGINT (Ctrl-C) or SIGTERM. The handlers are installed
/// when this is called, not when the future is first polled, so a signal that arrives while
/// a node is still starting is not lost (nor kills it without a clean stop). Must be called
/// inside the runtime.
pub fn terminated() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(cause = %e, "cannot install signal handlers; only Ctrl-C stops the node");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Worker threads of the process's runtime (tokio's own variable; default one per core).
pub const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// The worker-thread count `TOKIO_WORKER_THREADS` asks for, checked here so that a bad
/// value is a clear error instead of a panic inside tokio.
fn worker_threads() -> anyhow::Result<Option<usize>> {
    let Some(v) = std::env::var_os(WORKER_THREADS_ENV) else { return Ok(None) };
    match v.to_str().and_then(|s| s.trim().parse::<usize>().ok()) {
        Some(n @ 1..=1024) => Ok(Some(n)),
        _ => anyhow::bail!("{WORKER_THREADS_ENV}={v:?}: expected a whole number of threads from 1 to 1024"),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads()? {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(a) => {
                let cfg = a.load()?;
                crate::server::run(cfg, terminated()).await?;
                Ok(())
            }
            Command::Local(a) => local::run(a).await,
            Command::Token(a) => client::token(a),
            Command::Send(a) => client::send(a).await,
            Command::History(a) => client::history(a).await,
            Command::Conversations(a) => client::conversations(a).await,
            Command::MarkRead(a) => client::mark_read(a).await,
            Command::AddUser(a) => client::add_user(a).await,
            Command::AddAccount(a) => client::add_account(a).await,
            Command::Invite(a) => client::invite(a).await,
            Command::Chat(a) => chat::run(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Certs(a) => certs::run(a),
            Command::Admin(a) => admin::run(a).await,
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_printed_by_its_parent_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use (os error 98)");
        let e = anyhow::Error::new(crate::server::NodeError::Bind { addr: "127.0.0.1:1".parse().unwrap(), source: io })
            .context("starting node 1");
        assert_eq!(
            super::error_chain(&e),
            "starting node 1: cannot listen on 127.0.0.1:1: Address already in use (os error 98)"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_chain(&plain), "outer: inner");
    }
}
