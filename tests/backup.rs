//! `raftchat admin backup` of a live cluster and `admin restore` into a new one: every
//! message, read marker and recent-conversations list identical; a restore into a cluster
//! that holds data is refused.

mod common;

use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_raftchat");

fn admin(c: &common::TestCluster, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("admin")
        .args(args)
        .args(["--server", &c.url(0), "--secret-file"])
        .arg(c.dir.join("secret"))
        .env_remove("RAFTCHAT_SECRET")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_of_a_serving_cluster_restores_into_a_new_one_identical() {
    let a = common::start(3, |_| {}).await;
    let users = ["alice", "bob", "carol", "dave", "erin"];
    for u in users {
        a.register(0, u).await;
    }
    for i in 0..30 {
        let (from, to) = (users[i % 3], users[(i + 1) % 3]);
        a.send_ok(i % 3, from, to, &format!("m{i}"), &format!("message {i} — ünïcode")).await;
    }
    let bob = a.token("bob");
    let mark = a.req(1, "POST", "/v1/conversations/alice~bob/read", Some(&bob), Some(serde_json::json!({"seq": 4})));
    assert_eq!(mark.await.unwrap().status, 200);

    // Backup while another conversation keeps going.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, url, token) = (stop.clone(), a.url(2), a.token("dave"));
        let http = a.http.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body =
                    serde_json::json!({"to": "erin", "client_msg_id": format!("live{n}"), "text": "during the backup"});
                let _ = http.post(format!("{url}/v1/messages")).bearer_auth(&token).json(&body).send().await;
                n += 1;
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let backup_dir = dir.path().join("b1");
    let out = admin(&a, &["backup", backup_dir.to_str().unwrap()]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert!(out.status.success(), "backup: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["shards"].as_array().unwrap().len(), 8);
    // A second backup into the same folder is refused.
    assert!(!admin(&a, &["backup", backup_dir.to_str().unwrap()]).status.success());

    // Restore into a new cluster.
    let b = common::start(3, |_| {}).await;
    let out = admin(&b, &["restore", backup_dir.to_str().unwrap()]);
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    for (conv, reader) in [("alice~bob", "alice"), ("bob~carol", "bob"), ("alice~carol", "carol")] {
        let (x, y) = (a.full_history(0, reader, conv).await, b.full_history(1, reader, conv).await);
        assert_eq!(x.messages.len(), 10, "{conv}");
        assert_eq!(
            serde_json::to_value(&x.messages).unwrap(),
            serde_json::to_value(&y.messages).unwrap(),
            "{conv} after restore"
        );
    }
    for u in ["alice", "bob", "carol"] {
        let (x, y) = (a.conversations_ok(0, u).await, b.conversations_ok(2, u).await);
        assert_eq!(serde_json::to_value(&x).unwrap(), serde_json::to_value(&y).unwrap(), "{u}'s conversations");
    }
    // The conversation written during the backup is restored as a gap-free prefix.
    let live = b.full_history(0, "dave", "dave~erin").await;
    let seqs: Vec<u64> = live.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // The restored cluster works: idempotency keys came along, new sends follow on.
    let again = b.send_ok(1, "alice", "bob", "m0", "message 0 — ünïcode").await;
    assert!(again.duplicate);
    let next = b.send_ok(1, "alice", "bob", "after-restore", "hello again").await;
    assert!(next.seq > 1 && !next.duplicate);

    // Restoring again into a cluster that holds data is refused.
    let out = admin(&b, &["restore", backup_dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shard_not_empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// A restore chunk with a record the cluster could not use is refused whole, 400
/// `invalid_records` naming the record, and nothing of it is written: a malformed inbox key
/// (which would stop the shard's applies), an undecodable value, another shard's record.
/// The good chunk is restored afterwards and reads back.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_chunk_with_a_bad_record_is_refused_whole() {
    use raftchat::chat::{ConversationId, InboxEvent, UserId};
    use raftchat::storage::{keys, snapshot::write_record};
    let c = common::start(3, |_| {}).await;
    let (ann, bob) = (UserId::parse("ann").unwrap(), UserId::parse("bob").unwrap());
    let placement = raftchat::shard::Placement::new(8, vec![1, 2, 3]);
    let shard = placement.shard_of_user(&bob);
    let conv = ConversationId::between(&ann, &bob).unwrap();
    let event = InboxEvent::Messages { conversation: conv, after_seq: 0, to_seq: 1, ts: 5 };
    let event = serde_json::to_vec(&event).unwrap();
    let chunk = |records: &[(Vec<u8>, Vec<u8>)]| {
        let mut out = Vec::new();
        for (k, v) in records {
            write_record(&mut out, k, v).unwrap();
        }
        out
    };
    let good = vec![(keys::user(&bob), vec![]), (keys::inbox(&bob, 1), event.clone())];
    let ingest = |body: Vec<u8>, to: u32| {
        let url = format!("{}/v1/admin/shards/{to}/ingest?first=true", c.url(0));
        let req = c.http.post(url).bearer_auth(c.admin_token()).body(body);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    // Before the restore bob is unknown.
    let missing = c.req(1, "GET", "/v1/users/bob", Some(&c.token("ann")), None).await.unwrap();
    assert_eq!(missing.status, 404, "{:?}", missing.body);
    let short_key = [&keys::inbox_prefix(&bob)[..], &[0, 0, 0, 1]].concat();
    let other = (0..8).find(|s| *s != shard).unwrap();
    for (body, to, why) in [
        (chunk(&[good[0].clone(), (short_key, event.clone())]), shard, "8-byte number"),
        (chunk(&[good[0].clone(), (keys::inbox(&bob, 2), b"{\"Messages\":".to_vec())]), shard, "undecodable"),
        (chunk(&good), other, &format!("belongs on shard {shard}") as &str),
    ] {
        let (status, body) = ingest(body, to).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["code"], "invalid_records", "{body}");
        assert!(body["message"].as_str().unwrap_or_default().contains(why), "{body} (wanted {why})");
    }
    // Nothing was written: the shard is still empty, so a first chunk is accepted.
    let (status, body) = ingest(chunk(&good), shard).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["records"], 2);
    let ann_token = c.token("ann");
    let found = c.req(1, "GET", "/v1/users/bob", Some(&ann_token), None).await.unwrap();
    assert_eq!(found.status, 200, "{:?}", found.body);
}
