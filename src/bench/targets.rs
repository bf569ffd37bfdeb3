//! What the generator drives: raftchat sends (HTTP, WebSocket or gRPC), raftchat history
//! reads, and etcd puts (the peer). Each target turns an operation number into one request
//! and its [`Outcome`].

use super::load::Outcome;
use crate::etcdpb::kv_client::KvClient;
use crate::etcdpb::PutRequest;
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tonic::transport::Channel;

/// A deterministic pseudo-random number for operation `i` (the same plan every run).
pub fn mix(i: u64, salt: u64) -> u64 {
    let mut z = i.wrapping_add(salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sender and recipient of operation `i` among `n` users (never the same user).
pub fn pair(i: u64, n: usize, salt: u64) -> (usize, usize) {
    let a = (mix(i, salt) % n as u64) as usize;
    let b = (a + 1 + (mix(i, salt ^ 0x5555) % (n as u64 - 1)) as usize) % n;
    (a, b)
}

pub fn text(i: u64, bytes: usize) -> String {
    let head = format!("bench message {i} ");
    let mut t = head.clone();
    while t.len() < bytes {
        t.push('x');
    }
    t.truncate(bytes.max(head.len()));
    t
}

/// Classifies an HTTP error reply by status and the body's `code`.
fn http_outcome(status: u16, body: &str) -> Outcome {
    let code = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_string))
        .unwrap_or_default();
    if status == 503 && code == "overloaded" {
        Outcome::Refused
    } else {
        Outcome::Error(format!("{status} {code}"))
    }
}

/// The users of a run: ids and bearer tokens.
pub struct Users {
    pub names: Vec<String>,
    pub tokens: Vec<String>,
}

/// raftchat over HTTP/JSON, spread over the nodes' URLs.
pub struct Http {
    pub client: reqwest::Client,
    pub urls: Vec<String>,
    pub users: Arc<Users>,
    pub run_id: u64,
    pub text_bytes: usize,
}

impl Http {
    pub async fn send(&self, i: u64) -> Outcome {
        let (a, b) = pair(i, self.users.names.len(), self.run_id);
        let url = &self.urls[(i as usize) % self.urls.len()];
        let body = serde_json::json!({
            "to": self.users.names[b],
            "client_msg_id": format!("b{:x}-{i}", self.run_id),
            "text": text(i, self.text_bytes),
        });
        let r =
            self.client.post(format!("{url}/v1/messages")).bearer_auth(&self.users.tokens[a]).json(&body).send().await;
        match r {
            Ok(r) if r.status().is_success() => Outcome::Ok,
            Ok(r) => {
                let s = r.status().as_u16();
                http_outcome(s, &r.text().await.unwrap_or_default())
            }
            Err(e) => Outcome::Error(format!("transport: {}", if e.is_timeout() { "timeout" } else { "error" })),
        }
    }

    /// A page of `limit` messages of one of the `pairs` seeded conversations.
    pub async fn history(&self, i: u64, pairs: &[(usize, usize)], limit: u32) -> Outcome {
        let (a, b) = pairs[(mix(i, 77) % pairs.len() as u64) as usize];
        let (x, y) = (&self.users.names[a], &self.users.names[b]);
        let conv = if x < y { format!("{x}~{y}") } else { format!("{y}~{x}") };
        let url = &self.urls[(i as usize) % self.urls.len()];
        let r = self
            .client
            .get(format!("{url}/v1/conversations/{conv}/messages?limit={limit}"))
            .bearer_auth(&self.users.tokens[a])
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => match r.json::<serde_json::Value>().await {
                Ok(v) if v["messages"].as_array().map(|m| m.len()) == Some(limit as usize) => Outcome::Ok,
                Ok(_) => Outcome::Error("short page".into()),
                Err(_) => Outcome::Error("undecodable page".into()),
            },
            Ok(r) => {
                let s = r.status().as_u16();
                http_outcome(s, &r.text().await.unwrap_or_default())
            }
            Err(_) => Outcome::Error("transport".into()),
        }
    }
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Outcome>>>>;

/// One authenticated WebSocket per user, on node `user % nodes`; replies matched by id.
pub struct Ws {
    conns: Vec<(mpsc::UnboundedSender<String>, Waiters)>,
    pub users: Arc<Users>,
    pub run_id: u64,
    pub text_bytes: usize,
}

impl Ws {
    pub async fn connect(
        urls: &[String],
        users: Arc<Users>,
        run_id: u64,
        text_bytes: usize,
        ca: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let connector = ca.map(crate::tls::trusting).transpose()?.map(tokio_tungstenite::Connector::Rustls);
        let mut conns = Vec::new();
        for (u, token) in users.tokens.iter().enumerate() {
            let base = urls[u % urls.len()].replacen("http://", "ws://", 1).replacen("https://", "wss://", 1);
            let url = format!("{base}/v1/ws?access_token={token}");
            let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(url, None, true, connector.clone()).await?;
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            let waiters: Waiters = Arc::default();
            tokio::spawn(async move {
                while let Some(frame) = rx.recv().await {
                    if sink.send(WsMessage::Text(frame.into())).await.is_err() {
                        return;
                    }
                }
            });
            let w = waiters.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let WsMessage::Text(t) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else { continue };
                    let Some(id) = v.get("id").and_then(|i| i.as_str()).and_then(|s| s.parse::<u64>().ok()) else {
                        continue;
                    };
                    let outcome = match v["type"].as_str() {
                        Some("sent") => Outcome::Ok,
                        Some("error") if v["code"] == "overloaded" => Outcome::Refused,
                        Some("error") => Outcome::Error(format!("ws {}", v["code"].as_str().unwrap_or("?"))),
                        _ => continue,
                    };
                    if let Some(tx) = w.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                        let _ = tx.send(outcome);
                    }
                }
                // The connection ended: everything still waiting failed.
                for (_, tx) in w.lock().unwrap_or_else(|p| p.into_inner()).drain() {
                    let _ = tx.send(Outcome::Error("ws closed".into()));
                }
            });
            conns.push((tx, waiters));
        }
        Ok(Self { conns, users, run_id, text_bytes })
    }

    pub async fn send(&self, i: u64) -> Outcome {
        let (a, b) = pair(i, self.users.names.len(), self.run_id);
        let (tx, waiters) = &self.conns[a];
        let (otx, orx) = oneshot::channel();
        waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(i, otx);
        let frame = serde_json::json!({
            "type": "send",
            "id": i.to_string(),
            "to": self.users.names[b],
            "client_msg_id": format!("b{:x}-{i}", self.run_id),
            "text": text(i, self.text_bytes),
        });
        if tx.send(frame.to_string()).is_err() {
            return Outcome::Error("ws closed".into());
        }
        orx.await.unwrap_or_else(|_| Outcome::Error("ws closed".into()))
    }
}

/// etcd's KV.Put over gRPC, spread over the members.
pub struct Etcd {
    pub clients: Vec<KvClient<Channel>>,
    pub value_bytes: usize,
}

impl Etcd {
    pub async fn put(&self, i: u64) -> Outcome {
        let mut c = self.clients[(i as usize) % self.clients.len()].clone();
        let req = PutRequest {
            key: format!("msg/{:016x}", mix(i, 1)).into_bytes(),
            value: text(i, self.value_bytes).into_bytes(),
            ..Default::default()
        };
        match c.put(req).await {
            Ok(_) => Outcome::Ok,
            Err(s) => Outcome::Error(format!("grpc {:?}", s.code())),
        }
    }
}
