//! The client API on a real 3-node cluster: cross-node reads, pagination, recent
//! conversations and read markers, the gRPC API, and every bad input getting a clear 4xx.

mod common;

use common::*;
use raftchat::api::ops::{ConversationsResponse, HistoryResponse};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn send_on_one_node_read_on_every_other() {
    let c = start(3, |_| {}).await;
    c.register(0, "bob").await;
    c.register(0, "carol").await;
    let r = c.send_ok(0, "alice", "bob", "m1", "hello bob").await;
    assert_eq!((r.conversation_id.as_str(), r.seq, r.duplicate), ("alice~bob", 1, false));
    // Both sides name one conversation; seq continues from either side and from any node.
    assert_eq!(c.send_ok(1, "bob", "alice", "m1", "hi alice").await.seq, 2);
    assert_eq!(c.send_ok(2, "alice", "bob", "m2", "how are you").await.seq, 3);
    // A retry returns the original seq and writes nothing.
    let again = c.send_ok(1, "alice", "bob", "m1", "hello bob (retry)").await;
    assert_eq!((again.seq, again.ts, again.duplicate), (1, r.ts, true));

    for node in 0..3 {
        for user in ["alice", "bob"] {
            let h: HistoryResponse = c.history(node, user, "alice~bob", "").await.ok();
            let got: Vec<(u64, &str, &str)> =
                h.messages.iter().map(|m| (m.seq, m.from.as_str(), m.text.as_str())).collect();
            assert_eq!(got, vec![(1, "alice", "hello bob"), (2, "bob", "hi alice"), (3, "alice", "how are you")]);
            assert_eq!(h.last_seq, 3);
        }
    }

    // Paging backwards and forwards.
    let p: HistoryResponse = c.history(2, "bob", "alice~bob", "?before=3&limit=1").await.ok();
    assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2]);
    let p: HistoryResponse = c.history(2, "bob", "alice~bob", "?after=1&limit=5").await.ok();
    assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2, 3]);
    let p: HistoryResponse = c.history(2, "bob", "alice~bob", "?before=1").await.ok();
    assert!(p.messages.is_empty());

    // Recent conversations: newest first, unread counts, read markers that only move forward.
    c.send_ok(1, "carol", "bob", "c1", "carol here").await;
    let bob: ConversationsResponse = c.conversations_ok(2, "bob").await;
    let rows: Vec<(&str, &str, u64, u64)> =
        bob.conversations.iter().map(|x| (x.conversation_id.as_str(), x.peer.as_str(), x.last_seq, x.unread)).collect();
    // bob sent seq 2, which reads seq 1; seq 3 (alice) is unread.
    assert_eq!(rows, vec![("bob~carol", "carol", 1, 1), ("alice~bob", "alice", 3, 1)]);
    assert_eq!(bob.conversations[1].preview, "how are you");
    let mr = c
        .req(0, "POST", "/v1/conversations/alice~bob/read", Some(&c.token("bob")), Some(json!({"seq": 3})))
        .await
        .unwrap();
    assert_eq!((mr.status, mr.body["read_seq"].as_u64(), mr.body["unread"].as_u64()), (200, Some(3), Some(0)));
    let back = c
        .req(1, "POST", "/v1/conversations/alice~bob/read", Some(&c.token("bob")), Some(json!({"seq": 1})))
        .await
        .unwrap();
    assert_eq!(back.body["read_seq"].as_u64(), Some(3), "read marker never moves backwards");

    // Cursor paging over the recent list.
    let first = c.conversations(0, "bob", "?limit=1").await.ok::<ConversationsResponse>();
    assert_eq!(first.conversations[0].conversation_id, "bob~carol");
    let cursor = first.next_cursor.expect("more pages");
    let second = c.conversations(0, "bob", &format!("?limit=1&cursor={cursor}")).await.ok::<ConversationsResponse>();
    assert_eq!(second.conversations[0].conversation_id, "alice~bob");
    assert_eq!(second.next_cursor, None);

    // The cache served recent pages.
    let mut hits = 0.0;
    for n in 0..3 {
        hits += c.metric(n, "raftchat_cache_hits_total").await;
    }
    assert!(hits > 0.0, "history pages should be served from the 24h cache");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let c = start(3, |c| c.max_text_bytes = 100).await;
    c.register(0, "bob").await;
    let alice = c.token("alice");
    let send = |body: serde_json::Value| c.req(1, "POST", "/v1/messages", Some(&alice), Some(body));

    send(json!({"to": "bob", "client_msg_id": "a", "text": ""})).await.unwrap().err(400, "empty_text");
    send(json!({"to": "bob", "client_msg_id": "a", "text": "x".repeat(101)})).await.unwrap().err(400, "text_too_long");
    send(json!({"to": "bob", "client_msg_id": "a", "text": "a\u{7}b"})).await.unwrap().err(400, "invalid_text");
    send(json!({"to": "bob", "client_msg_id": "", "text": "hi"})).await.unwrap().err(400, "invalid_client_msg_id");
    send(json!({"to": "bob", "client_msg_id": "a", "text": "hi", "photo": "x.png"}))
        .await
        .unwrap()
        .err(400, "invalid_json");
    send(json!({"to": "bob", "client_msg_id": "a"})).await.unwrap().err(400, "invalid_json");
    send(json!({"to": "alice", "client_msg_id": "a", "text": "me"})).await.unwrap().err(400, "self_send");
    send(json!({"to": "nobody", "client_msg_id": "a", "text": "hi"})).await.unwrap().err(404, "unknown_user");
    send(json!({"to": "bad~id", "client_msg_id": "a", "text": "hi"})).await.unwrap().err(400, "invalid_user");

    // Raw bodies: not JSON, not UTF-8, too large.
    let raw = |body: Vec<u8>| c.http.post(format!("{}/v1/messages", c.url(0))).bearer_auth(&alice).body(body).send();
    let r = raw(b"{not json".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = raw(b"{\"to\":\"bob\",\"client_msg_id\":\"a\",\"text\":\"\xff\xfe\"}".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["code"], "invalid_json");
    let r = raw(vec![b'x'; 200_000]).await.unwrap();
    assert_eq!(r.status(), 413);
    // The unread rest of the body means the server closes this connection: it must say
    // so, or the client's next request on the same connection fails mid-way.
    assert_eq!(r.headers().get("connection").map(|v| v.as_bytes()), Some(&b"close"[..]));
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["code"], "body_too_large");
    // The very next request on the same client (and node) is answered.
    c.send_ok(0, "alice", "bob", "after-413", "still here").await;

    // Auth: missing, garbage, forged, expired tokens; reading someone else's conversation.
    let list = "/v1/conversations";
    c.req(2, "GET", list, None, None).await.unwrap().err(401, "missing_token");
    c.req(2, "GET", list, Some("garbage"), None).await.unwrap().err(401, "invalid_token");
    let alice_id = raftchat::chat::UserId::parse("alice").unwrap();
    let forged = raftchat::auth::Keys::new(b"not the secret").mint(&alice_id, 60, false);
    c.req(2, "GET", list, Some(&forged), None).await.unwrap().err(401, "invalid_token");
    let now = raftchat::auth::now_secs();
    let expired = c.keys().sign(&raftchat::auth::Claims {
        sub: "alice".into(),
        iat: now - 7200,
        exp: now - 3600,
        nbf: None,
        adm: false,
    });
    c.req(2, "GET", list, Some(&expired), None).await.unwrap().err(401, "token_expired");
    c.send_ok(0, "alice", "bob", "ok1", "fine").await;
    c.history(0, "mallory", "alice~bob", "").await.err(403, "forbidden");
    c.req(0, "POST", "/v1/conversations/alice~bob/read", Some(&c.token("mallory")), Some(json!({"seq": 1})))
        .await
        .unwrap()
        .err(403, "forbidden");
    c.req(0, "POST", "/v1/users", Some(&alice), Some(json!({"user": "eve"}))).await.unwrap().err(403, "forbidden");

    // Unknown or malformed ids, bad paging arguments, bad cursors, bad markers.
    c.history(1, "alice", "alice~zed", "").await.err(404, "unknown_conversation");
    c.history(1, "alice", "zed~alice", "").await.err(400, "invalid_conversation");
    c.history(1, "alice", "alice~bob", "?limit=0").await.err(400, "invalid_limit");
    c.history(1, "alice", "alice~bob", "?limit=100000").await.err(400, "invalid_limit");
    c.history(1, "alice", "alice~bob", "?before=2&after=1").await.err(400, "invalid_range");
    c.history(1, "alice", "alice~bob", "?after=-1").await.err(400, "invalid_query");
    c.history(1, "alice", "alice~bob", "?colour=red").await.err(400, "invalid_query");
    c.conversations(1, "alice", "?cursor=%%%").await.err(400, "invalid_cursor");
    c.conversations(1, "alice", "?cursor=AAAA").await.err(400, "invalid_cursor");
    let mark = |seq: u64| c.req(2, "POST", "/v1/conversations/alice~bob/read", Some(&alice), Some(json!({"seq": seq})));
    mark(0).await.unwrap().err(400, "invalid_seq");
    mark(99).await.unwrap().err(400, "seq_out_of_range");
    c.req(0, "GET", "/v1/nothing", None, None).await.unwrap().err(404, "no_route");

    // Nothing bad above was written: the conversation holds exactly the two good messages.
    let h: HistoryResponse = c.history(2, "bob", "alice~bob", "").await.ok();
    let texts: Vec<&str> = h.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["still here", "fine"]);
    // And every node is still healthy.
    for n in 0..3 {
        assert_eq!(c.req(n, "GET", "/readyz", None, None).await.unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_client_api_matches_http() {
    use raftchat::pb;
    let c = start(3, |_| {}).await;
    c.register(0, "bob").await;
    let url = format!("http://{}", c.configs[1].grpc_addr);
    let mut client = pb::chat_client::ChatClient::connect(url).await.unwrap();
    fn with_auth<T>(msg: T, tok: &str) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("authorization", format!("Bearer {tok}").parse().unwrap());
        r
    }
    let alice = c.token("alice");
    let sent = client
        .send(with_auth(
            pb::SendRequest { to: "bob".into(), client_msg_id: "g1".into(), text: "over grpc".into() },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((sent.conversation_id.as_str(), sent.seq), ("alice~bob", 1));
    let h = client
        .history(with_auth(
            pb::HistoryRequest { conversation_id: "alice~bob".into(), ..Default::default() },
            &c.token("bob"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), vec!["over grpc"]);
    let conv = client
        .conversations(with_auth(pb::ConversationsRequest::default(), &c.token("bob")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(conv.conversations[0].unread, 1);
    let mr = client
        .mark_read(with_auth(pb::MarkReadRequest { conversation_id: "alice~bob".into(), seq: 1 }, &c.token("bob")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mr.unread, 0);
    // Errors map to gRPC codes.
    let e = client.history(tonic::Request::new(pb::HistoryRequest::default())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = client
        .history(with_auth(
            pb::HistoryRequest { conversation_id: "alice~bob".into(), ..Default::default() },
            &c.token("eve"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    // The same message is visible over HTTP.
    let h: HistoryResponse = c.history(2, "alice", "alice~bob", "").await.ok();
    assert_eq!(h.messages[0].client_msg_id, "g1");
    // gRPC calls are counted like HTTP ones, by outcome.
    let ok = c.metric(1, "raftchat_requests_total{code=\"ok\",op=\"send\",via=\"grpc\"}").await;
    let denied = c.metric(1, "raftchat_requests_total{code=\"forbidden\",op=\"history\",via=\"grpc\"}").await;
    assert_eq!((ok, denied), (1.0, 1.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn five_nodes_three_replicas_per_shard_any_node_serves_any_request() {
    let c = start(5, |_| {}).await;
    // min(3, N) replicas: every node hosts 8 * 3 / 5 shard groups on average, none all 8.
    let mut hosted = Vec::new();
    for n in 0..5 {
        let s = c.status(n).await.unwrap();
        let shards = s["shards"].as_array().unwrap().clone();
        assert!(shards.iter().all(|x| x["replicas"].as_array().unwrap().len() == 3));
        hosted.push(shards.len());
    }
    assert_eq!(hosted.iter().sum::<usize>(), 8 * 3, "{hosted:?}");
    assert!(hosted.iter().all(|h| *h < 8), "{hosted:?}");
    for u in ["u0", "u1", "u2", "u3", "u4"] {
        c.register(0, u).await;
    }
    // Send from every node, read from every node, including nodes that host neither the
    // conversation's shard nor the users' shards (they forward through a replica).
    for n in 0..5 {
        let from = format!("u{n}");
        let to = format!("u{}", (n + 1) % 5);
        assert_eq!(c.send_ok(n, &from, &to, "x", &format!("from node {n}")).await.seq, 1);
    }
    for n in 0..5 {
        for k in 0..5 {
            let (a, b) = (format!("u{k}"), format!("u{}", (k + 1) % 5));
            let conv = if a < b { format!("{a}~{b}") } else { format!("{b}~{a}") };
            let h: HistoryResponse = c.history(n, &a, &conv, "").await.ok();
            assert_eq!(h.messages.len(), 1, "node {n} reads {conv}");
            assert_eq!(h.messages[0].text, format!("from node {k}"));
        }
        let rows: ConversationsResponse = c.conversations_ok(n, "u0").await;
        assert_eq!(rows.conversations.len(), 2, "u0 talks to u1 and u4");
    }
}
