//! `raftchat admin move-replica | add-node | remove-node | replace-node`: replica moves
//! (`node::membership`) planned here, one at a time, through any node's
//! `POST /v1/admin/shards/{shard}/move`.
//!
//! The plan comes from every node's `/status` (which shards it holds, their voters and
//! leader). Each move is safe to repeat, so a command cut short (a node down, Ctrl-C) is
//! finished by running it again.

use super::admin::AdminArgs;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The cluster as the nodes that answer report it.
struct View {
    /// Node id -> HTTP base URL, for every configured member.
    urls: BTreeMap<u64, String>,
    /// Members that answered `/status`.
    up: BTreeSet<u64>,
    /// Shard -> voters (from the leader's view when it answered, else any holder's).
    voters: BTreeMap<u32, Vec<u64>>,
    /// Shard -> leader, where known.
    leaders: BTreeMap<u32, u64>,
    /// Shard -> the node leader balancing gives it back to (its creation-time first replica
    /// while still a voter); absent when it has none.
    preferred: BTreeMap<u32, u64>,
    /// Nodes the node table marks removed (empty from builds without the table).
    removed: BTreeSet<u64>,
}

impl View {
    fn load_of(&self, node: u64) -> usize {
        self.voters.values().filter(|v| v.contains(&node)).count()
    }
}

async fn view(a: &AdminArgs, http: &reqwest::Client) -> anyhow::Result<View> {
    let base = a.server.trim_end_matches('/');
    // The node asked reads the node table afresh first, so a node that registered a moment
    // ago is listed (an older build has no such endpoint: its list is its config's).
    let mut removed = BTreeSet::new();
    if let Ok(token) = super::admin::operator_token(a) {
        let table =
            http.get(format!("{base}/v1/admin/nodes")).bearer_auth(token).timeout(Duration::from_secs(10)).send().await;
        if let Ok(body) = match table {
            Ok(r) => r.json::<Value>().await.map_err(|_| ()),
            Err(_) => Err(()),
        } {
            removed = body["table"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|rec| rec["removed"].as_bool() == Some(true))
                .filter_map(|rec| rec["id"].as_u64())
                .collect();
        }
    }
    let nodes = get(http, &format!("{base}/v1/nodes")).await?;
    let urls: BTreeMap<u64, String> = nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| Some((n["id"].as_u64()?, n["url"].as_str()?.trim_end_matches('/').to_string())))
        .collect();
    let mut up = BTreeSet::new();
    let mut voters: BTreeMap<u32, (bool, Vec<u64>)> = BTreeMap::new();
    let mut leaders = BTreeMap::new();
    let mut preferred = BTreeMap::new();
    for (id, url) in &urls {
        let Ok(s) = get(http, &format!("{url}/status")).await else { continue };
        up.insert(*id);
        for sh in s["shards"].as_array().into_iter().flatten() {
            let Some(shard) = sh["shard"].as_u64().map(|s| s as u32) else { continue };
            let v: Vec<u64> = sh["replicas"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
            let leads = sh["leader"].as_u64() == Some(*id);
            if leads {
                leaders.insert(shard, *id);
                if let Some(p) = sh["preferred_leader"].as_u64() {
                    preferred.insert(shard, p);
                }
            }
            let e = voters.entry(shard).or_insert((false, Vec::new()));
            if !e.0 && !v.is_empty() {
                *e = (leads, v);
            }
        }
    }
    let voters = voters.into_iter().map(|(s, (_, v))| (s, v)).collect();
    Ok(View { urls, up, voters, leaders, preferred, removed })
}

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    let r = http.get(url).timeout(Duration::from_secs(5)).send().await?;
    anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
    Ok(r.json().await?)
}

/// One move through `--server`; prints what happened.
async fn move_one(a: &AdminArgs, http: &reqwest::Client, shard: u32, from: u64, to: u64) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let path = format!("/v1/admin/shards/{shard}/move");
    let body = super::admin::post_admin(
        a,
        http,
        &path,
        &serde_json::json!({ "from": from, "to": to }),
        Duration::from_secs(660),
    )
    .await
    .map_err(|e| anyhow::anyhow!("shard {shard}: moving its replica from node {from} to node {to}: {e}"))?;
    let voters: Vec<String> =
        body["voters"].as_array().into_iter().flatten().filter_map(Value::as_u64).map(|v| v.to_string()).collect();
    println!(
        "shard {shard}: node {from} -> node {to} in {:.1} s (voters now {})",
        started.elapsed().as_secs_f64(),
        voters.join(", ")
    );
    if let Some(note) = body["note"].as_str() {
        println!("  note: {note}");
    }
    Ok(())
}

fn member(v: &View, node: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        v.urls.contains_key(&node),
        "node {node} is not a member of this cluster (members: {:?}); start it with initial_cluster_state = \"existing\" so that it registers first",
        v.urls.keys().collect::<Vec<_>>()
    );
    Ok(())
}

pub async fn move_replica(a: &AdminArgs, http: &reqwest::Client, shard: u32, from: u64, to: u64) -> anyhow::Result<()> {
    move_one(a, http, shard, from, to).await
}

/// Moves every replica of `node` to the other nodes that answer, each to the one holding
/// the fewest; then, with `remove`, takes it out of the node table for good.
pub async fn remove_node(a: &AdminArgs, http: &reqwest::Client, node: u64, remove: bool) -> anyhow::Result<()> {
    let mut v = view(a, http).await?;
    member(&v, node)?;
    let shards: Vec<u32> = v.voters.iter().filter(|(_, vs)| vs.contains(&node)).map(|(s, _)| *s).collect();
    for shard in shards {
        let held = v.voters[&shard].clone();
        let to =
            v.up.iter()
                .copied()
                .filter(|n| *n != node && !held.contains(n))
                .min_by_key(|n| (v.load_of(*n), *n))
                .ok_or_else(|| anyhow::anyhow!("shard {shard}: no other node that answers can take its replica"))?;
        move_one(a, http, shard, node, to).await?;
        let e = v.voters.get_mut(&shard).expect("listed");
        e.retain(|n| *n != node);
        e.push(to);
    }
    if !remove {
        println!("node {node} holds no replica (still a member: add-node or moves give it shards again)");
        return Ok(());
    }
    println!("node {node} holds no replica");
    leave(a, http, node).await
}

/// `remove-node --force`: takes `node` out of the node table while shards still list it,
/// then waits until re-replication (on the directory shard's leader) has moved every
/// replica off it.
pub async fn force_remove(a: &AdminArgs, http: &reqwest::Client, node: u64) -> anyhow::Result<()> {
    let v = view(a, http).await?;
    if v.removed.contains(&node) {
        // Run again after a timeout: the removal stands, only the wait is left.
        println!("node {node} is already removed from the cluster; waiting for its replicas to move");
    } else {
        member(&v, node)?;
        let path = format!("/v1/admin/nodes/{node}/remove?force=true");
        super::admin::post_admin(a, http, &path, &serde_json::json!({}), Duration::from_secs(60))
            .await
            .map_err(|e| anyhow::anyhow!("removing node {node}: {e}"))?;
        println!("node {node} removed from the cluster (its id is never taken back); waiting for its replicas to move");
    }
    let give_up = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let held: Vec<u32> = match view(a, http).await {
            Ok(v) => v.voters.iter().filter(|(_, vs)| vs.contains(&node)).map(|(s, _)| *s).collect(),
            Err(_) => vec![u32::MAX],
        };
        if held.is_empty() {
            println!("node {node} holds no replica: delete its data folder if it is still there");
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < give_up,
            "node {node} still listed in shards {held:?} after 10 minutes: see the log of shard 0's leader"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Takes `node` out of the node table for good (`POST /v1/admin/nodes/{id}/remove`).
async fn leave(a: &AdminArgs, http: &reqwest::Client, node: u64) -> anyhow::Result<()> {
    let path = format!("/v1/admin/nodes/{node}/remove");
    super::admin::post_admin(a, http, &path, &serde_json::json!({}), Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("removing node {node} from the node table: {e}"))?;
    println!(
        "node {node} removed from the cluster: it stops by itself (if running) and its id is never taken back; delete its data folder (and drop it from the seeds in `members` of the configs at your leisure)"
    );
    Ok(())
}

/// Moves replicas onto `node` from the nodes holding the most until it holds its share.
pub async fn add_node(a: &AdminArgs, http: &reqwest::Client, node: u64) -> anyhow::Result<()> {
    let mut v = view(a, http).await?;
    member(&v, node)?;
    anyhow::ensure!(
        v.up.contains(&node),
        "node {node} does not answer; start it first (initial_cluster_state = \"existing\")"
    );
    let total: usize = v.voters.values().map(Vec::len).sum();
    let nodes = v.urls.len().max(1);
    let share = total / nodes;
    let mut moved = 0;
    while v.load_of(node) < share {
        // From the busiest other node, a shard it holds and `node` does not, one it does not
        // lead if it can (no leadership change needed).
        let Some(from) = v.up.iter().copied().filter(|n| *n != node).max_by_key(|n| (v.load_of(*n), *n)) else { break };
        if v.load_of(from) <= v.load_of(node) + 1 {
            break;
        }
        let candidates: Vec<u32> =
            v.voters.iter().filter(|(_, vs)| vs.contains(&from) && !vs.contains(&node)).map(|(s, _)| *s).collect();
        // Best a shard `from` is the preferred leader of (after the move it has none, so the
        // new node may lead it for good), then one `from` does not lead (no transfer needed).
        let Some(shard) = candidates
            .iter()
            .copied()
            .find(|s| v.preferred.get(s) == Some(&from))
            .or_else(|| candidates.iter().copied().find(|s| v.leaders.get(s) != Some(&from)))
            .or(candidates.first().copied())
        else {
            break;
        };
        move_one(a, http, shard, from, node).await?;
        let e = v.voters.get_mut(&shard).expect("listed");
        e.retain(|n| *n != from);
        e.push(node);
        moved += 1;
    }
    println!("node {node} holds {} replicas ({moved} moved here; fair share {share})", v.load_of(node));

    // Leaders too: the new node takes the leadership of shards that have no preferred
    // leader any more (balancing leaves those where they are), up to its share.
    let v = view(a, http).await?;
    let lead_share = v.voters.len() / nodes;
    let mut leads = v.leaders.values().filter(|l| **l == node).count();
    for (shard, voters) in &v.voters {
        if leads >= lead_share {
            break;
        }
        let free = v.preferred.get(shard).is_none_or(|p| *p == node);
        if !voters.contains(&node) || v.leaders.get(shard) == Some(&node) || !free {
            continue;
        }
        match super::admin::transfer_leader(a, http, *shard, node).await {
            Ok(()) => leads += 1,
            Err(e) => println!("  shard {shard}: leadership not moved to node {node}: {e}"),
        }
    }
    println!("node {node} leads {leads} shards (fair share {lead_share})");
    Ok(())
}

/// Moves each replica of `old` to `new` (a replacement machine, or `old` is dead).
pub async fn replace_node(a: &AdminArgs, http: &reqwest::Client, old: u64, new: u64) -> anyhow::Result<()> {
    let v = view(a, http).await?;
    member(&v, old)?;
    member(&v, new)?;
    anyhow::ensure!(
        v.up.contains(&new),
        "node {new} does not answer; start it first (initial_cluster_state = \"existing\")"
    );
    let shards: Vec<u32> = v.voters.iter().filter(|(_, vs)| vs.contains(&old)).map(|(s, _)| *s).collect();
    for shard in &shards {
        move_one(a, http, *shard, old, new).await?;
    }
    println!("node {old} holds no replica ({} moved to node {new})", shards.len());
    leave(a, http, old).await
}
