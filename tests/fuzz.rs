//! Property-based fuzzing (proptest, stable Rust) of every decoder that takes bytes from
//! outside: WebSocket frames, cursors, tokens, ids and texts of HTTP bodies, peer payloads,
//! records read back from disk, and (accounts and operations) invites, refresh tokens,
//! JWKS files and backup records. Each must answer with a value or an error, never panic,
//! and the round trips must hold.
//!
//! `cargo test --test fuzz` runs 256 cases per target (CI); for a longer run:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

use proptest::prelude::*;
use raftchat::api::ws::protocol;
use raftchat::auth::{Claims, Keys};
use raftchat::chat::{ConversationId, UserId};
use raftchat::storage::keys::Writes;

/// Strings that look like frames: JSON objects with known and unknown keys and odd values.
fn frame_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("type"),
        Just("id"),
        Just("to"),
        Just("text"),
        Just("client_msg_id"),
        Just("token"),
        Just("cursor"),
        Just("conversation_id"),
        Just("seq"),
        Just("limit"),
        Just("before"),
        Just("after"),
        Just("x")
    ];
    let value = prop_oneof![
        Just("\"send\"".to_string()),
        Just("\"auth\"".to_string()),
        Just("\"history\"".to_string()),
        Just("\"ack\"".to_string()),
        Just("\"mark_read\"".to_string()),
        Just("\"conversations\"".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        ".{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("null".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
    ];
    prop::collection::vec((key, value), 0..8).prop_map(|kv| {
        let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    })
}

proptest! {
    #[test]
    fn websocket_frames_parse_or_fail_cleanly(s in prop_oneof![frame_like(), ".{0,200}"]) {
        match protocol::parse(&s) {
            Ok(_) => {}
            Err((_, e)) => prop_assert!(!e.code.is_empty() && !e.message.is_empty()),
        }
    }

    #[test]
    fn resume_cursors_parse_or_fail_cleanly(s in prop_oneof![".{0,30}", "[0-9]{1,25}\\.[0-9]{1,25}"]) {
        if let Ok(c) = protocol::Cursor::parse(&s) {
            prop_assert_eq!(protocol::Cursor::parse(&c.to_string()).unwrap(), c);
        }
    }

    #[test]
    fn page_cursors_parse_or_fail_cleanly(s in prop_oneof![".{0,60}", "[A-Za-z0-9_-]{0,80}"]) {
        let _ = raftchat::api::ops::decode_cursor(&s);
    }

    #[test]
    fn ids_and_texts_are_validated_without_panics(s in ".{0,200}", n in 0usize..300) {
        if let Ok(u) = UserId::parse(&s) {
            prop_assert!(!u.as_str().is_empty() && u.as_str() != "." && u.as_str() != "..");
        }
        if let Ok(c) = ConversationId::parse(&s) {
            prop_assert_eq!(ConversationId::parse(&c.to_string()).unwrap(), c);
        }
        let _ = raftchat::chat::types::validate_client_msg_id(&s);
        let _ = raftchat::chat::types::validate_text(&s, n);
        let _ = serde_json::from_str::<raftchat::api::ops::SendRequest>(&s);
    }

    /// Any string is refused or verified; a token changed anywhere never verifies as someone
    /// else.
    #[test]
    fn tokens_never_verify_when_tampered(s in ".{0,300}", flip in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let keys = Keys::new(b"fuzz secret");
        let _ = keys.verify(&s);
        let _ = keys.verify_header(Some(&s));
        let now = raftchat::auth::now_secs();
        let good = keys.sign(&Claims { sub: "alice".into(), iat: now, exp: now + 60, nbf: None, adm: false });
        let mut bytes = good.clone().into_bytes();
        let i = flip.index(bytes.len());
        bytes[i] = byte;
        if let Ok(t) = String::from_utf8(bytes) {
            if t != good {
                if let Ok(p) = keys.verify(&t) {
                    // base64url has equivalent spellings of the last character; anything
                    // accepted must still be alice's own token.
                    prop_assert_eq!(p.user.as_str(), "alice");
                    prop_assert!(!p.admin);
                }
            }
        }
    }

    /// Peer payloads are JSON; garbage is an error.
    #[test]
    fn peer_payloads_decode_or_fail_cleanly(b in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = serde_json::from_slice::<raftchat::node::router::ShardOp>(&b);
        let _ = serde_json::from_slice::<Result<raftchat::node::router::ShardReply, raftchat::node::router::ShardError>>(&b);
        let _ = raftchat::storage::snapshot::decode_all(&b);
    }

    /// Redo records read back from disk: garbage is `Corrupt`, real ones round-trip.
    #[test]
    fn redo_records_round_trip_and_reject_garbage(
        b in prop::collection::vec(any::<u8>(), 0..300),
        writes in prop::collection::vec(
            (prop::collection::vec(any::<u8>(), 0..20), prop::option::of(prop::collection::vec(any::<u8>(), 0..40))),
            0..10,
        ),
    ) {
        let _ = Writes::decode(&b);
        let w = Writes(writes);
        prop_assert_eq!(Writes::decode(&w.encode()).unwrap(), w);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// A write-ahead log segment of arbitrary bytes: the node either replays it (cutting a
    /// torn tail) or refuses to start with an error; it never panics.
    #[test]
    fn wal_segments_of_garbage_are_cut_or_refused(
        b in prop::collection::vec(any::<u8>(), 0..2000),
        second in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("00000000000000000001.wal"), &b).unwrap();
        let _ = raftchat::storage::wal::Wal::open(dir.path(), raftchat::metrics::Metrics::new());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("00000000000000000001.wal"), &b).unwrap();
        std::fs::write(dir.path().join("00000000000000000002.wal"), &second).unwrap();
        let _ = raftchat::storage::wal::Wal::open(dir.path(), raftchat::metrics::Metrics::new());
    }
}

proptest! {
    #[test]
    fn invites_refresh_tokens_and_jwks_files_decode_or_fail_cleanly(
        s in prop_oneof![".{0,120}", "inv1\\.[0-9a-f]{0,30}\\.[0-9]{0,12}\\.[A-Za-z0-9_-]{0,50}", "[a-z]{1,8}:[A-Za-z0-9_-]{0,50}"],
        b in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let k = Keys::new(b"secret");
        // A made-up invite never verifies; a refresh token either names a user or is refused.
        prop_assert!(k.verify_invite(&s).is_err());
        if let Ok(u) = raftchat::api::accounts::refresh_user(&s) {
            let prefix = format!("{u}:");
            prop_assert!(s.starts_with(&prefix));
        }
        let _ = raftchat::auth::External::from_jwks(&b, "issuer", None);
        let _ = raftchat::auth::External::from_jwks(s.as_bytes(), "issuer", Some("aud"));
        let jwks_like = format!("{{\"keys\":[{{\"kty\":\"EC\",\"crv\":\"P-256\",\"kid\":\"k\",\"x\":{:?},\"y\":{:?}}}]}}", s, s);
        let _ = raftchat::auth::External::from_jwks(jwks_like.as_bytes(), "issuer", None);
    }

    #[test]
    fn backup_records_decode_or_fail_cleanly(b in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(records) = raftchat::storage::snapshot::decode_all(&b) {
            let total: usize = records.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
            prop_assert_eq!(total, b.len());
        }
    }
}
