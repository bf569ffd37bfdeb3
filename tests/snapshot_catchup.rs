//! A node that is down while its shards snapshot and purge their logs rejoins and catches
//! up by snapshot install; its own disk then holds every message.

mod common;

use common::*;
use raftchat::chat::{ConversationId, UserId};
use raftchat::shard::Placement;
use raftchat::storage::keys::ShardView;
use raftchat::storage::Storage;
use std::time::Duration;

const MESSAGES: u64 = 120;

fn small_logs(c: &mut raftchat::config::Config) {
    c.snapshot_every = 20;
    c.keep_logs = 5;
}

async fn shard_status(c: &TestCluster, node: usize, shard: u32) -> Option<serde_json::Value> {
    let s = c.status(node).await.ok()?;
    s["shards"].as_array()?.iter().find(|x| x["shard"] == shard).cloned()
}

#[tokio::test(flavor = "multi_thread")]
async fn node_down_during_log_purge_catches_up_by_snapshot() {
    let mut c = start(3, small_logs).await;
    c.register(0, "bob").await;
    let conv = ConversationId::between(&UserId::parse("alice").unwrap(), &UserId::parse("bob").unwrap()).unwrap();
    let shard = Placement::new(8, vec![1, 2, 3]).shard_of_conversation(&conv);
    c.send_ok(0, "alice", "bob", "first", "message 1").await;
    let leader = c.leader_of(shard).await.unwrap();
    let down = c.other_than(&[leader]);
    let down_last = shard_status(&c, down, shard).await.unwrap()["last_log_index"].as_u64().unwrap();
    c.kill(down).unwrap();

    let live = c.other_than(&[down]);
    for i in 2..=MESSAGES {
        c.send_ok(live, "alice", "bob", &format!("m{i}"), &format!("message {i}")).await;
    }
    let purged = eventually(Duration::from_secs(30), "leader purges the log the down node lacks", || async {
        let s = shard_status(&c, leader, shard).await?;
        let p = s["purged_index"].as_u64()?;
        (p > down_last).then_some(p)
    })
    .await;

    c.spawn(down).unwrap();
    c.wait_ready(down, READY).await.unwrap();
    let target = shard_status(&c, leader, shard).await.unwrap()["committed_index"].as_u64().unwrap();
    eventually(Duration::from_secs(60), "restarted node installs a snapshot and catches up", || async {
        let s = shard_status(&c, down, shard).await?;
        let applied = s["applied_index"].as_u64()?;
        let snap = s["snapshot_index"].as_u64()?;
        (applied >= target && snap >= purged).then_some(())
    })
    .await;
    let log = std::fs::read_to_string(c.dir.join(format!("node{}.log", down + 1))).unwrap();
    assert!(log.contains("installed snapshot"), "the node caught up by snapshot install");

    // Stop it and read its own disk: every message is there, in order.
    assert!(c.stop(down, Duration::from_secs(30)).unwrap().success());
    let storage = Storage::open(&c.configs[down].data_dir, 8, 8 << 20).unwrap();
    let (_, sm) = storage.shard_trees(shard).unwrap();
    let msgs = ShardView { tree: sm }.messages(&conv, 1, MESSAGES).unwrap();
    let texts: Vec<String> = msgs.iter().map(|m| m.text.clone()).collect();
    assert_eq!(texts, (1..=MESSAGES).map(|i| format!("message {i}")).collect::<Vec<_>>());
}
