//! Send latency and throughput on a real local 3-node cluster (release build, separate
//! processes, sled on disk under a temp dir).
//!
//! `cargo bench --bench send_latency` runs:
//! 1. one client, N sequential sends (default 1000) through the conversation leader's node,
//! 2. the same through a node that must forward to the leader,
//! 3. C concurrent clients on C conversations (default 32) for throughput.
//!
//! Env: `BENCH_SENDS` (default 1000), `BENCH_CLIENTS` (32), `BENCH_SECONDS` (10).
//! Latency is client-observed: HTTP request to acknowledged reply.

use raftchat::chat::{ConversationId, UserId};
use raftchat::fixture::{Cluster, Spec};
use raftchat::shard::Placement;
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn report(label: &str, ms: Vec<f64>) {
    println!("{}", raftchat::fixture::latency_report(label, ms));
}

async fn send(http: &reqwest::Client, url: &str, token: &str, to: &str, id: &str) -> anyhow::Result<()> {
    let r = http
        .post(format!("{url}/v1/messages"))
        .bearer_auth(token)
        .json(&serde_json::json!({"to": to, "client_msg_id": id, "text": format!("benchmark message {id}")}))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "send failed: {}", r.text().await?);
    Ok(())
}

async fn metric(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let t = http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    t.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sends = env("BENCH_SENDS", 1000);
    let clients = env("BENCH_CLIENTS", 32);
    let seconds = env("BENCH_SECONDS", 10);
    let dir = tempfile::tempdir()?;
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_raftchat"));
    let cluster = Cluster::start(bin, &Spec::new(3, dir.path()))?;
    cluster.wait_all_ready(Duration::from_secs(60)).await?;
    let http = reqwest::Client::new();
    let admin = cluster.admin_token();
    for i in 0..clients {
        http.post(format!("{}/v1/users", cluster.url(0)))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"user": format!("peer{i}")}))
            .send()
            .await?;
    }
    http.post(format!("{}/v1/users", cluster.url(0)))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"user": "bob"}))
        .send()
        .await?;

    let conv = ConversationId::between(&UserId::parse("alice")?, &UserId::parse("bob")?)?;
    let shard = Placement::new(8, vec![1, 2, 3]).shard_of_conversation(&conv);
    let leader = cluster.leader_of(shard).await.expect("leader");
    let follower = (leader + 1) % 3;
    let alice = cluster.token("alice");
    // Warm up connections, registrations and caches.
    for i in 0..20 {
        send(&http, &cluster.url(leader), &alice, "bob", &format!("warm{i}")).await?;
    }
    for (label, node) in
        [("single client via the leader's node", leader), ("single client via a forwarding node", follower)]
    {
        let url = cluster.url(node);
        let mut ms = Vec::with_capacity(sends as usize);
        for i in 0..sends {
            let t = Instant::now();
            send(&http, &url, &alice, "bob", &format!("{node}-{i}")).await?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        report(label, ms);
    }

    // Throughput: C clients, each on its own conversation, spread over the nodes.
    let fsync_before = metric(&http, &cluster.url(0), "raftchat_fsync_seconds_count").await;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url, token) = (http.clone(), cluster.url(c as usize % 3), cluster.token(&format!("user{c}")));
        tasks.push(tokio::spawn(async move {
            let mut ms = Vec::new();
            let mut i = 0;
            while Instant::now() < end {
                let t = Instant::now();
                send(&http, &url, &token, &format!("peer{c}"), &format!("t{i}")).await.unwrap();
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                i += 1;
            }
            ms
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let fsyncs = metric(&http, &cluster.url(0), "raftchat_fsync_seconds_count").await - fsync_before;
    println!(
        "throughput: {clients} clients, {:.0} acknowledged sends/s over {seconds}s",
        all.len() as f64 / seconds as f64
    );
    println!(
        "node 1: {fsyncs:.0} fsyncs for {} sends ({:.2} sends per fsync)",
        all.len(),
        all.len() as f64 / fsyncs.max(1.0)
    );
    report(&format!("latency under {clients} concurrent clients"), all);
    Ok(())
}
