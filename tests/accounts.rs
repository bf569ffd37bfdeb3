//! Accounts and sessions over HTTP on a real 3-node cluster: sign-up, login on any node and
//! after the user shard's leader dies, refresh rotation, logout, a password change ending
//! every session, the registration policies with invites, failed-login limits, CORS, the
//! CLI logging in with a password, and no password in any log.

mod common;

use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

async fn post(c: &common::TestCluster, node: usize, path: &str, token: Option<&str>, body: Value) -> common::Answer {
    c.req(node, "POST", path, token, Some(body)).await.unwrap()
}

async fn login(c: &common::TestCluster, node: usize, user: &str, password: &str) -> common::Answer {
    post(c, node, "/v1/sessions", None, json!({ "user": user, "password": password })).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_logs_in_on_any_node_and_after_its_shards_leader_dies() {
    let mut c = common::start(3, |_| {}).await;
    let a = post(&c, 0, "/v1/accounts", None, json!({"user": "alice", "password": "alice's password"})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    post(&c, 1, "/v1/accounts", None, json!({"user": "alice", "password": "another password"}))
        .await
        .err(409, "user_taken");
    post(&c, 1, "/v1/accounts", None, json!({"user": "bob", "password": "short"})).await.err(400, "weak_password");
    post(&c, 1, "/v1/accounts", None, json!({"user": "../x", "password": "long enough"}))
        .await
        .err(400, "invalid_user");

    for node in 0..3 {
        let s = login(&c, node, "alice", "alice's password").await;
        assert_eq!(s.status, 200, "login on node {node}: {}", s.body);
        // The access token is an ordinary bearer token.
        let token = s.body["access_token"].as_str().unwrap();
        let r = c.req(node, "GET", "/v1/conversations", Some(token), None).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    login(&c, 2, "alice", "wrong password").await.err(401, "invalid_credentials");
    login(&c, 2, "nobody", "any password").await.err(401, "invalid_credentials");

    // Kill the leader of alice's user shard: logins go on once a new leader is elected.
    let shard = raftchat::shard::Placement::new(8, vec![1, 2, 3])
        .shard_of_user(&raftchat::chat::UserId::parse("alice").unwrap());
    let leader = common::eventually(T, "a leader", || async { c.leader_of(shard).await }).await;
    c.kill(leader).unwrap();
    let other = c.other_than(&[leader]);
    let cref = &c;
    common::eventually(T, "login after failover", || async move {
        let s = login(cref, other, "alice", "alice's password").await;
        (s.status == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_rotates_logout_ends_and_a_password_change_ends_every_session() {
    let c = common::start(3, |_| {}).await;
    post(&c, 0, "/v1/accounts", None, json!({"user": "carol", "password": "carol's password"})).await;
    let s1 = login(&c, 0, "carol", "carol's password").await.body;
    let s2 = login(&c, 1, "carol", "carol's password").await.body;
    let rt1 = s1["refresh_token"].as_str().unwrap().to_string();
    assert!(rt1.starts_with("carol:"));

    // Refresh: a new pair; the old refresh token is spent.
    let r = post(&c, 2, "/v1/sessions/refresh", None, json!({ "refresh_token": rt1 })).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rt1b = r.body["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rt1b, rt1);
    post(&c, 0, "/v1/sessions/refresh", None, json!({ "refresh_token": rt1 })).await.err(401, "session_ended");
    post(&c, 0, "/v1/sessions/refresh", None, json!({ "refresh_token": "garbage" }))
        .await
        .err(400, "invalid_refresh_token");

    // Logout ends that session only.
    let out = post(&c, 1, "/v1/sessions/logout", None, json!({ "refresh_token": rt1b })).await;
    assert_eq!(out.status, 200, "{}", out.body);
    post(&c, 0, "/v1/sessions/refresh", None, json!({ "refresh_token": rt1b })).await.err(401, "session_ended");
    let rt2 = s2["refresh_token"].as_str().unwrap().to_string();
    let r2 = post(&c, 0, "/v1/sessions/refresh", None, json!({ "refresh_token": rt2 })).await;
    assert_eq!(r2.status, 200, "the other session lives on: {}", r2.body);
    let rt2b = r2.body["refresh_token"].as_str().unwrap().to_string();

    // A password change needs the old password and ends every session.
    let token = r2.body["access_token"].as_str().unwrap().to_string();
    let wrong = json!({"old_password": "not it at all", "new_password": "brand new password"});
    post(&c, 2, "/v1/accounts/password", Some(&token), wrong).await.err(401, "invalid_credentials");
    let ok = json!({"old_password": "carol's password", "new_password": "brand new password"});
    let changed = post(&c, 2, "/v1/accounts/password", Some(&token), ok).await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    post(&c, 0, "/v1/sessions/refresh", None, json!({ "refresh_token": rt2b })).await.err(401, "session_ended");
    // The access token from before the change is refused too: on the node that made the
    // change at once, on the others within `revocation_check_secs`.
    c.req(2, "GET", "/v1/conversations", Some(&token), None).await.unwrap().err(401, "token_revoked");
    let cref = &c;
    let tok = token.clone();
    common::eventually(T, "the revocation on another node", || {
        let tok = tok.clone();
        async move {
            let a = cref.req(1, "GET", "/v1/conversations", Some(&tok), None).await.unwrap();
            (a.status == 401 && a.body["code"] == "token_revoked").then_some(())
        }
    })
    .await;
    login(&c, 1, "carol", "carol's password").await.err(401, "invalid_credentials");
    assert_eq!(login(&c, 1, "carol", "brand new password").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn invite_only_registration_takes_each_invite_once() {
    let c = common::start(3, |c| c.registration = raftchat::config::Registration::Invite).await;
    let nodes = c.req(0, "GET", "/v1/nodes", None, None).await.unwrap();
    assert_eq!(nodes.body["registration"], "invite");
    assert_eq!(nodes.body["nodes"].as_array().unwrap().len(), 3);

    post(&c, 0, "/v1/accounts", None, json!({"user": "dan", "password": "dan's password"}))
        .await
        .err(403, "invite_required");
    // Only operators make invites.
    post(&c, 0, "/v1/invites", Some(&c.token("dan")), json!({})).await.err(403, "forbidden");
    let inv = post(&c, 0, "/v1/invites", Some(&c.admin_token()), json!({})).await;
    assert_eq!(inv.status, 200, "{}", inv.body);
    let invite = inv.body["invite"].as_str().unwrap().to_string();
    let forged = format!("{}x", &invite[..invite.len() - 1]);
    post(&c, 1, "/v1/accounts", None, json!({"user": "dan", "password": "dan's password", "invite": forged}))
        .await
        .err(403, "invalid_invite");
    let ok =
        post(&c, 1, "/v1/accounts", None, json!({"user": "dan", "password": "dan's password", "invite": invite})).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    post(&c, 2, "/v1/accounts", None, json!({"user": "eve", "password": "eve's password", "invite": invite}))
        .await
        .err(403, "invite_used");
    assert_eq!(login(&c, 2, "dan", "dan's password").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn closed_registration_leaves_accounts_to_operators_and_the_cli_logs_in() {
    let c = common::start(3, |c| c.registration = raftchat::config::Registration::Closed).await;
    post(&c, 0, "/v1/accounts", None, json!({"user": "fay", "password": "fay's password"}))
        .await
        .err(403, "registration_closed");
    // A user already registered (by token) gets an account only from an operator.
    c.register(0, "gus").await;
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_raftchat"))
        .args(["add-account", "gus", "--server", &c.url(1), "--secret-file"])
        .arg(c.dir.join("secret"))
        .env("RAFTCHAT_PASSWORD", "gus's password")
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    // The CLI sends with a password login instead of the secret.
    c.register(0, "hal").await;
    let sent = std::process::Command::new(env!("CARGO_BIN_EXE_raftchat"))
        .args(["send", "--server", &c.url(2), "--as", "gus", "--to", "hal", "hello from a password login"])
        .env("RAFTCHAT_PASSWORD", "gus's password")
        .env("RAFTCHAT_SECRET_FILE", "/nonexistent")
        .output()
        .unwrap();
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_raftchat"))
        .args(["send", "--server", &c.url(2), "--as", "gus", "--to", "hal", "x"])
        .env("RAFTCHAT_PASSWORD", "wrong password")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("wrong user id or password"));
    let h = c.full_history(0, "hal", "gus~hal").await;
    assert_eq!(h.messages.len(), 1);

    // No password, not even hashed ones' inputs, in any node's log.
    for i in 0..3 {
        let log = std::fs::read_to_string(c.dir.join(format!("node{}.log", i + 1))).unwrap();
        for secret in ["gus's password", "wrong password", "fay's password"] {
            assert!(!log.contains(secret), "node {} logged a password", i + 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_limited_per_user_and_per_address() {
    let c = common::start(1, |c| {
        c.login_failures_per_user_per_minute = 3;
        c.login_failures_per_ip_per_minute = 6;
    })
    .await;
    for u in ["ivy", "jon", "kim"] {
        post(&c, 0, "/v1/accounts", None, json!({"user": u, "password": "the right one"})).await;
    }
    for _ in 0..3 {
        login(&c, 0, "ivy", "wrong guess").await.err(401, "invalid_credentials");
    }
    // Now even the right password waits: guessing cannot go on.
    let limited = c
        .http
        .post(format!("{}/v1/sessions", c.url(0)))
        .json(&json!({"user": "ivy", "password": "the right one"}))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().get("retry-after").is_some());
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["code"], "too_many_failures");
    // Another user is fine until this address has failed too often.
    assert_eq!(login(&c, 0, "jon", "the right one").await.status, 200);
    for _ in 0..3 {
        login(&c, 0, "jon", "wrong guess").await.err(401, "invalid_credentials");
    }
    login(&c, 0, "kim", "the right one").await.err(429, "too_many_failures");
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_answers_the_clusters_own_nodes_and_configured_origins_only() {
    let c = common::start(3, |c| c.cors_origins = vec!["https://chat.example.org".into()]).await;
    let origin_of_node2 = c.url(1);
    for (origin, allowed) in
        [(origin_of_node2.as_str(), true), ("https://chat.example.org", true), ("https://evil.example", false)]
    {
        let r = c
            .http
            .request(reqwest::Method::OPTIONS, format!("{}/v1/sessions", c.url(0)))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
            .await
            .unwrap();
        let acao = r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(acao.as_deref() == Some(origin), allowed, "{origin}: {acao:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_tokens_are_refused_on_every_node_and_close_their_websockets() {
    let c = common::start(3, |c| c.revocation_check_secs = 1).await;
    c.register(0, "zed").await;
    c.register(0, "amy").await;
    let old = c.token("zed");
    let mut ws = common::Ws::connect(&c.url(2), Some(&old), None).await.unwrap();
    ws.next_of("ready", T).await;
    for n in 0..3 {
        assert_eq!(c.req(n, "GET", "/v1/conversations", Some(&old), None).await.unwrap().status, 200);
    }
    // Only the user (or an operator) may do it.
    post(&c, 1, "/v1/users/zed/revoke-tokens", Some(&c.token("amy")), json!({})).await.err(403, "forbidden");
    // Marks have a resolution of one second: revoke in a later second than `old` was made.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = post(&c, 1, "/v1/users/zed/revoke-tokens", Some(&old), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for n in 0..3 {
        let cref = &c;
        let old = old.clone();
        common::eventually(T, "the revocation reaches every node", || {
            let old = old.clone();
            async move {
                let a = cref.req(n, "GET", "/v1/conversations", Some(&old), None).await.unwrap();
                (a.status == 401 && a.body["code"] == "token_revoked").then_some(())
            }
        })
        .await;
    }
    // The open WebSocket is told and closed.
    let mut closed = None;
    for _ in 0..20 {
        match ws.next(T).await {
            common::WsEvent::Closed(code) => {
                closed = code;
                break;
            }
            common::WsEvent::Json(_) => {}
        }
    }
    assert_eq!(closed, Some(4001));
    // Tokens made afterwards work; other users are not affected.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(c.req(0, "GET", "/v1/conversations", Some(&c.token("zed")), None).await.unwrap().status, 200);
    assert_eq!(c.req(0, "GET", "/v1/conversations", Some(&c.token("amy")), None).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_of_an_external_issuer_from_a_jwks_file_are_accepted_on_every_node() {
    use base64::Engine;
    let mut c = common::start(3, |_| {}).await;
    // The issuer's key pair: ES256 (P-256); its public half as a JWKS file.
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = pair.public_key_raw();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "login-1", "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65])}]});
    let jwks_path = c.dir.join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    // Point every node at it and restart them one by one.
    for i in 0..3 {
        let cfg_path = c.dir.join(format!("node{}.toml", i + 1));
        let cfg = std::fs::read_to_string(&cfg_path).unwrap();
        let head = format!(
            "jwks_file = {:?}\njwks_issuer = \"https://login.example\"\njwks_audience = \"chat\"\n",
            jwks_path.display().to_string()
        );
        std::fs::write(&cfg_path, head + &cfg).unwrap();
        c.kill(i).unwrap();
        c.spawn(i).unwrap();
        c.wait_ready(i, T).await.unwrap();
    }
    let now = raftchat::auth::now_secs();
    let mint = |claims: Value| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("login-1".into());
        jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der())).unwrap()
    };
    let good = mint(
        json!({"sub": "external_user", "iat": now, "exp": now + 300, "iss": "https://login.example", "aud": "chat"}),
    );
    for node in 0..3 {
        let a = c.req(node, "GET", "/v1/conversations", Some(&good), None).await.unwrap();
        assert_eq!(a.status, 200, "node {node}: {}", a.body);
    }
    c.register(0, "bob").await;
    let sent = c
        .req(
            1,
            "POST",
            "/v1/messages",
            Some(&good),
            Some(json!({"to": "bob", "client_msg_id": "e1", "text": "hi from outside"})),
        )
        .await
        .unwrap();
    assert_eq!(sent.status, 200, "{}", sent.body);
    let wrong_aud = mint(
        json!({"sub": "external_user", "iat": now, "exp": now + 300, "iss": "https://login.example", "aud": "other"}),
    );
    assert_eq!(c.req(2, "GET", "/v1/conversations", Some(&wrong_aud), None).await.unwrap().status, 401);
    // Cannot claim operator rights.
    let adm = mint(
        json!({"sub": "external_user", "iat": now, "exp": now + 300, "iss": "https://login.example", "aud": "chat", "adm": true}),
    );
    c.req(0, "POST", "/v1/users", Some(&adm), Some(json!({"user": "x"}))).await.unwrap().err(403, "forbidden");
    // The cluster's own tokens still work.
    assert_eq!(c.req(0, "GET", "/v1/conversations", Some(&c.token("bob")), None).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn during_a_rolling_upgrade_the_new_commands_wait_for_cluster_version_2() {
    // New nodes started with the old version's feature set propose nothing older nodes
    // could not apply: accounts, revocation and restore answer 503 upgrade_in_progress.
    let c = common::start(1, |c| c.cluster_version = 1).await;
    post(&c, 0, "/v1/accounts", None, json!({"user": "ola", "password": "ola's password"}))
        .await
        .err(503, "upgrade_in_progress");
    login(&c, 0, "ola", "ola's password").await.err(503, "upgrade_in_progress");
    c.register(0, "ola").await;
    post(&c, 0, "/v1/users/ola/revoke-tokens", Some(&c.token("ola")), json!({})).await.err(503, "upgrade_in_progress");
    // Messages work as before.
    c.register(0, "per").await;
    c.send_ok(0, "ola", "per", "v1", "still chatting").await;
}
