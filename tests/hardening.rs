//! Hardening probes on real nodes: each of these failed before the fix it names.

mod common;

use common::*;
use raftchat::auth::Claims;
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(15);

fn no_panics(c: &TestCluster) {
    for i in 0..c.len() {
        let log = std::fs::read_to_string(c.dir.join(format!("node{}.log", i + 1))).unwrap_or_default();
        assert!(!log.contains("panicked"), "node {} panicked:\n{log}", i + 1);
    }
}

/// A connection that never authenticates is closed with 4001 after 10 s, and the node does
/// not panic doing so ("JoinHandle polled after completion" before the fix); a 1 MiB frame
/// closes with 1009, not 1005.
#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_and_oversized_connections_close_cleanly() {
    let c = start(1, |_| {}).await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(Ws::connect(&c.url(0), None, None).await.unwrap());
    }
    let mut bad = Ws::connect(&c.url(0), None, None).await.unwrap();
    bad.send(json!({"type": "auth", "token": "garbage"})).await;
    assert_eq!(bad.reply(T).await["code"], "invalid_token");
    assert!(matches!(bad.next(T).await, WsEvent::Closed(Some(4001))));
    for ws in idle.iter_mut() {
        assert!(matches!(ws.next(T).await, WsEvent::Closed(Some(4001))));
    }

    let mut big = Ws::connect(&c.url(0), Some(&c.token("alice")), None).await.unwrap();
    big.send_raw(Message::Text("x".repeat((1 << 20) + 10).into())).await;
    let code = loop {
        match big.next(T).await {
            WsEvent::Json(_) => continue,
            WsEvent::Closed(code) => break code,
        }
    };
    assert_eq!(code, Some(1009));
    tokio::time::sleep(Duration::from_millis(500)).await;
    no_panics(&c);
}

/// Finished requests do not stay with the connection (memory grew ~1 KB per request before).
#[tokio::test(flavor = "multi_thread")]
async fn a_long_lived_connection_holds_only_what_is_in_flight() {
    let c = start(1, |_| {}).await;
    c.register(0, "bob").await;
    c.send_ok(0, "alice", "bob", "m1", "hi").await;
    let mut ws = Ws::connect(&c.url(0), Some(&c.token("alice")), None).await.unwrap();
    for i in 0..300 {
        ws.send(json!({"type": "history", "id": i, "conversation_id": "alice~bob", "limit": 1})).await;
        assert_eq!(ws.reply(T).await["type"], "history");
    }
    let held = eventually(T, "request tasks collected", || async {
        let held = c.metric(0, "raftchat_ws_request_tasks").await;
        (held <= 1.0).then_some(held)
    })
    .await;
    assert!(held <= 1.0, "{held} request tasks held after 300 finished requests");
    ws.inner.close(None).await.unwrap();
    eventually(T, "gauge back to zero", || async {
        (c.metric(0, "raftchat_ws_request_tasks").await == 0.0).then_some(())
    })
    .await;
}

/// exp = 2^64-1, iat in the future and nbf in the future are refused; an open WebSocket is
/// closed with 4001 token_expired when its token expires, unless renewed with an auth frame.
#[tokio::test(flavor = "multi_thread")]
async fn token_lifetimes_are_enforced_also_on_open_connections() {
    // No clock skew allowed, so a token of 2 s expires in 2 s.
    let c = start(1, |c| c.token_leeway_secs = 0).await;
    c.register(0, "bob").await;
    let now = raftchat::auth::now_secs();
    let claims = |iat: u64, exp: u64, nbf: Option<u64>| Claims { sub: "alice".into(), iat, exp, nbf, adm: false };
    for (what, t) in [
        ("never expires", c.keys().sign(&claims(now, u64::MAX, None))),
        ("issued in the future", c.keys().sign(&claims(now + 3600, now + 7200, None))),
        ("not before an hour from now", c.keys().sign(&claims(now, now + 7200, Some(now + 3600)))),
        ("expired", c.keys().sign(&claims(now - 7200, now - 3600, None))),
    ] {
        let a = c.req(0, "GET", "/v1/conversations", Some(&t), None).await.unwrap();
        assert_eq!(a.status, 401, "{what}: {}", a.body);
    }

    let now = raftchat::auth::now_secs();
    let short = |secs: u64| c.keys().sign(&claims(now, now + secs, None));
    let mut expiring = Ws::connect(&c.url(0), Some(&short(2)), None).await.unwrap();
    let mut renewed = Ws::connect(&c.url(0), Some(&short(2)), None).await.unwrap();
    renewed.send(json!({"type": "auth", "id": 1, "token": short(3600)})).await;
    let r = renewed.reply(T).await;
    assert_eq!(r["type"], "authenticated", "{r}");
    let e = expiring.reply(T).await;
    assert_eq!(e["code"], "token_expired", "{e}");
    assert!(matches!(expiring.next(T).await, WsEvent::Closed(Some(4001))));
    tokio::time::sleep(Duration::from_secs(1)).await;
    renewed.send(json!({"type": "conversations", "id": 2})).await;
    let r = renewed.reply(T).await;
    assert_eq!(r["type"], "conversations", "{r}");
    no_panics(&c);
}

/// One user sending far above the per-user rate gets 429 rate_limited with Retry-After
/// (WebSocket: an error frame); nothing refused is written; other users are not limited.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_sending_too_fast_is_limited_alone() {
    let c = start(1, |c| {
        c.user_send_rate = 2;
        c.user_send_burst = 5;
    })
    .await;
    c.register(0, "bob").await;
    c.register(0, "carol").await;
    let mut ok = Vec::new();
    let mut limited = 0;
    for i in 0..12 {
        let a = c.send(0, "alice", "bob", &format!("r{i}"), "fast").await.unwrap();
        match a.status {
            200 => ok.push(format!("r{i}")),
            429 => {
                assert_eq!(a.body["code"], "rate_limited", "{}", a.body);
                limited += 1;
            }
            s => panic!("unexpected {s} {}", a.body),
        }
    }
    assert!(limited >= 5, "only {limited} of 12 instant sends limited (burst 5, 2/s)");
    let r = c
        .http
        .post(format!("{}/v1/messages", c.url(0)))
        .bearer_auth(c.token("alice"))
        .json(&json!({"to": "bob", "client_msg_id": "hdr", "text": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    // Another user is not held back.
    c.send_ok(0, "carol", "bob", "c1", "my turn").await;
    // Only the accepted sends are stored.
    let h = c.full_history(0, "bob", "alice~bob").await;
    let stored: Vec<String> = h.messages.iter().map(|m| m.client_msg_id.clone()).collect();
    assert_eq!(stored, ok);
    // WebSocket: an error frame with the same code and retry_after_ms.
    let mut ws = Ws::connect(&c.url(0), Some(&c.token("alice")), None).await.unwrap();
    let mut codes = Vec::new();
    for i in 0..8 {
        ws.send(json!({"type": "send", "id": i, "to": "bob", "client_msg_id": format!("w{i}"), "text": "x"})).await;
        let r = ws.reply(T).await;
        if r["type"] == "error" {
            assert!(r["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{r}");
        }
        codes.push(r["code"].as_str().unwrap_or("ok").to_string());
    }
    assert!(codes.iter().any(|c| c == "rate_limited"), "{codes:?}");
    assert!(c.metric(0, "raftchat_shed_total{bound=\"user_rate\"}").await >= 5.0);
}

/// Small ones: 405 has a JSON body; acks past the last message are refused; "." and ".." are
/// not user ids; the secret file is private.
#[tokio::test(flavor = "multi_thread")]
async fn small_holes_are_closed() {
    let c = start(1, |_| {}).await;
    c.register(0, "bob").await;
    c.send_ok(0, "alice", "bob", "m1", "hello").await;

    let r = c.http.delete(format!("{}/v1/messages", c.url(0))).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let body: serde_json::Value = r.json().await.expect("a JSON body on 405");
    assert_eq!(body["code"], "method_not_allowed");

    let mut ws = Ws::connect(&c.url(0), Some(&c.token("bob")), None).await.unwrap();
    ws.send(json!({"type": "ack", "id": 1, "conversation_id": "alice~bob", "seq": 1_000_000_000_000_000_000u64})).await;
    let r = ws.reply(T).await;
    assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some("seq_out_of_range")), "{r}");
    ws.send(json!({"type": "ack", "id": 2, "conversation_id": "alice~bob", "seq": 1})).await;
    assert_eq!(ws.reply(T).await["type"], "acked");

    for id in [".", ".."] {
        let a = c.send(0, "alice", id, "dots", "x").await.unwrap();
        a.err(400, "invalid_user");
    }

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(c.dir.join("secret")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secret file mode {mode:o}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

/// Peer traffic has its own port: a request without the peer key is refused on its headers
/// (large bodies are never buffered or decoded), and the client gRPC port neither serves the
/// peer service nor accepts peer-sized messages.
#[tokio::test(flavor = "multi_thread")]
async fn the_peer_port_authenticates_before_reading_and_clients_keep_default_limits() {
    use raftchat::pb;
    let c = start(1, |_| {}).await;
    let pid = c.pid(0).unwrap();
    let before = rss_kib(pid);
    let peer = format!("http://{}", c.configs[0].peer_addr);
    let mut client =
        pb::peer_client::PeerClient::connect(peer.clone()).await.unwrap().max_encoding_message_size(64 << 20);
    for _ in 0..4 {
        let req = pb::RaftRequest { group: 0, kind: 0, payload: vec![b'x'; 60 << 20] };
        let err = client.raft(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    }
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 40 << 10, "four refused 60 MiB requests grew the node by {grown} KiB");

    // With the key, a call meant for another node id is refused (a wrong address in the
    // caller's book); one meant for this node, or naming none (older builds), is served.
    let key: tonic::metadata::MetadataValue<_> = c.keys().peer_token().parse().unwrap();
    let locate = |to: Option<&str>| {
        let mut req =
            tonic::Request::new(pb::RaftRequest { group: 0, kind: pb::RaftKind::Locate as i32, payload: vec![] });
        req.metadata_mut().insert("x-raftchat-peer", key.clone());
        if let Some(to) = to {
            req.metadata_mut().insert("x-raftchat-to", to.parse().unwrap());
        }
        req
    };
    let err = client.raft(locate(Some("2"))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("this is node 1, not node 2"), "{err}");
    client.raft(locate(Some("1"))).await.unwrap();
    client.raft(locate(None)).await.unwrap();

    // The client port: no peer service, and tonic's 4 MiB message limit.
    let grpc = format!("http://{}", c.configs[0].grpc_addr);
    let mut wrong = pb::peer_client::PeerClient::connect(grpc.clone()).await.unwrap();
    let mut req = tonic::Request::new(pb::RaftRequest { group: 0, kind: 0, payload: vec![] });
    req.metadata_mut().insert("x-raftchat-peer", c.keys().peer_token().parse().unwrap());
    assert_eq!(wrong.raft(req).await.unwrap_err().code(), tonic::Code::Unimplemented);
    let mut chat = pb::chat_client::ChatClient::connect(grpc).await.unwrap().max_encoding_message_size(64 << 20);
    let mut big = tonic::Request::new(pb::SendRequest {
        to: "bob".into(),
        client_msg_id: "big".into(),
        text: "x".repeat(10 << 20),
    });
    big.metadata_mut().insert("authorization", format!("Bearer {}", c.token("alice")).parse().unwrap());
    let code = chat.send(big).await.unwrap_err().code();
    assert!(matches!(code, tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{code:?}");
    no_panics(&c);
}

/// Slowloris, idle keep-alive connections and connection floods are bounded: headers must
/// arrive in time, silent connections are closed, and past the per-address limit a new
/// connection gets `503 too_many_connections` (before: all held indefinitely).
#[tokio::test(flavor = "multi_thread")]
async fn connections_are_limited_in_number_and_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = start(1, |c| {
        c.header_read_timeout_ms = 500;
        c.request_timeout_ms = 1_000;
        c.ws_ping_ms = 500;
        c.idle_timeout_ms = 1_500;
        c.max_connections_per_ip = 5;
    })
    .await;
    let addr = c.configs[0].http_addr;
    // Closed by the server: reading ends (0 bytes or a reset) within `within`.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = vec![0u8; 4096];
        let end = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(end, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }

    // Slowloris: a header line every 200 ms never completes the request.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let trickle = async {
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(format!("x-slow-{i}: y\r\n").as_bytes()).await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    assert!(closed_within(&mut slow, Duration::from_secs(3)).await, "a slowloris connection is cut off");

    // Idle keep-alive: one request, then silence.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    assert!(idle.read(&mut buf).await.unwrap() > 0);
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await, "an idle connection is closed");

    // Per-address limit: five held, the sixth refused with a JSON 503, then room again.
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        assert!(s.read(&mut buf).await.unwrap() > 0);
        held.push(s);
    }
    let mut sixth = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(T, sixth.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
    drop(held.pop());
    eventually(T, "a free place after one connection closed", || async {
        let r = c.http.get(format!("{}/healthz", c.url(0))).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    no_panics(&c);
}
