//! Replica moves (src/node/membership.rs) on real processes: a shard's replica moves to a
//! node that did not hold it and back, from a follower and from the leader, while clients
//! send through every node; nothing acknowledged is lost or reordered, every node still
//! serves every request (routing follows the moves), and it all holds after restarts.

mod common;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shards node `i` hosts: shard -> (voters as it sees them, leader).
async fn hosted(c: &common::TestCluster, i: usize) -> BTreeMap<u64, (Vec<u64>, Option<u64>)> {
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
fn logs(c: &common::TestCluster) -> String {
    c.log_tails(25)
}

async fn move_replica(c: &common::TestCluster, via: usize, shard: u64, from: u64, to: u64) -> Value {
    let path = format!("/v1/admin/shards/{shard}/move");
    let a = match c.req(via, "POST", &path, Some(&c.admin_token()), Some(json!({ "from": from, "to": to }))).await {
        Ok(a) => a,
        Err(e) => panic!("move shard {shard} {from} -> {to}: {e}\n{}", logs(c)),
    };
    assert_eq!(a.status, 200, "move shard {shard} {from} -> {to}: {}\n{}", a.body, logs(c));
    a.ok()
}

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

fn admin(c: &common::TestCluster, args: &[&str]) -> String {
    let secret = c.dir.join("secret");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_raftchat"))
        .arg("admin")
        .args(args)
        .args(["--server", &c.url(0), "--secret-file", secret.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "admin {args:?}: {}\n{text}\n{}", String::from_utf8_lossy(&out.stderr), logs(c));
    text
}

/// The node ids node `i` lists in `GET /v1/nodes`.
async fn listed(c: &common::TestCluster, i: usize) -> Option<Vec<u64>> {
    let r = c.req(i, "GET", "/v1/nodes", None, None).await.ok()?;
    Some(r.body["nodes"].as_array()?.iter().filter_map(|n| n["id"].as_u64()).collect())
}

/// Starts node `i` and checks that it exits with an error saying it was removed.
async fn refused_as_removed(c: &mut common::TestCluster, i: usize, within: Duration) {
    c.spawn(i).unwrap();
    let status = common::eventually(within, "the removed node refuses to run", || {
        let s = c.reap(i);
        async move { s }
    })
    .await;
    assert!(!status.success());
    let log = std::fs::read_to_string(c.dir.join(format!("node{}.log", i + 1))).unwrap();
    assert!(log.contains(&format!("node {} was removed from this cluster", i + 1)), "{log}");
}

/// `raftchat admin ARGS` through node `via`: whether it succeeded, and its output.
fn admin_via(c: &common::TestCluster, via: usize, args: &[&str]) -> (bool, String) {
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
async fn all_there(c: &common::TestCluster, sent: &[(String, String, u64, String)], nodes: &[usize]) {
    for (user, conv, seq, text) in sent {
        for &n in nodes {
            let h = c.full_history(n, user, conv).await;
            let got = h.messages.iter().find(|m| m.seq == *seq).map(|m| m.text.as_str());
            assert_eq!(got, Some(text.as_str()), "{conv} seq {seq} via node {}", n + 1);
        }
    }
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
        for (k, a) in users.iter().enumerate() {
            let b = users[(k + 1) % users.len()];
            let id = format!("{tag}-{k}");
            let r = c.send_ok(node, a, b, &id, &id).await;
            sent.push((a.to_string(), r.conversation_id, r.seq, id));
        }
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

/// Waits until each of the 8 shards, as its leader among `live` sees it, has 3 voters and
/// none of them is `dead`.
async fn back_to_three_voters_without(c: &common::TestCluster, live: &[usize], dead: u64, what: &str) {
    common::eventually(Duration::from_secs(90), what, || async {
        let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for &i in live {
            for (shard, (voters, leader)) in hosted(c, i).await {
                if leader == Some(i as u64 + 1) {
                    seen.insert(shard, voters);
                }
            }
        }
        (seen.len() == 8 && seen.values().all(|v| v.len() == 3 && !v.contains(&dead))).then_some(())
    })
    .await;
}

/// Whichever node leads shard 0 by now logged that re-replication moved a shard.
fn assert_repair_moved(c: &common::TestCluster) {
    let moved = (0..c.len()).any(|i| {
        std::fs::read_to_string(c.dir.join(format!("node{}.log", i + 1)))
            .is_ok_and(|l| l.contains("re-replicated a shard of a dead node"))
    });
    assert!(moved, "{}", logs(c));
}

/// Re-replication: a node of a 4-node cluster dies; once it has been silent for
/// `replace_dead_after_secs`, each shard it held gets a replica on a live node that had none
/// (three voters again, without it), with nothing lost. When it comes back, it drops the
/// copies that moved away and serves as a router.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_nodes_replicas_move_to_live_nodes_and_it_drops_them_when_back() {
    let mut c = common::start(4, |cfg| {
        cfg.balance_every_secs = 0;
        cfg.replace_dead_after_secs = 3;
    })
    .await;
    let users = ["ra", "rb", "rc", "rd", "re"];
    for u in users {
        c.register(0, u).await;
    }
    let mut sent = Vec::new();
    for round in 0..3 {
        for (k, a) in users.iter().enumerate() {
            let b = users[(k + 1) % users.len()];
            let id = format!("r{round}-{k}");
            let r = c.send_ok(round % 4, a, b, &id, &id).await;
            sent.push((a.to_string(), r.conversation_id, r.seq, id));
        }
    }
    // A node that does not lead the directory shard (shard 0) dies.
    let lead0 = c.leader_of(0).await.expect("shard 0 has a leader");
    let victim = (0..4).find(|i| *i != lead0).unwrap();
    let dead = victim as u64 + 1;
    let held = hosted(&c, victim).await.len();
    assert!(held > 0, "the victim holds replicas");
    c.kill(victim).unwrap();
    let live: Vec<usize> = (0..4).filter(|i| *i != victim).collect();
    back_to_three_voters_without(&c, &live, dead, "every shard has 3 voters, none of them the dead node").await;
    assert_repair_moved(&c);
    for (k, a) in users.iter().enumerate() {
        let b = users[(k + 1) % users.len()];
        let id = format!("after-{k}");
        let r = c.send_ok(live[k % 3], a, b, &id, &id).await;
        sent.push((a.to_string(), r.conversation_id, r.seq, id));
    }
    all_there(&c, &sent, &live).await;

    // It comes back: its copies moved away, so it drops them and routes.
    c.spawn(victim).unwrap();
    common::eventually(Duration::from_secs(60), "the returning node drops its stale copies", || async {
        let s = c.status(victim).await.ok()?;
        s["shards"].as_array()?.is_empty().then_some(())
    })
    .await;
    c.wait_ready(victim, common::READY).await.unwrap();
    all_there(&c, &sent, &[0, 1, 2, 3]).await;
}

/// `admin remove-node N --force` for a dead machine: the node is removed at once and its
/// replicas move in the next re-replication round, long before `replace_dead_after_secs`
/// (left at 300 s here) would count it dead. A second forced removal with no node free to
/// take the replicas is refused with the reason; the removed node cannot come back.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_node_removed_with_force_has_its_replicas_moved_at_once() {
    let mut c = common::start(4, |cfg| {
        cfg.balance_every_secs = 0;
        cfg.replace_dead_after_secs = 300;
    })
    .await;
    let users = ["fa", "fb", "fc", "fd", "fe"];
    for u in users {
        c.register(0, u).await;
    }
    let mut sent = Vec::new();
    for (k, a) in users.iter().enumerate() {
        let b = users[(k + 1) % users.len()];
        let id = format!("f-{k}");
        let r = c.send_ok(k % 4, a, b, &id, &id).await;
        sent.push((a.to_string(), r.conversation_id, r.seq, id));
    }
    let lead0 = c.leader_of(0).await.expect("shard 0 has a leader");
    let victim = (0..4).find(|i| *i != lead0).unwrap();
    let dead = victim as u64 + 1;
    assert!(!hosted(&c, victim).await.is_empty(), "the victim holds replicas");
    c.kill(victim).unwrap();
    let live: Vec<usize> = (0..4).filter(|i| *i != victim).collect();
    let via = live[0];

    // Forced: removed at once although shards still list it; the CLI waits for the moves.
    let started = std::time::Instant::now();
    let (ok, out) = admin_via(&c, via, &["remove-node", &dead.to_string(), "--force"]);
    assert!(ok, "{out}\n{}", logs(&c));
    assert!(out.contains(&format!("node {dead} holds no replica")), "{out}");
    back_to_three_voters_without(&c, &live, dead, "every shard has 3 voters, none of them the removed node").await;
    assert!(started.elapsed() < Duration::from_secs(120), "moved long before the 300 s threshold");
    assert_repair_moved(&c);
    // A node that answers is never forced out.
    let other_i = live.iter().copied().find(|i| *i != lead0 && *i != via).unwrap();
    let other = other_i as u64 + 1;
    common::eventually(Duration::from_secs(30), "a forced removal of a node that answers is refused", || async {
        let (ok, out) = admin_via(&c, via, &["remove-node", &other.to_string(), "--force"]);
        assert!(!ok, "{out}");
        out.contains("is for a node that is down").then_some(())
    })
    .await;
    // Down, but with three nodes left every shard is on all of them: no node could take its
    // replicas, so it is refused with the reason.
    c.kill(other_i).unwrap();
    common::eventually(Duration::from_secs(30), "a forced removal of the second dead node is refused", || async {
        let (ok, out) = admin_via(&c, via, &["remove-node", &other.to_string(), "--force"]);
        (!ok && out.contains("no node that answers is free to take")).then_some(())
    })
    .await;
    assert!(listed(&c, via).await.unwrap().contains(&other));
    c.spawn(other_i).unwrap();
    c.wait_ready(other_i, common::READY).await.unwrap();
    for (k, a) in users.iter().enumerate() {
        let b = users[(k + 1) % users.len()];
        let id = format!("after-{k}");
        let r = c.send_ok(live[k % 3], a, b, &id, &id).await;
        sent.push((a.to_string(), r.conversation_id, r.seq, id));
    }
    all_there(&c, &sent, &live).await;
    refused_as_removed(&mut c, victim, Duration::from_secs(30)).await;
}

/// With re-replication off (`replace_dead_after_secs = 0`) the cleanups still run: a shard's
/// replica moved away from a node while it was down (the operator's `move-replica` from a
/// dead node) is dropped by that node when it comes back.
#[tokio::test(flavor = "multi_thread")]
async fn with_re_replication_off_a_returning_node_still_drops_a_copy_that_moved_away() {
    let mut c = common::start(4, |cfg| {
        cfg.balance_every_secs = 0;
        cfg.replace_dead_after_secs = 0;
    })
    .await;
    let (on1, on4) = (hosted(&c, 0).await, hosted(&c, 3).await);
    let (&shard, (voters, _)) =
        on1.iter().find(|(s, _)| !on4.contains_key(s)).expect("node 4 lacks some shard node 1 holds");
    let victim = voters.iter().copied().find(|v| *v != 1 && *v != 4).expect("a voter other than nodes 1 and 4");
    c.kill(victim as usize - 1).unwrap();
    let out = move_replica(&c, 0, shard, victim, 4).await;
    assert!(out["voters"].as_array().unwrap().contains(&json!(4)), "{out}");
    assert!(!out["voters"].as_array().unwrap().contains(&json!(victim)), "{out}");

    c.spawn(victim as usize - 1).unwrap();
    common::eventually(Duration::from_secs(60), "the returning node drops the copy that moved away", || async {
        let s = c.status(victim as usize - 1).await.ok()?;
        let held: Vec<u64> = s["shards"].as_array()?.iter().filter_map(|g| g["shard"].as_u64()).collect();
        (!held.contains(&shard) && !held.is_empty()).then_some(())
    })
    .await;
}

/// A leader that crashes between the two steps of a voter change (`RAFTCHAT_FAULT=
/// crash-on-joint`: it aborts while applying the committed joint config, so the second step
/// is never proposed) leaves its shard in a joint config; the next leader finishes it to the
/// newer voters by itself (the repair task), with no other move asked for.
#[tokio::test(flavor = "multi_thread")]
async fn a_voter_change_cut_short_by_its_leaders_crash_is_finished_by_the_next_leader() {
    let mut c = common::start(4, |cfg| cfg.balance_every_secs = 0).await;
    c.register(0, "jo").await;
    c.register(0, "kay").await;
    let (on1, on4) = (hosted(&c, 0).await, hosted(&c, 3).await);
    let (&shard, (voters, _)) =
        on1.iter().find(|(s, _)| !on4.contains_key(s)).expect("node 4 lacks some shard node 1 holds");
    let voters = voters.clone();
    let leader = common::eventually(Duration::from_secs(30), "the shard has a leader", || async {
        hosted(&c, 0).await.get(&shard)?.1
    })
    .await;
    let from = voters.iter().copied().find(|v| *v != leader).expect("a follower");
    let mut after: Vec<u64> = voters.iter().copied().filter(|v| *v != from).chain([4]).collect();
    after.sort_unstable();

    // The leader runs with the fault, and gets the shard's leadership back after its restart.
    let li = leader as usize - 1;
    c.env[li].push(("RAFTCHAT_FAULT".into(), "crash-on-joint".into()));
    c.kill(li).unwrap();
    c.spawn(li).unwrap();
    c.wait_ready(li, common::READY).await.expect("restarted leader ready");
    common::eventually(Duration::from_secs(60), "the faulty node leads the shard again", || async {
        let body = json!({ "to": leader });
        let path = format!("/v1/admin/shards/{shard}/transfer-leader");
        let a = c.req(li, "POST", &path, Some(&c.admin_token()), Some(body)).await.ok()?;
        (a.status == 200 && a.body["leader"].as_u64() == Some(leader)).then_some(())
    })
    .await;

    // The move, asked of the leader itself so that nothing retries it elsewhere: the leader
    // dies with the joint config committed and the request unanswered.
    let path = format!("/v1/admin/shards/{shard}/move");
    let body = json!({ "from": from, "to": 4 });
    let a = c.req(li, "POST", &path, Some(&c.admin_token()), Some(body)).await;
    assert!(a.is_err(), "the faulty leader answered the move: {:?}\n{}", a.map(|a| a.body), logs(&c));
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !c.exited(li) {
        assert!(std::time::Instant::now() < end, "the faulty leader did not abort\n{}", logs(&c));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The next leader finds the joint config and finishes it.
    let live: Vec<usize> = (0..4).filter(|i| *i != li).collect();
    let finished = common::eventually(Duration::from_secs(90), "the joint config is finished", || async {
        for &i in &live {
            let s = c.status(i).await.ok()?;
            let g = s["shards"].as_array()?.iter().find(|g| g["shard"].as_u64() == Some(shard))?.clone();
            if g["leader"].as_u64() == Some(c.id_of(i)) && g["joint"].as_bool() == Some(false) {
                let mut v: Vec<u64> = g["replicas"].as_array()?.iter().filter_map(Value::as_u64).collect();
                v.sort_unstable();
                return Some((i, v));
            }
        }
        None
    })
    .await;
    assert_eq!(finished.1, after, "voters after the finished change\n{}", logs(&c));
    let counted: f64 = {
        let mut n = 0.0;
        for &i in &live {
            n += c.metric(i, "raftchat_joint_configs_finished_total").await;
        }
        n
    };
    assert!(counted >= 1.0, "no node counted a finished joint config\n{}", logs(&c));
    // (The finisher may be a voter the change removes, which then steps down: any live log.)
    assert!(
        live.iter().any(|i| std::fs::read_to_string(c.dir.join(format!("node{}.log", i + 1)))
            .unwrap_or_default()
            .contains("finished a membership change cut short")),
        "no live node logged the finish\n{}",
        logs(&c)
    );

    // The node comes back without the fault; running the move again completes it (the old
    // voter drops its copy) and the shard serves writes.
    c.env[li].clear();
    c.spawn(li).unwrap();
    c.wait_ready(li, common::READY).await.expect("node back");
    let out = move_replica(&c, live[0], shard, from, 4).await;
    let mut v: Vec<u64> = out["voters"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    v.sort_unstable();
    assert_eq!(v, after, "{out}");
    c.send_ok(li, "jo", "kay", "after-joint", "still here").await;
}

/// The placement lock: while one placement command holds it, another command and a direct
/// move are refused with the holder's name, a move carrying the holder's token goes on, and
/// re-replication of a dead node waits; once it is released, re-replication moves the dead
/// node's replicas and commands run again.
#[tokio::test(flavor = "multi_thread")]
async fn placement_changes_take_turns_through_the_placement_lock() {
    let mut c = common::start(4, |cfg| {
        cfg.balance_every_secs = 0;
        cfg.replace_dead_after_secs = 3;
    })
    .await;
    // Through a node that does not lead shard 0 (the lock's keeper), and a victim that is
    // neither.
    let lead0 = c.leader_of(0).await.expect("shard 0 has a leader");
    let via = (0..4).find(|i| *i != lead0).unwrap();
    let victim = (0..4).find(|i| *i != lead0 && *i != via).unwrap();
    let token: u64 = 4242;
    let take = move |renew: bool| json!({ "token": token, "holder": "the test's own command", "renew": renew });
    let taken = common::eventually(Duration::from_secs(30), "the placement lock is taken", || async {
        let a = c.req(via, "POST", "/v1/admin/placement/lock", Some(&c.admin_token()), Some(take(false))).await.ok()?;
        (a.status == 200).then_some(a)
    })
    .await;
    assert_eq!(taken.body["state"], json!("Granted"), "{}", taken.body);
    // Held: renewed in the background as a command would.
    let renewer = {
        let (http, url, bearer) = (c.http.clone(), format!("{}/v1/admin/placement/lock", c.url(via)), c.admin_token());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = http.post(&url).bearer_auth(&bearer).json(&take(true)).send().await;
            }
        })
    };

    let state = c.req(via, "GET", "/v1/admin/placement/lock", Some(&c.admin_token()), None).await.unwrap();
    assert!(state.body["message"].as_str().unwrap_or("").contains("the test's own command"), "{}", state.body);
    let user = c.req(via, "GET", "/v1/admin/placement/lock", Some(&c.token("nobody")), None).await.unwrap();
    assert_eq!(user.status, 403, "{}", user.body);

    // Another command is refused, naming the holder; so is a move without the token.
    let (on1, on4) = (hosted(&c, 0).await, hosted(&c, 3).await);
    let (&shard, (voters, _)) =
        on1.iter().find(|(s, _)| !on4.contains_key(s)).expect("node 4 lacks some shard node 1 holds");
    let from = voters.iter().copied().find(|v| *v != 1).expect("another voter");
    let (ok, out) = admin_via(&c, via, &["move-replica", &shard.to_string(), &from.to_string(), "4"]);
    assert!(!ok && out.contains("the test's own command"), "{out}");
    let path = format!("/v1/admin/shards/{shard}/move");
    let body = json!({ "from": from, "to": 4 });
    let a = c.req(via, "POST", &path, Some(&c.admin_token()), Some(body.clone())).await.unwrap();
    a.err(409, "placement_busy");
    assert!(a.body["message"].as_str().unwrap().contains("the test's own command"), "{}", a.body);
    // With the holder's token it goes on.
    let r = c
        .http
        .post(format!("{}{path}", c.url(via)))
        .bearer_auth(c.admin_token())
        .header("x-raftchat-placement-token", token.to_string())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let out: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{out}\n{}", logs(&c));
    assert!(out["voters"].as_array().unwrap().contains(&json!(4)), "{out}");

    // A node dies; re-replication waits while the lock is held...
    let dead = victim as u64 + 1;
    c.kill(victim).unwrap();
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(lists_dead(&c, victim, dead).await, "re-replication moved replicas while the lock was held\n{}", logs(&c));
    let log0 = std::fs::read_to_string(c.dir.join(format!("node{}.log", lead0 + 1))).unwrap_or_default();
    assert!(log0.contains("re-replication waits"), "shard 0's leader did not say it waits\n{}", logs(&c));

    // ...and goes on once it is released.
    renewer.abort();
    let a = c
        .req(via, "POST", "/v1/admin/placement/unlock", Some(&c.admin_token()), Some(json!({ "token": token })))
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    common::eventually(Duration::from_secs(120), "the dead node's replicas moved", || async {
        (!lists_dead(&c, victim, dead).await).then_some(())
    })
    .await;
    // And a command runs again (the repair released the lock when done): the node comes
    // back (dropping its stale copies) and gets a replica.
    c.spawn(victim).unwrap();
    common::eventually(Duration::from_secs(60), "the returning node drops its stale copies", || async {
        let s = c.status(victim).await.ok()?;
        s["shards"].as_array()?.is_empty().then_some(())
    })
    .await;
    let after = hosted(&c, lead0).await;
    let (&shard, (voters, _)) = after.iter().next().expect("shard 0's leader holds shards");
    let from = voters.iter().copied().find(|v| *v != lead0 as u64 + 1).expect("another voter");
    let to = dead;
    let (ok, out) = common::eventually(Duration::from_secs(60), "a placement command runs", || async {
        let r = admin_via(&c, via, &["move-replica", &shard.to_string(), &from.to_string(), &to.to_string()]);
        r.0.then_some(r)
    })
    .await;
    assert!(ok && out.contains(&format!("node {from} -> node {to}")), "{out}");
}

/// Whether any running node but `victim` lists node `dead` among a shard's voters.
async fn lists_dead(c: &common::TestCluster, victim: usize, dead: u64) -> bool {
    let mut any = false;
    for i in (0..c.len()).filter(|i| *i != victim) {
        if let Ok(s) = c.status(i).await {
            for g in s["shards"].as_array().into_iter().flatten() {
                any |= g["replicas"].as_array().into_iter().flatten().any(|v| v.as_u64() == Some(dead));
            }
        }
    }
    any
}

/// With shard 0 out of reach (two of its three voters dead), the placement lock cannot be
/// taken: an operator's command still repairs another shard, uncoordinated, with a warning
/// (the lock orders commands; no move needs it to be safe).
#[tokio::test(flavor = "multi_thread")]
async fn a_command_goes_on_without_the_lock_when_shard_0_cannot_answer() {
    let mut c = common::start(5, |cfg| {
        cfg.balance_every_secs = 0;
        cfg.replace_dead_after_secs = 0;
    })
    .await;
    let mut on = Vec::new();
    for i in 0..5 {
        on.push(hosted(&c, i).await);
    }
    let voters = |s: u64| on.iter().find_map(|m| m.get(&s).map(|(v, _)| v.clone())).unwrap_or_default();
    let v0 = voters(0);
    let keep = v0[0];
    let dead: Vec<u64> = v0[1..].to_vec();
    // A shard with one dead voter and two live ones, and a live node without it.
    let (shard, from, to) = (1..8u64)
        .find_map(|s| {
            let v = voters(s);
            let dead_in: Vec<u64> = v.iter().copied().filter(|n| dead.contains(n)).collect();
            let to = (1..=5u64).find(|n| !v.contains(n) && !dead.contains(n))?;
            (dead_in.len() == 1).then(|| (s, dead_in[0], to))
        })
        .unwrap_or_else(|| panic!("no shard fits: {on:?}"));
    for d in &dead {
        c.kill(*d as usize - 1).unwrap();
    }
    let via = keep as usize - 1;
    let (ok, out) = admin_via(&c, via, &["move-replica", &shard.to_string(), &from.to_string(), &to.to_string()]);
    assert!(ok, "{out}\n{}", logs(&c));
    assert!(out.contains("the placement lock cannot be taken"), "{out}");
    assert!(out.contains(&format!("node {from} -> node {to}")), "{out}");
}
