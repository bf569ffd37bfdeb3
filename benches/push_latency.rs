//! Commit-to-push latency over WebSockets on a real local 3-node cluster (release build).
//!
//! bob's socket is on a node that is neither the node alice sends through nor the leader
//! of bob's user shard, so every push crosses nodes. alice sends `BENCH_SENDS` (default
//! 500) messages one at a time over HTTP. For each message we take:
//! - send→push: from alice starting the request to bob's socket receiving the push, an
//!   upper bound on commit-to-push (the commit happens inside that window);
//! - ack→push: from alice's ack to bob's push (negative when the push wins the race);
//! - the server's own `raftchat_ws_push_lag_seconds` (message ts, set at proposal, to push).

use futures::StreamExt;
use raftchat::chat::UserId;
use raftchat::fixture::{Cluster, Spec};
use raftchat::shard::Placement;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn report(label: &str, ms: Vec<f64>) {
    println!("{}", raftchat::fixture::latency_report(label, ms));
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sends: u64 = std::env::var("BENCH_SENDS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let dir = tempfile::tempdir()?;
    let cluster = Cluster::start(std::path::Path::new(env!("CARGO_BIN_EXE_raftchat")), &Spec::new(3, dir.path()))?;
    cluster.wait_all_ready(Duration::from_secs(60)).await?;
    let http = reqwest::Client::new();
    for u in ["alice", "bob"] {
        http.post(format!("{}/v1/users", cluster.url(0)))
            .bearer_auth(cluster.admin_token())
            .json(&serde_json::json!({ "user": u }))
            .send()
            .await?;
    }
    let bob_shard = Placement::new(8, vec![1, 2, 3]).shard_of_user(&UserId::parse("bob")?);
    let mailbox_leader = cluster.leader_of(bob_shard).await.expect("leader");
    let bob_node = (mailbox_leader + 1) % 3;
    let alice_node = (mailbox_leader + 2) % 3;
    println!(
        "bob's mailbox shard led by node {}, bob on node {}, alice on node {}",
        mailbox_leader + 1,
        bob_node + 1,
        alice_node + 1
    );

    let url =
        format!("{}/v1/ws?access_token={}", cluster.url(bob_node).replacen("http", "ws", 1), cluster.token("bob"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v["type"] == "message" {
                    let _ = tx.send((v["seq"].as_u64().unwrap_or(0), Instant::now()));
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = cluster.token("alice");
    let mut send_to_push = Vec::new();
    let mut ack_to_push = Vec::new();
    for i in 1..=sends + 20 {
        let t0 = Instant::now();
        let r = http
            .post(format!("{}/v1/messages", cluster.url(alice_node)))
            .bearer_auth(&token)
            .json(&serde_json::json!({"to": "bob", "client_msg_id": format!("p{i}"), "text": format!("push {i}")}))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "send failed");
        let t1 = Instant::now();
        let (seq, t2) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await?.expect("push");
        anyhow::ensure!(seq == i, "push {seq} out of order, expected {i}");
        if i > 20 {
            // The first 20 warm up connections and caches.
            send_to_push.push((t2 - t0).as_secs_f64() * 1e3);
            ack_to_push.push(if t2 >= t1 { (t2 - t1).as_secs_f64() * 1e3 } else { -((t1 - t2).as_secs_f64() * 1e3) });
        }
    }
    report("send start -> push (recipient on another node)", send_to_push);
    report("ack -> push", ack_to_push);
    let m = http.get(format!("{}/metrics", cluster.url(bob_node))).send().await?.text().await?;
    for l in m.lines().filter(|l| {
        l.starts_with("raftchat_ws_push_lag_seconds_sum") || l.starts_with("raftchat_ws_push_lag_seconds_count")
    }) {
        println!("bob's node: {l}");
    }
    Ok(())
}
