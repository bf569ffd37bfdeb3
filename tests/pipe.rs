//! The peer pipe (src/raft/pipe.rs): Raft RPCs and forwarded operations travel as frames
//! on one stream per peer, and a node that does not use it still takes part.

mod common;

use std::collections::BTreeMap;

/// Node 3 runs with `peer_pipe = false` (its own calls go unary, as an older build's would);
/// nodes 1 and 2 pipe to each other and to node 3, which serves the pipe. Every send is
/// acknowledged, stored once and in one order, whichever node took it.
#[tokio::test(flavor = "multi_thread")]
async fn calls_travel_on_the_pipe_and_a_node_without_it_takes_part() {
    let c = common::start(3, |cfg| {
        if cfg.node_id == 3 {
            cfg.peer_pipe = false;
        }
    })
    .await;
    let users = ["ana", "ben", "cal", "dee", "eve", "fay"];
    for u in users {
        c.register(0, u).await;
    }
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..60 {
        let (from, to) = (users[i % users.len()], users[(i * 5 + 1) % users.len()]);
        if from == to {
            continue;
        }
        let text = format!("m{i}");
        let r = c.send_ok(i % 3, from, to, &format!("id-{i}"), &text).await;
        assert!(!r.duplicate, "a first attempt is never a duplicate");
        sent.entry(r.conversation_id.clone()).or_default().push(text);
        // The same id again, through another node: the stored message, flagged duplicate.
        if i % 10 == 0 {
            let again = c.send_ok((i + 1) % 3, from, to, &format!("id-{i}"), &format!("m{i}")).await;
            assert!(again.duplicate);
            assert_eq!((again.conversation_id, again.seq), (r.conversation_id.clone(), r.seq));
        }
    }
    for (conv, texts) in &sent {
        let participant = conv.split('~').next().unwrap_or_default().to_string();
        for node in 0..3 {
            let h = c.full_history(node, &participant, conv).await;
            let got: Vec<_> = h.messages.iter().map(|m| m.text.clone()).collect();
            assert_eq!(&got, texts, "conversation {conv} read on node {}", node + 1);
            let seqs: Vec<_> = h.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=texts.len() as u64).collect::<Vec<_>>(), "gap-free order");
        }
    }
    // Every node either leads shards (and replicates to the others) or forwards to their
    // leaders, so every node makes peer calls; the counters say which transport.
    let c = &c;
    let calls = |node, transport: &'static str| async move {
        let mut n = 0.0;
        for kind in ["append_entries", "vote", "forward"] {
            n += c
                .metric(node, &format!("raftchat_peer_calls_total{{kind=\"{kind}\",transport=\"{transport}\"}}"))
                .await;
        }
        n
    };
    for node in [0, 1] {
        assert!(calls(node, "pipe").await > 0.0, "node {} calls its peers over the pipe", node + 1);
        assert_eq!(calls(node, "unary").await, 0.0, "node {} makes no unary calls", node + 1);
    }
    assert_eq!(calls(2, "pipe").await, 0.0, "node 3 has the pipe off");
    assert!(calls(2, "unary").await > 0.0, "node 3 calls its peers unary");
}
