//! The coordinating leader dies between committing a message and committing the two index
//! updates (an injected abort at exactly that point): the conversation shard's next leader
//! re-drives the outbox and both users' recent-conversations lists converge.

mod common;

use common::*;
use raftchat::api::ops::ConversationsResponse;
use raftchat::chat::{ConversationId, UserId};
use raftchat::shard::Placement;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_between_message_and_index_updates_converges() {
    let fault = |i| (i, "RAFTCHAT_FAULT".to_string(), "crash-after-append".to_string());
    let mut c = start_with_env(3, |_| {}, vec![fault(0), fault(1), fault(2)]).await;
    c.register(0, "bob").await;
    c.send_ok(0, "alice", "bob", "m1", "before the crash").await;
    let coordinator = alice_and_bobs_coordinator(&c).await;

    // Sent straight to the coordinator, so no forwarding node retries on the client's behalf.
    let r = c.send(coordinator, "alice", "bob", "m2", "boom [crash-after-append]").await;
    assert!(r.is_err() || r.as_ref().unwrap().status >= 500, "the coordinator died before acknowledging: {r:?}");
    eventually(Duration::from_secs(10), "coordinator process exited", || {
        let exited = c.exited(coordinator);
        async move { exited.then_some(()) }
    })
    .await;

    let other = c.other_than(&[coordinator]);
    for user in ["alice", "bob"] {
        eventually(Duration::from_secs(30), &format!("{user}'s recent list includes seq 2"), || async {
            let a = c.conversations(other, user, "").await;
            if a.status != 200 {
                return None;
            }
            let list: ConversationsResponse = serde_json::from_value(a.body).ok()?;
            let row = list.conversations.iter().find(|x| x.conversation_id == "alice~bob")?;
            (row.last_seq == 2 && row.preview.starts_with("boom")).then_some(())
        })
        .await;
    }
    let mut redriven = 0.0;
    for i in 0..3 {
        if c.is_running(i) {
            redriven += c.metric(i, "raftchat_outbox_redriven_total").await;
        }
    }
    assert!(redriven >= 1.0, "the new leader re-drove the outbox");
    // The client's retry finds the original message.
    let again = c.send_ok(other, "alice", "bob", "m2", "boom [crash-after-append]").await;
    assert_eq!((again.seq, again.duplicate), (2, true));
    let h = c.full_history(other, "bob", "alice~bob").await;
    assert_eq!(h.messages.len(), 2);

    // The crashed node restarts and rejoins.
    c.spawn(coordinator).unwrap();
    c.wait_ready(coordinator, READY).await.unwrap();
}

/// A graceful stop confirms the outbox entries of the sends it acknowledged last before it
/// hands its leaderships off, so the conversation shard's next leader finds nothing to
/// re-drive. `slow-confirm` stretches the confirmer's gathering window to 30 s, so only
/// that flush can confirm them before the node is gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_confirms_its_last_sends_so_nothing_is_re_driven() {
    let fault = |i| (i, "RAFTCHAT_FAULT".to_string(), "slow-confirm".to_string());
    let mut c = start_with_env(3, |_| {}, vec![fault(0), fault(1), fault(2)]).await;
    c.register(0, "bob").await;
    c.send_ok(0, "alice", "bob", "m1", "first").await;
    let coordinator = alice_and_bobs_coordinator(&c).await;
    for n in 2..=4 {
        let r = c.send_ok(coordinator, "alice", "bob", &format!("m{n}"), "just before the stop").await;
        assert_eq!((r.seq, r.duplicate), (n, false));
    }
    let status = c.stop(coordinator, Duration::from_secs(30)).expect("graceful stop");
    assert!(status.success(), "the coordinator stopped cleanly: {status:?}");

    // Three re-drive rounds of the shard's next leader: an entry still pending would have
    // been re-driven by now.
    let other = c.other_than(&[coordinator]);
    let h = c.full_history(other, "bob", "alice~bob").await;
    assert_eq!(h.messages.len(), 4);
    tokio::time::sleep(raftchat::node::send::REDRIVE_EVERY * 3).await;
    let mut redriven = 0.0;
    for i in 0..3 {
        if c.is_running(i) {
            redriven += c.metric(i, "raftchat_outbox_redriven_total").await;
        }
    }
    assert_eq!(redriven, 0.0, "the next leader re-drove sends the stopped node had acknowledged\n{}", c.log_tails(40));
    let row =
        c.conversations_ok(other, "bob").await.conversations.into_iter().find(|x| x.conversation_id == "alice~bob");
    assert_eq!(row.map(|r| r.last_seq), Some(4));
}

/// The node leading alice~bob's conversation shard: the one that coordinates its sends.
async fn alice_and_bobs_coordinator(c: &TestCluster) -> usize {
    let conv = ConversationId::between(&UserId::parse("alice").unwrap(), &UserId::parse("bob").unwrap()).unwrap();
    let shard = Placement::new(8, vec![1, 2, 3]).shard_of_conversation(&conv);
    c.leader_of(shard).await.unwrap()
}
