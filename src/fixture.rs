//! Real node processes for tests, benchmarks and the local cluster command: writes one
//! config per node under one folder, starts `raftchat serve` processes, and kills
//! (SIGKILL), stops (SIGTERM), pauses and restarts them.

use crate::auth::Keys;
use crate::chat::UserId;
use crate::config::{Config, NodeAddr};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A command prefix for node `i` (given the cluster folder), e.g. `ip netns exec ns env ...`.
pub type Wrap = std::sync::Arc<dyn Fn(usize, &Path) -> Vec<String> + Send + Sync>;

/// What cluster to create.
#[derive(Clone)]
pub struct Spec {
    pub nodes: usize,
    pub shards: u32,
    pub dir: PathBuf,
    /// HTTP, client gRPC and peer ports per node; `None` picks free ports.
    pub ports: Option<Vec<(u16, u16, u16)>>,
    /// IP address per node; `None` is 127.0.0.1 for all.
    pub hosts: Option<Vec<String>>,
    /// Applied to every node's config first (a test suite's or tool's defaults)...
    pub base: fn(&mut Config),
    /// ...then this (one test's or run's settings: timeouts, snapshot policy...).
    pub tweak: fn(&mut Config),
    /// Runs each node through this prefix (network namespaces, LD_PRELOAD...).
    pub wrap: Option<Wrap>,
    /// TLS everywhere: a CA and node certificates are made under `dir/tls` (once), and
    /// `dir/tls/revoked` is every node's revoked list.
    pub tls: bool,
    /// Config keys set on every node after `base` and `tweak` (`raftchat bench --set`).
    pub set: Vec<(String, toml::Value)>,
    /// Per node, a binary other than the cluster's (mixed builds: the harness's `upgrade`
    /// nemesis); missing or `None` is the cluster's.
    pub bins: Vec<Option<PathBuf>>,
    /// The nodes share this machine's cores (`raftchat local`, `raftchat bench --local`):
    /// each node's runtime gets [`shared_worker_threads`] worker threads instead of one per
    /// core, unless `TOKIO_WORKER_THREADS` is set already.
    pub share_cores: bool,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec")
            .field("nodes", &self.nodes)
            .field("shards", &self.shards)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Spec {
    pub fn new(nodes: usize, dir: &Path) -> Self {
        Self {
            nodes,
            shards: 8,
            dir: dir.to_path_buf(),
            ports: None,
            hosts: None,
            base: |_| {},
            tweak: |_| {},
            wrap: None,
            tls: false,
            set: Vec::new(),
            bins: Vec::new(),
            share_cores: false,
        }
    }
}

/// Worker threads per node when `nodes` node processes share this machine: its cores
/// divided among them, at least one. Three nodes with a thread per core each on a 2-core
/// machine ran six workers that woke, searched for work and went back to sleep in turn
/// (`docs/performance.md`, tenth session).
pub fn shared_worker_threads(nodes: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / nodes.max(1)).max(1)
}

/// A free loopback port (bound once, then released).
/// A port to listen on, below Linux's ephemeral range (32768 and up): a port taken with
/// `bind(0)` and released comes from that range, and an outgoing connection (a peer
/// dialing, a test's HTTP client) can grab it as its source port before the node binds it,
/// which made a node fail to start now and then. Each port is handed out once per process.
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..2000 {
        let p = 20_000 + rand::random::<u16>() % 12_000;
        if given.contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            given.insert(p);
            return Ok(p);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The per-node configs of a loopback cluster, data under `spec.dir/node<N>`.
pub fn configs(spec: &Spec) -> anyhow::Result<Vec<Config>> {
    let ports: Vec<(u16, u16, u16)> = match &spec.ports {
        Some(p) => p.clone(),
        None => {
            (0..spec.nodes).map(|_| Ok((free_port()?, free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?
        }
    };
    if ports.len() != spec.nodes {
        bail!("need {} port triples, got {}", spec.nodes, ports.len());
    }
    let host = |i: usize| spec.hosts.as_ref().and_then(|h| h.get(i).cloned()).unwrap_or_else(|| "127.0.0.1".into());
    let members: Vec<NodeAddr> = ports
        .iter()
        .enumerate()
        .map(|(i, (h, g, p))| NodeAddr {
            id: i as u64 + 1,
            http: format!("{}:{h}", host(i)),
            grpc: format!("{}:{g}", host(i)),
            peer: format!("{}:{p}", host(i)),
            public_url: None,
        })
        .collect();
    let tls_dir = spec.dir.join("tls");
    if spec.tls && !tls_dir.join("ca.pem").exists() {
        let certs: Vec<(String, Vec<String>)> =
            (0..spec.nodes).map(|i| (format!("node{}", i + 1), vec![host(i), "localhost".to_string()])).collect();
        crate::tls::generate(&tls_dir, &certs)?;
        std::fs::write(tls_dir.join("revoked"), "")?;
    }
    let mut out = Vec::new();
    for (i, (h, g, p)) in ports.iter().enumerate() {
        let mut c = Config {
            node_id: i as u64 + 1,
            data_dir: spec.dir.join(format!("node{}", i + 1)),
            http_addr: format!("{}:{h}", host(i)).parse()?,
            grpc_addr: format!("{}:{g}", host(i)).parse()?,
            peer_addr: format!("{}:{p}", host(i)).parse()?,
            shards: spec.shards,
            nodes: members.clone(),
            secret_file: Some(spec.dir.join("secret")),
            ..Config::default()
        };
        if spec.tls {
            c.tls_cert_file = Some(tls_dir.join(format!("node{}.pem", i + 1)));
            c.tls_key_file = Some(tls_dir.join(format!("node{}.key", i + 1)));
            c.tls_ca_file = Some(tls_dir.join("ca.pem"));
            c.tls_revoked_file = Some(tls_dir.join("revoked"));
        }
        (spec.base)(&mut c);
        (spec.tweak)(&mut c);
        if !spec.set.is_empty() {
            c = with_keys(&c, &spec.set)?;
        }
        c.validate()?;
        out.push(c);
    }
    Ok(out)
}

/// `c` with `keys` set, as if written in its TOML file (unknown keys and wrong types are
/// errors that name the key).
pub fn with_keys(c: &Config, keys: &[(String, toml::Value)]) -> anyhow::Result<Config> {
    let mut v = toml::Value::try_from(c)?;
    let t = v.as_table_mut().context("a config is a table")?;
    for (k, val) in keys {
        t.insert(k.clone(), val.clone());
    }
    let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
    v.try_into().with_context(|| format!("setting {}", names.join(", ")))
}

/// Parses `KEY=VALUE`; the value is TOML (`true`, `2`, `"text"`), or else taken as a string.
pub fn parse_set(s: &str) -> Result<(String, toml::Value), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("no key in {s:?}"));
    }
    let val = toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()));
    Ok((k.to_string(), val))
}

/// `c` as TOML, leaving out the keys that hold their default value: short files that say
/// what is special about each node, readable by older builds (rolling upgrades, the
/// harness's before/after runs) as long as no new key is set.
pub fn config_toml(c: &Config) -> anyhow::Result<String> {
    let mut v = toml::Value::try_from(c)?;
    let d = toml::Value::try_from(Config::default())?;
    if let (Some(t), Some(dt)) = (v.as_table_mut(), d.as_table()) {
        t.retain(|k, val| {
            dt.get(k) != Some(val)
                || ["node_id", "data_dir", "http_addr", "grpc_addr", "peer_addr", "shards"].contains(&k)
        });
    }
    Ok(toml::to_string(&v)?)
}

/// Every panic message in a node's log with the two lines after it (a backtrace that follows
/// pushes them out of the log's tail, and the folder is gone after a failed test).
fn panics_in(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let mut out = String::new();
    for (k, l) in lines.iter().enumerate() {
        if l.contains("panicked at") {
            out.push_str("panic in the log:\n");
            for m in &lines[k..(k + 3).min(lines.len())] {
                out.push_str(m);
                out.push('\n');
            }
        }
    }
    out
}

/// A running cluster of node processes. Dropping it kills every node.
pub struct Cluster {
    /// The binary each node runs (restarts included).
    bins: Vec<PathBuf>,
    pub dir: PathBuf,
    pub configs: Vec<Config>,
    children: Vec<Option<Child>>,
    /// Extra environment per node index (e.g. fault injection), used on every (re)start.
    pub env: Vec<Vec<(String, String)>>,
    keys: Keys,
    wrap: Option<Wrap>,
}

impl Cluster {
    /// Writes the configs and a shared secret, then starts every node.
    pub fn start(bin: &Path, spec: &Spec) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.dir)?;
        let configs = configs(spec)?;
        let secret_path = spec.dir.join("secret");
        if !secret_path.exists() {
            crate::config::write_private(&secret_path, crate::auth::random_secret().as_bytes())?;
        }
        let keys = Keys::new(std::fs::read_to_string(&secret_path)?.trim().as_bytes());
        for (i, c) in configs.iter().enumerate() {
            std::fs::write(spec.dir.join(format!("node{}.toml", i + 1)), config_toml(c)?)?;
        }
        let n = configs.len();
        let mut cl = Self {
            bins: (0..n).map(|i| spec.bins.get(i).cloned().flatten().unwrap_or_else(|| bin.to_path_buf())).collect(),
            dir: spec.dir.clone(),
            wrap: spec.wrap.clone(),
            configs,
            children: (0..n).map(|_| None).collect(),
            env: vec![vec![]; n],
            keys,
        };
        if spec.share_cores && std::env::var_os(crate::cli::WORKER_THREADS_ENV).is_none() {
            let threads = shared_worker_threads(n).to_string();
            for env in &mut cl.env {
                env.push((crate::cli::WORKER_THREADS_ENV.to_string(), threads.clone()));
            }
        }
        for i in 0..n {
            cl.spawn(i)?;
        }
        Ok(cl)
    }

    pub fn len(&self) -> usize {
        self.configs.len()
    }

    /// Adds a node to the cluster's configs (not started): a new id with fresh ports, set to
    /// join a running cluster (`initial_cluster_state = "existing"`), its `members` the
    /// running cluster's plus itself. The other nodes' configs stay as they are: they learn
    /// of it from the node table once it registers. Returns its index.
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let first = self.configs.first().context("a cluster has a node")?.clone();
        if first.tls_cert_file.is_some() {
            bail!("adding a node to a TLS cluster needs a certificate for it");
        }
        let i = self.configs.len();
        let id = i as u64 + 1;
        let (h, g, p) = (free_port()?, free_port()?, free_port()?);
        let host = first.http_addr.ip();
        let mut c = first.clone();
        c.node_id = id;
        c.data_dir = self.dir.join(format!("node{id}"));
        c.http_addr = format!("{host}:{h}").parse()?;
        c.grpc_addr = format!("{host}:{g}").parse()?;
        c.peer_addr = format!("{host}:{p}").parse()?;
        c.initial_cluster_state = crate::config::ClusterState::Existing;
        let mut members = first.members();
        members.push(NodeAddr {
            id,
            http: c.http_addr.to_string(),
            grpc: c.grpc_addr.to_string(),
            peer: c.peer_addr.to_string(),
            public_url: None,
        });
        c.nodes = members;
        c.validate()?;
        std::fs::write(self.dir.join(format!("node{}.toml", i + 1)), config_toml(&c)?)?;
        self.configs.push(c);
        self.bins.push(self.bins[0].clone());
        self.children.push(None);
        self.env.push(Vec::new());
        Ok(i)
    }

    /// The node id of slot `i` (its index + 1 unless it rejoined under a new id).
    pub fn id_of(&self, i: usize) -> u64 {
        self.configs[i].node_id
    }

    /// Slot `i` (stopped) comes back as a new node `id`, as an operator replaces a removed
    /// node: the same addresses, a fresh data folder (`id<ID>` inside the old one, so a
    /// lazy mount stays in place), `initial_cluster_state = "existing"`, its `members` the
    /// other slots as they are now plus itself. Nobody else's config changes.
    pub fn rejoin_as(&mut self, i: usize, id: u64) -> anyhow::Result<()> {
        let slot_dir = self.dir.join(format!("node{}", i + 1));
        let mut c = self.configs[i].clone();
        c.node_id = id;
        c.data_dir = slot_dir.join(format!("id{id}"));
        c.initial_cluster_state = crate::config::ClusterState::Existing;
        c.nodes = self
            .configs
            .iter()
            .enumerate()
            .map(|(k, o)| NodeAddr {
                id: if k == i { id } else { o.node_id },
                http: o.http_addr.to_string(),
                grpc: o.grpc_addr.to_string(),
                peer: o.peer_addr.to_string(),
                public_url: None,
            })
            .collect();
        c.validate()?;
        std::fs::write(self.dir.join(format!("node{}.toml", i + 1)), config_toml(&c)?)?;
        self.configs[i] = c;
        Ok(())
    }

    /// The binary node `i` runs.
    pub fn bin(&self, i: usize) -> &Path {
        &self.bins[i]
    }

    /// The binary node `i` runs from its next start on.
    pub fn set_bin(&mut self, i: usize, bin: &Path) {
        self.bins[i] = bin.to_path_buf();
    }
    pub fn is_empty(&self) -> bool {
        self.configs.is_empty()
    }

    /// Starts node `i` (0-based) if it is not running.
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        if self.children[i].is_some() {
            return Ok(());
        }
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("node{}.log", i + 1)))?;
        let mut cmd = match &self.wrap {
            Some(w) => {
                let prefix = w(i, &self.dir);
                let mut c = Command::new(&prefix[0]);
                c.args(&prefix[1..]).arg(&self.bins[i]);
                c
            }
            None => Command::new(&self.bins[i]),
        };
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(self.dir.join(format!("node{}.toml", i + 1)))
            .envs(self.env[i].iter().map(|(k, v)| (k.as_str(), v.as_str())))
            // The node's default filter unless the test run names one.
            .envs(std::env::var("RAFTCHAT_TEST_LOG").ok().map(|f| ("RUST_LOG", f)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bins[i].display()))?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(|c| c.id())
    }

    fn signal(&self, i: usize, sig: i32) -> anyhow::Result<()> {
        let Some(c) = &self.children[i] else { bail!("node {} is not running", i + 1) };
        // SAFETY: kill(2) on the pid of a child we own; no memory is touched.
        if unsafe { libc::kill(c.id() as i32, sig) } != 0 {
            bail!("kill({}, {sig}) failed: {}", c.id(), std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGKILL node `i` and reap it.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// SIGTERM node `i` and wait (up to `timeout`) for a clean exit; returns its status.
    pub fn stop(&mut self, i: usize, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.signal(i, libc::SIGTERM)?;
        let mut c = self.children[i].take().context("not running")?;
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                bail!("node {} did not stop within {timeout:?} after SIGTERM", i + 1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pause(&self, i: usize) -> anyhow::Result<()> {
        self.signal(i, libc::SIGSTOP)
    }
    pub fn resume(&self, i: usize) -> anyhow::Result<()> {
        self.signal(i, libc::SIGCONT)
    }
    pub fn is_running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// Whether node `i`'s process has exited on its own (e.g. an injected abort); reaps it.
    pub fn exited(&mut self, i: usize) -> bool {
        self.reap(i);
        self.children[i].is_none()
    }

    /// The exit status of node `i` if its process ended since the last look (reaps it).
    pub fn reap(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        match self.children[i].as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => {
                self.children[i] = None;
                Some(status)
            }
            _ => None,
        }
    }

    /// `http://host:port` of node `i` (`https://` with TLS).
    pub fn url(&self, i: usize) -> String {
        let scheme = if self.configs[i].tls_cert_file.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.configs[i].http_addr)
    }

    /// An HTTP client that trusts the cluster's CA when it has one.
    pub fn http_client(&self) -> anyhow::Result<reqwest::Client> {
        Ok(crate::tls::trust_ca(reqwest::Client::builder(), self.configs[0].tls_ca_file.as_deref())?.build()?)
    }

    /// A token valid for a week (long harness runs, skewed clocks).
    pub fn token(&self, user: &str) -> String {
        self.keys.mint(&UserId::parse(user).expect("valid user id"), 7 * 86_400, false)
    }
    /// The cluster's signing keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }
    pub fn admin_token(&self) -> String {
        self.keys.mint(&UserId::parse("operator").expect("valid"), 7 * 86_400, true)
    }

    /// Waits until node `i` answers `/readyz` with 200.
    pub async fn wait_ready(&self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let http = self.http_client()?;
        let end = Instant::now() + timeout;
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.url(i))).timeout(Duration::from_secs(2)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > end {
                // The log's tail, so that a CI failure says why (the folder is gone after).
                let log = self.dir.join(format!("node{}.log", i + 1));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                let status =
                    self.status(i).await.map(|s| s.to_string()).unwrap_or_else(|e| format!("no /status: {e:#}"));
                bail!(
                    "node {} not ready within {timeout:?} (see {}); /status: {status}\n{}last log lines:\n{}",
                    i + 1,
                    log.display(),
                    panics_in(&text),
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_all_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        for i in 0..self.len() {
            if self.is_running(i) {
                self.wait_ready(i, timeout).await?;
            }
        }
        Ok(())
    }

    /// `/status` of node `i`.
    pub async fn status(&self, i: usize) -> anyhow::Result<serde_json::Value> {
        let r = reqwest::Client::new()
            .get(format!("{}/status", self.url(i)))
            .timeout(Duration::from_secs(2))
            .send()
            .await?;
        Ok(r.json().await?)
    }

    /// The index of the node that currently leads `shard`, as a running node reports it.
    pub async fn leader_of(&self, shard: u32) -> Option<usize> {
        for i in 0..self.len() {
            if !self.is_running(i) {
                continue;
            }
            if let Ok(s) = self.status(i).await {
                let shards = s["shards"].as_array().cloned().unwrap_or_default();
                for sh in shards {
                    if sh["shard"] == shard && sh["leader"] == self.configs[i].node_id {
                        return Some(i);
                    }
                }
            }
        }
        None
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `label: n=.. p50=.. p90=.. p99=.. max=..` for latencies in milliseconds (benchmarks).
pub fn latency_report(label: &str, mut ms: Vec<f64>) -> String {
    if ms.is_empty() {
        return format!("{label}: no samples");
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    format!(
        "{label}: n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
        ms.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        ms[ms.len() - 1]
    )
}

#[cfg(test)]
mod set_tests {
    use super::*;

    #[test]
    fn a_panic_in_a_node_log_is_quoted_whatever_follows_it() {
        let mut log =
            String::from("start\nthread 'tokio-rt-worker' panicked at src/x.rs:1:2:\nthe reason\nstack backtrace:\n");
        for k in 0..100 {
            log.push_str(&format!("  {k}: frame\n"));
        }
        let p = panics_in(&log);
        assert!(p.contains("panicked at src/x.rs:1:2") && p.contains("the reason"), "{p}");
        assert_eq!(panics_in("all fine\n"), "");
    }

    #[test]
    fn set_keys_are_typed_and_unknown_or_mistyped_ones_are_named() {
        assert_eq!(parse_set("peer_pipe=false").unwrap(), ("peer_pipe".into(), toml::Value::Boolean(false)));
        assert_eq!(parse_set("batches_in_flight = 2").unwrap().1, toml::Value::Integer(2));
        assert_eq!(parse_set("registration=invite").unwrap().1, toml::Value::String("invite".into()));
        assert!(parse_set("no-equals").is_err());
        assert!(parse_set("=1").is_err());
        let c = with_keys(&Config::default(), &[parse_set("peer_pipe=false").unwrap()]).unwrap();
        assert!(!c.peer_pipe);
        let e = with_keys(&Config::default(), &[parse_set("peer_pipes=false").unwrap()]).unwrap_err();
        assert!(format!("{e:#}").contains("peer_pipes"), "{e:#}");
        let e = with_keys(&Config::default(), &[parse_set("batches_in_flight=many").unwrap()]).unwrap_err();
        assert!(format!("{e:#}").contains("batches_in_flight"), "{e:#}");
    }
}
