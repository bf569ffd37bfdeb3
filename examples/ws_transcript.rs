//! Prints a real WebSocket exchange against a running node, for docs/protocol.md.
//! Usage: cargo run --example ws_transcript -- http://127.0.0.1:8080 <alice token> <bob token>
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let base = args[1].replacen("http://", "ws://", 1);
    let (mut bob, _) = tokio_tungstenite::connect_async(format!("{base}/v1/ws?access_token={}", args[3])).await?;
    let (mut alice, _) = tokio_tungstenite::connect_async(format!("{base}/v1/ws")).await?;
    let say = |who: &str, dir: &str, t: &str| println!("{who} {dir} {t}");
    let frames = [
        format!(r#"{{"type":"auth","id":"a1","token":"{}"}}"#, args[2]),
        r#"{"type":"send","id":"r1","to":"bob","client_msg_id":"laptop-1","text":"hi bob"}"#.to_string(),
    ];
    for f in &frames {
        alice.send(Message::Text(f.clone().into())).await?;
        say(
            "alice",
            ">>",
            if f.contains("auth") { r#"{"type":"auth","id":"a1","token":"<alice's token>"}"# } else { f },
        );
    }
    for _ in 0..4 {
        if let Some(Ok(Message::Text(t))) = alice.next().await {
            say("alice", "<<", t.as_str());
        }
    }
    for _ in 0..2 {
        if let Some(Ok(Message::Text(t))) = bob.next().await {
            say("bob  ", "<<", t.as_str());
        }
    }
    for f in [
        r#"{"type":"ack","id":"r2","conversation_id":"alice~bob","seq":1}"#,
        r#"{"type":"mark_read","id":"r3","conversation_id":"alice~bob","seq":1}"#,
        r#"{"type":"history","id":"r4","conversation_id":"alice~bob","limit":10}"#,
        r#"{"type":"conversations","id":"r5","limit":10}"#,
        r#"{"type":"shout","id":"r6"}"#,
    ] {
        bob.send(Message::Text(f.into())).await?;
        say("bob  ", ">>", f);
        if let Some(Ok(Message::Text(t))) = bob.next().await {
            say("bob  ", "<<", t.as_str());
        }
    }
    for _ in 0..2 {
        if let Some(Ok(Message::Text(t))) = alice.next().await {
            say("alice", "<<", t.as_str());
        }
    }
    Ok(())
}
