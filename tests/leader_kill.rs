//! kill -9 the leader of a conversation's shard while several clients send into it: a new
//! leader takes over, every acknowledged message is present exactly once in one gap-free
//! order, and retries (same client_msg_id) are deduplicated.

mod common;

use common::*;
use raftchat::chat::{ConversationId, UserId};
use raftchat::shard::Placement;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORKERS: usize = 4;
const PER_WORKER: usize = 40;

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_shard_leader_under_concurrent_sends_loses_and_duplicates_nothing() {
    let mut c = start(3, |_| {}).await;
    c.register(0, "bob").await;
    c.register(0, "alice").await;
    let conv = ConversationId::between(&UserId::parse("alice").unwrap(), &UserId::parse("bob").unwrap()).unwrap();
    let shard = Placement::new(8, vec![1, 2, 3]).shard_of_conversation(&conv);
    let leader = c.leader_of(shard).await.expect("shard has a leader");

    let urls: Vec<String> = (0..3).map(|i| c.url(i)).collect();
    let tokens: HashMap<&str, String> = [("alice", c.token("alice")), ("bob", c.token("bob"))].into_iter().collect();
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (urls, tokens, acked) = (urls.clone(), tokens.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
            let mut node = w % 3;
            let mut out = Vec::new();
            let mut retries = 0;
            for i in 0..PER_WORKER {
                let (from, to) = if (w + i) % 2 == 0 { ("alice", "bob") } else { ("bob", "alice") };
                let id = format!("w{w}-{i}");
                let body = serde_json::json!({"to": to, "client_msg_id": id, "text": format!("text {id}")});
                let end = Instant::now() + Duration::from_secs(60);
                loop {
                    let r = http
                        .post(format!("{}/v1/messages", urls[node]))
                        .bearer_auth(&tokens[from])
                        .json(&body)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            let v: serde_json::Value = r.json().await.unwrap();
                            out.push((id.clone(), from, v["seq"].as_u64().unwrap(), v["duplicate"].as_bool().unwrap()));
                            acked.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        other => {
                            // Unknown outcome: retry the same client_msg_id, on another node.
                            let status = other.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
                            assert!(status == 0 || status >= 500, "client error {status} for {id}");
                            assert!(Instant::now() < end, "{id} never acknowledged");
                            retries += 1;
                            node = (node + 1) % 3;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            (out, retries)
        }));
    }

    eventually(Duration::from_secs(60), "a third of the sends acknowledged", || async {
        (acked.load(Ordering::SeqCst) >= WORKERS * PER_WORKER / 3).then_some(())
    })
    .await;
    c.kill(leader).unwrap();

    let mut acks = Vec::new();
    let mut retries = 0;
    for t in tasks {
        let (out, r) = t.await.unwrap();
        acks.extend(out);
        retries += r;
    }
    assert_eq!(acks.len(), WORKERS * PER_WORKER);
    let survivor = c.other_than(&[leader]);
    let new_leader = c.leader_of(shard).await.expect("a new leader");
    assert_ne!(new_leader, leader);

    // Every acknowledged message is present exactly once, at the seq its ack named, in one
    // gap-free order.
    let h = c.full_history(survivor, "alice", &conv.to_string()).await;
    let seqs: Vec<u64> = h.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=(WORKERS * PER_WORKER) as u64).collect::<Vec<_>>(), "gap-free, no extra messages");
    let by_id: HashMap<(&str, &str), u64> =
        h.messages.iter().map(|m| ((m.from.as_str(), m.client_msg_id.as_str()), m.seq)).collect();
    assert_eq!(by_id.len(), h.messages.len(), "no client_msg_id appears twice");
    for (id, from, seq, _) in &acks {
        assert_eq!(by_id.get(&(*from, id.as_str())), Some(seq), "ack of {id} names its stored seq");
        let m = &h.messages[(*seq - 1) as usize];
        assert_eq!(m.text, format!("text {id}"));
    }
    // Retrying acknowledged sends now returns the original seq and adds nothing.
    for (id, from, seq, _) in acks.iter().take(10) {
        let to = if *from == "alice" { "bob" } else { "alice" };
        let again = c.send_ok(survivor, from, to, id, "retry").await;
        assert_eq!((again.seq, again.duplicate), (*seq, true));
    }
    assert_eq!(c.full_history(survivor, "bob", &conv.to_string()).await.messages.len(), WORKERS * PER_WORKER);
    eprintln!("leader {} killed; {retries} client retries; new leader {}", leader + 1, new_leader + 1);

    // The killed node comes back and catches up.
    c.spawn(leader).unwrap();
    c.wait_ready(leader, READY).await.unwrap();
    let target = h.messages.len() as u64;
    eventually(Duration::from_secs(30), "restarted node applies the shard's log", || async {
        let s = c.status(leader).await.ok()?;
        let sh = s["shards"].as_array()?.iter().find(|x| x["shard"] == shard)?.clone();
        (sh["applied_index"].as_u64()? >= target).then_some(())
    })
    .await;
}
