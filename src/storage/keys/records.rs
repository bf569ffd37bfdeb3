//! Checking a backup's records before a restore writes them ([`check_record`]).

use super::super::{decode, StoreError};
use super::split_numbered;
use crate::chat::types::{Account, ConvMeta, Pending};
use crate::chat::{ConversationId, InboxEvent, IndexEntry, Message, UserId};

/// Whose a record is, by its key: the shard it belongs on follows from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOwner {
    Conversation(ConversationId),
    User(UserId),
    Invite(String),
    /// The node table (a restore skips it).
    NodeTable,
}

/// Checks a record of a backup before a restore writes it: a key of a known kind whose ids
/// parse, and a value the readers can decode. Written unchecked, such a record would fail
/// later, where nobody can fix it: the applies of the shard (a malformed inbox key stops
/// the numbering of a user's events), its retention sweeps, or every read of the user.
pub fn check_record(key: &[u8], value: &[u8]) -> Result<RecordOwner, String> {
    fn text(b: &[u8]) -> Result<&str, String> {
        std::str::from_utf8(b).map_err(|_| "an id that is not UTF-8".to_string())
    }
    fn conv(b: &[u8]) -> Result<ConversationId, String> {
        ConversationId::parse(text(b)?).map_err(|e| format!("conversation id: {e}"))
    }
    fn user(b: &[u8]) -> Result<UserId, String> {
        UserId::parse(text(b)?).map_err(|e| format!("user id: {e}"))
    }
    fn numbered(body: &[u8]) -> Result<(&[u8], u64), String> {
        split_numbered(body).ok_or_else(|| "the key does not end in \\0 and an 8-byte number".to_string())
    }
    fn split2(body: &[u8]) -> Result<(&[u8], &[u8]), String> {
        let at = body.iter().position(|b| *b == 0).ok_or("the key lacks its \\0 separator")?;
        Ok((&body[..at], &body[at + 1..]))
    }
    fn decoded<T: serde::de::DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, String> {
        decode(key, v).map_err(|e| match e {
            StoreError::Corrupt { reason, .. } => format!("undecodable value: {reason}"),
            e => e.to_string(),
        })
    }
    fn empty(v: &[u8]) -> Result<(), String> {
        v.is_empty().then_some(()).ok_or_else(|| "the value should be empty".to_string())
    }
    fn number(v: &[u8]) -> Result<(), String> {
        (v.len() == 8).then_some(()).ok_or_else(|| "the value should be an 8-byte number".to_string())
    }
    if key.len() < 2 || key[1] != b'/' {
        return Err("not a key of the state machine's data".into());
    }
    let body = &key[2..];
    match key[0] {
        b'c' => {
            decoded::<ConvMeta>(key, value)?;
            Ok(RecordOwner::Conversation(conv(body)?))
        }
        b'm' => {
            let (c, seq) = numbered(body)?;
            let m: Message = decoded(key, value)?;
            if m.seq != seq {
                return Err(format!("message {} stored under seq {seq}", m.seq));
            }
            Ok(RecordOwner::Conversation(conv(c)?))
        }
        b'x' => {
            let (c, _) = numbered(body)?;
            decoded::<Pending>(key, value)?;
            Ok(RecordOwner::Conversation(conv(c)?))
        }
        b'd' => {
            let (c, rest) = split2(body)?;
            let (from, _id) = split2(rest)?;
            user(from)?;
            decoded::<(u64, u64, u64)>(key, value)?;
            Ok(RecordOwner::Conversation(conv(c)?))
        }
        b'i' => {
            let (u, c) = split2(body)?;
            conv(c)?;
            decoded::<IndexEntry>(key, value)?;
            Ok(RecordOwner::User(user(u)?))
        }
        b'o' => {
            let (u, rest) = split2(body)?;
            if rest.len() < 8 {
                return Err("the recency key lacks its 8-byte time".into());
            }
            conv(&rest[8..])?;
            empty(value)?;
            Ok(RecordOwner::User(user(u)?))
        }
        b'e' => {
            let (u, _) = numbered(body)?;
            decoded::<InboxEvent>(key, value)?;
            Ok(RecordOwner::User(user(u)?))
        }
        b'u' => {
            empty(value)?;
            Ok(RecordOwner::User(user(body)?))
        }
        b'a' => {
            decoded::<Account>(key, value)?;
            Ok(RecordOwner::User(user(body)?))
        }
        b'r' | b'g' | b'n' => {
            number(value)?;
            Ok(RecordOwner::User(user(body)?))
        }
        b'v' => {
            decoded::<UserId>(key, value)?;
            Ok(RecordOwner::Invite(text(body)?.to_string()))
        }
        b'N' => Ok(RecordOwner::NodeTable),
        _ => Err("not a key of the state machine's data".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    /// Records a restore must refuse (`check_record`), and what the good ones belong to.
    #[test]
    fn restore_records_are_checked_by_kind() {
        let (bob, ann) = (UserId::parse("bob").unwrap(), UserId::parse("ann").unwrap());
        let c = ConversationId::between(&ann, &bob).unwrap();
        let event = InboxEvent::Messages { conversation: c.clone(), after_seq: 0, to_seq: 1, ts: 5 };
        let msg = |seq| Message { seq, from: ann.clone(), text: "hi".into(), ts: 5, client_msg_id: "m1".into() };
        let good: Vec<(Vec<u8>, Vec<u8>, RecordOwner)> = vec![
            (inbox(&bob, 1), encode(&event), RecordOwner::User(bob.clone())),
            (message(&c, 3), encode(&msg(3)), RecordOwner::Conversation(c.clone())),
            (dedup(&c, &ann, "m1"), encode(&(3u64, 5u64, 0u64)), RecordOwner::Conversation(c.clone())),
            (index(&bob, &c), encode(&IndexEntry::new(ann.clone())), RecordOwner::User(bob.clone())),
            (order(&bob, 5, &c), vec![], RecordOwner::User(bob.clone())),
            (user(&bob), vec![], RecordOwner::User(bob.clone())),
            (inbox_last(&bob), 1u64.to_be_bytes().to_vec(), RecordOwner::User(bob.clone())),
            (invite("inv1"), encode(&bob), RecordOwner::Invite("inv1".into())),
            (node(2), b"{}".to_vec(), RecordOwner::NodeTable),
        ];
        for (k, v, owner) in good {
            assert_eq!(check_record(&k, &v), Ok(owner), "{}", String::from_utf8_lossy(&k));
        }
        let short_inbox = [&inbox_prefix(&bob)[..], &[0, 0, 0, 0, 0, 0, 1]].concat();
        let bad: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
            (short_inbox, encode(&event), "8-byte number"),
            (inbox(&bob, 1), b"{".to_vec(), "undecodable"),
            (message(&c, 4), encode(&msg(3)), "stored under seq 4"),
            (b"m/ann+bob\0\0\0\0\0\0\0\0\x01".to_vec(), encode(&msg(1)), "conversation id"),
            (b"c/bob~ann".to_vec(), b"{}".to_vec(), "undecodable"),
            (b"i/bob".to_vec(), encode(&IndexEntry::new(ann.clone())), "separator"),
            (b"u/b\xffb".to_vec(), vec![], "UTF-8"),
            (user(&bob), b"x".to_vec(), "empty"),
            (revoked_before(&bob), vec![1, 2, 3], "8-byte number"),
            (b"z/what".to_vec(), vec![], "not a key"),
            (b"c".to_vec(), vec![], "not a key"),
        ];
        for (k, v, why) in bad {
            let e = check_record(&k, &v).expect_err(&String::from_utf8_lossy(&k));
            assert!(e.contains(why), "{}: {e} (wanted {why})", String::from_utf8_lossy(&k));
        }
    }
}
