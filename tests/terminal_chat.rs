//! Two real `raftchat chat` processes talk through a 3-node cluster: lines typed on one
//! appear on the other, receipts come back, and a client whose node is killed reconnects
//! elsewhere and carries on.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

fn chat(c: &TestCluster, me: &str, peer: &str, servers: &[usize]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_raftchat"));
    cmd.args(["chat", "--as", me, "--with", peer, "--server", &c.url(servers[0])]);
    for s in &servers[1..] {
        cmd.args(["--also", &c.url(*s)]);
    }
    cmd.arg("--secret-file").arg(c.dir.join("secret"));
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true).spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, out)
}

async fn expect_line(out: &mut Lines<BufReader<ChildStdout>>, needle: &str) {
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = out.next_line().await.unwrap() {
            if line.contains(needle) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "a line containing {needle:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_terminals_chat_with_receipts_and_failover() {
    let mut c = start(3, |_| {}).await;
    c.register(0, "bob").await;
    c.register(0, "alice").await;
    let (mut alice, mut alice_out) = chat(&c, "alice", "bob", &[0, 2]);
    let (mut bob, mut bob_out) = chat(&c, "bob", "alice", &[1]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let alice_in = alice.stdin.as_mut().unwrap();
    alice_in.write_all(b"hello bob from the terminal\n").await.unwrap();
    expect_line(&mut bob_out, "alice: hello bob from the terminal").await;
    expect_line(&mut alice_out, "you: hello bob from the terminal").await;
    // bob's client showed it, so it acked and marked it read: alice sees the ticks.
    expect_line(&mut alice_out, "✓✓ read up to #1").await;

    let bob_in = bob.stdin.as_mut().unwrap();
    bob_in.write_all(b"hi alice\n").await.unwrap();
    expect_line(&mut alice_out, "bob: hi alice").await;

    // alice's node dies; her client reconnects to node 3 and keeps chatting.
    c.kill(0).unwrap();
    alice_in.write_all(b"still here after failover\n").await.unwrap();
    expect_line(&mut bob_out, "alice: still here after failover").await;
    let h = c.full_history(1, "bob", "alice~bob").await;
    let texts: Vec<&str> = h.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec!["hello bob from the terminal", "hi alice", "still here after failover"]);
    alice_in.write_all(b"/quit\n").await.unwrap();
    let st = tokio::time::timeout(Duration::from_secs(10), alice.wait()).await.unwrap().unwrap();
    assert!(st.success());
}
