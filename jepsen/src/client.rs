//! Clients: workers invoking operations through the public HTTP API, and one WebSocket push
//! subscriber per user. Every operation is recorded as invoke then ok / fail / info:
//! 2xx is ok, 4xx is fail (the server rejected it: it did not happen), anything else —
//! 5xx, timeouts, dropped connections — is info (unknown). A send that ends in info is
//! retried with the same `client_msg_id`, possibly on another node.

use crate::history::{Recorder, Type, Value};
use futures::StreamExt;
use rand::Rng;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// What the clients need to know about the cluster.
#[derive(Clone)]
pub struct Target {
    pub urls: Vec<String>,
    pub tokens: Arc<std::collections::HashMap<String, String>>,
    pub users: Vec<String>,
}

impl Target {
    pub fn convs(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, a) in self.users.iter().enumerate() {
            for b in &self.users[i + 1..] {
                out.push((a.clone(), b.clone()));
            }
        }
        out
    }
}

pub fn conv_id(a: &str, b: &str) -> String {
    if a < b {
        format!("{a}~{b}")
    } else {
        format!("{b}~{a}")
    }
}

enum Outcome<T> {
    Ok(T),
    /// The server answered that it did not do it (4xx).
    Fail(String),
    /// The connection was refused: the request never left, so it did not happen either,
    /// but another node may take it.
    Refused(String),
    Info(String),
}

async fn call(req: reqwest::RequestBuilder) -> Outcome<serde_json::Value> {
    match req.send().await {
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            if status.is_success() {
                match serde_json::from_str(&body) {
                    Ok(v) => Outcome::Ok(v),
                    Err(e) => Outcome::Info(format!("undecodable reply: {e}")),
                }
            } else if status.is_client_error() {
                Outcome::Fail(format!("{status}: {body}"))
            } else {
                Outcome::Info(format!("{status}: {body}"))
            }
        }
        // Refused before the request was sent: it definitely did not happen.
        Err(e) if e.is_connect() => Outcome::Refused(format!("connect: {e}")),
        Err(e) => Outcome::Info(e.to_string()),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(6))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("client")
}

/// One worker process: operations at about `interval` apart until `until`.
pub async fn worker(p: usize, t: Target, rec: Recorder, interval: Duration, until: Instant) {
    let http = http();
    let convs = t.convs();
    let mut k = 0u64;
    while Instant::now() < until {
        let (a, b, dice, node, jitter) = {
            let mut rng = rand::rng();
            let (a, b) = convs[rng.random_range(0..convs.len())].clone();
            let (a, b) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
            (a, b, rng.random_range(0..100u32), rng.random_range(0..t.urls.len()), rng.random_range(0.5..1.5))
        };
        if dice < 55 {
            k += 1;
            send(&http, p, &t, &rec, &a, &b, &format!("p{p}-{k}"), node).await;
        } else if dice < 80 {
            read(&http, p, &t, &rec, &a, &b, node, false).await;
        } else if dice < 92 {
            recent(&http, p, &t, &rec, &a, node).await;
        } else {
            mark_read(&http, p, &t, &rec, &a, &b, node).await;
        }
        tokio::time::sleep(interval.mul_f64(jitter)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn send(
    http: &reqwest::Client,
    p: usize,
    t: &Target,
    rec: &Recorder,
    from: &str,
    to: &str,
    id: &str,
    mut node: usize,
) {
    let conv = conv_id(from, to);
    let value = |seq| Value::Send { conv: conv.clone(), from: from.into(), to: to.into(), id: id.into(), seq };
    for _attempt in 0..4 {
        rec.record(p, Type::Invoke, node, value(None), None, false);
        let body = json!({"to": to, "client_msg_id": id, "text": format!("text of {id}")});
        let req = http.post(format!("{}/v1/messages", t.urls[node])).bearer_auth(&t.tokens[from]).json(&body);
        match call(req).await {
            Outcome::Ok(v) => return rec.record(p, Type::Ok, node, value(v["seq"].as_u64()), None, false),
            Outcome::Refused(e) => {
                rec.record(p, Type::Fail, node, value(None), Some(e), false);
                node = (node + 1) % t.urls.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Outcome::Fail(e) => return rec.record(p, Type::Fail, node, value(None), Some(e), false),
            Outcome::Info(e) => {
                rec.record(p, Type::Info, node, value(None), Some(e), false);
                node = (node + 1) % t.urls.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads a whole conversation (paging with `after`). Returns whether it succeeded.
#[allow(clippy::too_many_arguments)]
pub async fn read(
    http: &reqwest::Client,
    p: usize,
    t: &Target,
    rec: &Recorder,
    user: &str,
    peer: &str,
    node: usize,
    is_final: bool,
) -> bool {
    let conv = conv_id(user, peer);
    let value = |msgs| Value::Read { conv: conv.clone(), user: user.into(), msgs };
    rec.record(p, Type::Invoke, node, value(None), None, is_final);
    let mut msgs: Vec<(u64, String, String)> = Vec::new();
    loop {
        let after = msgs.last().map(|m| m.0).unwrap_or(0);
        let url = format!("{}/v1/conversations/{conv}/messages?after={after}&limit=200", t.urls[node]);
        match call(http.get(url).bearer_auth(&t.tokens[user])).await {
            Outcome::Ok(v) => {
                let page = v["messages"].as_array().cloned().unwrap_or_default();
                for m in &page {
                    msgs.push((
                        m["seq"].as_u64().unwrap_or(0),
                        m["from"].as_str().unwrap_or("").to_string(),
                        m["client_msg_id"].as_str().unwrap_or("").to_string(),
                    ));
                }
                let last = v["last_seq"].as_u64().unwrap_or(0);
                if page.is_empty() || msgs.last().map(|m| m.0).unwrap_or(0) >= last {
                    rec.record(p, Type::Ok, node, value(Some(msgs)), None, is_final);
                    return true;
                }
            }
            // A conversation without messages yet reads as empty.
            Outcome::Fail(e) if e.contains("unknown_conversation") && msgs.is_empty() => {
                rec.record(p, Type::Ok, node, value(Some(vec![])), None, is_final);
                return true;
            }
            // Reads change nothing, so any failure is a definite "did not happen".
            Outcome::Fail(e) | Outcome::Refused(e) | Outcome::Info(e) => {
                rec.record(p, Type::Fail, node, value(None), Some(e), is_final);
                return false;
            }
        }
    }
}

async fn recent(http: &reqwest::Client, p: usize, t: &Target, rec: &Recorder, user: &str, node: usize) {
    let value = |rows| Value::Recent { user: user.into(), rows };
    rec.record(p, Type::Invoke, node, value(None), None, false);
    let req = http.get(format!("{}/v1/conversations?limit=200", t.urls[node])).bearer_auth(&t.tokens[user]);
    match call(req).await {
        Outcome::Ok(v) => {
            let rows = v["conversations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| (r["conversation_id"].as_str().unwrap_or("").to_string(), r["last_seq"].as_u64().unwrap_or(0)))
                .collect();
            rec.record(p, Type::Ok, node, value(Some(rows)), None, false);
        }
        Outcome::Fail(e) | Outcome::Refused(e) | Outcome::Info(e) => {
            rec.record(p, Type::Fail, node, value(None), Some(e), false)
        }
    }
}

async fn mark_read(http: &reqwest::Client, p: usize, t: &Target, rec: &Recorder, user: &str, peer: &str, node: usize) {
    let conv = conv_id(user, peer);
    let value = Value::MarkRead { conv: conv.clone(), user: user.into(), seq: 1 };
    rec.record(p, Type::Invoke, node, value.clone(), None, false);
    let req = http
        .post(format!("{}/v1/conversations/{conv}/read", t.urls[node]))
        .bearer_auth(&t.tokens[user])
        .json(&json!({"seq": 1}));
    match call(req).await {
        Outcome::Ok(_) => rec.record(p, Type::Ok, node, value, None, false),
        Outcome::Fail(e) | Outcome::Refused(e) => rec.record(p, Type::Fail, node, value, Some(e), false),
        Outcome::Info(e) => rec.record(p, Type::Info, node, value, Some(e), false),
    }
}

/// A user's push subscriber: connects to a random node, records every pushed message,
/// and on any disconnect reconnects to a random node with its last cursor.
pub async fn subscriber(p: usize, user: String, t: Target, rec: Recorder, until: Instant) {
    let mut cursor: Option<String> = None;
    while Instant::now() < until {
        let node = rand::rng().random_range(0..t.urls.len());
        let mut url = format!("{}/v1/ws?access_token={}", t.urls[node].replacen("http", "ws", 1), t.tokens[&user]);
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let conn = tokio::time::timeout(Duration::from_secs(3), tokio_tungstenite::connect_async(url)).await;
        let Ok(Ok((mut ws, _))) = conn else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        rec.record(p, Type::Ok, node, Value::Connect { user: user.clone(), cursor: cursor.clone() }, None, false);
        // Reconnect now and then even without faults, to exercise resume.
        let session_end = Instant::now() + Duration::from_secs(rand::rng().random_range(5..20));
        loop {
            let deadline = session_end.min(until);
            let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(m))) => m,
                _ => break,
            };
            let Message::Text(text) = msg else { continue };
            let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap_or_default();
            match v["type"].as_str() {
                Some("ready") => cursor = v["cursor"].as_str().map(str::to_string),
                Some("message") => {
                    cursor = v["cursor"].as_str().map(str::to_string);
                    let value = Value::Push {
                        user: user.clone(),
                        conv: v["conversation_id"].as_str().unwrap_or("").into(),
                        seq: v["seq"].as_u64().unwrap_or(0),
                        from: v["from"].as_str().unwrap_or("").into(),
                        id: v["client_msg_id"].as_str().unwrap_or("").into(),
                        cursor: cursor.clone().unwrap_or_default(),
                    };
                    rec.record(p, Type::Ok, node, value, None, false);
                }
                Some("receipt") => cursor = v["cursor"].as_str().map(str::to_string),
                _ => {}
            }
        }
    }
}

/// Final reads after heal and quiet: every conversation, retried until one succeeds.
pub async fn final_reads(t: &Target, rec: &Recorder, first_process: usize, within: Duration) -> usize {
    let http = http();
    let end = Instant::now() + within;
    let mut missing = 0;
    for (i, (a, b)) in t.convs().into_iter().enumerate() {
        let p = first_process + i;
        let mut node = i % t.urls.len();
        loop {
            if read(&http, p, t, rec, &a, &b, node, true).await {
                break;
            }
            if Instant::now() > end {
                missing += 1;
                break;
            }
            node = (node + 1) % t.urls.len();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    missing
}
