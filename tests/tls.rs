//! TLS on real nodes: HTTPS for clients, mutual TLS between nodes with a cluster CA and a
//! revoked list, and no plain-text serving off loopback unless asked for.

mod common;

use common::*;
use raftchat::pb;
use std::path::Path;
use std::sync::Arc;

/// Calls the peer service at `addr` as a node presenting `client` (a rustls config).
async fn peer_call(addr: &str, client: Arc<rustls::ClientConfig>, key: &str) -> Result<(), tonic::Code> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let channel = ep
        .connect_with_connector(tower::service_fn(move |uri| raftchat::tls::connect(client.clone(), uri)))
        .await
        .map_err(|_| tonic::Code::Unavailable)?;
    let mut req = tonic::Request::new(pb::RaftRequest { group: 999, kind: 0, payload: vec![] });
    req.metadata_mut().insert("x-raftchat-peer", key.parse().unwrap());
    pb::peer_client::PeerClient::new(channel).raft(req).await.map(|_| ()).map_err(|s| s.code())
}

/// The next frame of a WebSocket as JSON (pings and the like as `{}`).
async fn ws_next<S, E>(ws: &mut S) -> serde_json::Value
where
    S: futures::Stream<Item = Result<tokio_tungstenite::tungstenite::Message, E>> + Unpin,
    E: std::fmt::Debug,
{
    use futures::StreamExt;
    let m = tokio::time::timeout(std::time::Duration::from_secs(15), ws.next()).await.unwrap().unwrap().unwrap();
    serde_json::from_str(m.to_text().unwrap_or("{}")).unwrap_or_default()
}

fn identity(dir: &Path, name: &str, ca: &Path) -> Arc<rustls::ClientConfig> {
    raftchat::tls::Tls::load(&dir.join(format!("{name}.pem")), &dir.join(format!("{name}.key")), ca, None)
        .unwrap()
        .peer_client
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_cluster_serves_https_and_its_nodes_talk_over_mutual_tls() {
    let c = start_tls(3, |_| {}).await;
    assert!(c.url(0).starts_with("https://"));
    c.register(0, "bob").await;
    for i in 0..20 {
        c.send_ok(i % 3, "alice", "bob", &format!("t{i}"), "over TLS").await;
    }
    // Every node reads every message: forwarding and replication crossed mutual TLS.
    for n in 0..3 {
        assert_eq!(c.full_history(n, "bob", "alice~bob").await.messages.len(), 20);
    }
    // WSS on the same listener: bob's socket on node 3 gets alice's next message pushed.
    let client = raftchat::tls::trusting(&c.dir.join("tls/ca.pem")).unwrap();
    let url = format!("wss://localhost:{}/v1/ws?access_token={}", c.configs[2].http_addr.port(), c.token("bob"));
    let connector = tokio_tungstenite::Connector::Rustls(client);
    let (mut wss, _) = tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
        .await
        .expect("WSS connects");
    loop {
        if ws_next(&mut wss).await["type"] == "ready" {
            break;
        }
    }
    c.send_ok(0, "alice", "bob", "over-wss", "pushed over WSS").await;
    loop {
        let v = ws_next(&mut wss).await;
        if v["type"] == "message" && v["text"] == "pushed over WSS" {
            break;
        }
    }
    // A plain-text client gets nowhere on the HTTPS port.
    let plain = reqwest::Client::new().get(format!("http://{}/healthz", c.configs[0].http_addr)).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // Nor on the peer port.
    let plain_peer = pb::peer_client::PeerClient::connect(format!("http://{}", c.configs[0].peer_addr)).await;
    let refused = match plain_peer {
        Err(_) => true,
        Ok(mut p) => p.raft(pb::RaftRequest { group: 0, kind: 0, payload: vec![] }).await.is_err(),
    };
    assert!(refused, "a plain-text peer call was answered");
}

/// A node certificate of another CA, a revoked one, or none: the peer port refuses the
/// handshake. A valid, unrevoked certificate of the cluster CA reaches the service.
#[tokio::test(flavor = "multi_thread")]
async fn foreign_and_revoked_certificates_cannot_talk_to_a_node() {
    let foreign = tempfile::tempdir().unwrap();
    raftchat::tls::generate(foreign.path(), &[("stranger".into(), vec!["127.0.0.1".into()])]).unwrap();
    let c = start_tls(1, |dir| {
        let tls = dir.join("tls");
        let names = ["node1", "friend", "revoked"];
        let certs: Vec<(String, Vec<String>)> =
            names.iter().map(|n| (n.to_string(), vec!["127.0.0.1".into(), "localhost".into()])).collect();
        raftchat::tls::generate(&tls, &certs).unwrap();
        let fp = raftchat::tls::fingerprint_file(&tls.join("revoked.pem")).unwrap();
        std::fs::write(tls.join("revoked"), format!("# revoked by the test\n{fp}\n")).unwrap();
    })
    .await;
    let tls = c.dir.join("tls");
    let ca = tls.join("ca.pem");
    let addr = c.configs[0].peer_addr.to_string();
    let key = c.keys().peer_token().to_string();

    // The service answers a valid peer (group 999 does not exist here).
    assert_eq!(peer_call(&addr, identity(&tls, "friend", &ca), &key).await, Err(tonic::Code::NotFound));
    // A revoked certificate of the same CA is refused at the handshake.
    let r = peer_call(&addr, identity(&tls, "revoked", &ca), &key).await;
    assert!(matches!(r, Err(code) if code != tonic::Code::NotFound), "revoked: {r:?}");
    // A certificate of another CA is refused too.
    let r = peer_call(&addr, identity(foreign.path(), "stranger", &foreign.path().join("ca.pem")), &key).await;
    assert!(matches!(r, Err(code) if code != tonic::Code::NotFound), "foreign: {r:?}");
    // No client certificate at all.
    let mut anonymous = (*raftchat::tls::trusting(&ca).unwrap()).clone();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    let r = peer_call(&addr, Arc::new(anonymous), &key).await;
    assert!(matches!(r, Err(code) if code != tonic::Code::NotFound), "anonymous: {r:?}");
}

/// Off loopback, a node without TLS refuses to start unless told `--insecure`.
#[test]
fn plain_text_off_loopback_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_raftchat");
    let out = std::process::Command::new(bin)
        .args(["serve", "--http-addr", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without TLS") && err.contains("--insecure"), "{err}");
    let mut cfg = raftchat::config::Config { http_addr: "0.0.0.0:8080".parse().unwrap(), ..Default::default() };
    assert!(cfg.validate().is_err());
    cfg.insecure = true;
    assert!(cfg.validate().is_ok());
}
