//! Retention through the Raft log on a real 3-node cluster: idempotency keys, inbox events
//! and messages older than their windows are deleted on every replica, in bounded sweeps;
//! a retry after the horizon is a new message and a resume cursor from before the kept
//! inbox is refused with 4002.

mod common;

use common::{Ws, WsEvent};
use std::time::Duration;

fn short_windows(c: &mut raftchat::config::Config) {
    c.dedup_retention_secs = 2;
    c.inbox_retention_secs = 2;
    c.message_retention_secs = 4;
    c.sweep_interval_secs = 1;
    // Small steps: a pass takes several Raft entries.
    c.sweep_batch = 3;
}

async fn swept(c: &common::TestCluster, kind: &str) -> f64 {
    let mut total = 0.0;
    for i in 0..3 {
        let body = c.http.get(format!("{}/metrics", c.url(i))).send().await.unwrap().text().await.unwrap();
        let line = format!("raftchat_swept_total{{kind=\"{kind}\"}} ");
        total += body.lines().find_map(|l| l.strip_prefix(&line)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn old_keys_inbox_events_and_messages_expire_through_the_raft_log() {
    let c = common::start(3, short_windows).await;
    c.register(0, "bob").await;
    // A device of bob's connected now; its cursor will point into events that expire.
    let mut ws = Ws::connect(&c.url(1), Some(&c.token("bob")), None).await.unwrap();
    let ready = ws.next_of("ready", Duration::from_secs(10)).await;
    let old_cursor = ready["cursor"].as_str().unwrap().to_string();
    drop(ws);
    for i in 1..=8 {
        let r = c.send_ok(i % 3, "alice", "bob", &format!("k{i}"), &format!("old {i}")).await;
        assert!(!r.duplicate);
    }
    // Within the window a retry is a duplicate...
    let again = c.send_ok(0, "alice", "bob", "k1", "old 1").await;
    assert!(again.duplicate, "a retry inside the horizon");
    // ...after it (and a sweep), a new message.
    common::eventually(Duration::from_secs(30), "dedup keys swept", || async {
        (swept(&c, "dedup").await >= 8.0).then_some(())
    })
    .await;
    let late = c.send_ok(1, "alice", "bob", "k1", "old 1, retried late").await;
    assert!(!late.duplicate && late.seq == 9, "past the retry horizon it is a new message: {late:?}");

    // Inbox events went too: resuming from before them is refused, and says so.
    common::eventually(Duration::from_secs(30), "inbox events swept", || async {
        (swept(&c, "inbox").await >= 7.0).then_some(())
    })
    .await;
    let mut ws = Ws::connect(&c.url(2), Some(&c.token("bob")), Some(&old_cursor)).await.unwrap();
    let mut closed = None;
    for _ in 0..10 {
        match ws.next(Duration::from_secs(10)).await {
            WsEvent::Closed(code) => {
                closed = code;
                break;
            }
            WsEvent::Json(_) => {}
        }
    }
    assert_eq!(closed, Some(4002), "an expired cursor is refused");
    // A fresh connection works.
    let mut ws = Ws::connect(&c.url(2), Some(&c.token("bob")), None).await.unwrap();
    ws.next_of("ready", Duration::from_secs(10)).await;

    // Messages older than their window are deleted on every replica; the newest stays
    // (sent later) and seqs do not move.
    common::eventually(Duration::from_secs(30), "old messages deleted", || async {
        let h = c.full_history(0, "bob", "alice~bob").await;
        (h.messages.len() <= 1).then_some(h)
    })
    .await;
    let fresh = c.send_ok(2, "alice", "bob", "fresh", "new").await;
    let h = c.full_history(1, "alice", "alice~bob").await;
    assert_eq!(h.messages.last().unwrap().seq, fresh.seq);
    assert!(h.messages.iter().all(|m| m.seq >= 9));
    assert!(swept(&c, "messages").await >= 8.0);
}
