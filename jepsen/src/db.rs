//! The raftchat nodes under test: the shared [`raftchat::fixture::Cluster`] (the same one
//! the integration tests and benchmarks use), with each node started inside its network
//! namespace (`ip netns exec`) and, when available, under libfaketime: a per-node offset
//! file the nemesis rewrites skews the wall clock while monotonic time stays real, as on a
//! host whose NTP misbehaves. Faults a process suffers: kill -9 and restart, SIGSTOP/SIGCONT.

use crate::net::Net;
use anyhow::bail;
use raftchat::fixture::{Cluster, Spec};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 7070;
const PEER_PORT: u16 = 7071;

pub struct Db {
    pub net: Net,
    pub cluster: Cluster,
    dir: PathBuf,
    pub faketime: bool,
    pub shards: u32,
    /// Each node's data folder on a lazy filesystem (the `power` nemesis), unmounted last.
    pub lazy: Vec<crate::lazyfs::Mounted>,
    /// The build under test and, in mixed-build runs, the older one.
    new_bin: PathBuf,
    old_bin: Option<PathBuf>,
    /// The highest node id given so far (slots that rejoined under new ids).
    next_id: u64,
    /// Node replacements tried so far (the membership nemesis).
    pub replacements: u32,
    /// Nodes the membership nemesis left dead past `replace_dead_after_secs` so far.
    pub deaths: u32,
    /// Slots stopped with SIGSTOP now (the pause nemesis).
    paused: std::sync::Mutex<std::collections::HashSet<usize>>,
}

fn clock_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("node{}.faketime", i + 1))
}

/// Tighter timeouts than the defaults, and small snapshots so runs exercise snapshot
/// install and log purge.
fn harness_config(c: &mut raftchat::config::Config) {
    c.request_timeout_ms = 5_000;
    c.rpc_timeout_ms = 1_000;
    c.snapshot_every = 300;
    c.keep_logs = 50;
    // The harness checks consistency; its generator may exceed a person's send rate.
    c.user_send_rate = 0;
    c.max_connections_per_ip = c.max_connections;
    // Nodes listen on their namespaces' addresses, on a network the harness made.
    c.insecure = true;
}

impl Db {
    /// Writes every node's config and starts them all; with `lazy`, each node's data folder
    /// (`node<N>`) is first mounted as a lazy view of `node<N>.disk`. With `old_bin`, nodes
    /// 1, 3, 5... start on that build.
    pub fn start(
        net: Net,
        bin: &Path,
        old_bin: Option<&Path>,
        dir: &Path,
        shards: u32,
        lazy: bool,
        set: Vec<(String, toml::Value)>,
    ) -> anyhow::Result<Self> {
        // With an older build in the cluster, the new one may only propose what the old one
        // applies (cluster version 2: 9004378, the old build CI uses).
        let mut set = set;
        if old_bin.is_some() && !set.iter().any(|(k, _)| k == "cluster_version") {
            set.push(("cluster_version".to_string(), toml::Value::Integer(2)));
        }
        for b in std::iter::once(bin).chain(old_bin) {
            if !b.exists() {
                bail!("raftchat binary {} not found: build it first (cargo build --release)", b.display());
            }
        }
        std::fs::create_dir_all(dir)?;
        let faketime = Path::new(LIBFAKETIME).exists();
        for i in 0..net.nodes {
            std::fs::write(clock_file(dir, i), "+0\n")?;
        }
        let namespaces: Vec<String> = (0..net.nodes).map(|i| net.ns(i)).collect();
        let wrap = Arc::new(move |i: usize, dir: &Path| {
            let mut v: Vec<String> = ["ip", "netns", "exec", &namespaces[i], "env"].map(String::from).to_vec();
            if faketime {
                v.push(format!("LD_PRELOAD={LIBFAKETIME}"));
                v.push(format!("FAKETIME_TIMESTAMP_FILE={}", clock_file(dir, i).display()));
                v.push("FAKETIME_CACHE_DURATION=1".into());
                v.push("FAKETIME_DONT_FAKE_MONOTONIC=1".into());
            }
            v
        });
        let spec = Spec {
            shards,
            ports: Some(vec![(HTTP_PORT, GRPC_PORT, PEER_PORT); net.nodes]),
            hosts: Some((0..net.nodes).map(|i| net.ip(i)).collect()),
            tweak: harness_config,
            wrap: Some(wrap),
            set,
            bins: (0..net.nodes).map(|i| old_bin.filter(|_| i % 2 == 0).map(Path::to_path_buf)).collect(),
            ..Spec::new(net.nodes, dir)
        };
        let mut mounts = Vec::new();
        if lazy {
            for i in 0..net.nodes {
                let backing = dir.join(format!("node{}.disk", i + 1));
                mounts.push(crate::lazyfs::LazyFs::mount(&backing, &dir.join(format!("node{}", i + 1)))?);
            }
        }
        let next_id = net.nodes as u64;
        let cluster = Cluster::start(bin, &spec)?;
        Ok(Self {
            net,
            cluster,
            dir: dir.to_path_buf(),
            faketime,
            shards,
            lazy: mounts,
            new_bin: bin.to_path_buf(),
            old_bin: old_bin.map(Path::to_path_buf),
            next_id,
            replacements: 0,
            deaths: 0,
            paused: Default::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.cluster.len()
    }
    pub fn is_empty(&self) -> bool {
        self.cluster.is_empty()
    }
    pub fn url(&self, i: usize) -> String {
        self.cluster.url(i)
    }

    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.cluster.spawn(i)
    }
    pub fn running(&self, i: usize) -> bool {
        self.cluster.is_running(i)
    }
    pub fn kill(&mut self, i: usize) {
        let _ = self.cluster.kill(i);
    }
    pub fn pause(&self, i: usize) {
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).insert(i);
        let _ = self.cluster.pause(i);
    }
    pub fn resume(&self, i: usize) {
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).remove(&i);
        let _ = self.cluster.resume(i);
    }
    fn is_paused(&self, i: usize) -> bool {
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).contains(&i)
    }

    /// Whether node `i` runs the older build.
    fn on_old(&self, i: usize) -> bool {
        self.old_bin.as_deref() == Some(self.cluster.bin(i))
    }

    /// A rolling-upgrade step: node `i` stops gracefully (SIGTERM) and starts again on the
    /// other build; returns what happened. Only a node that is running and stops cleanly
    /// switches, as an operator rolls nodes: a node that is down (killed by another fault)
    /// is left alone, and one whose stop fails is restarted on the same build, the failure
    /// named in the fault's description.
    pub fn switch_build(&mut self, i: usize) -> anyhow::Result<String> {
        let Some(old) = self.old_bin.clone() else { bail!("mixed builds need --old-bin") };
        if !self.cluster.is_running(i) {
            return Ok(format!("n{} is down: not switched", i + 1));
        }
        self.resume(i);
        let (to, name) = if self.on_old(i) { (self.new_bin.clone(), "new") } else { (old, "old") };
        let outcome = match self.cluster.stop(i, Duration::from_secs(10)) {
            Ok(status) if status.success() => {
                self.cluster.set_bin(i, &to);
                format!("n{} restarted on the {name} build", i + 1)
            }
            Ok(status) => format!("n{} NOT switched: it exited with {status} on SIGTERM", i + 1),
            Err(e) => format!("n{} NOT switched: {e}", i + 1),
        };
        self.cluster.spawn(i)?;
        Ok(outcome)
    }

    /// Which build every node runs, e.g. `n1 old, n2 new, ...`.
    pub fn builds(&self) -> String {
        (0..self.len())
            .map(|i| format!("n{} {}", i + 1, if self.on_old(i) { "old" } else { "new" }))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Sets node `i`'s wall clock to real time plus `offset_secs`.
    pub fn set_clock(&self, i: usize, offset_secs: i64) -> anyhow::Result<()> {
        std::fs::write(clock_file(&self.dir, i), format!("{offset_secs:+}\n"))?;
        Ok(())
    }

    /// Power loss of node `i`: kill -9, then its lazy filesystem forgets every write that
    /// was not fsynced. Returns the bytes dropped.
    pub fn power_loss(&mut self, i: usize) -> anyhow::Result<u64> {
        anyhow::ensure!(!self.lazy.is_empty(), "power loss needs the nodes on lazy filesystems");
        self.resume(i);
        self.kill(i);
        Ok(self.lazy[i].fs.power_loss())
    }

    /// Stops every node (SIGCONT first, then SIGKILL).
    pub fn kill_all(&mut self) {
        for i in 0..self.len() {
            self.resume(i);
            self.kill(i);
        }
    }

    /// Every shard's voters and leader, as the running nodes report them (the leader's
    /// view where it answered).
    async fn placement(&self) -> std::collections::BTreeMap<u32, (Vec<u64>, Option<u64>)> {
        let mut out: std::collections::BTreeMap<u32, (Vec<u64>, Option<u64>)> = Default::default();
        for i in (0..self.len()).filter(|i| self.running(*i)) {
            let Ok(s) = self.cluster.status(i).await else { continue };
            for sh in s["shards"].as_array().into_iter().flatten() {
                let Some(shard) = sh["shard"].as_u64() else { continue };
                let v: Vec<u64> = sh["replicas"].as_array().into_iter().flatten().filter_map(|x| x.as_u64()).collect();
                let leads = sh["leader"] == self.cluster.id_of(i);
                let e = out.entry(shard as u32).or_default();
                if !v.is_empty() && (e.0.is_empty() || leads) {
                    *e = (v, sh["leader"].as_u64());
                }
            }
        }
        out
    }

    /// One move through a random running node (`POST /v1/admin/shards/{shard}/move`); says
    /// what happened.
    async fn post_move(&self, shard: u32, from: u64, to: u64, leader: Option<u64>) -> String {
        use rand::seq::IndexedRandom;
        let running: Vec<usize> = (0..self.len()).filter(|i| self.running(*i)).collect();
        let Some(&via) = running.choose(&mut rand::rng()) else {
            return "move a replica: no node runs".into();
        };
        let desc =
            format!("move shard {shard} n{from}{} -> n{to}", if Some(from) == leader { " (leader)" } else { "" });
        let started = std::time::Instant::now();
        let r = reqwest::Client::new()
            .post(format!("{}/v1/admin/shards/{shard}/move", self.url(via)))
            .bearer_auth(self.cluster.admin_token())
            .json(&serde_json::json!({ "from": from, "to": to, "timeout_secs": 20 }))
            .timeout(Duration::from_secs(25))
            .send()
            .await;
        let took = started.elapsed().as_secs_f64();
        match r {
            Ok(r) if r.status().is_success() => format!("{desc}: done in {took:.1} s"),
            Ok(r) => {
                let status = r.status();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                format!("{desc}: {status} after {took:.1} s ({})", body["message"].as_str().unwrap_or(""))
            }
            Err(e) => format!("{desc}: no answer after {took:.1} s ({e})"),
        }
    }

    /// The membership nemesis: moves one replica of a random shard (from its leader or from a
    /// follower, at random) to a node that does not hold it. A move that fails under the
    /// other faults is reported, not an error (a later one completes it or another).
    pub async fn move_replica(&self) -> String {
        use rand::seq::IndexedRandom;
        use rand::Rng;
        let shard = rand::rng().random_range(0..self.shards);
        let Some((voters, leader)) = self.placement().await.remove(&shard).filter(|(v, _)| !v.is_empty()) else {
            return format!("move a replica of shard {shard}: no running node reports its voters");
        };
        let from = match leader.filter(|_| rand::rng().random_bool(0.5)) {
            Some(l) => l,
            None => *voters.choose(&mut rand::rng()).expect("not empty"),
        };
        let others: Vec<u64> = self.ids().into_iter().filter(|n| !voters.contains(n)).collect();
        let Some(&to) = others.choose(&mut rand::rng()) else {
            return format!("move a replica of shard {shard}: every node holds one");
        };
        self.post_move(shard, from, to, leader).await
    }

    /// The membership nemesis's other kind: every replica of node `i` moves away, each to
    /// the node holding the fewest (as `raftchat admin remove-node`).
    pub async fn drain(&self, i: usize) -> String {
        let node = self.cluster.id_of(i);
        let mut placement = self.placement().await;
        let mut done = Vec::new();
        let shards: Vec<u32> = placement.iter().filter(|(_, (v, _))| v.contains(&node)).map(|(s, _)| *s).collect();
        for shard in shards {
            let (voters, leader) = placement[&shard].clone();
            let load = |n: u64| placement.values().filter(|(v, _)| v.contains(&n)).count();
            let Some(to) = self.ids().into_iter().filter(|n| !voters.contains(n)).min_by_key(|n| (load(*n), *n)) else {
                continue;
            };
            let r = self.post_move(shard, node, to, leader).await;
            if r.contains(": done") {
                let e = placement.get_mut(&shard).expect("listed");
                e.0.retain(|n| *n != node);
                e.0.push(to);
            }
            done.push(r);
        }
        format!("drain n{node}: [{}]", done.join("; "))
    }

    /// The node ids of the slots now.
    fn ids(&self) -> Vec<u64> {
        (0..self.len()).map(|i| self.cluster.id_of(i)).collect()
    }

    /// The membership nemesis's third kind, an operator's node replacement: node `i` is
    /// drained, removed from the node table for good (it stops by itself; the harness kills
    /// it if it has not within 10 s), and its slot comes back as a new node id with an
    /// empty data folder that joins the running cluster (later moves give it replicas).
    /// If the removal is refused (a drain cut short by other faults), the node stays.
    pub async fn replace(&mut self, i: usize) -> String {
        use rand::seq::IndexedRandom;
        let old = self.cluster.id_of(i);
        if !self.running(i) {
            return format!("replace n{old}: it is down, not replaced");
        }
        self.replacements += 1;
        let drained = self.drain(i).await;
        // Through a node that answers (a paused one would hold the request until the
        // fault's window ends, and commit the removal after the harness gave up on it).
        let others: Vec<usize> =
            (0..self.len()).filter(|k| *k != i && self.running(*k) && !self.is_paused(*k)).collect();
        let Some(&via) = others.choose(&mut rand::rng()) else {
            return format!("{drained}; replace n{old}: no other node runs");
        };
        let r = reqwest::Client::new()
            .post(format!("{}/v1/admin/nodes/{old}/remove", self.url(via)))
            .bearer_auth(self.cluster.admin_token())
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        let failed = match r {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => {
                let status = r.status();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                Some(format!("{status} ({})", body["message"].as_str().unwrap_or("")))
            }
            Err(e) => Some(format!("no answer ({e})")),
        };
        if let Some(why) = failed {
            // The removal may still have committed (a timeout): then the slot must come back
            // under a new id all the same, or it would stay dead.
            if !self.removed_in_table(old, &others).await {
                return format!("{drained}; remove n{old}: {why}: not replaced");
            }
        }
        self.resume(i);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut stopped_itself = false;
        while std::time::Instant::now() < deadline {
            if self.cluster.exited(i) {
                stopped_itself = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !stopped_itself {
            self.kill(i);
        }
        let new = self.ids().into_iter().max().unwrap_or(0).max(self.next_id) + 1;
        self.next_id = new;
        if let Err(e) = self.cluster.rejoin_as(i, new).and_then(|()| self.cluster.spawn(i)) {
            return format!("{drained}; n{old} removed; slot {} NOT restarted as n{new}: {e}", i + 1);
        }
        format!(
            "{drained}; n{old} removed ({}), slot {} rejoined as n{new}",
            if stopped_itself { "it stopped by itself" } else { "killed after 10 s" },
            i + 1
        )
    }

    /// Whether `id` is out of the node list of the nodes `via` (polled for up to 10 s).
    async fn removed_in_table(&self, id: u64, via: &[usize]) -> bool {
        let http = reqwest::Client::new();
        for _ in 0..20 {
            for &k in via {
                let Ok(r) = http.get(format!("{}/v1/nodes", self.url(k))).timeout(Duration::from_secs(2)).send().await
                else {
                    continue;
                };
                let Ok(body) = r.json::<serde_json::Value>().await else { continue };
                let ids: Vec<u64> =
                    body["nodes"].as_array().into_iter().flatten().filter_map(|n| n["id"].as_u64()).collect();
                if !ids.is_empty() && !ids.contains(&id) {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        false
    }

    pub async fn leader_of(&self, shard: u32) -> Option<usize> {
        self.cluster.leader_of(shard).await
    }

    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        self.cluster.wait_all_ready(timeout).await
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Paused processes ignore SIGKILL until continued; the cluster kills the rest.
        for i in 0..self.len() {
            self.resume(i);
        }
    }
}
