//! WebSocket delivery on a real 3-node cluster with real WebSocket clients.

mod common;

use common::*;
use raftchat::chat::UserId;
use raftchat::shard::Placement;
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Reads `n` message frames, returning them (other frames are skipped).
async fn messages(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(ws.next_of("message", T).await);
    }
    out
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn recipient_on_another_node_gets_every_message_in_order_and_resumes() {
    let mut c = start(3, |_| {}).await;
    c.register(0, "bob").await;
    let mut bob = Ws::connect(&c.url(2), Some(&c.token("bob")), None).await.unwrap();
    let ready = bob.next_of("ready", T).await;
    assert_eq!(ready["cursor"], "1.0", "bob's stream is empty: live from event 1");
    for i in 1..=30 {
        c.send_ok(0, "alice", "bob", &format!("m{i}"), &format!("text {i}")).await;
    }
    let got = messages(&mut bob, 30).await;
    assert_eq!(seqs(&got), (1..=30).collect::<Vec<_>>());
    assert!(got.iter().enumerate().all(|(i, f)| f["text"] == format!("text {}", i + 1) && f["from"] == "alice"));
    let cursor = got.last().unwrap()["cursor"].as_str().unwrap().to_string();
    drop(bob);

    // Offline: 250 more messages (more than one catch-up page). Resume on another node.
    for i in 31..=280 {
        c.send_ok(1, "alice", "bob", &format!("m{i}"), &format!("text {i}")).await;
    }
    let mut bob = Ws::connect(&c.url(1), Some(&c.token("bob")), Some(&cursor)).await.unwrap();
    assert_eq!(bob.next_of("ready", T).await["cursor"], cursor);
    let got = messages(&mut bob, 250).await;
    assert_eq!(seqs(&got), (31..=280).collect::<Vec<_>>(), "exactly the missed messages, in order");
    // Then live again, and nothing extra.
    c.send_ok(2, "alice", "bob", "m281", "text 281").await;
    assert_eq!(messages(&mut bob, 1).await[0]["seq"], 281);
    let mut resumes = 0.0;
    for n in 0..3 {
        resumes += c.metric(n, "raftchat_ws_resumes_total").await;
    }
    assert!(resumes >= 1.0);
    // SIGTERM on bob's node: his socket is told to go away (1001) and the node exits cleanly.
    let stop = tokio::task::spawn_blocking(move || {
        let st = c.stop(1, Duration::from_secs(30));
        (c, st)
    });
    loop {
        match bob.next(T).await {
            WsEvent::Json(_) => continue,
            WsEvent::Closed(code) => {
                assert_eq!(code, Some(1001));
                break;
            }
        }
    }
    let (_c, st) = stop.await.unwrap();
    assert!(st.unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_user_shard_leader_loses_and_duplicates_nothing() {
    let mut c = start(3, |_| {}).await;
    c.register(0, "bob").await;
    c.register(0, "alice").await;
    let shard = Placement::new(8, vec![1, 2, 3]).shard_of_user(&UserId::parse("bob").unwrap());
    let leader = c.leader_of(shard).await.unwrap();
    // bob is connected to the node that leads his mailbox shard: killing it kills his socket.
    let mut bob = Ws::connect(&c.url(leader), Some(&c.token("bob")), None).await.unwrap();
    bob.next_of("ready", T).await;

    const N: u64 = 60;
    let sender_node = c.other_than(&[leader]);
    let urls: Vec<String> = (0..3).map(|i| c.url(i)).collect();
    let token = c.token("alice");
    let sender = tokio::spawn(async move {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
        let mut node = sender_node;
        for i in 1..=N {
            let body = json!({"to": "bob", "client_msg_id": format!("k{i}"), "text": format!("t{i}")});
            loop {
                let r = http.post(format!("{}/v1/messages", urls[node])).bearer_auth(&token).json(&body).send().await;
                if matches!(&r, Ok(r) if r.status() == 200) {
                    break;
                }
                node = (node + 1) % 3;
                if node == leader {
                    node = (node + 1) % 3;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let mut got = messages(&mut bob, 20).await;
    c.kill(leader).unwrap();
    // Read what the dead socket still delivered, then reconnect elsewhere with the cursor.
    loop {
        match bob.next(T).await {
            WsEvent::Json(v) if v["type"] == "message" => got.push(v),
            WsEvent::Json(_) => {}
            WsEvent::Closed(_) => break,
        }
    }
    let cursor = got.last().unwrap()["cursor"].as_str().unwrap().to_string();
    let other = c.other_than(&[leader]);
    let mut bob = Ws::connect(&c.url(other), Some(&c.token("bob")), Some(&cursor)).await.unwrap();
    let rest = messages(&mut bob, (N as usize).saturating_sub(got.len())).await;
    got.extend(rest);
    sender.await.unwrap();
    assert_eq!(seqs(&got), (1..=N).collect::<Vec<_>>(), "no gap, no duplicate across the leader kill");
    // Nothing more arrives.
    c.send_ok(other, "alice", "bob", "last", "last").await;
    assert_eq!(messages(&mut bob, 1).await[0]["seq"], N + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_device_gets_every_message_and_senders_see_their_own() {
    let c = start(3, |_| {}).await;
    c.register(0, "bob").await;
    let mut bob1 = Ws::connect(&c.url(0), Some(&c.token("bob")), None).await.unwrap();
    let mut bob2 = Ws::connect(&c.url(1), Some(&c.token("bob")), None).await.unwrap();
    let mut alice2 = Ws::connect(&c.url(2), Some(&c.token("alice")), None).await.unwrap();
    for ws in [&mut bob1, &mut bob2, &mut alice2] {
        ws.next_of("ready", T).await;
    }
    // alice's first device sends over its own socket; bob answers over HTTP.
    let mut alice1 = Ws::connect(&c.url(0), Some(&c.token("alice")), None).await.unwrap();
    alice1.next_of("ready", T).await;
    let mut own = Vec::new();
    for i in 1..=10u64 {
        alice1.send(json!({"type": "send", "id": i, "to": "bob", "client_msg_id": format!("a{i}"), "text": format!("a{i}")})).await;
        loop {
            let v = match alice1.next(T).await {
                WsEvent::Json(v) => v,
                WsEvent::Closed(c) => panic!("closed {c:?}"),
            };
            if v["type"] == "message" {
                own.push(v);
            } else if v["type"] == "sent" {
                assert_eq!((v["id"].as_u64(), v["seq"].as_u64()), (Some(i), Some(i)));
                break;
            }
        }
    }
    // WebSocket requests are counted like HTTP ones.
    let counted = c.metric(0, "raftchat_requests_total{code=\"ok\",op=\"send\",via=\"ws\"}").await;
    assert_eq!(counted, 10.0);
    c.send_ok(2, "bob", "alice", "b1", "b1").await;
    let rest = messages(&mut alice1, 11 - own.len()).await;
    own.extend(rest);
    assert_eq!(seqs(&own), (1..=11).collect::<Vec<_>>(), "the sending device sees its own sends too");
    for ws in [&mut bob1, &mut bob2, &mut alice2] {
        let got = messages(ws, 11).await;
        assert_eq!(seqs(&got), (1..=11).collect::<Vec<_>>());
        assert_eq!(got[10]["from"], "bob");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn delivered_and_read_receipts_reach_the_sender_also_after_reconnect() {
    let c = start(3, |_| {}).await;
    c.register(0, "bob").await;
    let mut alice = Ws::connect(&c.url(0), Some(&c.token("alice")), None).await.unwrap();
    let start_cursor = alice.next_of("ready", T).await["cursor"].as_str().unwrap().to_string();
    for i in 1..=3 {
        c.send_ok(0, "alice", "bob", &format!("m{i}"), "hi").await;
    }
    let mut bob = Ws::connect(&c.url(1), Some(&c.token("bob")), Some("1.0")).await.unwrap();
    let got = messages(&mut bob, 3).await;
    bob.send(json!({"type": "ack", "id": "a", "conversation_id": "alice~bob", "seq": got[2]["seq"]})).await;
    assert_eq!(bob.reply(T).await["type"], "acked");
    bob.send(json!({"type": "mark_read", "id": "r", "conversation_id": "alice~bob", "seq": 2})).await;
    let r = bob.reply(T).await;
    assert_eq!(
        (r["type"].as_str(), r["read_seq"].as_u64(), r["unread"].as_u64()),
        (Some("marked_read"), Some(2), Some(1))
    );

    let receipt = |v: &Value| {
        (v["receipt"].as_str().unwrap().to_string(), v["seq"].as_u64().unwrap(), v["by"].as_str().unwrap().to_string())
    };
    let d = alice.next_of("receipt", T).await;
    assert_eq!(receipt(&d), ("delivered".into(), 3, "bob".into()));
    let r = alice.next_of("receipt", T).await;
    assert_eq!(receipt(&r), ("read".into(), 2, "bob".into()));
    drop(alice);

    // Reconnecting from the start replays her own messages and both receipts, in order.
    let mut alice = Ws::connect(&c.url(2), Some(&c.token("alice")), Some(&start_cursor)).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 5 {
        let v = match alice.next(T).await {
            WsEvent::Json(v) => v,
            WsEvent::Closed(c) => panic!("closed {c:?}"),
        };
        match v["type"].as_str() {
            Some("message") => kinds.push(format!("m{}", v["seq"])),
            Some("receipt") => kinds.push(format!("{}{}", v["receipt"].as_str().unwrap(), v["seq"])),
            _ => {}
        }
    }
    assert_eq!(kinds, vec!["m1", "m2", "m3", "delivered3", "read2"]);
    // The receipts are persisted in the recent-conversations row too.
    let row = &c.conversations_ok(1, "alice").await.conversations[0];
    assert_eq!((row.peer_delivered_seq, row.peer_read_seq), (3, 2));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_an_error_frame_or_a_documented_close() {
    let c = start(3, |c| {
        c.ws_queue_frames = 4;
        c.ws_slow_consumer_ms = 300;
    })
    .await;
    c.register(0, "bob").await;
    use tokio_tungstenite::tungstenite::Message;

    // Handshake refusals: bad token, bad cursor syntax.
    assert!(Ws::connect(&c.url(0), Some("garbage"), None).await.unwrap_err().contains("401"));
    assert!(Ws::connect(&c.url(0), Some(&c.token("bob")), Some("x.y")).await.unwrap_err().contains("400"));

    // Requests before auth, then a bad auth frame: error frame, then close 4001.
    let mut ws = Ws::connect(&c.url(1), None, None).await.unwrap();
    ws.send(json!({"type": "history", "id": 1, "conversation_id": "alice~bob"})).await;
    let e = ws.reply(T).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_u64()),
        (Some("error"), Some("unauthenticated"), Some(1))
    );
    ws.send(json!({"type": "auth", "token": "garbage"})).await;
    assert_eq!(ws.reply(T).await["code"], "invalid_token");
    assert!(matches!(ws.next(T).await, WsEvent::Closed(Some(4001))));

    // Authenticated by an auth frame; then every kind of bad frame gets an error frame and
    // the connection keeps working.
    let mut ws = Ws::connect(&c.url(2), None, None).await.unwrap();
    ws.send(json!({"type": "auth", "id": "x", "token": c.token("alice")})).await;
    assert_eq!(ws.reply(T).await["type"], "authenticated");
    let expect =
        |v: Value, code: &str| assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some(code)), "{v}");
    ws.send_raw(Message::Text("not json".into())).await;
    expect(ws.reply(T).await, "invalid_json");
    ws.send(json!({"type": "photo", "id": 2})).await;
    expect(ws.reply(T).await, "unknown_type");
    ws.send(json!({"id": 3})).await;
    expect(ws.reply(T).await, "missing_type");
    ws.send(json!({"type": "send", "id": 4, "to": "bob"})).await;
    expect(ws.reply(T).await, "invalid_request");
    ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    expect(ws.reply(T).await, "binary_not_supported");
    ws.send_raw(Message::Text("x".repeat(100_000).into())).await;
    expect(ws.reply(T).await, "frame_too_large");
    ws.send(json!({"type": "send", "id": 5, "to": "bob", "client_msg_id": "k", "text": ""})).await;
    expect(ws.reply(T).await, "empty_text");
    ws.send(json!({"type": "history", "id": 6, "conversation_id": "bob~carol"})).await;
    expect(ws.reply(T).await, "forbidden");
    // A fresh token for the same user renews the connection; another user's is refused.
    ws.send(json!({"type": "auth", "id": 7, "token": c.token("alice")})).await;
    assert_eq!(ws.reply(T).await["type"], "authenticated");
    ws.send(json!({"type": "auth", "id": 7, "token": c.token("bob")})).await;
    expect(ws.reply(T).await, "forbidden");
    ws.send(json!({"type": "send", "id": 8, "to": "bob", "client_msg_id": "k", "text": "still fine"})).await;
    let r = ws.reply(T).await;
    assert_eq!((r["type"].as_str(), r["id"].as_u64(), r["seq"].as_u64()), (Some("sent"), Some(8), Some(1)));

    // A cursor past the end of the stream: close 4002.
    let mut ws = Ws::connect(&c.url(0), Some(&c.token("bob")), Some("999.0")).await.unwrap();
    assert!(matches!(ws.next(T).await, WsEvent::Closed(Some(4002))));

    // A consumer that stops reading is closed with 4008 instead of buffering without bound.
    let long = "y".repeat(4000);
    for i in 0..150 {
        c.send_ok(1, "alice", "bob", &format!("big{i}"), &long).await;
    }
    let mut slow = Ws::connect_with(&c.url(1), Some(&c.token("bob")), None, Some(4096)).await.unwrap();
    for i in 0..16 {
        slow.send(json!({"type": "history", "id": i, "conversation_id": "alice~bob", "limit": 200})).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let close = loop {
        match slow.next(T).await {
            WsEvent::Json(_) => continue,
            WsEvent::Closed(code) => break code,
        }
    };
    assert_eq!(close, Some(4008));
    let mut closes = 0.0;
    for n in 0..3 {
        closes += c.metric(n, "raftchat_ws_slow_consumer_closes_total").await;
    }
    assert!(closes >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pausing_the_mailbox_leader_does_not_stall_pushes() {
    let c = start(3, |_| {}).await;
    c.register(0, "bob").await;
    c.register(0, "alice").await;
    let shard = Placement::new(8, vec![1, 2, 3]).shard_of_user(&UserId::parse("bob").unwrap());
    let leader = c.leader_of(shard).await.unwrap();
    let bob_node = c.other_than(&[leader]);
    let mut bob = Ws::connect(&c.url(bob_node), Some(&c.token("bob")), None).await.unwrap();
    bob.next_of("ready", T).await;
    c.send_ok(bob_node, "alice", "bob", "before", "before the pause").await;
    assert_eq!(messages(&mut bob, 1).await[0]["seq"], 1);

    // Bob's client keeps reading (and so answering pings) while the sends below retry, as a
    // real client does: a client that stops reading for three ping intervals is closed.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(bob.next_of("message", Duration::from_secs(150)).await);
        }
        got
    });

    // The leader freezes: its TCP connections stay open but it answers nothing.
    let paused = std::time::Instant::now();
    c.pause(leader).unwrap();
    let sender = (0..3).find(|i| *i != leader && *i != bob_node).unwrap();
    for i in 2..=4 {
        let mut tries = 0;
        loop {
            let r = c.send(sender, "alice", "bob", &format!("during{i}"), "during the pause").await;
            if matches!(&r, Ok(a) if a.status == 200) {
                break;
            }
            tries += 1;
            assert!(tries < 30, "send during the pause ({:?} after it began): {r:?}", paused.elapsed());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    eprintln!("three sends accepted {:?} after the pause began", paused.elapsed());
    let got = tokio::time::timeout(Duration::from_secs(160), reader)
        .await
        .expect("bob's pushes within 160 s")
        .expect("bob's reader");
    assert_eq!(seqs(&got), vec![2, 3, 4], "pushes continue from the new mailbox leader");
    c.resume(leader).unwrap();
}
