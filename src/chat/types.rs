//! Identifiers and records of the chat domain, with the validation rules clients see.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest user id, in bytes.
pub const MAX_USER_ID: usize = 64;
/// Longest client-supplied idempotency key, in bytes.
pub const MAX_CLIENT_MSG_ID: usize = 128;
/// Characters of the last message kept as the preview in recent-conversation lists.
pub const PREVIEW_CHARS: usize = 80;
/// Separator of the two participants in a conversation id; never valid in a user id.
const CONV_SEP: char = '~';

/// A rule a client request broke; mapped to a 4xx by the API layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("user id must be 1..={MAX_USER_ID} characters of [A-Za-z0-9_.-], got {got:?}")]
    BadUserId { got: String },
    #[error("conversation id must be '<user>~<user>' with the two users sorted and distinct, got {got:?}")]
    BadConversationId { got: String },
    #[error("client_msg_id must be 1..={MAX_CLIENT_MSG_ID} printable characters")]
    BadClientMsgId,
    #[error("text must not be empty")]
    EmptyText,
    #[error("text is {len} bytes, the limit is {max}")]
    TextTooLong { len: usize, max: usize },
    #[error("text may not contain control characters other than newline and tab")]
    ControlCharacters,
    #[error("cannot send a message to yourself")]
    SelfSend,
}

/// A user's id: 1..=64 characters of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_USER_ID
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            // "." and ".." read as paths in URLs and logs.
            && !s.bytes().all(|b| b == b'.');
        if ok {
            Ok(UserId(s.to_string()))
        } else {
            Err(ValidationError::BadUserId { got: truncate(s, 80) })
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        UserId::parse(&s)
    }
}
impl From<UserId> for String {
    fn from(u: UserId) -> String {
        u.0
    }
}
impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 1:1 conversation, named by its two participants in sorted order (`alice~bob`), so both
/// sides, and two concurrent first messages, name the same conversation without a create step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConversationId {
    lo: UserId,
    hi: UserId,
}

impl ConversationId {
    /// The conversation between `a` and `b`; they must differ.
    pub fn between(a: &UserId, b: &UserId) -> Result<Self, ValidationError> {
        match a.cmp(b) {
            std::cmp::Ordering::Less => Ok(Self { lo: a.clone(), hi: b.clone() }),
            std::cmp::Ordering::Greater => Ok(Self { lo: b.clone(), hi: a.clone() }),
            std::cmp::Ordering::Equal => Err(ValidationError::SelfSend),
        }
    }
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let bad = || ValidationError::BadConversationId { got: truncate(s, 140) };
        let (a, b) = s.split_once(CONV_SEP).ok_or_else(bad)?;
        let (a, b) = (UserId::parse(a).map_err(|_| bad())?, UserId::parse(b).map_err(|_| bad())?);
        if a >= b {
            return Err(bad());
        }
        Ok(Self { lo: a, hi: b })
    }
    pub fn has_participant(&self, u: &UserId) -> bool {
        &self.lo == u || &self.hi == u
    }
    /// The other participant, if `u` is one.
    pub fn peer_of(&self, u: &UserId) -> Option<&UserId> {
        if &self.lo == u {
            Some(&self.hi)
        } else if &self.hi == u {
            Some(&self.lo)
        } else {
            None
        }
    }
    pub fn participants(&self) -> [&UserId; 2] {
        [&self.lo, &self.hi]
    }
}

impl TryFrom<String> for ConversationId {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ConversationId::parse(&s)
    }
}
impl From<ConversationId> for String {
    fn from(c: ConversationId) -> String {
        c.to_string()
    }
}
impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{CONV_SEP}{}", self.lo, self.hi)
    }
}

/// Checks an idempotency key: 1..=128 bytes, no control characters.
pub fn validate_client_msg_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() || id.len() > MAX_CLIENT_MSG_ID || id.chars().any(char::is_control) {
        return Err(ValidationError::BadClientMsgId);
    }
    Ok(())
}

/// Checks message text: non-empty, at most `max_bytes`, no control characters except `\n`, `\t`.
/// (Rust strings are UTF-8 already; invalid UTF-8 is rejected where bytes become a `String`.)
pub fn validate_text(text: &str, max_bytes: usize) -> Result<(), ValidationError> {
    if text.trim().is_empty() {
        return Err(ValidationError::EmptyText);
    }
    if text.len() > max_bytes {
        return Err(ValidationError::TextTooLong { len: text.len(), max: max_bytes });
    }
    if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r') {
        return Err(ValidationError::ControlCharacters);
    }
    Ok(())
}

/// The first [`PREVIEW_CHARS`] characters of a message.
pub fn preview(text: &str) -> String {
    text.chars().take(PREVIEW_CHARS).collect()
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// A stored message. `seq` is gap-free from 1 within its conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub seq: u64,
    pub from: UserId,
    pub text: String,
    /// Milliseconds since the Unix epoch, never decreasing within a conversation.
    pub ts: u64,
    pub client_msg_id: String,
}

/// One row of a user's recent-conversations index (kept on the user's shard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub peer: UserId,
    /// Highest seq this index has seen; 0 while only a read marker exists.
    pub last_seq: u64,
    pub last_ts: u64,
    pub last_from: Option<UserId>,
    pub preview: String,
    /// Read marker: every message up to here is read. Sending a message reads everything
    /// before it, so messages after the marker are the peer's: unread = last_seq - read_seq.
    pub read_seq: u64,
    /// Receipts from the peer: their devices received / read up to these seqs.
    #[serde(default)]
    pub peer_delivered_seq: u64,
    #[serde(default)]
    pub peer_read_seq: u64,
    /// The timestamp in the entry's recency key (`o/`), when it is not `last_ts`: a
    /// message within [`ORDER_WINDOW_MS`] of that key leaves it where it is (see
    /// [`IndexEntry::recency_ts`]). Absent in entries written before `cluster_version` 7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_ts: Option<u64>,
}

/// How far an entry's `last_ts` may run ahead of the timestamp in its recency key
/// (`cluster_version` 7, [`crate::chat::command::LAZY_ORDER_VERSION`]). Moving the key costs
/// two writes per user per message (remove the old key, insert the new one) on every
/// replica; within this window a message leaves it in place, and a listing of recent
/// conversations reads this much further to put the entries in `last_ts` order.
pub const ORDER_WINDOW_MS: u64 = 60_000;

impl IndexEntry {
    pub fn new(peer: UserId) -> Self {
        Self {
            peer,
            last_seq: 0,
            last_ts: 0,
            last_from: None,
            preview: String::new(),
            read_seq: 0,
            peer_delivered_seq: 0,
            peer_read_seq: 0,
            order_ts: None,
        }
    }

    /// The timestamp of this entry's recency key: `last_ts`, or up to [`ORDER_WINDOW_MS`]
    /// before it. Meaningful once `last_seq > 0` (before that there is no key).
    pub fn recency_ts(&self) -> u64 {
        self.order_ts.unwrap_or(self.last_ts)
    }

    /// The timestamp of the recency key this entry has, if any.
    pub fn recency_key_ts(&self) -> Option<u64> {
        (self.last_seq > 0).then(|| self.recency_ts())
    }
    pub fn unread(&self) -> u64 {
        self.last_seq.saturating_sub(self.read_seq)
    }
}

/// Which receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    Delivered,
    Read,
}

/// One event of a user's inbox (the delivery stream), numbered 1, 2, ... per user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InboxEvent {
    /// Messages `after_seq + 1 ..= to_seq` of `conversation` are new for this user. Ranges
    /// of one conversation follow each other without gap or overlap.
    Messages {
        conversation: ConversationId,
        after_seq: u64,
        to_seq: u64,
        /// When the event was made (ms since the epoch; 0 in data from before this field),
        /// for the inbox retention window.
        #[serde(default)]
        ts: u64,
    },
    /// The peer's devices received (or read) this user's messages up to `seq`.
    Receipt {
        conversation: ConversationId,
        by: UserId,
        receipt: ReceiptKind,
        seq: u64,
        #[serde(default)]
        ts: u64,
    },
}

impl InboxEvent {
    /// When the event was made (0: before events carried a time).
    pub fn ts(&self) -> u64 {
        match self {
            InboxEvent::Messages { ts, .. } | InboxEvent::Receipt { ts, .. } => *ts,
        }
    }

    /// How many frames the event becomes on the wire.
    pub fn frames(&self) -> u64 {
        match self {
            InboxEvent::Messages { after_seq, to_seq, .. } => to_seq - after_seq,
            InboxEvent::Receipt { .. } => 1,
        }
    }
}

/// Conversation metadata on the conversation's shard.
/// A password account (on the user's shard). `password` is an Argon2id PHC string, never
/// the password; `sessions` are the live refresh tokens, by the SHA-256 of the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub password: String,
    /// Bumped by every password change (which also ends every session).
    pub generation: u64,
    pub sessions: Vec<Session>,
}

/// One logged-in device: the hash of its current refresh token and when it lapses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub expires_ms: u64,
}

/// Sessions kept per account; logging in once more ends the oldest.
pub const MAX_SESSIONS: usize = 32;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvMeta {
    pub last_seq: u64,
    pub last_ts: u64,
}

/// A message whose index updates are not yet confirmed: the conversation shard's leader
/// re-drives these after a crash (the "outbox").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub conversation: ConversationId,
    pub from: UserId,
    pub to: UserId,
    pub seq: u64,
    pub ts: u64,
    pub preview: String,
}

/// One node of the cluster's node table (the address book every node dials peers from),
/// replicated on the directory shard (`node::directory`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    /// Peer address (Raft, forwarded operations).
    pub peer: String,
    /// Client gRPC address.
    pub grpc: String,
    /// Client HTTP address.
    pub http: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Removed from the cluster for good: its id is never taken back.
    #[serde(default)]
    pub removed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_id_is_order_independent_and_round_trips() {
        let (a, b) = (UserId::parse("alice").unwrap(), UserId::parse("bob").unwrap());
        let c1 = ConversationId::between(&a, &b).unwrap();
        let c2 = ConversationId::between(&b, &a).unwrap();
        assert_eq!(c1, c2);
        assert_eq!(c1.to_string(), "alice~bob");
        assert_eq!(ConversationId::parse("alice~bob").unwrap(), c1);
        assert!(ConversationId::parse("bob~alice").is_err());
        assert!(ConversationId::parse("alice~alice").is_err());
        assert!(ConversationId::parse("alice").is_err());
        assert_eq!(ConversationId::between(&a, &a), Err(ValidationError::SelfSend));
        assert_eq!(c1.peer_of(&a), Some(&b));
    }

    #[test]
    fn user_ids_are_checked() {
        assert!(UserId::parse("a.b-c_9").is_ok());
        for bad in ["", "a~b", "a b", "ä", &"x".repeat(65)] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn text_rules() {
        assert!(validate_text("hi\nthere", 10).is_ok());
        assert_eq!(validate_text("   ", 10), Err(ValidationError::EmptyText));
        assert!(matches!(validate_text("héllo wörld", 5), Err(ValidationError::TextTooLong { .. })));
        assert_eq!(validate_text("a\u{0}b", 10), Err(ValidationError::ControlCharacters));
        assert_eq!(preview(&"é".repeat(100)).chars().count(), PREVIEW_CHARS);
    }
}
