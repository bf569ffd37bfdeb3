//! `raftchat admin`: what an operator looks at first.
//!
//! - `admin members`: the cluster's nodes as one node knows them (`GET /v1/nodes`) and
//!   whether each answers.
//! - `admin status`: one table of nodes (up, version, shards led, disk) and one of shards
//!   (leader, term, replicas, commit index, and per replica its applied index and how far it
//!   is behind), from every node's `/status`.
//!
//! - `admin backup DIR`: a snapshot of every shard, each from its leader, with the log index
//!   it covers, into DIR (one file per shard and `manifest.json` with sizes and SHA-256),
//!   while the cluster serves.
//! - `admin restore DIR`: writes a backup into a new, empty cluster with the same shard
//!   count, shard by shard through each shard's Raft log.
//!
//! - `admin move-replica`, `add-node`, `remove-node`, `replace-node`: replica moves
//!   ([`super::placement`]).
//!
//! `status` and `members` read the operations endpoints, which need no token; backup and
//! restore use an operator token minted from the cluster secret.

use clap::{Args, Subcommand};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub command: AdminCommand,
    /// Any node's HTTP address; the others are found through it.
    #[arg(long, global = true, env = "RAFTCHAT_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// CA certificate (PEM) to trust for `https://`.
    #[arg(long, global = true, env = "RAFTCHAT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print the raw JSON gathered instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub secret: super::client::SecretArgs,
    /// The placement lock's token while a placement command holds it (sent with its moves).
    #[arg(skip)]
    pub placement_token: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Nodes and shards: leaders, terms, replication progress and lag, disk.
    Status,
    /// The cluster's nodes and whether each answers.
    Members,
    /// Write a consistent snapshot of every shard (with the log index it covers) into DIR.
    Backup {
        /// A new or empty folder.
        dir: PathBuf,
    },
    /// Restore a backup made by `admin backup` into a new, empty cluster with the same
    /// shard count.
    Restore {
        /// The folder `admin backup` wrote.
        dir: PathBuf,
    },
    /// Move a shard's leadership to another of its replicas (leader balancing does this on
    /// its own; see `balance_every_secs`).
    TransferLeader {
        /// The shard.
        shard: u32,
        /// The node that should lead it.
        to: u64,
    },
    /// Move one replica of a shard from one node to another (the new one catches up, then
    /// replaces the old one among the voters; the old one deletes its copy).
    MoveReplica {
        /// The shard.
        shard: u32,
        /// The node that holds the replica now.
        from: u64,
        /// The node that should hold it.
        to: u64,
    },
    /// Give a node that joined (started with initial_cluster_state = "existing" and `members`
    /// naming a running node or more: it registers itself in the node table) its fair share
    /// of replicas, moved from the busiest nodes.
    AddNode {
        /// The new node's id.
        node: u64,
    },
    /// Move every replica off a node, then remove it from the cluster for good (it stops by
    /// itself; its id is never taken back; its data folder can be deleted).
    RemoveNode {
        /// The node to remove.
        node: u64,
        /// Only move its replicas away: it stays a member (e.g. for maintenance; `add-node`
        /// or replica moves give it shards again).
        #[arg(long, conflicts_with = "force")]
        drain_only: bool,
        /// For a node that is down (a dead machine): remove it now and let re-replication move
        /// its replicas, without waiting `replace_dead_after_secs`. Refused while it answers,
        /// and unless every shard it is in keeps a majority and has a spare node.
        #[arg(long)]
        force: bool,
    },
    /// Move every replica of one node to another (a replacement machine; the old one may be
    /// dead), then remove the old one from the cluster for good.
    ReplaceNode {
        /// The node to empty.
        old: u64,
        /// The node that takes its replicas.
        new: u64,
    },
}

pub async fn run(mut a: AdminArgs) -> anyhow::Result<()> {
    let http = super::client::http_client(a.ca_file.as_deref())?;
    // Placement commands hold the cluster's placement lock while they plan and move (a
    // forced removal only for the removal: re-replication then does the moves).
    let what = match &a.command {
        AdminCommand::MoveReplica { shard, from, to } => Some(format!("move-replica {shard} {from} {to}")),
        AdminCommand::AddNode { node } => Some(format!("add-node {node}")),
        AdminCommand::RemoveNode { node, force: false, .. } => Some(format!("remove-node {node}")),
        AdminCommand::ReplaceNode { old, new } => Some(format!("replace-node {old} {new}")),
        _ => None,
    };
    if let Some(what) = what {
        let lock = super::placement::Lock::take(&a, &http, &what).await?;
        a.placement_token = lock.as_ref().map(|l| l.token);
        let r = placement_command(&a, &http).await;
        if let Some(l) = lock {
            l.release(&http).await;
        }
        return r;
    }
    match &a.command {
        AdminCommand::Backup { dir } => return backup(&a, &http, dir).await,
        AdminCommand::Restore { dir } => return restore(&a, &http, dir).await,
        AdminCommand::TransferLeader { shard, to } => return transfer_leader(&a, &http, *shard, *to).await,
        AdminCommand::RemoveNode { node, force: true, .. } => {
            let node = *node;
            return super::placement::force_remove(&mut a, &http, node).await;
        }
        _ => {}
    }
    let get = |url: String| {
        let http = http.clone();
        async move {
            let r = http.get(&url).timeout(Duration::from_secs(3)).send().await.map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("{}", r.status()));
            }
            r.json::<Value>().await.map_err(|e| e.to_string())
        }
    };
    let nodes = get(format!("{}/v1/nodes", a.server.trim_end_matches('/')))
        .await
        .map_err(|e| anyhow::anyhow!("{} does not answer /v1/nodes: {e}", a.server))?;
    let members: Vec<(u64, String)> = nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| (n["id"].as_u64().unwrap_or(0), n["url"].as_str().unwrap_or("").trim_end_matches('/').to_string()))
        .collect();
    let mut statuses: BTreeMap<u64, Result<Value, String>> = BTreeMap::new();
    for (id, url) in &members {
        statuses.insert(*id, get(format!("{url}/status")).await);
    }
    if a.json {
        let all: BTreeMap<String, Value> = statuses
            .iter()
            .map(|(id, s)| (id.to_string(), s.clone().unwrap_or_else(|e| serde_json::json!({ "error": e }))))
            .collect();
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "nodes": nodes, "status": all }))?);
        return Ok(());
    }
    match a.command {
        AdminCommand::Members => {
            println!("registration: {}", nodes["registration"].as_str().unwrap_or("?"));
            let rows: Vec<Vec<String>> = members
                .iter()
                .map(|(id, url)| {
                    let state = match &statuses[id] {
                        Ok(_) => "up".to_string(),
                        Err(e) => format!("down ({e})"),
                    };
                    vec![id.to_string(), url.clone(), state]
                })
                .collect();
            print_table(&["NODE", "URL", "STATE"], &rows);
        }
        AdminCommand::Status => status(&members, &statuses),
        AdminCommand::Backup { .. }
        | AdminCommand::Restore { .. }
        | AdminCommand::TransferLeader { .. }
        | AdminCommand::MoveReplica { .. }
        | AdminCommand::AddNode { .. }
        | AdminCommand::RemoveNode { .. }
        | AdminCommand::ReplaceNode { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

fn status(members: &[(u64, String)], statuses: &BTreeMap<u64, Result<Value, String>>) {
    let mut rows = Vec::new();
    // shard -> node -> that node's view of the shard
    let mut shards: BTreeMap<u64, BTreeMap<u64, Value>> = BTreeMap::new();
    for (id, url) in members {
        match &statuses[id] {
            Ok(s) => {
                let list = s["shards"].as_array().cloned().unwrap_or_default();
                let leads = list.iter().filter(|sh| sh["leader"].as_u64() == Some(*id)).count();
                for sh in &list {
                    if let Some(n) = sh["shard"].as_u64() {
                        shards.entry(n).or_default().insert(*id, sh.clone());
                    }
                }
                let disk = s["disk_bytes"].as_object().map(|d| d.values().filter_map(Value::as_u64).sum::<u64>());
                rows.push(vec![
                    id.to_string(),
                    url.clone(),
                    "up".into(),
                    format!("{} {}", s["version"].as_str().unwrap_or("?"), s["commit"].as_str().unwrap_or("")),
                    format!("{leads}/{}", list.len()),
                    disk.map(human_bytes).unwrap_or_else(|| "?".into()),
                ]);
            }
            Err(e) => {
                rows.push(vec![id.to_string(), url.clone(), format!("down ({e})"), "".into(), "".into(), "".into()])
            }
        }
    }
    print_table(&["NODE", "URL", "STATE", "VERSION", "LEADS", "DISK"], &rows);
    println!();
    let mut rows = Vec::new();
    for (shard, views) in &shards {
        // The leader's own view has the replicas' matched indexes.
        let leader = views.values().find_map(|v| v["leader"].as_u64());
        let lv = leader.and_then(|l| views.get(&l));
        let term = views.values().filter_map(|v| v["term"].as_u64()).max().unwrap_or(0);
        let commit = lv.and_then(|v| v["committed_index"].as_u64());
        let last = lv.and_then(|v| v["last_log_index"].as_u64()).unwrap_or(0);
        // Every replica: those that answered, and those only the leader knows of.
        let mut nodes: Vec<u64> = views.keys().copied().collect();
        if let Some(m) = lv.and_then(|l| l["matched"].as_object()) {
            nodes.extend(m.keys().filter_map(|k| k.parse::<u64>().ok()));
        }
        nodes.sort_unstable();
        nodes.dedup();
        let replicas: Vec<String> = nodes
            .iter()
            .map(|node| {
                let applied = match views.get(node) {
                    Some(v) => v["applied_index"].as_u64().unwrap_or(0).to_string(),
                    None => "down".into(),
                };
                let lag = lv
                    .and_then(|l| l["matched"].get(node.to_string()))
                    .and_then(Value::as_u64)
                    .map(|m| last.saturating_sub(m));
                let role = if Some(*node) == leader { "*" } else { "" };
                match lag {
                    Some(lag) if Some(*node) != leader => format!("{node}{role}:{applied} (-{lag})"),
                    _ => format!("{node}{role}:{applied}"),
                }
            })
            .collect();
        // In the middle of a voter change, as the leader (else any replica) sees it.
        let joint = lv.or(views.values().next()).is_some_and(|v| v["joint"].as_bool() == Some(true));
        rows.push(vec![
            if joint { format!("{shard} (joint)") } else { shard.to_string() },
            leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
            term.to_string(),
            commit.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
            lv.and_then(|v| v["snapshot_bytes"].as_u64()).map(human_bytes).unwrap_or_else(|| "?".into()),
            replicas.join("  "),
        ]);
    }
    print_table(
        &["SHARD", "LEADER", "TERM", "COMMIT", "SNAPSHOT", "REPLICAS (node:applied, * leader, -entries behind)"],
        &rows,
    );
    let down: Vec<String> =
        members.iter().filter(|(id, _)| statuses[id].is_err()).map(|(id, _)| id.to_string()).collect();
    if !down.is_empty() {
        println!("\nnodes not answering: {} (their replicas are missing above)", down.join(", "));
    }
}

fn human_bytes(b: u64) -> String {
    let mut v = b as f64;
    for unit in ["B", "KiB", "MiB", "GiB", "TiB"] {
        if v < 1024.0 || unit == "TiB" {
            return if unit == "B" { format!("{b} B") } else { format!("{v:.1} {unit}") };
        }
        v /= 1024.0;
    }
    unreachable!("the loop returns at TiB")
}

fn print_table(head: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < width.len() {
                width[i] = width[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = width[i])).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(head.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// What `admin backup` writes beside the shard files.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Manifest {
    format: String,
    data_format: u32,
    shard_count: u32,
    created_at_ms: u64,
    source: String,
    shards: Vec<ShardFile>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ShardFile {
    shard: u32,
    file: String,
    bytes: u64,
    sha256: String,
    log_index: u64,
    log_term: u64,
    node: u64,
}

const BACKUP_FORMAT: &str = "raftchat-backup 1";

fn hex(hash: Sha256) -> String {
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds what is written to a hash (`std::io::copy` into a digest).
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs a placement command (the caller holds the placement lock).
async fn placement_command(a: &AdminArgs, http: &reqwest::Client) -> anyhow::Result<()> {
    match &a.command {
        AdminCommand::MoveReplica { shard, from, to } => {
            super::placement::move_replica(a, http, *shard, *from, *to).await
        }
        AdminCommand::AddNode { node } => super::placement::add_node(a, http, *node).await,
        AdminCommand::RemoveNode { node, drain_only, .. } => {
            super::placement::remove_node(a, http, *node, !*drain_only).await
        }
        AdminCommand::ReplaceNode { old, new } => super::placement::replace_node(a, http, *old, *new).await,
        other => anyhow::bail!("not a placement command: {other:?}"),
    }
}

/// POSTs `body` to `path` on `--server` with an operator token; the JSON answer, or the
/// status and the node's message.
pub(crate) async fn post_admin(
    a: &AdminArgs,
    http: &reqwest::Client,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let url = format!("{}{path}", a.server.trim_end_matches('/'));
    let mut rb = http.post(&url).bearer_auth(operator_token(a)?);
    if let Some(t) = a.placement_token {
        rb = rb.header(crate::node::placement_lock::TOKEN_HEADER, t.to_string());
    }
    let r = rb.json(body).timeout(timeout).send().await.map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let status = r.status();
    let answer: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        anyhow::bail!("{status}: {}", answer["message"].as_str().unwrap_or("no message"));
    }
    Ok(answer)
}

pub(crate) async fn transfer_leader(a: &AdminArgs, http: &reqwest::Client, shard: u32, to: u64) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let path = format!("/v1/admin/shards/{shard}/transfer-leader");
    let body = post_admin(a, http, &path, &serde_json::json!({ "to": to }), Duration::from_secs(15)).await?;
    println!("shard {shard}: node {} leads (in {} ms)", body["leader"], started.elapsed().as_millis());
    Ok(())
}

pub(crate) fn operator_token(a: &AdminArgs) -> anyhow::Result<String> {
    let op = crate::chat::UserId::parse("operator")?;
    Ok(a.secret.keys_for(Some(&a.server))?.mint(&op, 3600, true))
}

async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let r = http.get(url).timeout(Duration::from_secs(5)).send().await?;
    anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
    Ok(r.json().await?)
}

async fn backup(a: &AdminArgs, http: &reqwest::Client, dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if dir.join("manifest.json").exists() {
        anyhow::bail!("{} already holds a backup; pick a new folder", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let token = operator_token(a)?;
    let nodes = get_json(http, &format!("{}/v1/nodes", a.server.trim_end_matches('/'))).await?;
    let mut urls: BTreeMap<u64, String> = BTreeMap::new();
    for n in nodes["nodes"].as_array().into_iter().flatten() {
        urls.insert(n["id"].as_u64().unwrap_or(0), n["url"].as_str().unwrap_or("").trim_end_matches('/').to_string());
    }
    // Who leads (or at least holds) each shard.
    let mut holders: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut shard_count = 0;
    for (id, url) in &urls {
        let Ok(s) = get_json(http, &format!("{url}/status")).await else { continue };
        shard_count = s["shard_count"].as_u64().unwrap_or(0) as u32;
        for sh in s["shards"].as_array().into_iter().flatten() {
            let (Some(n), leader) = (sh["shard"].as_u64(), sh["leader"].as_u64()) else { continue };
            let list = holders.entry(n).or_default();
            if leader == Some(*id) {
                list.insert(0, *id);
            } else {
                list.push(*id);
            }
        }
    }
    anyhow::ensure!(shard_count > 0, "no node of {} answered /status", a.server);
    let started = std::time::Instant::now();
    let mut files = Vec::new();
    for shard in 0..shard_count {
        let candidates = holders.get(&u64::from(shard)).cloned().unwrap_or_default();
        let mut last_err = String::from("no replica answered");
        let mut got = None;
        for node in candidates {
            let url = format!("{}/v1/admin/shards/{shard}/snapshot", urls[&node]);
            match http.get(&url).bearer_auth(&token).timeout(Duration::from_secs(120)).send().await {
                Ok(r) if r.status().is_success() => {
                    let h = |name: &str| {
                        r.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0)
                    };
                    let (index, term) = (h("x-raftchat-log-index"), h("x-raftchat-log-term"));
                    got = Some((node, index, term, r));
                    break;
                }
                Ok(r) => last_err = format!("node {node}: {} {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last_err = format!("node {node}: {e}"),
            }
        }
        let Some((node, log_index, log_term, mut body)) = got else {
            anyhow::bail!("shard {shard}: {last_err}");
        };
        // Streamed to the file (and hashed) as it arrives: a shard of any size costs a buffer.
        let file = format!("shard-{shard:04}.snap");
        let tmp = dir.join(format!("{file}.tmp"));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut hash = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = body.chunk().await? {
            hash.update(&chunk);
            std::io::Write::write_all(&mut out, &chunk)?;
            bytes += chunk.len() as u64;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, dir.join(&file))?;
        eprintln!("shard {shard}: {bytes} bytes at log index {log_index} from node {node}");
        files.push(ShardFile { shard, file, bytes, sha256: hex(hash), log_index, log_term, node });
    }
    let manifest = Manifest {
        format: BACKUP_FORMAT.into(),
        data_format: crate::storage::FORMAT_VERSION,
        shard_count,
        created_at_ms: crate::storage::sm::now_ms(),
        source: a.server.clone(),
        shards: files,
    };
    let path = dir.join("manifest.json");
    std::fs::write(dir.join("manifest.json.tmp"), serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::rename(dir.join("manifest.json.tmp"), &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    let total: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    println!(
        "backed up {shard_count} shards, {total} bytes, in {:.1} s into {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

async fn post_ingest(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    shard: u32,
    first: bool,
    chunk: Vec<u8>,
) -> anyhow::Result<()> {
    let url = format!("{base}/v1/admin/shards/{shard}/ingest?first={first}");
    let r = http.post(&url).bearer_auth(token).body(chunk).timeout(Duration::from_secs(60)).send().await?;
    if !r.status().is_success() {
        anyhow::bail!("shard {shard}: {} {}", r.status(), r.text().await.unwrap_or_default());
    }
    Ok(())
}

async fn restore(a: &AdminArgs, http: &reqwest::Client, dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let path = dir.join("manifest.json");
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
            .with_context(|| format!("{} is not a raftchat backup manifest", path.display()))?;
    anyhow::ensure!(manifest.format == BACKUP_FORMAT, "unknown backup format {:?}", manifest.format);
    anyhow::ensure!(
        (crate::storage::FORMAT_COUNTED..=crate::storage::FORMAT_VERSION).contains(&manifest.data_format),
        "the backup holds data format {}, this build reads formats {} to {}: restore it with a newer build",
        manifest.data_format,
        crate::storage::FORMAT_COUNTED,
        crate::storage::FORMAT_VERSION
    );
    let base = a.server.trim_end_matches('/');
    let status = get_json(http, &format!("{base}/status")).await?;
    let count = status["shard_count"].as_u64().unwrap_or(0) as u32;
    anyhow::ensure!(
        count == manifest.shard_count,
        "the backup has {} shards and {base} has {count}: a restore needs a cluster with the same shard count",
        manifest.shard_count
    );
    let token = operator_token(a)?;
    let started = std::time::Instant::now();
    let mut total = 0usize;
    for sf in &manifest.shards {
        let path = dir.join(&sf.file);
        let open = || std::fs::File::open(&path).with_context(|| format!("reading {}", sf.file));
        // Read twice, a buffer at a time: once to check the checksum, once to send.
        let mut hash = Sha256::new();
        std::io::copy(&mut open()?, &mut HashWriter(&mut hash))?;
        anyhow::ensure!(hex(hash) == sf.sha256, "{} does not match its checksum in the manifest", sf.file);
        let mut records = 0usize;
        let mut chunk = Vec::new();
        let mut first = true;
        let reader = std::io::BufReader::with_capacity(1 << 20, open()?);
        for rec in crate::storage::snapshot::RecordReader::new(reader) {
            let (k, v) = rec.with_context(|| format!("decoding {}", sf.file))?;
            // The state machine's bookkeeping (applied index, membership) belongs to the old
            // cluster's logs; the new cluster keeps its own.
            if k.first() == Some(&0) {
                continue;
            }
            if !chunk.is_empty() && chunk.len() + k.len() + v.len() + 8 > crate::api::admin::INGEST_CHUNK {
                post_ingest(http, base, &token, sf.shard, first, std::mem::take(&mut chunk)).await?;
                first = false;
            }
            crate::storage::snapshot::write_record(&mut chunk, &k, &v)?;
            records += 1;
        }
        // The last chunk; an empty shard still sends one, so that it is claimed.
        if first || !chunk.is_empty() {
            post_ingest(http, base, &token, sf.shard, first, chunk).await?;
        }
        total += records;
        eprintln!("shard {}: {records} records restored (backup at log index {})", sf.shard, sf.log_index);
    }
    println!("restored {} shards, {total} records, in {:.1} s", manifest.shards.len(), started.elapsed().as_secs_f64());
    Ok(())
}
