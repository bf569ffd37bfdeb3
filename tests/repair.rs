//! Repair on real processes (src/node/repair.rs): a dead node's replicas move to live
//! nodes (after `replace_dead_after_secs`, or at once for `remove-node --force`), a node
//! that comes back drops the copies that moved away (also with re-replication off), and a
//! voter change cut short by its leader's crash is finished by the next leader.

mod common;

use common::placement::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

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
        send_ring(&c, &users, &format!("r{round}-"), |_| round % 4, &mut sent).await;
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
    send_ring(&c, &users, "after-", |k| live[k % 3], &mut sent).await;
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
    send_ring(&c, &users, "f-", |k| k % 4, &mut sent).await;
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
    send_ring(&c, &users, "after-", |k| live[k % 3], &mut sent).await;
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
