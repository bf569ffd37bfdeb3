//! Prometheus metrics of a node. Per-shard Raft gauges are refreshed at scrape time from
//! openraft's metrics; latencies are histograms observed where the work happens. Every
//! metric is exported from start-up: counters with labels are created at zero for every
//! label value the code uses (`Metrics::new`), so a dashboard or an alert on `rate(...)`
//! works before the first event. The process collector (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, ...) lives in a registry of its own
//! because those names carry no `raftchat_` prefix.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `process_*` (no prefix): CPU, memory, file descriptors of this process.
    pub process: Registry,
    pub fsync_seconds: Histogram,
    pub fsync_batch: Histogram,
    /// Write-ahead log rounds that ended in `fdatasync` (the others carried lazy records only).
    pub fsync_rounds: prometheus::IntCounter,
    pub sled_sync_seconds: Histogram,
    pub proposal_batch: Histogram,
    pub shed: IntCounterVec,
    pub admission_limit: prometheus::IntGauge,
    pub admission_inflight: prometheus::IntGauge,
    pub proposal_seconds: HistogramVec,
    pub send_seconds: Histogram,
    pub requests: IntCounterVec,
    pub forwards: IntCounterVec,
    pub peer_calls: IntCounterVec,
    pub prevotes: IntCounterVec,
    pub leader_transfers: IntCounterVec,
    pub joint_configs_finished: prometheus::IntCounter,
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub shard_leader: IntGaugeVec,
    pub shard_term: IntGaugeVec,
    pub shard_commit: IntGaugeVec,
    pub shard_applied: IntGaugeVec,
    pub shard_last_log: IntGaugeVec,
    pub shard_snapshot: IntGaugeVec,
    pub shard_snapshot_bytes: IntGaugeVec,
    pub outbox_redriven: IntCounterVec,
    pub ws_connections: prometheus::IntGauge,
    /// Open connections on the client HTTP listener (WebSockets included).
    pub http_connections: prometheus::IntGauge,
    /// Request tasks WebSocket sessions hold (running, or finished and not yet collected).
    pub ws_request_tasks: prometheus::IntGauge,
    pub ws_pushes: prometheus::IntCounter,
    pub ws_resumes: prometheus::IntCounter,
    pub ws_slow_closes: prometheus::IntCounter,
    pub ws_push_lag_seconds: Histogram,
    pub build_info: IntGaugeVec,
    /// On a shard's leader: log entries each follower is behind.
    pub replication_lag: IntGaugeVec,
    /// The data folder's size by part (`wal`, `db`).
    pub disk_bytes: IntGaugeVec,
    /// Records deleted by retention sweeps, by kind.
    pub swept: IntCounterVec,
}

/// Client operations, as counted in `raftchat_requests_total{via,op,code}`.
pub const OPS: &[&str] = &[
    "send",
    "history",
    "conversations",
    "mark_read",
    "ack",
    "register",
    "lookup_user",
    "signup",
    "login",
    "refresh",
    "logout",
    "password",
    "invite",
    "nodes",
    "revoke_tokens",
    "backup",
    "restore",
    "transfer_leader",
    "move_replica",
    "remove_node",
    "placement_lock",
];
/// Bounds named in `raftchat_shed_total{bound}`.
pub const SHED_BOUNDS: &[&str] = &["node", "shard", "user_rate", "connections", "connections_per_ip"];
/// Outcomes named in `raftchat_forwards_total{result}`.
pub const FORWARD_RESULTS: &[&str] = &["ok", "peer_stopped", "transport_error", "timeout"];

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A shard left this node (a replica move): its per-shard gauges go rather than keep
    /// their last values.
    pub fn forget_shard(&self, shard: u32) {
        let s = shard.to_string();
        for g in [
            &self.shard_leader,
            &self.shard_term,
            &self.shard_commit,
            &self.shard_applied,
            &self.shard_last_log,
            &self.shard_snapshot,
            &self.shard_snapshot_bytes,
        ] {
            let _ = g.remove_label_values(&[&s]);
        }
        // Lag series are labelled (shard, follower); drop every one of this shard.
        let families = prometheus::core::Collector::collect(&self.replication_lag);
        for f in families {
            for m in f.get_metric() {
                let labels: Vec<&str> = m.get_label().iter().map(|l| l.value()).collect();
                if labels.first() == Some(&s.as_str()) {
                    let _ = self.replication_lag.remove_label_values(&labels);
                }
            }
        }
    }

    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("raftchat".into()), None).expect("valid prefix");
        let h = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())).expect("valid")
        };
        let shard_gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["shard"]).expect("valid");
        let m = Self {
            fsync_seconds: h(
                "fsync_seconds",
                "Write-ahead log group commit: one write and fdatasync covering every queued record",
            ),
            fsync_rounds: prometheus::IntCounter::new(
                "wal_fsyncs_total",
                "Write-ahead log rounds that ended in fdatasync (rounds of commit marks only are not synced)",
            )
            .expect("valid"),
            fsync_batch: Histogram::with_opts(
                HistogramOpts::new(
                    "fsync_batch_size",
                    "Records (appends, votes, commit marks) covered by one write-ahead log fdatasync",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            )
            .expect("valid"),
            sled_sync_seconds: h(
                "sled_sync_seconds",
                "State-machine checkpoint latency: sled flush plus fdatasync (before purges, after snapshots)",
            ),
            proposal_batch: Histogram::with_opts(
                HistogramOpts::new("proposal_batch_size", "Commands carried by one proposed Raft log entry")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
            )
            .expect("valid"),
            admission_limit: prometheus::IntGauge::new(
                "admission_limit",
                "The node's current adaptive limit on client sends in flight",
            )
            .expect("valid"),
            admission_inflight: prometheus::IntGauge::new("admission_inflight", "Client sends in flight on this node")
                .expect("valid"),
            shed: IntCounterVec::new(
                Opts::new("shed_total", "Sends refused with 503 overloaded, by the bound that was reached"),
                &["bound"],
            )
            .expect("valid"),
            proposal_seconds: HistogramVec::new(
                HistogramOpts::new("proposal_seconds", "Raft proposal latency until applied, by command kind")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["kind"],
            )
            .expect("valid"),
            send_seconds: h(
                "send_seconds",
                "End-to-end send latency on the coordinating leader (message + both index updates)",
            ),
            requests: IntCounterVec::new(
                Opts::new(
                    "requests_total",
                    "Client API requests by transport (http, ws, grpc), operation and outcome (ok or the error code)",
                ),
                &["via", "op", "code"],
            )
            .expect("valid"),
            forwards: IntCounterVec::new(
                Opts::new("forwards_total", "Shard operations forwarded to another node, by outcome"),
                &["result"],
            )
            .expect("valid"),
            peer_calls: IntCounterVec::new(
                Opts::new(
                    "peer_calls_total",
                    "Calls to other nodes (Raft RPCs and forwarded operations) by transport: `pipe` (frames on the peer stream) or `unary` (one gRPC call each: pipes off, or an older peer)",
                ),
                &["transport", "kind"],
            )
            .expect("valid"),
            leader_transfers: IntCounterVec::new(
                Opts::new(
                    "leader_transfers_total",
                    "Leadership transfers this node made as a shard's leader (admin transfer-leader, leader balancing): `ok` or `failed`",
                ),
                &["result"],
            )
            .expect("valid"),
            joint_configs_finished: prometheus::IntCounter::new(
                "joint_configs_finished_total",
                "Voter changes this node finished as a shard's leader after they were cut short between their two steps (a committed joint config)",
            )
            .expect("valid"),
            prevotes: IntCounterVec::new(
                Opts::new(
                    "prevotes_total",
                    "Pre-votes this node held for its groups: `won` (a majority agreed the leader is gone; an election follows) or `lost`",
                ),
                &["result"],
            )
            .expect("valid"),
            cache_hits: IntCounterVec::new(
                Opts::new("cache_hits_total", "History pages served from the 24h cache"),
                &["shard"],
            )
            .expect("valid"),
            cache_misses: IntCounterVec::new(
                Opts::new("cache_misses_total", "History pages read from sled"),
                &["shard"],
            )
            .expect("valid"),
            shard_leader: shard_gauge("shard_is_leader", "1 if this node leads the shard"),
            shard_term: shard_gauge("shard_term", "Current Raft term of the shard on this node"),
            shard_commit: shard_gauge("shard_commit_index", "Committed log index of the shard on this node"),
            shard_applied: shard_gauge("shard_applied_index", "Applied log index of the shard on this node"),
            shard_last_log: shard_gauge("shard_last_log_index", "Last log index of the shard on this node"),
            shard_snapshot: shard_gauge("shard_snapshot_index", "Last snapshot index of the shard on this node"),
            shard_snapshot_bytes: shard_gauge(
                "shard_snapshot_bytes",
                "Bytes of the shard's snapshot files on this node: its whole state as of its last snapshot (the live state shares one sled database and write-ahead log with the node's other shards)",
            ),
            outbox_redriven: IntCounterVec::new(
                Opts::new(
                    "outbox_redriven_total",
                    "Index updates re-driven from the outbox after a coordinator failure",
                ),
                &["shard"],
            )
            .expect("valid"),
            ws_connections: prometheus::IntGauge::new("ws_connections", "Open WebSocket connections").expect("valid"),
            http_connections: prometheus::IntGauge::new(
                "http_connections",
                "Open connections on the client HTTP listener (WebSockets included)",
            )
            .expect("valid"),
            ws_request_tasks: prometheus::IntGauge::new(
                "ws_request_tasks",
                "Request tasks held by WebSocket sessions (in flight or finished and not yet collected)",
            )
            .expect("valid"),
            ws_pushes: prometheus::IntCounter::new("ws_pushes_total", "Messages and receipts pushed over WebSockets")
                .expect("valid"),
            ws_resumes: prometheus::IntCounter::new("ws_resumes_total", "WebSocket connections resumed from a cursor")
                .expect("valid"),
            ws_slow_closes: prometheus::IntCounter::new(
                "ws_slow_consumer_closes_total",
                "WebSocket connections closed because the client fell too far behind (4008)",
            )
            .expect("valid"),
            ws_push_lag_seconds: h(
                "ws_push_lag_seconds",
                "Time from a message's commit timestamp to its push on this node's WebSocket",
            ),
            build_info: IntGaugeVec::new(
                Opts::new("build_info", "Always 1; labels name the build (version, git commit)"),
                &["version", "commit"],
            )
            .expect("valid"),
            replication_lag: IntGaugeVec::new(
                Opts::new(
                    "replication_lag_entries",
                    "On a shard's leader: log entries a follower's matched log is behind the leader's last entry",
                ),
                &["shard", "follower"],
            )
            .expect("valid"),
            disk_bytes: IntGaugeVec::new(
                Opts::new("disk_bytes", "Bytes of the node's data folder: the write-ahead log (wal), sled (db), snapshot files (snapshots)"),
                &["part"],
            )
            .expect("valid"),
            swept: IntCounterVec::new(
                Opts::new("swept_total", "Records deleted by retention sweeps (dedup, inbox, messages)"),
                &["kind"],
            )
            .expect("valid"),
            registry: Registry::new(),
            process: Registry::new(),
        };
        let reg = registry;
        macro_rules! register {
            ($($f:ident),*) => { $( reg.register(Box::new(m.$f.clone())).expect("unique metric"); )* };
        }
        register!(
            fsync_seconds,
            fsync_batch,
            fsync_rounds,
            sled_sync_seconds,
            proposal_batch,
            shed,
            admission_limit,
            admission_inflight,
            proposal_seconds,
            send_seconds,
            requests,
            forwards,
            peer_calls,
            prevotes,
            leader_transfers,
            joint_configs_finished,
            cache_hits,
            cache_misses,
            shard_leader,
            shard_term,
            shard_commit,
            shard_applied,
            shard_last_log,
            shard_snapshot,
            shard_snapshot_bytes,
            outbox_redriven,
            ws_connections,
            http_connections,
            ws_request_tasks,
            ws_pushes,
            ws_resumes,
            ws_slow_closes,
            ws_push_lag_seconds,
            build_info,
            replication_lag,
            disk_bytes,
            swept
        );
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), option_env!("RAFTCHAT_GIT_COMMIT").unwrap_or("unknown")])
            .set(1);
        for via in ["http", "ws", "grpc"] {
            for op in OPS {
                m.requests.with_label_values(&[via, op, "ok"]);
            }
        }
        for kind in ["dedup", "inbox", "messages"] {
            m.swept.with_label_values(&[kind]);
        }
        for part in ["wal", "db", "snapshots"] {
            m.disk_bytes.with_label_values(&[part]);
        }
        for b in SHED_BOUNDS {
            m.shed.with_label_values(&[b]);
        }
        for kind in [
            "append",
            "index_update",
            "mark_read",
            "outbox_done",
            "register",
            "receipt",
            "create_account",
            "session",
            "use_invite",
            "sweep",
        ] {
            m.proposal_seconds.with_label_values(&[kind]);
        }
        for r in FORWARD_RESULTS {
            m.forwards.with_label_values(&[r]);
        }
        for r in ["won", "lost"] {
            m.prevotes.with_label_values(&[r]);
        }
        for r in ["ok", "failed"] {
            m.leader_transfers.with_label_values(&[r]);
        }
        for t in ["pipe", "unary"] {
            for k in ["append_entries", "vote", "forward", "pre_vote", "elect"] {
                m.peer_calls.with_label_values(&[t, k]);
            }
        }
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())).expect("unique metric");
        Self { registry: reg, process, ..m }
    }

    /// Counts one client request: `via` is `http`, `ws` or `grpc`; `code` is `ok` or the
    /// error's code.
    pub fn count_request(&self, via: &str, op: &str, code: &str) {
        self.requests.with_label_values(&[via, op, code]).inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let _ = TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
