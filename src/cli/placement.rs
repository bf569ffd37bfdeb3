//! `raftchat admin move-replica | add-node | remove-node | replace-node`: replica moves
//! (`node::membership`) planned here, one at a time, through any node's
//! `POST /v1/admin/shards/{shard}/move`.
//!
//! The plan comes from every node's `/status` (which shards it holds, their voters and
//! leader). Each move is safe to repeat, so a command cut short (a node down, Ctrl-C) is
//! finished by running it again.
//!
//! A command holds the cluster's placement lock ([`Lock`], `node::placement_lock`) from
//! before it plans until it is done, renewing it every few seconds: another placement
//! command, or re-replication, waits meanwhile (a command finds it held and says by whom).

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

/// The placement lock, held by this command (module docs).
pub struct Lock {
    pub token: u64,
    renewer: tokio::task::JoinHandle<()>,
    /// Every member's base URL, `--server` first: renewals and the release go to the first
    /// that answers (the node asked may be the one `remove-node` stops).
    urls: Vec<String>,
    bearer: String,
}

/// Posts `body` to `path` on the first of `urls` that answers (any status).
async fn post_first(
    http: &reqwest::Client,
    urls: &[String],
    bearer: &str,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> Option<reqwest::Response> {
    for u in urls {
        if let Ok(r) = http.post(format!("{u}{path}")).bearer_auth(bearer).json(body).timeout(timeout).send().await {
            return Some(r);
        }
    }
    None
}

const LOCK_PATH: &str = "/v1/admin/placement/lock";

impl Lock {
    /// Takes the lock as `admin {what}`; `None` from a cluster whose build has no lock.
    pub async fn take(a: &AdminArgs, http: &reqwest::Client, what: &str) -> anyhow::Result<Option<Lock>> {
        let token: u64 = rand::random::<u64>() | 1;
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "an unnamed host".into());
        let holder = format!("`raftchat admin {what}` on {host} (pid {})", std::process::id());
        let server = a.server.trim_end_matches('/').to_string();
        let url = format!("{server}{LOCK_PATH}");
        let bearer = super::admin::operator_token(a)?;
        let ask = |renew: bool| {
            let body = serde_json::json!({ "token": token, "holder": holder, "renew": renew });
            http.post(&url).bearer_auth(&bearer).json(&body).timeout(Duration::from_secs(15)).send()
        };
        // Shard 0's leader changed a moment ago (`placement_unsure`): it answers within
        // seconds, so ask again a few times before giving up.
        let mut tries = 0;
        loop {
            tries += 1;
            let r = ask(false).await.map_err(|e| anyhow::anyhow!("taking the placement lock at {url}: {e}"))?;
            let status = r.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                println!(
                    "note: the node asked has no placement lock (an older build, or cluster_version below {}): \
                     placement commands are not coordinated",
                    crate::node::placement_lock::VERSION
                );
                return Ok(None);
            }
            let answer: Value = r.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                break;
            }
            // Shard 0 cannot answer (it lost its majority, say): the lock orders commands and
            // no move needs it to be safe, so the repair an operator runs then goes on, as the
            // nodes let a move go on when they cannot check the lock.
            if matches!(status.as_u16(), 503 | 504) && answer["code"].as_str() != Some("overloaded") {
                eprintln!(
                    "warning: the placement lock cannot be taken ({}); going on uncoordinated",
                    answer["message"].as_str().unwrap_or("shard 0 did not answer")
                );
                return Ok(None);
            }
            let why = answer["message"].as_str().map(str::to_string);
            if answer["code"].as_str() == Some("placement_unsure") && tries < 4 {
                eprintln!("{}; waiting", why.as_deref().unwrap_or("shard 0's leader changed"));
                tokio::time::sleep(Duration::from_secs(4)).await;
                continue;
            }
            anyhow::bail!("{}", why.unwrap_or_else(|| format!("the placement lock: {status}")));
        }
        let mut urls = vec![server.clone()];
        if let Ok(nodes) = get(http, &format!("{server}/v1/nodes")).await {
            for n in nodes["nodes"].as_array().into_iter().flatten() {
                if let Some(u) = n["url"].as_str().map(|u| u.trim_end_matches('/').to_string()) {
                    if !urls.contains(&u) {
                        urls.push(u);
                    }
                }
            }
        }
        let (http, bearer2, urls2, holder) = (http.clone(), bearer.clone(), urls.clone(), holder.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::node::placement_lock::RENEW_EVERY).await;
                let body = serde_json::json!({ "token": token, "holder": holder, "renew": true });
                // Well within a renewal period: one slow answer (an election of shard 0) must
                // not use up the lease.
                let r = post_first(&http, &urls2, &bearer2, LOCK_PATH, &body, Duration::from_secs(4)).await;
                match r {
                    Some(r) if r.status() == reqwest::StatusCode::CONFLICT => {
                        let answer: Value = r.json().await.unwrap_or(Value::Null);
                        eprintln!(
                            "warning: lost the placement lock ({}); the moves from here on are refused",
                            answer["message"].as_str().unwrap_or("no message")
                        );
                        return;
                    }
                    // Not answered: the lease lasts a while yet; try again.
                    _ => {}
                }
            }
        });
        Ok(Some(Lock { token, renewer, urls, bearer }))
    }

    pub async fn release(self, http: &reqwest::Client) {
        self.renewer.abort();
        let body = serde_json::json!({ "token": self.token });
        // Not released (no node answers): the lease runs out by itself.
        let path = "/v1/admin/placement/unlock";
        for u in &self.urls {
            // An answer of the lock's keeper (released, or held by another) ends it; a node
            // that is stopping (`remove-node` of the node asked) may fail the call: the next.
            let sent = post_first(http, std::slice::from_ref(u), &self.bearer, path, &body, Duration::from_secs(10));
            if let Some(r) = sent.await {
                if r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT {
                    return;
                }
            }
        }
    }
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
pub async fn force_remove(a: &mut AdminArgs, http: &reqwest::Client, node: u64) -> anyhow::Result<()> {
    let v = view(a, http).await?;
    if v.removed.contains(&node) {
        // Run again after a timeout: the removal stands, only the wait is left.
        println!("node {node} is already removed from the cluster; waiting for its replicas to move");
    } else {
        member(&v, node)?;
        // The lock for the removal only: re-replication, which then moves the replicas,
        // takes it itself.
        let lock = Lock::take(a, http, &format!("remove-node {node} --force")).await?;
        a.placement_token = lock.as_ref().map(|l| l.token);
        let path = format!("/v1/admin/nodes/{node}/remove?force=true");
        let removed = super::admin::post_admin(a, http, &path, &serde_json::json!({}), Duration::from_secs(60))
            .await
            .map_err(|e| anyhow::anyhow!("removing node {node}: {e}"));
        if let Some(l) = lock {
            l.release(http).await;
        }
        a.placement_token = None;
        removed?;
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
