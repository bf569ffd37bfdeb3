//! Leadership: pre-votes keep a healthy leader (src/raft/prevote.rs), leadership moves on
//! request (`admin transfer-leader`) and returns to each shard's preferred node after a
//! failure (leader balancing, src/node/balance.rs).

mod common;

use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_raftchat");

/// Leaders and terms of the shards node 1 sees, by shard.
async fn leaders(c: &common::TestCluster) -> std::collections::BTreeMap<u64, (u64, u64)> {
    let s = c.status(0).await.expect("status");
    s["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .filter_map(|g| Some((g["shard"].as_u64()?, (g["leader"].as_u64()?, g["term"].as_u64()?))))
        .collect()
}

/// A follower frozen for longer than the election timeout (SIGSTOP, as a long GC pause or a
/// stalled VM) times out the moment it resumes. With pre-votes its peers, still hearing from
/// their leader, refuse; no election, and the shards it follows keep their leader and term.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_back_from_a_pause_does_not_depose_a_healthy_leader() {
    let c = common::start(3, |_| {}).await;
    c.register(0, "ana").await;
    c.register(0, "ben").await;
    c.send_ok(0, "ana", "ben", "warm-up", "hi").await;
    let before = leaders(&c).await;
    let followed: Vec<u64> = before.iter().filter(|(_, (l, _))| *l != 3).map(|(s, _)| *s).collect();
    assert!(!followed.is_empty(), "node 3 follows some shard: {before:?}");
    c.pause(2).unwrap();
    // Longer than election_timeout_max (2 s): node 3's timer has long expired when it resumes.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    c.resume(2).unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let after = leaders(&c).await;
    for s in &followed {
        assert_eq!(after.get(s), before.get(s), "shard {s}: leader and term kept (before {before:?}, after {after:?})");
    }
    assert!(c.metric(2, "raftchat_prevotes_total{result=\"lost\"}").await > 0.0, "node 3 asked and was refused");
    c.send_ok(2, "ben", "ana", "after", "still here").await;
}

/// Leader, by shard, as node `i` sees it.
async fn leader_map(c: &common::TestCluster, i: usize) -> std::collections::BTreeMap<u64, Option<u64>> {
    let Ok(s) = c.status(i).await else { return Default::default() };
    s["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| Some((g["shard"].as_u64()?, g["leader"].as_u64())))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_transfer_leader_moves_a_shard_and_refuses_what_it_cannot_do() {
    let c = common::start(3, |cfg| cfg.balance_every_secs = 0).await;
    c.register(0, "ana").await;
    c.register(0, "ben").await;
    c.send_ok(0, "ana", "ben", "t1", "before").await;
    let before = leader_map(&c, 0).await;
    let from = before[&1].expect("shard 1 has a leader");
    let to = if from == 3 { 2 } else { 3 };
    let secret = c.dir.join("secret");
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let out = run(&[
        "admin",
        "transfer-leader",
        "1",
        &to.to_string(),
        "--server",
        &c.url(0),
        "--secret-file",
        secret.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), c.log_tails(40));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains(&format!("node {to} leads")), "{text}");
    for node in 0..3 {
        let seen = common::eventually(Duration::from_secs(30), "every node sees the new leader", || async {
            leader_map(&c, node).await.get(&1).copied().flatten().filter(|l| *l == to)
        })
        .await;
        assert_eq!(seen, to);
    }
    assert!(c.metric(from as usize - 1, "raftchat_leader_transfers_total{result=\"ok\"}").await >= 1.0);
    // Writes carry on under the new leader, in order.
    c.send_ok(1, "ben", "ana", "t2", "after").await;
    let conv = c.send_ok(2, "ana", "ben", "t3", "again").await.conversation_id;
    let h = c.full_history(0, "ana", &conv).await;
    assert_eq!(h.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["before", "after", "again"]);

    // What it cannot do: a node with no replica, a user's token.
    let body = serde_json::json!({ "to": 9 });
    let a = c.req(0, "POST", "/v1/admin/shards/1/transfer-leader", Some(&c.admin_token()), Some(body)).await.unwrap();
    a.err(400, "not_replica");
    let body = serde_json::json!({ "to": 2 });
    let a = c.req(0, "POST", "/v1/admin/shards/1/transfer-leader", Some(&c.token("ana")), Some(body)).await.unwrap();
    assert_eq!(a.status, 403, "{}", a.body);
    let a = c
        .req(
            0,
            "POST",
            "/v1/admin/shards/99/transfer-leader",
            Some(&c.admin_token()),
            Some(serde_json::json!({ "to": 2 })),
        )
        .await
        .unwrap();
    a.err(404, "unknown_shard");
}

/// Kill the node that leads a third of the shards: the others take over. Bring it back:
/// leader balancing gives each shard back to its preferred node.
#[tokio::test(flavor = "multi_thread")]
async fn leaders_return_to_their_preferred_nodes_after_a_failure() {
    let mut c = common::start(3, |cfg| cfg.balance_every_secs = 1).await;
    let status = c.status(1).await.unwrap();
    let first_replica: std::collections::BTreeMap<u64, u64> = status["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["shard"].as_u64().unwrap(), g["replicas"][0].as_u64().unwrap()))
        .collect();
    let preferred = common::eventually(Duration::from_secs(30), "leaders on their preferred nodes", || async {
        let m = leader_map(&c, 1).await;
        (m.len() == 8 && m.iter().all(|(s, l)| *l == first_replica.get(s).copied())).then_some(m)
    })
    .await;
    let led_by_1: Vec<u64> = preferred.iter().filter(|(_, l)| **l == Some(1)).map(|(s, _)| *s).collect();
    assert!(!led_by_1.is_empty());
    c.kill(0).unwrap();
    common::eventually(Duration::from_secs(30), "the other nodes take over node 1's shards", || async {
        let m = leader_map(&c, 1).await;
        led_by_1.iter().all(|s| matches!(m.get(s), Some(Some(l)) if *l != 1)).then_some(())
    })
    .await;
    c.spawn(0).unwrap();
    c.wait_ready(0, common::READY).await.unwrap();
    common::eventually(Duration::from_secs(60), "node 1 leads its shards again", || async {
        let m = leader_map(&c, 1).await;
        led_by_1.iter().all(|s| m.get(s) == Some(&Some(1))).then_some(())
    })
    .await;
    // The balancer moved them (a transfer may also end in an ordinary election when the
    // leader's log ran ahead of the target's; then it counts as failed).
    let mut tried = 0.0;
    for node in [1, 2] {
        for result in ["ok", "failed"] {
            tried += c.metric(node, &format!("raftchat_leader_transfers_total{{result=\"{result}\"}}")).await;
        }
    }
    assert!(tried >= 1.0, "transfers tried: {tried}");
    c.register(0, "ana").await;
    c.register(0, "ben").await;
    c.send_ok(0, "ana", "ben", "b1", "balanced").await;
}

/// Graceful shutdown hands leaderships off (`Node::hand_off_leadership`): when a node that
/// leads shards exits after SIGTERM, each of those shards already has a new leader among the
/// others at that moment (before it, the survivors would still name the stopped node until
/// an election timeout), writes go on, and the peer server stopped without waiting for the
/// peers' open streams.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_stopped_gracefully_hands_its_leaderships_off_first() {
    let mut c = common::start(3, |_| {}).await;
    c.register(0, "ana").await;
    c.register(0, "ben").await;
    c.send_ok(0, "ana", "ben", "warm-up", "hi").await;
    // Node 3 leads the shards it is the preferred leader of (8 shards over 3 nodes).
    let led: Vec<u64> = common::eventually(Duration::from_secs(30), "node 3 leads some shard", || async {
        let m = leader_map(&c, 2).await;
        let led: Vec<u64> = m.iter().filter(|(_, l)| **l == Some(3)).map(|(s, _)| *s).collect();
        (!led.is_empty()).then_some(led)
    })
    .await;
    let st = c.stop(2, Duration::from_secs(30)).unwrap();
    assert!(st.success(), "node 3 exit status {st}");
    // The new leader of each shard leads it as node 3 exits. Without a hand-off the
    // survivors would still follow node 3 until an election timeout (election_timeout_min,
    // 1 s, after its last heartbeat); a glance of 400 ms tells the two apart.
    let glance = std::time::Instant::now() + Duration::from_millis(400);
    let (m1, m2) = loop {
        let (m1, m2) = (leader_map(&c, 0).await, leader_map(&c, 1).await);
        let all = led.iter().all(|s| m1.get(s) == Some(&Some(1)) || m2.get(s) == Some(&Some(2)));
        if all || std::time::Instant::now() > glance {
            break (m1, m2);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for s in &led {
        let claimed = m1.get(s) == Some(&Some(1)) || m2.get(s) == Some(&Some(2));
        assert!(
            claimed,
            "shard {s}: no survivor leads it right after node 3 stopped ({m1:?} / {m2:?})\n{}",
            c.log_tails(30)
        );
    }
    let log = std::fs::read_to_string(c.dir.join("node3.log")).unwrap();
    assert!(log.contains("shutdown: leadership handed off"), "node 3's log:\n{log}");
    assert!(!log.contains("still open after"), "node 3's peer server waited for open streams:\n{log}");
    c.send_ok(0, "ben", "ana", "after", "still here").await;
    c.send_ok(1, "ana", "ben", "after-2", "and here").await;
}
