//! Key layout of a shard's state-machine tree, the [`Store`] view the pure state machine
//! reads through, and the read queries served to clients.
//!
//! | key | value |
//! |---|---|
//! | `c/<conv>` | conversation meta (last seq, last ts) |
//! | `m/<conv>\0<seq BE>` | message |
//! | `d/<conv>\0<from>\0<client_msg_id>` | `(seq, ts)` of the first send with that key |
//! | `x/<conv>\0<seq BE>` | outbox: index updates not yet confirmed |
//! | `i/<user>\0<conv>` | recent-conversations entry |
//! | `o/<user>\0<!ts BE><conv>` | recency order of a user's entries (newest first); `ts` is the entry's `last_ts` or, from cluster version 7, up to `ORDER_WINDOW_MS` before it (the entry's `order_ts`; see [`ShardView::recent`]) |
//! | `u/<user>` | the user exists |
//! | `e/<user>\0<n BE>` | inbox event number n of the user (the delivery stream) |
//! | `n/<user>` | number of the user's last inbox event, kept only by events proposed below cluster version 6 (older builds read it; this one reads the last `e/` key) |
//! | `N/<node id BE>` | the cluster's node table (directory shard only; a restore skips it) |
//! | `\0applied`, `\0membership` | openraft's applied log id and membership |
//! | `\0redo` | the writes of the last applied entry (see [`Writes`]); not in snapshots |
//! | `\0uncounted` | the shard applied an inbox event without the counter (`storage::FormatLabel`) |
//! | `\0lazyorder` | the shard wrote a recency key behind its entry's `last_ts` (format 3, `storage::FormatLabel`) |
//!
//! Ids never contain `\0`, so prefix scans cannot run into a neighbouring id.

use super::{decode, encode, StoreError};
use crate::chat::state::{Change, Store, SweepItem, SweepRecord};
use crate::chat::types::{Account, ConvMeta, Pending};
use crate::chat::SweepKind;
use crate::chat::{ConversationId, InboxEvent, IndexEntry, Message, NodeRecord, UserId};

mod recent;
mod records;
pub use records::{check_record, RecordOwner};

pub const APPLIED: &[u8] = b"\0applied";
pub const MEMBERSHIP: &[u8] = b"\0membership";
pub const REDO: &[u8] = b"\0redo";
/// Present once the shard applied an inbox event without the counter (it travels in
/// snapshots, so a replica that installs one knows too; `storage::FormatLabel`).
pub const UNCOUNTED: &[u8] = b"\0uncounted";
/// Present once the shard wrote a recency key that is not at its entry's `last_ts`
/// (`chat::command::LAZY_ORDER_VERSION`); like [`UNCOUNTED`] it travels in snapshots.
pub const LAZY_ORDER: &[u8] = b"\0lazyorder";

/// The marks a tree may hold, each with the on-disk format (`storage::FORMAT_VERSION`) the
/// writes it stands for need.
pub const MARKS: [(&[u8], u32); 2] = [(UNCOUNTED, 2), (LAZY_ORDER, 3)];

/// The on-disk format a tree holding `mark` needs, if it is a mark.
pub fn format_of_mark(mark: &[u8]) -> Option<u32> {
    MARKS.iter().find(|(m, _)| *m == mark).map(|(_, f)| *f)
}

/// The writes of one applied entry, committed without sled's `apply_batch`.
///
/// sled makes a batch atomic by sealing and writing its current I/O buffer (with a
/// synchronous `sync_file_range`) before and after reserving the batch: two disk writes per
/// batch, on every replica, for every entry of every shard. Measured, this was the largest
/// single cost of a send. Instead an entry's writes are first stored as one value under
/// [`REDO`] (a single insert is atomic), then made one by one. sled recovers a prefix of its
/// writes, so after a crash either the redo record of the entry cut short is there, and
/// [`Writes::recover`] repeats its writes (each sets a final value, so repeating is
/// harmless), or nothing of that entry is. The Raft log still holds everything after the
/// last sled sync; the redo record only makes sled's own state whole again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Writes(pub Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Writes {
    pub fn insert(&mut self, k: impl Into<Vec<u8>>, v: impl Into<Vec<u8>>) {
        self.0.push((k.into(), Some(v.into())));
    }

    pub fn remove(&mut self, k: impl Into<Vec<u8>>) {
        self.0.push((k.into(), None));
    }

    /// `[u32 n]` then per write `[u8 0=remove|1=insert][u32 klen][k]([u32 vlen][v])`.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self.0.iter().map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Vec::len)).sum();
        let mut out = Vec::with_capacity(4 + size);
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (k, v) in &self.0 {
            out.push(u8::from(v.is_some()));
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k);
            if let Some(v) = v {
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
        out
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt { key: "\\0redo".into(), reason: reason.into() };
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, tail) = b.split_at_checked(n)?;
            *b = tail;
            Some(head)
        }
        fn len(b: &mut &[u8]) -> Option<usize> {
            take(b, 4).map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        }
        let n = len(&mut bytes).ok_or_else(|| corrupt("truncated count"))?;
        let mut writes = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let op = take(&mut bytes, 1).ok_or_else(|| corrupt("truncated op"))?[0];
            let kl = len(&mut bytes).ok_or_else(|| corrupt("truncated key length"))?;
            let k = take(&mut bytes, kl).ok_or_else(|| corrupt("truncated key"))?.to_vec();
            let v = match op {
                0 => None,
                1 => {
                    let vl = len(&mut bytes).ok_or_else(|| corrupt("truncated value length"))?;
                    Some(take(&mut bytes, vl).ok_or_else(|| corrupt("truncated value"))?.to_vec())
                }
                _ => return Err(corrupt("unknown op")),
            };
            writes.push((k, v));
        }
        if !bytes.is_empty() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(Writes(writes))
    }

    /// Stores the redo record, then makes the writes: one per key (the last one made to it,
    /// since each sets a final value), in key order. A full entry updates the same keys many
    /// times (a conversation's meta, a user's inbox counter and recent-conversations entry),
    /// and sled's inserts are the largest cost of applying.
    pub fn commit(&self, tree: &sled::Tree) -> Result<(), StoreError> {
        let merged = self.merged();
        tree.insert(REDO, merged.encode())?;
        merged.write_all(tree)
    }

    /// The same final state in fewer writes: the last write of each key, in key order.
    pub fn merged(&self) -> Writes {
        let mut last: std::collections::BTreeMap<&[u8], &Option<Vec<u8>>> = std::collections::BTreeMap::new();
        for (k, v) in &self.0 {
            last.insert(k.as_slice(), v);
        }
        Writes(last.into_iter().map(|(k, v)| (k.to_vec(), v.clone())).collect())
    }

    fn write_all(&self, tree: &sled::Tree) -> Result<(), StoreError> {
        for (k, v) in &self.0 {
            match v {
                Some(v) => tree.insert(k.as_slice(), v.as_slice())?,
                None => tree.remove(k.as_slice())?,
            };
        }
        Ok(())
    }

    /// At start-up: repeats the writes of the redo record, if any, so that an entry cut short
    /// by a crash is whole. Returns how many writes were repeated.
    pub fn recover(tree: &sled::Tree) -> Result<usize, StoreError> {
        let Some(bytes) = tree.get(REDO)? else {
            return Ok(0);
        };
        let writes = Writes::decode(&bytes)?;
        writes.write_all(tree)?;
        Ok(writes.0.len())
    }
}

/// Splits the body of a numbered key (`<id>\0<8-byte number>`, e.g. an inbox event or a
/// message after its kind prefix) into the id and the number.
pub(crate) fn split_numbered(body: &[u8]) -> Option<(&[u8], u64)> {
    if body.len() < 9 || body[body.len() - 9] != 0 {
        return None;
    }
    let (id, n) = body.split_at(body.len() - 9);
    Some((id, u64::from_be_bytes(n[1..].try_into().ok()?)))
}

fn k(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}
pub fn conv_meta(c: &ConversationId) -> Vec<u8> {
    k(&[b"c/", c.to_string().as_bytes()])
}
pub fn message_prefix(c: &ConversationId) -> Vec<u8> {
    k(&[b"m/", c.to_string().as_bytes(), b"\0"])
}
pub fn message(c: &ConversationId, seq: u64) -> Vec<u8> {
    k(&[&message_prefix(c), &seq.to_be_bytes()])
}
pub fn dedup(c: &ConversationId, from: &UserId, id: &str) -> Vec<u8> {
    k(&[b"d/", c.to_string().as_bytes(), b"\0", from.as_str().as_bytes(), b"\0", id.as_bytes()])
}
pub fn pending(c: &ConversationId, seq: u64) -> Vec<u8> {
    k(&[b"x/", c.to_string().as_bytes(), b"\0", &seq.to_be_bytes()])
}
pub const PENDING_PREFIX: &[u8] = b"x/";
pub fn index(u: &UserId, c: &ConversationId) -> Vec<u8> {
    k(&[b"i/", u.as_str().as_bytes(), b"\0", c.to_string().as_bytes()])
}
pub fn order_prefix(u: &UserId) -> Vec<u8> {
    k(&[b"o/", u.as_str().as_bytes(), b"\0"])
}
pub fn order(u: &UserId, ts: u64, c: &ConversationId) -> Vec<u8> {
    k(&[&order_prefix_at(u, ts), c.to_string().as_bytes()])
}
/// The first order key of `u` at `ts` (the newest first: later ones are older).
pub fn order_prefix_at(u: &UserId, ts: u64) -> Vec<u8> {
    k(&[&order_prefix(u), &(!ts).to_be_bytes()])
}
pub fn user(u: &UserId) -> Vec<u8> {
    k(&[b"u/", u.as_str().as_bytes()])
}
pub fn account(u: &UserId) -> Vec<u8> {
    k(&[b"a/", u.as_str().as_bytes()])
}
pub fn invite(id: &str) -> Vec<u8> {
    k(&[b"v/", id.as_bytes()])
}
pub fn inbox_prefix(u: &UserId) -> Vec<u8> {
    k(&[b"e/", u.as_str().as_bytes(), b"\0"])
}
pub fn inbox(u: &UserId, n: u64) -> Vec<u8> {
    k(&[&inbox_prefix(u), &n.to_be_bytes()])
}
/// Tokens of the user issued before this are revoked.
pub fn revoked_before(u: &UserId) -> Vec<u8> {
    k(&[b"r/", u.as_str().as_bytes()])
}
/// The user's first inbox event still kept (after sweeps).
pub fn inbox_first(u: &UserId) -> Vec<u8> {
    k(&[b"g/", u.as_str().as_bytes()])
}
pub fn inbox_last(u: &UserId) -> Vec<u8> {
    k(&[b"n/", u.as_str().as_bytes()])
}
/// The node table: cluster bookkeeping, not chat data (a restore never writes it).
pub const NODE_PREFIX: &[u8] = b"N/";
pub fn node(id: u64) -> Vec<u8> {
    k(&[NODE_PREFIX, &id.to_be_bytes()])
}

/// What one applied entry added that live readers care about.
#[derive(Default)]
pub struct Staged {
    pub messages: Vec<(ConversationId, Message)>,
    /// Messages deleted by retention (the cache forgets them).
    pub deleted_messages: Vec<(ConversationId, u64)>,
    pub inbox: Vec<(UserId, u64, InboxEvent)>,
    /// Conversation metas and recent-conversations entries written (the point cache).
    pub metas: Vec<(ConversationId, ConvMeta)>,
    pub entries: Vec<(UserId, ConversationId, IndexEntry)>,
    /// Raw records were written (a restore): any key may have changed.
    pub raw: bool,
    /// An inbox event was written without the counter.
    pub uncounted: bool,
    /// A recency key was written behind its entry's `last_ts`.
    pub lazy_order: bool,
}

impl Staged {
    /// The marks ([`MARKS`]) these writes call for.
    pub fn marks(&self) -> impl Iterator<Item = &'static [u8]> {
        [(self.uncounted, UNCOUNTED), (self.lazy_order, LAZY_ORDER)].into_iter().filter(|(on, _)| *on).map(|(_, m)| m)
    }
}

/// The state of one shard as the state machine and readers see it.
#[derive(Clone)]
pub struct ShardView {
    pub tree: sled::Tree,
}

impl ShardView {
    fn get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.tree.get(key)? {
            Some(v) => Ok(Some(decode(key, &v)?)),
            None => Ok(None),
        }
    }

    /// Adds `changes` to `batch`; `PutMessage` values are also returned for the cache.
    pub fn stage(&self, changes: Vec<Change>, batch: &mut Writes) -> Staged {
        let mut staged = Staged::default();
        for ch in changes {
            match ch {
                Change::PutMessage { conversation, message: m } => {
                    batch.insert(message(&conversation, m.seq), encode(&m));
                    staged.messages.push((conversation, m));
                }
                Change::PutConvMeta { conversation, meta } => {
                    batch.insert(conv_meta(&conversation), encode(&meta));
                    staged.metas.push((conversation, meta));
                }
                Change::PutDedup { conversation, from, client_msg_id, seq, ts, attempt } => {
                    batch.insert(dedup(&conversation, &from, &client_msg_id), encode(&(seq, ts, attempt)))
                }
                Change::PutIndex { user, conversation, entry, previous_order } => {
                    // The recency key is written only when it moves.
                    let order_ts = entry.recency_key_ts();
                    if previous_order != order_ts {
                        if let Some(old) = previous_order {
                            batch.remove(order(&user, old, &conversation));
                        }
                        if let Some(ts) = order_ts {
                            batch.insert(order(&user, ts, &conversation), []);
                        }
                    }
                    staged.lazy_order |= entry.order_ts.is_some();
                    batch.insert(index(&user, &conversation), encode(&entry));
                    staged.entries.push((user, conversation, entry));
                }
                Change::PutPending(p) => batch.insert(pending(&p.conversation, p.seq), encode(&p)),
                Change::DeletePending { conversation, seq } => batch.remove(pending(&conversation, seq)),
                Change::PutUser(u) => batch.insert(user(&u), []),
                Change::PutAccount { user: u, account: a } => batch.insert(account(&u), encode(&a)),
                Change::PutInvite { id, user: u } => batch.insert(invite(&id), encode(&u)),
                Change::Delete(SweepRecord::Dedup { conversation, from, client_msg_id }) => {
                    batch.remove(dedup(&conversation, &from, &client_msg_id))
                }
                Change::Delete(SweepRecord::Inbox { user: u, n }) => batch.remove(inbox(&u, n)),
                Change::Delete(SweepRecord::Message { conversation, seq }) => {
                    batch.remove(message(&conversation, seq));
                    staged.deleted_messages.push((conversation, seq));
                }
                Change::PutInboxFirst { user: u, first } => batch.insert(inbox_first(&u), first.to_be_bytes()),
                Change::PutRevokedBefore { user: u, before } => batch.insert(revoked_before(&u), before.to_be_bytes()),
                // A backup of another cluster must not bring its node table along.
                Change::PutRaw { key, .. } if key.starts_with(NODE_PREFIX) => {}
                Change::PutRaw { key, value } => {
                    // A restored entry whose recency key is behind its last_ts (a backup
                    // of a cluster at version 7) needs format 3 like a live one.
                    if key.starts_with(b"i/") {
                        staged.lazy_order |= decode::<IndexEntry>(&key, &value).is_ok_and(|e| e.order_ts.is_some());
                    }
                    batch.insert(key, value);
                    staged.raw = true;
                }
                Change::PutNode(n) => batch.insert(node(n.id), encode(&n)),
                Change::PutInbox { user: u, n, event, counter } => {
                    batch.insert(inbox(&u, n), encode(&event));
                    if counter {
                        batch.insert(inbox_last(&u), n.to_be_bytes());
                    } else {
                        staged.uncounted = true;
                    }
                    staged.inbox.push((u, n, event));
                }
            }
        }
        staged
    }

    /// The node table (`node::directory`), by id.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(NODE_PREFIX) {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Up to `limit` inbox events of `u` numbered after `after`, ascending.
    pub fn inbox_page(&self, u: &UserId, after: u64, limit: usize) -> Result<Vec<(u64, InboxEvent)>, StoreError> {
        let start = inbox(u, after.saturating_add(1));
        let end = inbox(u, u64::MAX);
        let mut out = Vec::new();
        for kv in self.tree.range(start..=end).take(limit) {
            let (k, v) = kv?;
            let n = u64::from_be_bytes(k[k.len().saturating_sub(8)..].try_into().map_err(|_| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into(),
                reason: "short inbox key".into(),
            })?);
            out.push((n, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Messages with `lo <= seq <= hi`, ascending.
    pub fn messages(&self, c: &ConversationId, lo: u64, hi: u64) -> Result<Vec<Message>, StoreError> {
        let mut out = Vec::new();
        if lo > hi {
            return Ok(out);
        }
        for kv in self.tree.range(message(c, lo)..=message(c, hi)) {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    pub fn pending_all(&self) -> Result<Vec<Pending>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(PENDING_PREFIX) {
            let (k, v) = kv?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }
}

impl Store for ShardView {
    type Error = StoreError;
    fn conv_meta(&self, c: &ConversationId) -> Result<Option<ConvMeta>, StoreError> {
        self.get(&conv_meta(c))
    }
    fn dedup(&self, c: &ConversationId, from: &UserId, id: &str) -> Result<Option<(u64, u64, u64)>, StoreError> {
        self.get(&dedup(c, from, id))
    }
    fn index_entry(&self, u: &UserId, c: &ConversationId) -> Result<Option<IndexEntry>, StoreError> {
        self.get(&index(u, c))
    }
    fn user_exists(&self, u: &UserId) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(user(u))?)
    }
    fn account(&self, u: &UserId) -> Result<Option<Account>, StoreError> {
        self.get(&account(u))
    }
    fn has_data(&self) -> Result<bool, StoreError> {
        // Any key but the state machine's own bookkeeping (which starts with \0) and the
        // node table.
        let before = self.tree.range(&b"\x01"[..]..NODE_PREFIX).next().transpose()?.is_some();
        Ok(before || self.tree.range(&b"N0"[..]..).next().transpose()?.is_some())
    }
    fn node(&self, id: u64) -> Result<Option<NodeRecord>, StoreError> {
        self.get(&node(id))
    }
    fn revoked_before(&self, u: &UserId) -> Result<u64, StoreError> {
        match self.tree.get(revoked_before(u))? {
            Some(v) => Ok(u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt { key: format!("r/{u}"), reason: "not 8 bytes".into() })?,
            )),
            None => Ok(0),
        }
    }
    fn inbox_first(&self, u: &UserId) -> Result<u64, StoreError> {
        match self.tree.get(inbox_first(u))? {
            Some(v) => Ok(u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt { key: format!("g/{u}"), reason: "not 8 bytes".into() })?,
            )),
            None => Ok(1),
        }
    }
    fn sweep_page(&self, kind: SweepKind, after: &[u8], limit: usize) -> Result<Vec<SweepItem>, StoreError> {
        let prefix: &[u8] = match kind {
            SweepKind::Dedup => b"d/",
            SweepKind::Inbox => b"e/",
            SweepKind::Messages => b"m/",
        };
        // Just after `after` (a key of this kind), or the start of the kind's keys.
        let start = if after.starts_with(prefix) { [after, &[0u8]].concat() } else { prefix.to_vec() };
        let end = [&prefix[..1], &[prefix[1] + 1]].concat();
        let mut out = Vec::new();
        for kv in self.tree.range(start..end).take(limit) {
            let (key, value) = kv?;
            let corrupt = |reason: &str| StoreError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                reason: reason.to_string(),
            };
            let body = &key[2..];
            let (record, ts) = match kind {
                SweepKind::Dedup => {
                    let mut parts = body.splitn(3, |b| *b == 0);
                    let (Some(c), Some(f), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
                        return Err(corrupt("dedup key without its three parts"));
                    };
                    let text = |b: &[u8]| std::str::from_utf8(b).map(str::to_string).map_err(|_| corrupt("not UTF-8"));
                    let conversation = ConversationId::parse(&text(c)?).map_err(|e| corrupt(&e.to_string()))?;
                    let from = UserId::parse(&text(f)?).map_err(|e| corrupt(&e.to_string()))?;
                    let (_, ts, _): (u64, u64, u64) = decode(&key, &value)?;
                    (SweepRecord::Dedup { conversation, from, client_msg_id: text(id)? }, ts)
                }
                SweepKind::Inbox | SweepKind::Messages => {
                    let (name, n) =
                        split_numbered(body).ok_or_else(|| corrupt("key does not end in \\0 and 8 bytes"))?;
                    let name = std::str::from_utf8(name).map_err(|_| corrupt("not UTF-8"))?;
                    if kind == SweepKind::Inbox {
                        let user = UserId::parse(name).map_err(|e| corrupt(&e.to_string()))?;
                        let event: InboxEvent = decode(&key, &value)?;
                        (SweepRecord::Inbox { user, n }, event.ts())
                    } else {
                        let conversation = ConversationId::parse(name).map_err(|e| corrupt(&e.to_string()))?;
                        let m: Message = decode(&key, &value)?;
                        (SweepRecord::Message { conversation, seq: n }, m.ts)
                    }
                }
            };
            out.push(SweepItem { cursor: key.to_vec(), ts, record });
        }
        Ok(out)
    }
    fn invite(&self, id: &str) -> Result<Option<UserId>, StoreError> {
        self.get(&invite(id))
    }
    /// The number of the user's last inbox event, read from the event's key: retention never
    /// deletes a user's last event, and the counter (`n/<user>`) is no longer written by
    /// every event (cluster version 6), so only the events themselves are current.
    fn inbox_last(&self, u: &UserId) -> Result<u64, StoreError> {
        let prefix = inbox_prefix(u);
        match self.tree.get_lt(inbox(u, u64::MAX))? {
            Some((k, _)) if k.starts_with(&prefix) => {
                let n = k[prefix.len()..].try_into().map_err(|_| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: "inbox key does not end in 8 bytes".into(),
                })?;
                Ok(u64::from_be_bytes(n))
            }
            _ => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> sled::Tree {
        sled::Config::new().temporary(true).open().unwrap().open_tree("t").unwrap()
    }

    fn dump(t: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
        t.iter().map(|kv| kv.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).filter(|(k, _)| k != REDO).collect()
    }

    fn sample() -> Writes {
        let mut w = Writes::default();
        w.insert(b"a".to_vec(), b"1".to_vec());
        w.remove(b"gone".to_vec());
        w.insert(b"b".to_vec(), Vec::new());
        w.insert(APPLIED.to_vec(), b"7".to_vec());
        w
    }

    #[test]
    fn merged_writes_leave_the_same_state() {
        let mut w = Writes::default();
        w.insert(b"b".to_vec(), b"1".to_vec());
        w.insert(b"a".to_vec(), b"1".to_vec());
        w.insert(b"b".to_vec(), b"2".to_vec());
        w.remove(b"a".to_vec());
        w.insert(b"c".to_vec(), b"3".to_vec());
        w.remove(b"c".to_vec());
        w.insert(b"c".to_vec(), b"4".to_vec());
        let (one, two) = (tree(), tree());
        one.insert(b"a", b"0").unwrap();
        two.insert(b"a", b"0").unwrap();
        w.write_all(&one).unwrap();
        w.commit(&two).unwrap();
        two.remove(REDO).unwrap();
        assert_eq!(dump(&one), dump(&two));
        let m = w.merged();
        assert_eq!(m.0.len(), 3);
        assert_eq!(
            m.0.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
    }

    #[test]
    fn writes_round_trip_and_reject_damage() {
        let w = sample();
        let bytes = w.encode();
        assert_eq!(Writes::decode(&bytes).unwrap(), w);
        for cut in 0..bytes.len() {
            assert!(Writes::decode(&bytes[..cut]).is_err(), "a record cut at {cut} bytes is refused");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(Writes::decode(&extra).is_err());
        let mut bad_op = bytes;
        bad_op[4] = 9;
        assert!(Writes::decode(&bad_op).is_err());
    }

    /// Whatever prefix of an entry's writes a crash leaves (after its redo record), recovery
    /// ends in the state of the whole entry; recovering twice changes nothing.
    #[test]
    fn recovery_completes_an_entry_cut_short_at_any_point() {
        let full = tree();
        full.insert(b"gone", b"x").unwrap();
        sample().commit(&full).unwrap();
        let want = dump(&full);
        assert!(!want.iter().any(|(k, _)| k == b"gone"));
        for done in 0..=sample().0.len() {
            let t = tree();
            t.insert(b"gone", b"x").unwrap();
            let w = sample();
            t.insert(REDO, w.encode()).unwrap();
            Writes(w.0[..done].to_vec()).write_all(&t).unwrap();
            assert_eq!(Writes::recover(&t).unwrap(), w.0.len());
            assert_eq!(dump(&t), want, "cut after {done} writes");
            Writes::recover(&t).unwrap();
            assert_eq!(dump(&t), want);
        }
        // No redo record: nothing to do.
        assert_eq!(Writes::recover(&tree()).unwrap(), 0);
    }

    /// The number of a user's last inbox event comes from the events, whether the commands
    /// that made them kept the counter (`n/`, below cluster version 6) or not; numbers stay
    /// dense across the switch and across a sweep, and neighbouring ids never leak in.
    #[test]
    fn inbox_numbers_come_from_the_events_with_or_without_the_counter() {
        use crate::chat::state::apply;
        use crate::chat::Command;
        let view = ShardView { tree: tree() };
        let run = |cmd: Command| {
            let (changes, _) = apply(&cmd, &view).unwrap();
            let mut w = Writes::default();
            view.stage(changes, &mut w);
            w.commit(&view.tree).unwrap();
        };
        let (alice, bob) = (UserId::parse("alice").unwrap(), UserId::parse("bob").unwrap());
        let conversation = ConversationId::between(&alice, &bob).unwrap();
        let update = |seq: u64, uncounted: bool| Command::IndexUpdate {
            user: bob.clone(),
            conversation: conversation.clone(),
            from: alice.clone(),
            seq,
            ts: 1_000 + seq,
            preview: String::new(),
            uncounted,
            lazy_order: false,
        };
        let numbers = |u: &UserId| view.inbox_page(u, 0, 100).unwrap().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        let counter = |u: &UserId| view.tree.get(inbox_last(u)).unwrap().map(|v| v.to_vec());
        for seq in 1..=3 {
            run(update(seq, false));
        }
        assert_eq!(counter(&bob), Some(3u64.to_be_bytes().to_vec()), "counted events keep the counter");
        for seq in 4..=6 {
            run(update(seq, true));
        }
        assert_eq!(numbers(&bob), (1..=6).collect::<Vec<_>>());
        assert_eq!(view.inbox_last(&bob).unwrap(), 6);
        assert_eq!(counter(&bob), Some(3u64.to_be_bytes().to_vec()), "uncounted events leave it alone");
        // Users whose keys sort just before and after bob's, and one with no events at all.
        for other in ["bo", "boa", "boc", "bob-", "bob.x"] {
            assert_eq!(view.inbox_last(&UserId::parse(other).unwrap()).unwrap(), 0, "{other}");
        }
        assert_eq!(view.inbox_last(&alice).unwrap(), 0);
        // Retention keeps the last event, so the next one is numbered on from it.
        run(Command::Sweep { kind: SweepKind::Inbox, before_ms: u64::MAX, after: Vec::new(), limit: 100 });
        assert_eq!(numbers(&bob), vec![6]);
        run(update(7, true));
        assert_eq!(numbers(&bob), vec![6, 7]);
        assert_eq!(view.inbox_last(&bob).unwrap(), 7);
    }

    /// Damaged keys read back from disk are reported as corrupt, never sliced past their end.
    #[test]
    fn short_stored_keys_are_corrupt_not_a_panic() {
        let view = ShardView { tree: tree() };
        let u = UserId::parse("alice").unwrap();
        view.tree.insert([order_prefix(&u).as_slice(), &[1, 2, 3]].concat(), &[]).unwrap();
        assert!(matches!(view.recent(&u, None, 10), Err(StoreError::Corrupt { .. })));
        view.tree.insert([inbox_prefix(&u).as_slice(), &[9]].concat(), b"{}").unwrap();
        assert!(view.inbox_page(&u, 0, 10).is_err());
    }
}
