//! `raftchat admin`: what an operator looks at first.
//!
//! - `admin members`: the cluster's nodes as one node knows them (`GET /v1/nodes`) and
//!   whether each answers.
//! - `admin status`: one table of nodes (up, version, shards led, disk) and one of shards
//!   (leader, term, replicas, commit index, and per replica its applied index and how far it
//!   is behind), from every node's `/status`.
//!
//! Both read the operations endpoints, which need no token.

use clap::{Args, Subcommand};
use serde_json::Value;
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
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Nodes and shards: leaders, terms, replication progress and lag, disk.
    Status,
    /// The cluster's nodes and whether each answers.
    Members,
}

pub async fn run(a: AdminArgs) -> anyhow::Result<()> {
    let http = super::client::http_client(a.ca_file.as_deref())?;
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
        rows.push(vec![
            shard.to_string(),
            leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into()),
            term.to_string(),
            commit.map(|c| c.to_string()).unwrap_or_else(|| "?".into()),
            replicas.join("  "),
        ]);
    }
    print_table(&["SHARD", "LEADER", "TERM", "COMMIT", "REPLICAS (node:applied, * leader, -entries behind)"], &rows);
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
