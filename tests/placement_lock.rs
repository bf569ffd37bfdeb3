//! The placement lock on real processes (src/node/placement_lock.rs): placement commands,
//! direct moves and re-replication take turns, and a command goes on without the lock when
//! shard 0 cannot answer.

mod common;

use common::placement::*;
use serde_json::{json, Value};
use std::time::Duration;

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
