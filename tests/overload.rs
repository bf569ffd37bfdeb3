//! Admission control on a real 3-node cluster: a burst beyond a shard's bound is refused at
//! once with `503 overloaded` and `Retry-After` (WebSocket: an error frame with the same code
//! and `retry_after_ms`); nothing refused is written, everything accepted is, once, in one
//! gap-free order; the cluster serves normally afterwards.

mod common;

use common::*;
use raftchat::api::ops::HistoryResponse;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

/// A tiny per-shard queue, so a burst overflows it on any machine.
fn tight(c: &mut raftchat::config::Config) {
    c.shard_max_queued = 2;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_past_the_bound_is_refused_and_nothing_refused_is_written() {
    let c = start(3, tight).await;
    c.register(0, "bob").await;
    // The conversation exists and alice is registered before the burst.
    c.send_ok(0, "alice", "bob", "warm-up", "hello").await;

    let token = c.token("alice");
    let url = format!("{}/v1/messages", c.url(0));
    let calls = (0..300).map(|i| {
        let (http, url, token) = (c.http.clone(), url.clone(), token.clone());
        async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"to": "bob", "client_msg_id": format!("b{i}"), "text": format!("burst {i}")}))
                .send()
                .await
                .expect("the node answers");
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
            let body: serde_json::Value = r.json().await.expect("JSON body");
            (i, status, retry_after, body)
        }
    });
    let answers = futures::future::join_all(calls).await;

    let mut accepted = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for (i, status, retry_after, body) in &answers {
        match status {
            200 => {
                assert_eq!(body["duplicate"], false, "a first attempt is never a duplicate: {body}");
                accepted.insert(format!("b{i}"));
            }
            503 => {
                assert_eq!(body["code"], "overloaded", "{body}");
                let secs: u64 = retry_after.as_deref().expect("Retry-After on a 503").parse().expect("whole seconds");
                assert!(secs >= 1, "Retry-After {secs}");
                refused.insert(format!("b{i}"));
            }
            other => panic!("send b{i}: unexpected {other} {body}"),
        }
    }
    assert!(!refused.is_empty(), "a burst of 300 past a bound of 2 was never refused");
    assert!(!accepted.is_empty(), "nothing of the burst was accepted");

    // Every accepted message is stored once, in a gap-free order; no refused one is.
    let h: HistoryResponse = c.full_history(1, "bob", "alice~bob").await;
    let seqs: Vec<u64> = h.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=h.messages.len() as u64).collect::<Vec<_>>(), "gap-free");
    let stored: BTreeSet<String> =
        h.messages.iter().map(|m| m.client_msg_id.clone()).filter(|id| id.starts_with('b')).collect();
    assert_eq!(stored, accepted, "stored = accepted");
    assert!(stored.is_disjoint(&refused));
    let mut shed = 0.0;
    for node in 0..3 {
        shed += c.metric(node, "raftchat_shed_total").await;
    }
    assert!(shed >= refused.len() as f64, "shed_total {shed} counts the {} refusals", refused.len());

    // Refused sends can be retried (same client_msg_id) once the burst is over.
    let again = refused.iter().next().expect("one refused").clone();
    let r = c.send_ok(2, "alice", "bob", &again, "retried after 503").await;
    assert!(!r.duplicate, "nothing was written the first time");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_burst_gets_overloaded_error_frames() {
    let c = start(3, tight).await;
    c.register(0, "bob").await;
    c.send_ok(0, "alice", "bob", "warm-up", "hello").await;
    // A connection may have 16 requests in flight; 8 connections send waves of 16.
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.push(Ws::connect(&c.url(0), Some(&c.token("alice")), None).await.unwrap());
    }
    let (mut sent, mut overloaded) = (0, 0);
    for wave in 0..4 {
        for (k, ws) in conns.iter_mut().enumerate() {
            for i in 0..16 {
                let id = format!("w{wave}-{k}-{i}");
                ws.send(json!({"type": "send", "id": id, "to": "bob", "client_msg_id": id, "text": "burst"})).await;
            }
        }
        for ws in conns.iter_mut() {
            for _ in 0..16 {
                let v = ws.reply(Duration::from_secs(30)).await;
                match v["type"].as_str() {
                    Some("sent") => sent += 1,
                    Some("error") => {
                        assert_eq!(v["code"], "overloaded", "{v}");
                        assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{v}");
                        overloaded += 1;
                    }
                    _ => panic!("unexpected reply {v}"),
                }
            }
        }
    }
    assert!(overloaded > 0 && sent > 0, "sent {sent}, overloaded {overloaded}");
    let h: HistoryResponse = c.full_history(2, "alice", "alice~bob").await;
    assert_eq!(h.messages.len(), 1 + sent, "warm-up plus every sent frame, nothing refused");
}

/// The node-wide admission limit is held on the client listener's front thread: a send past
/// it is refused without waiting for the node's runtime. The node runs one worker thread and
/// admits one send at a time; a send carrying the stall marker takes that one permit and
/// blocks the worker (`RAFTCHAT_FAULT=stall-runtime`) until the test releases it. A send
/// made meanwhile must be answered `503 overloaded` with `Retry-After` *before* the release:
/// were the refusal decided on the node's runtime, it could not be answered at all until
/// then. Afterwards the stalled send completes and the refused one can be retried.
#[tokio::test(flavor = "multi_thread")]
async fn a_send_past_the_limit_is_refused_while_the_node_runtime_is_stalled() {
    let c = stallable_node().await;

    let (http, url, token) = (c.http.clone(), format!("{}/v1/messages", c.url(0)), c.token("alice"));
    let stalled = stall_over_http(&c).await;

    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        http.post(url.clone())
            .bearer_auth(token.clone())
            .json(&json!({"to": "bob", "client_msg_id": "second", "text": "while stalled"}))
            .send(),
    )
    .await
    .expect("a send past the limit is answered while the node's runtime is stalled")
    .expect("an answer");
    assert_eq!(refused.status().as_u16(), 503);
    let secs: u64 = refused
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .expect("Retry-After on a 503")
        .parse()
        .expect("whole seconds");
    assert!(secs >= 1, "Retry-After {secs}");
    let body: serde_json::Value = refused.json().await.expect("JSON body");
    assert_eq!(body["code"], "overloaded", "{body}");
    assert!(!stalled.is_finished(), "the stalled send was still held when the refusal came");

    release_stall(&c);
    assert_eq!(stalled.await.unwrap(), 200, "the stalled send completes once released");
    let r = c.send_ok(0, "alice", "bob", "second", "retried after 503").await;
    assert!(!r.duplicate, "nothing of the refused send was written");
    assert!(c.metric(0, "raftchat_shed_total{bound=\"node\"}").await >= 1.0, "the refusal is counted");
    let h: HistoryResponse = c.full_history(0, "bob", "alice~bob").await;
    let ids: Vec<&str> = h.messages.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(ids, ["warm-up", "stalled", "second"]);
}

/// The front runtime reads a send's body before the send takes an admission permit: a body
/// that never arrives is answered `400 invalid_body` once `header_read_timeout_ms` has
/// passed, and holds no permit meanwhile (the node admits one send at a time here, and a
/// whole send goes through while the other one's body is still missing).
#[tokio::test(flavor = "multi_thread")]
async fn a_send_whose_body_never_arrives_holds_no_permit_and_gets_a_clear_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn one_at_a_time(c: &mut raftchat::config::Config) {
        c.node_max_inflight_sends = 1;
        c.header_read_timeout_ms = 2_000;
    }
    let c = start(1, one_at_a_time).await;
    c.register(0, "bob").await;
    c.send_ok(0, "alice", "bob", "warm-up", "hello").await;

    let addr = c.url(0).trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"to\":",
        c.token("alice")
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    // Give the node the time to read the head and start on the body (an aid to ordering, not
    // a bound: were the permit taken before the body, the send below would be refused).
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Meanwhile another send is admitted and stored.
    c.send_ok(0, "alice", "bob", "whole", "arrives whole").await;

    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&answer).contains("invalid_body") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to the unfinished body");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("invalid_body"), "{text}");
    let h: HistoryResponse = c.full_history(0, "bob", "alice~bob").await;
    let ids: Vec<&str> = h.messages.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(ids, ["warm-up", "whole"]);
}

/// WebSocket sends are admitted by the session's reader, which runs on the listener's front
/// runtime: with the node's runtime stalled by one admitted send (as above, over one
/// connection), a send over another connection gets its `overloaded` error frame with
/// `retry_after_ms` before the stall is released; then the stalled send is acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_send_past_the_limit_gets_its_error_frame_while_the_node_runtime_is_stalled() {
    let c = stallable_node().await;
    let mut first = Ws::connect(&c.url(0), Some(&c.token("alice")), None).await.unwrap();
    let mut second = Ws::connect(&c.url(0), Some(&c.token("alice")), None).await.unwrap();

    first
        .send(json!({"type": "send", "id": "s1", "to": "bob", "client_msg_id": "stalled", "text": "[stall-runtime] wait"}))
        .await;
    stall_begun(&c).await;

    second
        .send(json!({"type": "send", "id": "s2", "to": "bob", "client_msg_id": "second", "text": "while stalled"}))
        .await;
    let v = second.reply(Duration::from_secs(20)).await;
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], "overloaded", "{v}");
    assert_eq!(v["id"], "s2", "{v}");
    assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{v}");

    release_stall(&c);
    let v = first.reply(Duration::from_secs(30)).await;
    assert_eq!(v["type"], "sent", "{v}");
    second.send(json!({"type": "send", "id": "s3", "to": "bob", "client_msg_id": "second", "text": "retried"})).await;
    let v = second.reply(Duration::from_secs(30)).await;
    assert_eq!(v["type"], "sent", "{v}");
    let h: HistoryResponse = c.full_history(0, "bob", "alice~bob").await;
    let ids: Vec<&str> = h.messages.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(ids, ["warm-up", "stalled", "second"]);
}

/// One node with one worker thread, admitting one send at a time, run with
/// `RAFTCHAT_FAULT=stall-runtime`; alice and bob have a conversation.
async fn stallable_node() -> TestCluster {
    fn one_at_a_time(c: &mut raftchat::config::Config) {
        c.node_max_inflight_sends = 1;
    }
    let env = vec![
        (0, "RAFTCHAT_FAULT".to_string(), "stall-runtime".to_string()),
        (0, "TOKIO_WORKER_THREADS".to_string(), "1".to_string()),
    ];
    let c = start_with_env(1, one_at_a_time, env).await;
    c.register(0, "bob").await;
    c.send_ok(0, "alice", "bob", "warm-up", "hello").await;
    c
}

/// Sends, over HTTP, a send that stalls the node's runtime once admitted, and waits until
/// the stall has begun; the task answers the send's status once the stall is released.
async fn stall_over_http(c: &TestCluster) -> tokio::task::JoinHandle<u16> {
    let (http, url, token) = (c.http.clone(), format!("{}/v1/messages", c.url(0)), c.token("alice"));
    let stalled = tokio::spawn(async move {
        let r = http
            .post(url)
            .bearer_auth(token)
            .json(&json!({"to": "bob", "client_msg_id": "stalled", "text": "[stall-runtime] wait"}))
            .send()
            .await
            .expect("the node answers the stalled send");
        r.status().as_u16()
    });
    stall_begun(c).await;
    stalled
}

/// Lets the stalled send go on.
fn release_stall(c: &TestCluster) {
    std::fs::write(c.dir.join("node1").join(raftchat::api::ops::STALL_RELEASE), b"").unwrap();
}

/// Waits until the node says in its log that a send has stalled its runtime.
async fn stall_begun(c: &TestCluster) {
    let log = c.dir.join("node1.log");
    eventually(Duration::from_secs(20), "the stall to begin", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log).ok().filter(|t| t.contains("fault injection: blocking this runtime thread"))
        }
    })
    .await;
}

/// A node already at its admission limit refuses a send before checking its token (the
/// cheapest refusal): even a send with a token that is not one gets `503 overloaded` at once
/// while the node's runtime is stalled, where a token check failing would have sent it to
/// the stalled runtime for its 401.
#[tokio::test(flavor = "multi_thread")]
async fn a_send_arriving_while_the_node_is_full_is_refused_before_its_token_is_checked() {
    let c = stallable_node().await;
    let (http, url) = (c.http.clone(), format!("{}/v1/messages", c.url(0)));
    let stalled = stall_over_http(&c).await;

    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        http.post(url.clone())
            .bearer_auth("not-a-token")
            .json(&json!({"to": "bob", "client_msg_id": "forged", "text": "while full"}))
            .send(),
    )
    .await
    .expect("a send arriving while the node is full is answered before its token is checked")
    .expect("an answer");
    assert_eq!(refused.status().as_u16(), 503);
    let body: serde_json::Value = refused.json().await.expect("JSON body");
    assert_eq!(body["code"], "overloaded", "{body}");

    release_stall(&c);
    assert_eq!(stalled.await.unwrap(), 200, "the stalled send completes once released");
    // With room again, the same bad token gets its 401.
    let r = http
        .post(url)
        .bearer_auth("not-a-token")
        .json(&json!({"to": "bob", "client_msg_id": "forged", "text": "with room"}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(r.status().as_u16(), 401);
    let h: HistoryResponse = c.full_history(0, "bob", "alice~bob").await;
    let ids: Vec<&str> = h.messages.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(ids, ["warm-up", "stalled"]);
}
