//! `raftchat chat --as alice --with bob`: an interactive terminal chat over the WebSocket.
//!
//! Shows the last messages, then live messages and receipts of the conversation; every
//! line typed is sent (with a fresh `client_msg_id`). Messages from the peer are acked
//! (delivered) and marked read as they are shown. On a lost connection it reconnects with
//! its last cursor (to the next `--server` given, round robin) and re-sends unacknowledged
//! lines with the same `client_msg_id`, so nothing is lost or doubled. `/quit` leaves.

use super::client::ClientArgs;
use crate::chat::{ConversationId, UserId};
use anyhow::Context;
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The other participant.
    #[arg(long)]
    pub with: String,
    /// More nodes to fail over to (HTTP addresses), besides --server.
    #[arg(long = "also")]
    pub also: Vec<String>,
}

fn ws_url(server: &str, token: &str, cursor: Option<&str>) -> String {
    let base = server.replacen("http://", "ws://", 1).replacen("https://", "wss://", 1);
    match cursor {
        Some(c) => format!("{base}/v1/ws?access_token={token}&cursor={c}"),
        None => format!("{base}/v1/ws?access_token={token}"),
    }
}

fn show(v: &Value, me: &UserId) {
    let from = v["from"].as_str().unwrap_or("?");
    let who = if from == me.as_str() { "you" } else { from };
    println!("#{:<4} {who}: {}", v["seq"], v["text"].as_str().unwrap_or(""));
}

pub async fn run(a: ChatArgs) -> anyhow::Result<()> {
    let me = a.client.user()?;
    let peer = UserId::parse(&a.with)?;
    let conv = ConversationId::between(&me, &peer)?;
    // wss:// trusts the cluster's CA (--ca-file).
    let connector =
        a.client.ca_file.as_deref().map(crate::tls::trusting).transpose()?.map(tokio_tungstenite::Connector::Rustls);
    let servers: Vec<String> = std::iter::once(a.client.server.clone()).chain(a.also.clone()).collect();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut cursor: Option<String> = None;
    let mut unacked: BTreeMap<String, String> = BTreeMap::new(); // client_msg_id -> text
    let mut counter = 0u64;
    let mut shown_history = false;
    let mut stdin_open = true;
    let mut attempt = 0usize;
    let session = format!("{}-{}", std::process::id(), crate::storage::sm::now_ms());
    loop {
        let server = &servers[attempt % servers.len()];
        // A fresh token per connection: a password login's access token is short-lived.
        let token = match a.client.token_at(server).await {
            Ok(t) => t,
            Err(e) if e.to_string().starts_with("login refused") => return Err(e),
            Err(e) => {
                eprintln!("-- cannot log in at {server}: {e:#}; retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let url = ws_url(server, &token, cursor.as_deref());
        let (mut ws, _) =
            match tokio_tungstenite::connect_async_tls_with_config(url, None, true, connector.clone()).await {
                Ok(ok) => ok,
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) if resp.status().is_client_error() => {
                    // A bad token or an unknown user: retrying cannot help.
                    let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                    anyhow::bail!("{server} refused the connection: {} {body}", resp.status());
                }
                Err(e) => {
                    eprintln!("-- cannot connect to {server}: {e}; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
        eprintln!("-- connected to {server} as {me}, chatting with {peer} (/quit to leave)");
        if !shown_history {
            let req = json!({"type": "history", "id": "history", "conversation_id": conv, "limit": 20});
            ws.send(Message::Text(req.to_string().into())).await?;
        }
        for (id, text) in &unacked {
            let req = json!({"type": "send", "id": id, "to": peer, "client_msg_id": id, "text": text});
            ws.send(Message::Text(req.to_string().into())).await?;
        }
        loop {
            tokio::select! {
                line = lines.next_line(), if stdin_open => {
                    let Some(line) = line.context("reading stdin")? else {
                        stdin_open = false;
                        if unacked.is_empty() { return Ok(()); }
                        continue;
                    };
                    let text = line.trim_end().to_string();
                    if text == "/quit" {
                        let _ = ws.close(None).await;
                        return Ok(());
                    }
                    if text.trim().is_empty() {
                        continue;
                    }
                    counter += 1;
                    let id = format!("{me}-{session}-{counter}");
                    let req = json!({"type": "send", "id": id, "to": peer, "client_msg_id": id, "text": text});
                    unacked.insert(id, text);
                    if ws.send(Message::Text(req.to_string().into())).await.is_err() {
                        break;
                    }
                }
                msg = ws.next() => {
                    let Some(Ok(msg)) = msg else { break };
                    let Message::Text(t) = msg else {
                        if let Message::Close(c) = msg { eprintln!("-- server closed the connection: {c:?}"); }
                        continue;
                    };
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                    if let Some(c) = v["cursor"].as_str() {
                        cursor = Some(c.to_string());
                    }
                    match v["type"].as_str().unwrap_or("") {
                        "history" => {
                            for m in v["messages"].as_array().into_iter().flatten() { show(m, &me); }
                            shown_history = true;
                        }
                        "message" if v["conversation_id"] == json!(conv) => {
                            show(&v, &me);
                            if v["from"] == json!(peer) {
                                let seq = v["seq"].clone();
                                for kind in ["ack", "mark_read"] {
                                    let f = json!({"type": kind, "conversation_id": conv, "seq": seq});
                                    let _ = ws.send(Message::Text(f.to_string().into())).await;
                                }
                            }
                        }
                        "message" => eprintln!("-- new message from {} in {}", v["from"], v["conversation_id"]),
                        "receipt" if v["conversation_id"] == json!(conv) => {
                            let tick = if v["receipt"] == "read" { "✓✓ read" } else { "✓ delivered" };
                            println!("      {tick} up to #{}", v["seq"]);
                        }
                        "sent" => {
                            if let Some(id) = v["id"].as_str() { unacked.remove(id); }
                            if !stdin_open && unacked.is_empty() { return Ok(()); }
                        }
                        "error" => eprintln!("-- error: {} ({})", v["message"].as_str().unwrap_or(""), v["code"].as_str().unwrap_or("")),
                        _ => {}
                    }
                }
            }
        }
        eprintln!("-- connection lost; reconnecting from cursor {}", cursor.as_deref().unwrap_or("(start)"));
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
