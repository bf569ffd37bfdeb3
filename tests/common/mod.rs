//! Helpers shared by the integration tests: a real cluster of `raftchat serve` processes
//! (from `raftchat::fixture`) and a small typed HTTP client.
#![allow(dead_code)]

pub mod browser;
pub mod placement;

use raftchat::api::ops::{ConversationsResponse, HistoryResponse, SendResponse};
use raftchat::fixture::{Cluster, Spec};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Generous: a loaded 2-core CI machine has been seen to take over a minute to elect every
/// shard's leader at start (the error then carries the node's log tail).
pub const READY: Duration = Duration::from_secs(120);

pub struct TestCluster {
    pub cluster: Cluster,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}
impl std::ops::DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }
}

/// Tests drive users far faster than people type and open hundreds of connections from one
/// address; a test of those limits sets them again in its tweak.
fn test_defaults(c: &mut raftchat::config::Config) {
    c.user_send_rate = 0;
    c.max_connections_per_ip = 10_000;
}

/// A cluster with TLS everywhere (certificates under its folder's `tls/`).
pub async fn start_tls(nodes: usize, prepare: impl FnOnce(&std::path::Path)) -> TestCluster {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let mut spec = Spec::new(nodes, dir.path());
    spec.base = test_defaults;
    spec.tls = true;
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_raftchat"));
    let cluster = Cluster::start(bin, &spec).expect("start cluster");
    cluster.wait_all_ready(READY).await.expect("cluster ready");
    let http = cluster.http_client().expect("client trusting the cluster CA");
    TestCluster { cluster, http, _dir: dir }
}

pub async fn start(nodes: usize, tweak: fn(&mut raftchat::config::Config)) -> TestCluster {
    start_with_env(nodes, tweak, vec![]).await
}

/// Starts a cluster; `env` holds extra environment per node index (used from the first start).
pub async fn start_with_env(
    nodes: usize,
    tweak: fn(&mut raftchat::config::Config),
    env: Vec<(usize, String, String)>,
) -> TestCluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = Spec::new(nodes, dir.path());
    spec.base = test_defaults;
    spec.tweak = tweak;
    // Write configs and start with the environment in place.
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_raftchat"));
    let cluster = if env.is_empty() {
        Cluster::start(bin, &spec).expect("start cluster")
    } else {
        let mut c = Cluster::start(bin, &spec).expect("start cluster");
        for (i, k, v) in env {
            c.env[i].push((k, v));
            c.kill(i).unwrap();
            c.spawn(i).unwrap();
        }
        c
    };
    cluster.wait_all_ready(READY).await.expect("cluster ready");
    TestCluster {
        cluster,
        http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        _dir: dir,
    }
}

/// An HTTP answer: status and JSON body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn ok<T: serde::de::DeserializeOwned>(self) -> T {
        assert_eq!(self.status, 200, "expected 200, got {} {}", self.status, self.body);
        serde_json::from_value(self.body).expect("typed body")
    }
    /// Asserts an error status and code.
    pub fn err(&self, status: u16, code: &str) {
        assert_eq!((self.status, self.body["code"].as_str().unwrap_or("")), (status, code), "body: {}", self.body);
        assert!(self.body["message"].as_str().is_some_and(|m| !m.is_empty()), "error message present: {}", self.body);
    }
}

impl TestCluster {
    pub async fn req(
        &self,
        node: usize,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<Answer, reqwest::Error> {
        let url = format!("{}{}", self.url(node), path);
        let mut rb = match method {
            "GET" => self.http.get(url),
            _ => self.http.post(url),
        };
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await?;
        let status = r.status().as_u16();
        let bytes = r.bytes().await?;
        let body =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok(Answer { status, body })
    }

    pub async fn register(&self, node: usize, user: &str) {
        let a = self
            .req(node, "POST", "/v1/users", Some(&self.admin_token()), Some(json!({ "user": user })))
            .await
            .unwrap();
        assert_eq!(a.status, 200, "register {user}: {}", a.body);
    }

    pub async fn send(
        &self,
        node: usize,
        from: &str,
        to: &str,
        id: &str,
        text: &str,
    ) -> Result<Answer, reqwest::Error> {
        let body = json!({ "to": to, "client_msg_id": id, "text": text });
        self.req(node, "POST", "/v1/messages", Some(&self.token(from)), Some(body)).await
    }

    pub async fn send_ok(&self, node: usize, from: &str, to: &str, id: &str, text: &str) -> SendResponse {
        self.send(node, from, to, id, text).await.unwrap().ok()
    }

    pub async fn history(&self, node: usize, user: &str, conv: &str, query: &str) -> Answer {
        self.req(node, "GET", &format!("/v1/conversations/{conv}/messages{query}"), Some(&self.token(user)), None)
            .await
            .unwrap()
    }

    /// Every message of a conversation, paging forward with `after`.
    pub async fn full_history(&self, node: usize, user: &str, conv: &str) -> HistoryResponse {
        let mut all: HistoryResponse = self.history(node, user, conv, "?after=0&limit=200").await.ok();
        loop {
            let last = all.messages.last().map(|m| m.seq).unwrap_or(0);
            if last >= all.last_seq {
                return all;
            }
            let page: HistoryResponse = self.history(node, user, conv, &format!("?after={last}&limit=200")).await.ok();
            assert!(!page.messages.is_empty(), "page after {last} of {} is empty", all.last_seq);
            all.last_seq = page.last_seq;
            all.messages.extend(page.messages);
        }
    }

    pub async fn conversations(&self, node: usize, user: &str, query: &str) -> Answer {
        self.req(node, "GET", &format!("/v1/conversations{query}"), Some(&self.token(user)), None).await.unwrap()
    }

    pub async fn conversations_ok(&self, node: usize, user: &str) -> ConversationsResponse {
        self.conversations(node, user, "?limit=200").await.ok()
    }

    pub async fn metric(&self, node: usize, name: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.url(node))).send().await.unwrap().text().await.unwrap();
        text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }

    /// The last lines (without DEBUG) of every node's log, for a failure's message.
    pub fn log_tails(&self, lines: usize) -> String {
        (1..=self.len())
            .map(|i| {
                let text = std::fs::read_to_string(self.dir.join(format!("node{i}.log"))).unwrap_or_default();
                let kept: Vec<&str> = text.lines().filter(|l| !l.contains("DEBUG")).collect();
                format!("--- node {i}\n{}", kept[kept.len().saturating_sub(lines)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Index of a running node other than `not`.
    pub fn other_than(&self, not: &[usize]) -> usize {
        (0..self.len()).find(|i| !not.contains(i) && self.is_running(*i)).expect("another running node")
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A WebSocket test client (tokio-tungstenite).
pub struct Ws {
    pub inner: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
}

impl std::fmt::Debug for Ws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ws")
    }
}

/// What the next frame was.
#[derive(Debug)]
pub enum WsEvent {
    Json(Value),
    Closed(Option<u16>),
}

impl Ws {
    /// Connects to node URL `http://host:port` with optional token and cursor in the query.
    pub async fn connect(base: &str, token: Option<&str>, cursor: Option<&str>) -> Result<Ws, String> {
        Self::connect_with(base, token, cursor, None).await
    }

    /// Like `connect`, with a tiny receive buffer when `small_rcvbuf` (slow-consumer tests).
    pub async fn connect_with(
        base: &str,
        token: Option<&str>,
        cursor: Option<&str>,
        rcvbuf: Option<u32>,
    ) -> Result<Ws, String> {
        let hostport = base.trim_start_matches("http://");
        let mut q = vec![];
        if let Some(t) = token {
            q.push(format!("access_token={t}"));
        }
        if let Some(c) = cursor {
            q.push(format!("cursor={c}"));
        }
        let url = format!("ws://{hostport}/v1/ws?{}", q.join("&"));
        let addr: std::net::SocketAddr = hostport.parse().unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(b) = rcvbuf {
            sock.set_recv_buffer_size(b).unwrap();
        }
        let tcp = sock.connect(addr).await.map_err(|e| e.to_string())?;
        let (inner, _) = tokio_tungstenite::client_async(url, tcp).await.map_err(|e| e.to_string())?;
        Ok(Ws { inner })
    }

    pub async fn send(&mut self, v: Value) {
        use futures::SinkExt;
        self.inner.send(tokio_tungstenite::tungstenite::Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: tokio_tungstenite::tungstenite::Message) {
        use futures::SinkExt;
        self.inner.send(m).await.unwrap();
    }

    /// The next JSON frame or the close, skipping pings; panics after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> WsEvent {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let m = tokio::time::timeout_at(end, self.inner.next()).await.expect("a frame within the timeout");
            match m {
                Some(Ok(Message::Text(t))) => return WsEvent::Json(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Close(c))) => return WsEvent::Closed(c.map(|c| u16::from(c.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return WsEvent::Closed(None),
            }
        }
    }

    /// The next JSON frame of type `t` (other frames are returned in `skipped`).
    pub async fn next_of(&mut self, t: &str, timeout: Duration) -> Value {
        loop {
            match self.next(timeout).await {
                WsEvent::Json(v) if v["type"] == t => return v,
                WsEvent::Json(_) => continue,
                WsEvent::Closed(c) => panic!("closed ({c:?}) while waiting for a {t} frame"),
            }
        }
    }

    /// The next frame that is not a push (a reply or an error).
    pub async fn reply(&mut self, timeout: Duration) -> Value {
        loop {
            match self.next(timeout).await {
                WsEvent::Json(v) if v["type"] == "message" || v["type"] == "receipt" || v["type"] == "ready" => {
                    continue
                }
                WsEvent::Json(v) => return v,
                WsEvent::Closed(c) => panic!("closed ({c:?}) while waiting for a reply"),
            }
        }
    }
}
