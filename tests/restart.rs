//! Restart the whole cluster, first after kill -9 of every node, then after a graceful
//! SIGTERM: every acknowledged message, read marker and recent-conversations entry is
//! still there, and shutdown exits cleanly.

mod common;

use common::*;
use raftchat::api::ops::{ConversationsResponse, HistoryResponse};
use serde_json::json;
use std::time::Duration;

async fn snapshot_of(c: &TestCluster, node: usize) -> Vec<(String, Vec<(u64, String)>, Vec<(String, u64, u64)>)> {
    let mut out = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let convs: ConversationsResponse = c.conversations_ok(node, user).await;
        let rows = convs.conversations.iter().map(|x| (x.conversation_id.clone(), x.last_seq, x.read_seq)).collect();
        let mut msgs = Vec::new();
        for x in &convs.conversations {
            let h: HistoryResponse = c.full_history(node, user, &x.conversation_id).await;
            msgs.extend(h.messages.into_iter().map(|m| (m.seq, m.text)));
        }
        out.push((user.to_string(), msgs, rows));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn whole_cluster_restart_keeps_every_acknowledged_message_and_marker() {
    let mut c = start(3, |_| {}).await;
    for u in ["alice", "bob", "carol"] {
        c.register(0, u).await;
    }
    let pairs = [("alice", "bob"), ("bob", "carol"), ("carol", "alice")];
    for i in 0..30 {
        let (a, b) = pairs[i % 3];
        let (from, to) = if i % 2 == 0 { (a, b) } else { (b, a) };
        c.send_ok(i % 3, from, to, &format!("m{i}"), &format!("message {i}")).await;
    }
    // alice's own last send was seq 9 of alice~bob (sending reads what came before); bob's
    // seq 10 is unread until she marks it.
    let alice_rows = c.conversations_ok(0, "alice").await.conversations;
    let ab = alice_rows.iter().find(|x| x.conversation_id == "alice~bob").unwrap();
    assert_eq!((ab.last_seq, ab.read_seq, ab.unread), (10, 9, 1));
    for (node, user, conv, seq) in [(1, "alice", "alice~bob", 10), (2, "carol", "bob~carol", 10)] {
        let path = format!("/v1/conversations/{conv}/read");
        let a = c.req(node, "POST", &path, Some(&c.token(user)), Some(json!({ "seq": seq }))).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let before = snapshot_of(&c, 0).await;
    assert_eq!(before.iter().map(|(_, m, _)| m.len()).sum::<usize>(), 60, "each message seen by both participants");
    let alice_rows = &before[0].2;
    assert!(alice_rows.contains(&("alice~bob".to_string(), 10, 10)), "{alice_rows:?}");

    // Power cut: kill -9 every node, then start them again.
    for i in 0..3 {
        c.kill(i).unwrap();
    }
    for i in 0..3 {
        c.spawn(i).unwrap();
    }
    c.wait_all_ready(READY).await.unwrap();
    for node in 0..3 {
        assert_eq!(snapshot_of(&c, node).await, before, "state after kill -9 of all nodes, read on node {}", node + 1);
    }
    // The cluster keeps going: seq continues without a gap.
    assert_eq!(c.send_ok(2, "alice", "bob", "after-crash", "still here").await.seq, 11);

    // Graceful: SIGTERM every node; each exits 0 after flushing.
    let before = snapshot_of(&c, 1).await;
    for i in 0..3 {
        let st = c.stop(i, Duration::from_secs(30)).unwrap();
        assert!(st.success(), "node {} exit status {st}", i + 1);
    }
    for i in 0..3 {
        c.spawn(i).unwrap();
    }
    c.wait_all_ready(READY).await.unwrap();
    assert_eq!(snapshot_of(&c, 2).await, before);
}
