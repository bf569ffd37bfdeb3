//! Helpers of the placement tests (membership, repair, placement lock): what nodes host,
//! replica moves, the admin CLI, and reading messages back through every node.

use super::TestCluster;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Shards node `i` hosts: shard -> (voters as it sees them, leader).
pub async fn hosted(c: &TestCluster, i: usize) -> BTreeMap<u64, (Vec<u64>, Option<u64>)> {
    let s = c.status(i).await.expect("status");
    s["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter_map(|g| {
            let voters = g["replicas"].as_array()?.iter().filter_map(Value::as_u64).collect();
            Some((g["shard"].as_u64()?, (voters, g["leader"].as_u64())))
        })
        .collect()
}

/// The end of every node's log, for a failure's message.
pub fn logs(c: &TestCluster) -> String {
    c.log_tails(25)
}

pub async fn move_replica(c: &TestCluster, via: usize, shard: u64, from: u64, to: u64) -> Value {
    let path = format!("/v1/admin/shards/{shard}/move");
    let a = match c.req(via, "POST", &path, Some(&c.admin_token()), Some(json!({ "from": from, "to": to }))).await {
        Ok(a) => a,
        Err(e) => panic!("move shard {shard} {from} -> {to}: {e}\n{}", logs(c)),
    };
    assert_eq!(a.status, 200, "move shard {shard} {from} -> {to}: {}\n{}", a.body, logs(c));
    a.ok()
}

/// `raftchat admin ARGS` through node 1, which must succeed; its output.
pub fn admin(c: &TestCluster, args: &[&str]) -> String {
    let (ok, out) = admin_via(c, 0, args);
    assert!(ok, "admin {args:?}: {out}\n{}", logs(c));
    out
}

/// The node ids node `i` lists in `GET /v1/nodes`.
pub async fn listed(c: &TestCluster, i: usize) -> Option<Vec<u64>> {
    let r = c.req(i, "GET", "/v1/nodes", None, None).await.ok()?;
    Some(r.body["nodes"].as_array()?.iter().filter_map(|n| n["id"].as_u64()).collect())
}

/// Starts node `i` and checks that it exits with an error saying it was removed.
pub async fn refused_as_removed(c: &mut TestCluster, i: usize, within: Duration) {
    c.spawn(i).unwrap();
    let status = super::eventually(within, "the removed node refuses to run", || {
        let s = c.reap(i);
        async move { s }
    })
    .await;
    assert!(!status.success());
    let log = std::fs::read_to_string(c.dir.join(format!("node{}.log", i + 1))).unwrap();
    assert!(log.contains(&format!("node {} was removed from this cluster", i + 1)), "{log}");
}

/// `raftchat admin ARGS` through node `via`: whether it succeeded, and its output.
pub fn admin_via(c: &TestCluster, via: usize, args: &[&str]) -> (bool, String) {
    let secret = c.dir.join("secret");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_raftchat"))
        .arg("admin")
        .args(args)
        .args(["--server", &c.url(via), "--secret-file", secret.to_str().unwrap()])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
}

/// Messages of `sent` (conversation, seq, text), each read through every running node.
/// One message from each of `users` to the next (a ring), the k-th through node `via(k)` with
/// id and text `{prefix}{k}`; each is recorded in `sent` as `all_there` reads it.
pub async fn send_ring(
    c: &TestCluster,
    users: &[&str],
    prefix: &str,
    via: impl Fn(usize) -> usize,
    sent: &mut Vec<(String, String, u64, String)>,
) {
    for (k, a) in users.iter().enumerate() {
        let b = users[(k + 1) % users.len()];
        let id = format!("{prefix}{k}");
        let r = c.send_ok(via(k), a, b, &id, &id).await;
        sent.push((a.to_string(), r.conversation_id, r.seq, id));
    }
}

pub async fn all_there(c: &TestCluster, sent: &[(String, String, u64, String)], nodes: &[usize]) {
    for (user, conv, seq, text) in sent {
        for &n in nodes {
            let h = c.full_history(n, user, conv).await;
            let got = h.messages.iter().find(|m| m.seq == *seq).map(|m| m.text.as_str());
            assert_eq!(got, Some(text.as_str()), "{conv} seq {seq} via node {}", n + 1);
        }
    }
}
