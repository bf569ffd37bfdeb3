//! Replica moves (src/node/membership.rs) on real processes: a shard's replica moves to a
//! node that did not hold it and back, from a follower and from the leader, while clients
//! send through every node; nothing acknowledged is lost or reordered, every node still
//! serves every request (routing follows the moves), and it all holds after restarts.

mod common;

use common::placement::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_moves_away_and_back_under_load_and_nothing_is_lost() {
    let c = Arc::new(common::start(4, |cfg| cfg.balance_every_secs = 0).await);
    let users: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    for u in &users {
        c.register(0, u).await;
    }

    // Senders through every node, until told to stop; what was acknowledged, by conversation.
    type Acked = BTreeMap<String, Vec<(u64, String)>>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for p in 0..4usize {
        let (c, acked, stop, users) = (c.clone(), acked.clone(), stop.clone(), users.clone());
        senders.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (a, b) = (&users[(p + n) % 8], &users[(p + 3 * n + 1) % 8]);
                n += 1;
                if a == b {
                    continue;
                }
                let text = format!("p{p}-{n}");
                // A send that fails (a shard mid-move, a timeout) is retried with its id until
                // it is acknowledged: exactly once either way.
                for _ in 0..20 {
                    if let Ok(r) = c.send((p + n) % 4, a, b, &text, &text).await {
                        if r.status == 200 {
                            let s: raftchat::api::ops::SendResponse = r.ok();
                            acked.lock().unwrap().entry(s.conversation_id).or_default().push((s.seq, text.clone()));
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A shard node 4 does not hold, and one of its followers.
    let on4 = hosted(&c, 3).await;
    let on1 = hosted(&c, 0).await;
    let (&shard, (voters, leader)) =
        on1.iter().find(|(s, _)| !on4.contains_key(s)).expect("node 4 lacks some shard node 1 holds");
    assert_eq!(voters.len(), 3, "{voters:?}");
    let leader = leader.expect("the shard has a leader");
    let follower = *voters.iter().find(|v| **v != leader).unwrap();

    let series = format!("raftchat_shard_term{{shard=\"{shard}\"}}");
    assert!(c.metric(follower as usize - 1, &series).await >= 1.0, "node {follower} exports shard {shard}'s term");

    // 1. From a follower to node 4, asked through a node that is neither.
    let via = (1..=4u64).find(|n| *n != follower && *n != 4).unwrap() as usize - 1;
    let out = move_replica(&c, via, shard, follower, 4).await;
    assert_eq!(out["dropped"], true, "{out}");
    let mut want: Vec<u64> = voters.iter().map(|v| if *v == follower { 4 } else { *v }).collect();
    want.sort_unstable();
    let mut got: Vec<u64> = out["voters"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    got.sort_unstable();
    assert_eq!(got, want);
    assert!(!hosted(&c, follower as usize - 1).await.contains_key(&shard), "node {follower} dropped shard {shard}");
    assert_eq!(c.metric(follower as usize - 1, &series).await, 0.0, "its per-shard series went with it");
    let text = c.http.get(format!("{}/metrics", c.url(follower as usize - 1))).send().await.unwrap();
    assert!(!text.text().await.unwrap().contains(&series), "no {series} on node {follower}");
    common::eventually(Duration::from_secs(30), "node 4 holds the shard as a voter, with a leader", || async {
        hosted(&c, 3).await.get(&shard).filter(|(v, _)| v.contains(&4)).and_then(|(_, l)| *l)
    })
    .await;

    // 2. From the leader back to the node that just left it (its data was deleted: it
    //    comes back empty and catches up).
    let path = format!("/v1/admin/shards/{shard}/transfer-leader");
    let a = c.req(3, "POST", &path, Some(&c.admin_token()), Some(json!({ "to": 4 }))).await.unwrap();
    assert_eq!(a.status, 200, "{}\n{}", a.body, logs(&c));
    let leader_now = 4u64;
    let out = move_replica(&c, 3, shard, leader_now, follower).await;
    assert_eq!(out["dropped"], true, "{out}");
    assert!(out["voters"].as_array().unwrap().contains(&json!(follower)), "{out}");
    assert!(!hosted(&c, leader_now as usize - 1).await.contains_key(&shard));

    // Moving what is not there is refused with a reason.
    let path = format!("/v1/admin/shards/{shard}/move");
    let a = c.req(0, "POST", &path, Some(&c.admin_token()), Some(json!({"from": leader_now, "to": 9}))).await.unwrap();
    a.err(400, "invalid_request");
    let a = c.req(0, "POST", &path, Some(&c.token("m1")), Some(json!({"from": 1, "to": 2}))).await.unwrap();
    assert_eq!(a.status, 403, "{}", a.body);

    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }

    // Restarts keep what each node hosts and where moved shards went.
    let mut c = Arc::try_unwrap(c).ok().expect("senders are done");
    for i in [follower as usize - 1, leader_now as usize - 1] {
        c.kill(i).unwrap();
        c.spawn(i).unwrap();
    }
    c.wait_all_ready(common::READY).await.unwrap();

    // Every acknowledged message, once, in order, read through every node.
    let acked = acked.lock().unwrap().clone();
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total > 20, "the senders sent during the moves ({total})");
    for (conv, sent) in &acked {
        let (a, _) = conv.split_once('~').unwrap();
        for node in 0..4 {
            let h = c.full_history(node, a, conv).await;
            let seqs: Vec<u64> = h.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=h.last_seq).collect::<Vec<_>>(), "{conv} via node {}: gap-free", node + 1);
            let by_seq: BTreeMap<u64, &str> = h.messages.iter().map(|m| (m.seq, m.text.as_str())).collect();
            for (seq, text) in sent {
                assert_eq!(by_seq.get(seq), Some(&text.as_str()), "{conv} seq {seq} via node {}", node + 1);
            }
        }
    }
    assert!(!hosted(&c, 3).await.contains_key(&shard), "node 4 gave the shard back");
    assert!(hosted(&c, follower as usize - 1).await.contains_key(&shard));
}

/// An operator's path, with no config edited and no node restarted for it: a node joins a
/// running 3-node cluster (started with `initial_cluster_state = "existing"` and the running
/// nodes as seeds: it registers in the replicated node table), `admin add-node` gives it
/// its share; `admin remove-node` empties another and removes it for good (it stops by
/// itself and cannot come back, not even with an empty data folder); another node joins and
/// `admin replace-node` moves a third's replicas to it. Every message stays readable through
/// every member, before and after a restart of all of them.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_joins_and_nodes_leave_with_the_admin_commands() {
    // Small logs: shards snapshot and purge early, so a replica moving to a new node can
    // only catch up by a streamed snapshot.
    let mut c = common::start(3, |cfg| {
        cfg.balance_every_secs = 0;
        cfg.snapshot_every = 10;
        cfg.keep_logs = 2;
    })
    .await;
    let users = ["ja", "jb", "jc", "jd", "je", "jf"];
    for u in users {
        c.register(0, u).await;
    }
    let mut sent = Vec::new();
    let mut send = async |c: &common::TestCluster, node: usize, tag: &str| {
        send_ring(c, &users, &format!("{tag}-"), |_| node, &mut sent).await;
    };
    for round in 0..6 {
        send(&c, round % 3, &format!("before{round}")).await;
    }
    // Shards whose leader purged its log's start: a new replica gets them by snapshot.
    // (Every replica purged, the leader included: the lowest purge point of the three.)
    let purged: BTreeMap<u64, u64> = common::eventually(Duration::from_secs(30), "some shards purge", || async {
        let mut low: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for n in 0..3 {
            let s = c.status(n).await.ok()?;
            for g in s["shards"].as_array()? {
                low.entry(g["shard"].as_u64()?).or_default().push(g["purged_index"].as_u64().unwrap_or(0));
            }
        }
        let p: BTreeMap<u64, u64> = low
            .into_iter()
            .filter_map(|(s, v)| Some((s, v.iter().copied().min().filter(|m| *m > 0 && v.len() == 3)?)))
            .collect();
        (p.len() >= 3).then_some(p)
    })
    .await;

    // Node 4 joins: it registers its addresses in the node table, and the others learn them
    // from there (nobody restarts, no config changes).
    let n4 = c.add_node().unwrap();
    c.spawn(n4).unwrap();
    c.wait_ready(n4, common::READY).await.unwrap();
    assert!(hosted(&c, n4).await.is_empty(), "a joining node hosts nothing by itself");
    common::eventually(Duration::from_secs(30), "every node lists node 4", || async {
        for i in 0..3 {
            if !listed(&c, i).await?.contains(&4) {
                return None;
            }
        }
        Some(())
    })
    .await;
    send(&c, n4, "joined").await;

    let out = admin(&c, &["add-node", "4"]);
    assert!(out.contains("node 4 holds 6 replicas"), "{out}");
    // And its share of leaders (8 shards over 4 nodes), on shards with no preferred leader
    // left, so leader balancing does not take them back.
    assert!(out.contains("node 4 leads 2 shards"), "{out}");
    let s4 = c.status(n4).await.unwrap();
    let led: Vec<&Value> = s4["shards"].as_array().unwrap().iter().filter(|g| g["leader"] == 4).collect();
    assert!(led.len() >= 2, "node 4 leads {} shards", led.len());
    for g in led {
        // Leader balancing moves a leadership only to a shard's preferred leader.
        assert!(g["preferred_leader"].is_null() || g["preferred_leader"] == 4, "{g}");
    }
    let on4 = hosted(&c, n4).await;
    assert_eq!(on4.len(), 6);
    // Node 4 holds at least one shard whose log had been purged, and has applied past it.
    let caught: Vec<u64> = on4.keys().copied().filter(|s| purged.contains_key(s)).collect();
    assert!(!caught.is_empty(), "node 4 holds a purged shard: {purged:?} vs {:?}", on4.keys());
    for shard in caught {
        common::eventually(Duration::from_secs(30), "node 4 applied past the purge", || async {
            let s = c.status(n4).await.ok()?;
            let g = s["shards"].as_array()?.iter().find(|g| g["shard"] == shard)?.clone();
            (g["applied_index"].as_u64()? >= purged[&shard]).then_some(())
        })
        .await;
    }
    send(&c, n4, "added").await;

    // Node 1 leaves: its replicas move away, it is removed from the node table and stops.
    let out = admin(&c, &["remove-node", "1"]);
    assert!(out.contains("node 1 holds no replica"), "{out}");
    assert!(out.contains("node 1 removed from the cluster"), "{out}");
    common::eventually(Duration::from_secs(30), "node 1 stops by itself", || async {
        std::fs::read_to_string(c.dir.join("node1.log"))
            .ok()?
            .contains("this node was removed from the cluster")
            .then_some(())
    })
    .await;
    common::eventually(Duration::from_secs(60), "node 1's process ends", || {
        let done = c.exited(0);
        async move { done.then_some(()) }
    })
    .await;
    send(&c, 1, "removed").await;
    // Every other node drops it from its list.
    common::eventually(Duration::from_secs(30), "no node lists node 1", || async {
        for i in 1..4 {
            if listed(&c, i).await?.contains(&1) {
                return None;
            }
        }
        Some(())
    })
    .await;

    // Node 5 joins and takes all of node 2's replicas; node 2 is removed too.
    let n5 = c.add_node().unwrap();
    c.spawn(n5).unwrap();
    c.wait_ready(n5, common::READY).await.unwrap();
    let listed = common::eventually(Duration::from_secs(30), "node 5 registered", || async {
        let ids = listed(&c, 2).await?;
        ids.contains(&5).then_some(ids)
    })
    .await;
    assert_eq!(listed, vec![2, 3, 4, 5], "{}", logs(&c));
    let (ok, out) = admin_via(&c, 2, &["replace-node", "2", "5"]);
    assert!(ok, "{out}");
    assert!(out.contains("node 2 removed from the cluster"), "{out}");
    assert_eq!(hosted(&c, n5).await.len(), 8, "node 5 took all 8 of node 2's replicas");
    common::eventually(Duration::from_secs(60), "node 2's process ends", || {
        let done = c.exited(1);
        async move { done.then_some(()) }
    })
    .await;
    send(&c, n5, "replaced").await;
    all_there(&c, &sent, &[2, 3, 4]).await;

    // Everything holds after every member restarts.
    for i in 2..5 {
        c.kill(i).unwrap();
    }
    for i in 2..5 {
        c.spawn(i).unwrap();
    }
    for i in 2..5 {
        c.wait_ready(i, common::READY).await.unwrap();
    }
    all_there(&c, &sent, &[2, 3, 4]).await;
    // The nodes that joined learnt the founders from their peers: their placement (where
    // they guess shards are) is the other nodes'.
    for i in 2..5 {
        assert_eq!(c.status(i).await.unwrap()["founders"], serde_json::json!([1, 2, 3]), "node {}", i + 1);
    }

    // A removed node cannot come back by accident: not with its data folder...
    refused_as_removed(&mut c, 0, Duration::from_secs(30)).await;
    // ...nor with an empty one, joining as a new node would.
    std::fs::remove_dir_all(c.dir.join("node1")).unwrap();
    let mut cfg = c.configs[0].clone();
    cfg.initial_cluster_state = raftchat::config::ClusterState::Existing;
    std::fs::write(c.dir.join("node1.toml"), raftchat::fixture::config_toml(&cfg).unwrap()).unwrap();
    std::fs::write(c.dir.join("node1.log"), "").unwrap();
    refused_as_removed(&mut c, 0, Duration::from_secs(60)).await;

    // What cannot be done is refused with a reason.
    let (ok, out) = admin_via(&c, 2, &["add-node", "9"]);
    assert!(!ok);
    assert!(out.contains("not a member"), "{out}");
}
