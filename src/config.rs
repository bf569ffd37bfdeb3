//! Node configuration: a TOML file, overridden by flags and `RAFTCHAT_*` environment
//! variables (clap handles both), checked by [`Config::validate`].
//!
//! With no file at all the defaults describe a working single-node cluster whose data lives
//! under `./raftchat-data`.

use crate::shard::NodeId;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML for raftchat: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("cannot read or create the cluster secret at {path}: {source}")]
    Secret { path: PathBuf, source: std::io::Error },
}

/// A member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddr {
    pub id: NodeId,
    /// Client gRPC address.
    pub grpc: String,
    /// HTTP address clients use.
    pub http: String,
    /// Peer address: Raft and forwarded operations, between nodes only.
    pub peer: String,
    /// The URL browsers reach this node's HTTP address at (e.g. behind a proxy), listed by
    /// `GET /v1/nodes` for clients to fail over to; default `http(s)://<http>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// Node-to-node traffic (Raft, forwarding, inbox streams); authenticated by the peer key
    /// before any request body is read. Keep it off networks clients can reach.
    pub peer_addr: SocketAddr,
    /// Fixed when the cluster is created; a node refuses to start with another value.
    pub shards: u32,
    /// Every member, this node included. Empty means a single-node cluster of this node.
    pub nodes: Vec<NodeAddr>,
    /// File holding the JWT signing secret; default `<data_dir>/secret`, created if missing.
    pub secret_file: Option<PathBuf>,
    pub max_text_bytes: usize,
    /// How long a client request may wait for leaders, forwarding and commits.
    pub request_timeout_ms: u64,
    /// Bound on every node-to-node RPC.
    pub rpc_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Take a shard snapshot after this many log entries...
    pub snapshot_every: u64,
    /// ...and keep this many entries behind it for lagging followers.
    pub keep_logs: u64,
    /// Memory budget of the 24-hour recent-message cache, split over local shards.
    pub cache_bytes: usize,
    /// sled's page cache (`cache_capacity`): with `cache_bytes` the bulk of a node's memory,
    /// whatever the size of its data or of a snapshot being installed.
    pub sled_cache_bytes: u64,
    /// Largest HTTP request body, and largest WebSocket frame a client may send.
    pub max_body_bytes: usize,
    /// WebSocket: frames queued per connection before the consumer counts as slow.
    pub ws_queue_frames: usize,
    /// WebSocket: a consumer whose queue stays full this long is closed (code 4008).
    pub ws_slow_consumer_ms: u64,
    /// WebSocket: ping interval; a connection silent for 3 intervals is closed (code 4004).
    pub ws_ping_ms: u64,
    /// WebSocket: requests one connection may have in flight; more get error `busy`.
    pub ws_max_in_flight: usize,
    /// Write path: most commands carried by one Raft log entry.
    pub max_batch: usize,
    /// Write path: log entries a shard leader keeps proposed and not yet applied.
    pub batches_in_flight: usize,
    /// Peer calls (Raft RPCs, forwarded operations) travel as frames on one long-lived
    /// stream per peer (`Peer/Pipe`) instead of one gRPC call each. `false` only to compare.
    pub peer_pipe: bool,
    /// Elections start only after a majority of the group's voters agree they have not heard
    /// from a leader (a pre-vote), so a node returning from isolation does not depose a
    /// healthy leader. `false` gives openraft's own election timer (to compare).
    pub prevote: bool,
    /// Leader balancing: every this many seconds a node gives each shard it leads back to the
    /// shard's preferred leader (its first replica) when that node answers and is caught up,
    /// one shard per round. 0 turns it off.
    pub balance_every_secs: u64,
    /// Re-replication: once a node has not answered for this long, the leader of shard 0
    /// moves each of its replicas to a live node that holds none of that shard (one at a
    /// time), so every shard is back to full strength; a node that comes back later drops
    /// the copies it lost. 0 turns it off.
    pub replace_dead_after_secs: u64,
    /// `new`: on a fresh data folder this node creates its shards' groups with the others
    /// listed in `members` (a new cluster). `existing`: it joins a running cluster and
    /// hosts nothing until `raftchat admin add-node` (or a replica move) gives it shards.
    /// Ignored once the data folder records what the node hosts.
    pub initial_cluster_state: ClusterState,
    /// Admission: new messages queued or in flight per shard before more are refused (503).
    pub shard_max_queued: usize,
    /// Admission: bytes of new messages queued or in flight per shard before more are refused.
    pub shard_max_queued_bytes: usize,
    /// Admission: most sends this node's client listeners handle at once; the actual limit
    /// adapts below it (see `admission_target_ms`).
    pub node_max_inflight_sends: usize,
    /// Admission: the send latency the node's adaptive limit aims for; sends slower than this
    /// shrink the limit, faster ones grow it.
    pub admission_target_ms: u64,
    /// The `Retry-After` given with a 503 `overloaded`, in milliseconds (rounded up to seconds
    /// in the HTTP header).
    pub overload_retry_after_ms: u64,
    /// Tokens: the longest lifetime (`exp - iat`) a token may have; longer ones are refused.
    pub max_token_ttl_secs: u64,
    /// Tokens: clock skew allowed on `exp`, `nbf` and `iat`.
    pub token_leeway_secs: u64,
    /// Sends per second one user may make on this node, sustained (token bucket; 0 = no limit).
    pub user_send_rate: u32,
    /// Sends one user may make at once above the sustained rate.
    pub user_send_burst: u32,
    /// TLS: this node's certificate chain (PEM), made by `raftchat certs`. With `tls_key_file`
    /// and `tls_ca_file`, turns on HTTPS/WSS, TLS on client gRPC and mutual TLS on the peer
    /// port.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// TLS: the cluster CA; peers must present a certificate it signed.
    pub tls_ca_file: Option<PathBuf>,
    /// TLS: certificates no longer accepted, one SHA-256 fingerprint per line
    /// (`raftchat certs --fingerprint FILE`); read at start.
    pub tls_revoked_file: Option<PathBuf>,
    /// Serve without TLS on addresses other than loopback (a node refuses to otherwise).
    pub insecure: bool,
    /// Client HTTP listener: open connections at most (WebSockets included).
    pub max_connections: usize,
    /// Client HTTP listener: open connections from one IP address at most.
    pub max_connections_per_ip: usize,
    /// Client HTTP listener: a request's headers must arrive within this.
    pub header_read_timeout_ms: u64,
    /// Client HTTP listener: a connection on which nothing moves this long is closed.
    pub idle_timeout_ms: u64,
    /// Accounts: who may sign up with a password. `open`: anyone; `invite`: with an invite
    /// from `raftchat invite`; `closed`: only operators make accounts (`raftchat add-account`).
    pub registration: Registration,
    /// Accounts: lifetime of the access tokens a login or refresh gives (seconds).
    pub access_token_ttl_secs: u64,
    /// Accounts: a session (refresh token) unused this long lapses (seconds).
    pub refresh_token_ttl_secs: u64,
    /// Accounts: failed logins allowed per user id per minute (burst the same); 0 = no limit.
    pub login_failures_per_user_per_minute: u32,
    /// Accounts: failed logins allowed per client address per minute; 0 = no limit.
    pub login_failures_per_ip_per_minute: u32,
    /// The replicated features this node may use (see `CLUSTER_VERSION`). During a rolling
    /// upgrade from a build that knows an older version, set it to that version on the new
    /// nodes, upgrade every node, then raise it (another rolling restart): a node never
    /// proposes a command the others cannot apply.
    pub cluster_version: u32,
    /// Tokens: a JWKS file (`{"keys": [...]}`) of an external issuer whose RS256/ES256
    /// tokens are accepted too (your own login system); read at start.
    pub jwks_file: Option<PathBuf>,
    /// Tokens: the `iss` an external token must carry (required with `jwks_file`).
    pub jwks_issuer: Option<String>,
    /// Tokens: the `aud` an external token must carry, if set.
    pub jwks_audience: Option<String>,
    /// Tokens: how long a node reuses a user's revocation mark before reading it again (a
    /// revocation reaches every node within this). Seconds.
    pub revocation_check_secs: u64,
    /// Retention: idempotency keys older than this are deleted; a retry of a send after it
    /// is a new message (the retry horizon). Seconds.
    pub dedup_retention_secs: u64,
    /// Retention: inbox events (the delivery backlog of devices that were away) older than
    /// this are deleted; a device away longer resumes with 4002 and resyncs. Seconds.
    pub inbox_retention_secs: u64,
    /// Retention: messages older than this (seconds; e.g. 31536000 for a year) are deleted
    /// on every replica; 0 keeps them forever.
    pub message_retention_secs: u64,
    /// Retention: how often each shard leader sweeps, in seconds.
    pub sweep_interval_secs: u64,
    /// Retention: records one sweep entry scans at most.
    pub sweep_batch: u32,
    /// Browser clients served from other origins that may call the API (CORS), e.g.
    /// `["https://chat.example.org"]`. The page every node serves at `/` needs none.
    pub cors_origins: Vec<String>,
}

/// The newest set of replicated commands this build speaks. 1: messages, indexes, read
/// markers, receipts, registration (builds before accounts); 2: accounts and sessions,
/// invites, token revocation, retention sweeps, restore (`Ingest`); 3: replica moves (a
/// node that gives a shard away records it in its write-ahead log in a way older builds
/// cannot read); 4: the replicated node table; 5: the placement lock (a peer op older builds
/// cannot parse); 6: inbox events no longer keep the inbox counter that older builds read
/// (`chat::command::UNCOUNTED_VERSION`); 7: a message within a minute of the timestamp in
/// its recency-order key leaves the key in place, which older builds would misread
/// (`chat::command::LAZY_ORDER_VERSION`).
pub const CLUSTER_VERSION: u32 = 7;

/// Whether a node with a fresh data folder starts a new cluster or joins a running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    New,
    Existing,
}

/// Who may create a password account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    Open,
    Invite,
    Closed,
}

impl Registration {
    pub fn as_str(self) -> &'static str {
        match self {
            Registration::Open => "open",
            Registration::Invite => "invite",
            Registration::Closed => "closed",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: 1,
            data_dir: PathBuf::from("raftchat-data"),
            http_addr: "127.0.0.1:8080".parse().expect("literal address"),
            grpc_addr: "127.0.0.1:7070".parse().expect("literal address"),
            peer_addr: "127.0.0.1:7071".parse().expect("literal address"),
            shards: 8,
            nodes: Vec::new(),
            secret_file: None,
            max_text_bytes: 4096,
            request_timeout_ms: 10_000,
            rpc_timeout_ms: 2_000,
            heartbeat_ms: 250,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            snapshot_every: 5_000,
            keep_logs: 1_000,
            cache_bytes: 64 << 20,
            sled_cache_bytes: 256 << 20,
            max_body_bytes: 64 << 10,
            ws_queue_frames: 256,
            ws_slow_consumer_ms: 5_000,
            ws_ping_ms: 15_000,
            ws_max_in_flight: 16,
            max_batch: 512,
            batches_in_flight: 1,
            peer_pipe: true,
            prevote: true,
            balance_every_secs: 30,
            replace_dead_after_secs: 300,
            initial_cluster_state: ClusterState::New,
            shard_max_queued: 1024,
            shard_max_queued_bytes: 4 << 20,
            node_max_inflight_sends: 4096,
            admission_target_ms: 100,
            overload_retry_after_ms: 1_000,
            max_token_ttl_secs: 30 * 86_400,
            token_leeway_secs: 60,
            user_send_rate: 20,
            user_send_burst: 100,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_revoked_file: None,
            insecure: false,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            registration: Registration::Open,
            access_token_ttl_secs: 900,
            refresh_token_ttl_secs: 30 * 86_400,
            login_failures_per_user_per_minute: 5,
            login_failures_per_ip_per_minute: 30,
            cors_origins: Vec::new(),
            cluster_version: CLUSTER_VERSION,
            jwks_file: None,
            jwks_issuer: None,
            jwks_audience: None,
            revocation_check_secs: 2,
            dedup_retention_secs: 7 * 86_400,
            inbox_retention_secs: 7 * 86_400,
            message_retention_secs: 0,
            sweep_interval_secs: 3600,
            sweep_batch: 1000,
        }
    }
}

impl Config {
    /// Inbox events are proposed without the per-user counter older builds read, and the
    /// data folder is labelled for it (`cluster_version` 6,
    /// `chat::command::UNCOUNTED_VERSION`).
    pub fn uncounted_inbox(&self) -> bool {
        self.cluster_version >= crate::chat::command::UNCOUNTED_VERSION
    }

    /// Index updates are proposed `lazy_order` (`cluster_version` 7,
    /// `chat::command::LAZY_ORDER_VERSION`).
    pub fn lazy_order(&self) -> bool {
        self.cluster_version >= crate::chat::command::LAZY_ORDER_VERSION
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    /// The member list, with this node alone when `nodes` is empty.
    pub fn members(&self) -> Vec<NodeAddr> {
        if self.nodes.is_empty() {
            vec![NodeAddr {
                id: self.node_id,
                grpc: self.grpc_addr.to_string(),
                http: self.http_addr.to_string(),
                peer: self.peer_addr.to_string(),
                public_url: None,
            }]
        } else {
            self.nodes.clone()
        }
    }

    pub fn secret_path(&self) -> PathBuf {
        self.secret_file.clone().unwrap_or_else(|| self.data_dir.join("secret"))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.peer_addr == self.grpc_addr || self.peer_addr == self.http_addr || self.grpc_addr == self.http_addr {
            return bad("http_addr, grpc_addr and peer_addr must be three different addresses".into());
        }
        let tls_set =
            [&self.tls_cert_file, &self.tls_key_file, &self.tls_ca_file].iter().filter(|f| f.is_some()).count();
        if tls_set != 0 && tls_set != 3 {
            return bad("TLS needs tls_cert_file, tls_key_file and tls_ca_file together".into());
        }
        if tls_set == 0 && !self.insecure {
            let public: Vec<String> = [self.http_addr, self.grpc_addr, self.peer_addr]
                .iter()
                .filter(|a| !a.ip().is_loopback())
                .map(|a| a.to_string())
                .collect();
            if !public.is_empty() {
                return bad(format!(
                    "refusing to serve {} without TLS: tokens, messages and the peer key would cross the network in plain text. Make certificates with `raftchat certs` and set tls_cert_file, tls_key_file and tls_ca_file, or pass --insecure (insecure = true) on a network you trust",
                    public.join(", ")
                ));
            }
        }
        if self.shards == 0 || self.shards > 4096 {
            return bad(format!("shards must be in 1..=4096, got {}", self.shards));
        }
        let members = self.members();
        if !members.iter().any(|n| n.id == self.node_id) {
            return bad(format!("node_id {} is not in the nodes list", self.node_id));
        }
        let mut ids: Vec<_> = members.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != members.len() {
            return bad("node ids in the nodes list must be unique".into());
        }
        if ids.contains(&0) {
            return bad("node id 0 is reserved; number nodes from 1".into());
        }
        if self.max_body_bytes > 16 << 20 || self.max_batch > 100_000 || self.shard_max_queued > 1 << 20 {
            return bad("max_body_bytes is limited to 16 MiB, max_batch to 100000, shard_max_queued to 1048576".into());
        }
        if self.max_text_bytes == 0 || self.max_text_bytes > 1 << 20 {
            return bad(format!("max_text_bytes must be in 1..=1048576, got {}", self.max_text_bytes));
        }
        if self.max_body_bytes < self.max_text_bytes + 1024 {
            return bad("max_body_bytes must exceed max_text_bytes by at least 1024".into());
        }
        if self.heartbeat_ms == 0 || self.election_timeout_min_ms <= self.heartbeat_ms * 2 {
            return bad("election_timeout_min_ms must be more than twice heartbeat_ms (> 0)".into());
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return bad("election_timeout_max_ms must exceed election_timeout_min_ms".into());
        }
        if self.request_timeout_ms < 100 || self.rpc_timeout_ms < 50 {
            return bad("request_timeout_ms must be >= 100 and rpc_timeout_ms >= 50".into());
        }
        if self.ws_queue_frames == 0 || self.ws_slow_consumer_ms == 0 || self.ws_ping_ms < 100 {
            return bad("ws_queue_frames and ws_slow_consumer_ms must be > 0, ws_ping_ms >= 100".into());
        }
        if self.snapshot_every == 0 {
            return bad("snapshot_every must be > 0".into());
        }
        if self.sled_cache_bytes < 1 << 20 {
            return bad(format!("sled_cache_bytes must be at least 1048576 (1 MiB), got {}", self.sled_cache_bytes));
        }
        if self.max_batch == 0 || self.batches_in_flight == 0 {
            return bad("max_batch and batches_in_flight must be > 0".into());
        }
        if self.shard_max_queued == 0 || self.node_max_inflight_sends == 0 {
            return bad("shard_max_queued and node_max_inflight_sends must be > 0".into());
        }
        if self.admission_target_ms == 0 || self.admission_target_ms > self.request_timeout_ms {
            return bad("admission_target_ms must be in 1..=request_timeout_ms".into());
        }
        const HOUR_MS: u64 = 3_600_000;
        for (name, v) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("rpc_timeout_ms", self.rpc_timeout_ms),
            ("heartbeat_ms", self.heartbeat_ms),
            ("election_timeout_max_ms", self.election_timeout_max_ms),
            ("ws_slow_consumer_ms", self.ws_slow_consumer_ms),
            ("ws_ping_ms", self.ws_ping_ms),
            ("overload_retry_after_ms", self.overload_retry_after_ms),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            // Durations are added to the current instant; bounding them keeps that from
            // overflowing.
            if v > HOUR_MS {
                return bad(format!("{name} must be at most {HOUR_MS} (one hour), got {v}"));
            }
        }
        if self.access_token_ttl_secs < 30 || self.access_token_ttl_secs > self.max_token_ttl_secs {
            return bad(format!(
                "access_token_ttl_secs must be in 30..=max_token_ttl_secs ({}), got {}",
                self.max_token_ttl_secs, self.access_token_ttl_secs
            ));
        }
        if self.refresh_token_ttl_secs < 10 || self.refresh_token_ttl_secs > 365 * 86_400 {
            return bad("refresh_token_ttl_secs must be in 10..=31536000 (a year)".into());
        }
        if !(1..=CLUSTER_VERSION).contains(&self.cluster_version) {
            return bad(format!("cluster_version must be in 1..={CLUSTER_VERSION}"));
        }
        if self.jwks_file.is_some() && self.jwks_issuer.as_deref().is_none_or(str::is_empty) {
            return bad("jwks_file needs jwks_issuer: the iss that external tokens must carry".into());
        }
        if self.revocation_check_secs == 0 || self.revocation_check_secs > 3600 {
            return bad("revocation_check_secs must be in 1..=3600".into());
        }
        const CENTURY: u64 = 100 * 365 * 86_400;
        let windows = [self.dedup_retention_secs, self.inbox_retention_secs, self.message_retention_secs];
        if self.dedup_retention_secs == 0 || self.inbox_retention_secs == 0 || windows.iter().any(|w| *w > CENTURY) {
            return bad(
                "dedup_retention_secs and inbox_retention_secs must be > 0, and retention windows at most a century"
                    .into(),
            );
        }
        if self.message_retention_secs > 0 && self.inbox_retention_secs >= self.message_retention_secs {
            // An inbox event must go before the messages it points to.
            return bad("with message_retention_secs set, inbox_retention_secs must be shorter".into());
        }
        if self.sweep_interval_secs == 0
            || self.sweep_interval_secs > 86_400
            || !(1..=100_000).contains(&self.sweep_batch)
        {
            return bad("sweep_interval_secs must be in 1..=86400 and sweep_batch in 1..=100000".into());
        }
        for o in &self.cors_origins {
            let ok = (o.starts_with("http://") || o.starts_with("https://"))
                && !o.ends_with('/')
                && o.parse::<axum::http::HeaderValue>().is_ok();
            if !ok {
                return bad(format!("cors_origins: {o:?} is not an origin like \"https://chat.example.org\""));
            }
        }
        if self.ws_max_in_flight == 0 || self.ws_max_in_flight > 1024 {
            return bad("ws_max_in_flight must be in 1..=1024".into());
        }
        if self.max_connections == 0 || self.max_connections_per_ip == 0 {
            return bad("max_connections and max_connections_per_ip must be > 0".into());
        }
        if self.header_read_timeout_ms < 100 || self.idle_timeout_ms < 1_000 {
            return bad("header_read_timeout_ms must be >= 100 and idle_timeout_ms >= 1000".into());
        }
        if self.idle_timeout_ms <= self.request_timeout_ms || self.idle_timeout_ms <= self.ws_ping_ms {
            return bad("idle_timeout_ms must exceed request_timeout_ms and ws_ping_ms (a waiting request or a pinged WebSocket is not idle)".into());
        }
        if self.max_token_ttl_secs == 0 || self.max_token_ttl_secs > 366 * 86_400 {
            return bad("max_token_ttl_secs must be in 1..=31622400 (a year)".into());
        }
        if self.token_leeway_secs > 3_600 {
            return bad("token_leeway_secs must be at most 3600".into());
        }
        if self.user_send_rate > 0 && self.user_send_burst == 0 {
            return bad("user_send_burst must be > 0 when user_send_rate is set".into());
        }
        if self.shard_max_queued_bytes < 2 * self.max_body_bytes {
            return bad("shard_max_queued_bytes must be at least twice max_body_bytes".into());
        }
        Ok(())
    }

    /// Reads the cluster secret, creating a random one (mode 0600) if the file is missing.
    pub fn load_or_create_secret(&self) -> Result<Vec<u8>, ConfigError> {
        if let Some(s) = secret_from_env() {
            return Ok(s);
        }
        let path = self.secret_path();
        let err = |source| ConfigError::Secret { path: path.clone(), source };
        match read_secret_file(&path) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(err)?;
                }
                let secret = crate::auth::random_secret();
                match write_private(&path, secret.as_bytes()) {
                    Ok(()) => Ok(secret.into_bytes()),
                    // Another node sharing the file created it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self.load_secret(),
                    Err(e) => Err(err(e)),
                }
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Reads the cluster secret without creating it.
    pub fn load_secret(&self) -> Result<Vec<u8>, ConfigError> {
        if let Some(s) = secret_from_env() {
            return Ok(s);
        }
        let path = self.secret_path();
        read_secret_file(&path).map_err(|source| ConfigError::Secret { path, source })
    }
}

/// `RAFTCHAT_SECRET`, when set and non-empty (it overrides every secret file).
pub fn secret_from_env() -> Option<Vec<u8>> {
    std::env::var("RAFTCHAT_SECRET").ok().filter(|s| !s.is_empty()).map(String::into_bytes)
}

/// A secret file's contents without surrounding whitespace; an empty file is an error.
pub fn read_secret_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let s = std::fs::read_to_string(path)?;
    let s = s.trim();
    if s.is_empty() {
        return Err(std::io::Error::other("secret file is empty"));
    }
    Ok(s.as_bytes().to_vec())
}

/// Creates `path` readable by its owner only (mode 0600) and writes `bytes`, synced.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_a_valid_single_node_cluster() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.members().len(), 1);
        assert_eq!(c.shards, 8);
    }

    #[test]
    fn shipped_cluster_configs_are_valid_and_agree() {
        let files = [
            include_str!("../cluster/node1.toml"),
            include_str!("../cluster/node2.toml"),
            include_str!("../cluster/node3.toml"),
        ];
        let cfgs: Vec<Config> = files.iter().map(|f| toml::from_str(f).unwrap()).collect();
        for (i, c) in cfgs.iter().enumerate() {
            c.validate().unwrap();
            assert_eq!(c.node_id, i as u64 + 1);
            assert_eq!(c.nodes, cfgs[0].nodes);
            assert_eq!(c.secret_file, cfgs[0].secret_file);
            assert_eq!(c.shards, 8);
        }
    }

    #[test]
    fn file_parses_and_unknown_keys_are_rejected() {
        let ok: Config = toml::from_str(
            "node_id = 2\nshards = 16\n[[nodes]]\nid = 2\ngrpc = \"127.0.0.1:1\"\nhttp = \"127.0.0.1:2\"\npeer = \"127.0.0.1:3\"\n",
        )
        .unwrap();
        ok.validate().unwrap();
        assert!(toml::from_str::<Config>("shard = 3").is_err());
        let mut c = Config { shards: 0, ..Config::default() };
        assert!(c.validate().is_err());
        c.shards = 8;
        c.node_id = 9;
        c.nodes = ok.nodes.clone();
        assert!(c.validate().unwrap_err().to_string().contains("node_id 9"));
        let tiny = Config { sled_cache_bytes: 4096, ..Config::default() };
        assert!(tiny.validate().unwrap_err().to_string().contains("sled_cache_bytes"));
        let set: Config = toml::from_str("sled_cache_bytes = 67108864").unwrap();
        assert_eq!(set.sled_cache_bytes, 64 << 20);
    }
}
