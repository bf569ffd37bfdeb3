//! The pure chat state machine: `apply(command, store) -> (changes, reply)`.
//!
//! It reads the current state through the [`Store`] trait and returns the writes to make as
//! a list of [`Change`]s, which the storage layer commits atomically together with the
//! applied log id. No I/O happens here, so every rule is unit-tested without a cluster.

use super::command::{AccountOutcome, Command, Reply, SweepKind};
use super::types::{
    preview as make_preview, Account, ConvMeta, ConversationId, InboxEvent, IndexEntry, Message, NodeRecord, Pending,
    ReceiptKind, Session, UserId, MAX_SESSIONS, ORDER_WINDOW_MS,
};
use std::collections::{HashMap, HashSet};

/// Read access to one shard's state.
pub trait Store {
    type Error;
    fn conv_meta(&self, c: &ConversationId) -> Result<Option<ConvMeta>, Self::Error>;
    /// The `(seq, ts, attempt)` an earlier send with this idempotency key got.
    fn dedup(
        &self,
        c: &ConversationId,
        from: &UserId,
        client_msg_id: &str,
    ) -> Result<Option<(u64, u64, u64)>, Self::Error>;
    fn index_entry(&self, user: &UserId, c: &ConversationId) -> Result<Option<IndexEntry>, Self::Error>;
    fn user_exists(&self, user: &UserId) -> Result<bool, Self::Error>;
    /// Number of the user's last inbox event (0 if none).
    fn inbox_last(&self, user: &UserId) -> Result<u64, Self::Error>;
    fn account(&self, user: &UserId) -> Result<Option<Account>, Self::Error>;
    /// Who used invite `id`, if anyone.
    fn invite(&self, id: &str) -> Result<Option<UserId>, Self::Error>;
    /// Whether the shard holds any chat data (a restore goes only into an empty shard).
    fn has_data(&self) -> Result<bool, Self::Error>;
    /// Tokens of `user` issued before this (seconds) are revoked; 0 if none.
    fn revoked_before(&self, user: &UserId) -> Result<u64, Self::Error>;
    /// The lowest inbox event of `user` still kept (events before it were swept); 1 when
    /// nothing was swept.
    fn inbox_first(&self, user: &UserId) -> Result<u64, Self::Error>;
    /// Up to `limit` records of `kind` in key order after the cursor `after` (empty: from
    /// the start), with their times.
    fn sweep_page(&self, kind: SweepKind, after: &[u8], limit: usize) -> Result<Vec<SweepItem>, Self::Error>;
    /// Node `id`'s record in the node table (on the directory shard).
    fn node(&self, id: u64) -> Result<Option<NodeRecord>, Self::Error>;
}

/// A record a sweep may delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepItem {
    /// Where the scan goes on after this record.
    pub cursor: Vec<u8>,
    /// When the record was made (ms since the epoch).
    pub ts: u64,
    pub record: SweepRecord,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SweepRecord {
    Dedup { conversation: ConversationId, from: UserId, client_msg_id: String },
    Inbox { user: UserId, n: u64 },
    Message { conversation: ConversationId, seq: u64 },
}

/// One write the storage layer must make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    PutMessage {
        conversation: ConversationId,
        message: Message,
    },
    PutConvMeta {
        conversation: ConversationId,
        meta: ConvMeta,
    },
    PutDedup {
        conversation: ConversationId,
        from: UserId,
        client_msg_id: String,
        seq: u64,
        ts: u64,
        attempt: u64,
    },
    /// `previous_order` is the timestamp of the entry's recency key before this change
    /// ([`IndexEntry::recency_key_ts`]): the key moves when the new entry's differs.
    PutIndex {
        user: UserId,
        conversation: ConversationId,
        entry: IndexEntry,
        previous_order: Option<u64>,
    },
    PutPending(Pending),
    DeletePending {
        conversation: ConversationId,
        seq: u64,
    },
    PutUser(UserId),
    /// Append event number `n` to the user's inbox (n = previous last + 1); `counter`: also
    /// write the user's inbox counter, which builds before cluster version 6 read.
    PutInbox {
        user: UserId,
        n: u64,
        event: InboxEvent,
        counter: bool,
    },
    PutAccount {
        user: UserId,
        account: Account,
    },
    PutInvite {
        id: String,
        user: UserId,
    },
    /// Retention: a record older than its window goes.
    Delete(SweepRecord),
    PutRevokedBefore {
        user: UserId,
        before: u64,
    },
    /// A record of a backup, written as it is.
    PutRaw {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Inbox events of `user` before `first` are gone (a resume cursor before it is refused).
    PutInboxFirst {
        user: UserId,
        first: u64,
    },
    PutNode(NodeRecord),
}

/// Applies one command (a batch: each of its commands in order) to the state seen through
/// `store`.
pub fn apply<S: Store>(cmd: &Command, store: &S) -> Result<(Vec<Change>, Reply), S::Error> {
    let Command::Batch(cmds) = cmd else {
        return apply_single(cmd, store);
    };
    // Each command sees the changes of the ones before it, as if they had been separate
    // entries; all changes are committed together.
    let mut overlay = Overlay::new(store);
    let mut changes = Vec::new();
    let mut replies = Vec::with_capacity(cmds.len());
    for c in cmds {
        let (ch, reply) = apply_single(c, &overlay)?;
        for change in &ch {
            overlay.record(change);
        }
        changes.extend(ch);
        replies.push(reply);
    }
    Ok((changes, Reply::Batch(replies)))
}

fn apply_single<S: Store>(cmd: &Command, store: &S) -> Result<(Vec<Change>, Reply), S::Error> {
    match cmd {
        Command::Append { conversation, from, to, client_msg_id, text, ts, attempt } => {
            if let Some((seq, ts, first)) = store.dedup(conversation, from, client_msg_id)? {
                // The same attempt again is the node's own retry of one client request.
                let duplicate = *attempt == 0 || first != *attempt;
                return Ok((vec![], Reply::Appended { seq, ts, duplicate }));
            }
            let meta = store.conv_meta(conversation)?.unwrap_or_default();
            let seq = meta.last_seq + 1;
            let ts = (*ts).max(meta.last_ts);
            let message =
                Message { seq, from: from.clone(), text: text.clone(), ts, client_msg_id: client_msg_id.clone() };
            let changes = vec![
                Change::PutMessage { conversation: conversation.clone(), message },
                Change::PutConvMeta {
                    conversation: conversation.clone(),
                    meta: ConvMeta { last_seq: seq, last_ts: ts },
                },
                Change::PutDedup {
                    conversation: conversation.clone(),
                    from: from.clone(),
                    client_msg_id: client_msg_id.clone(),
                    seq,
                    ts,
                    attempt: *attempt,
                },
                Change::PutPending(Pending {
                    conversation: conversation.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    seq,
                    ts,
                    preview: make_preview(text),
                }),
            ];
            Ok((changes, Reply::Appended { seq, ts, duplicate: false }))
        }
        Command::IndexUpdate { user, conversation, from, seq, ts, preview, uncounted, lazy_order } => {
            let Some(peer) = conversation.peer_of(user) else {
                // Never proposed by the coordinator; ignore rather than corrupt the index.
                return Ok((vec![], Reply::Indexed));
            };
            let old = store.index_entry(user, conversation)?;
            let mut entry = old.clone().unwrap_or_else(|| IndexEntry::new(peer.clone()));
            let mut changes = Vec::new();
            if *seq > entry.last_seq {
                // The user's devices learn of every message exactly once, through this range.
                let event = InboxEvent::Messages {
                    conversation: conversation.clone(),
                    after_seq: entry.last_seq,
                    to_seq: *seq,
                    ts: *ts,
                };
                changes.push(Change::PutInbox {
                    user: user.clone(),
                    n: store.inbox_last(user)? + 1,
                    event,
                    counter: !*uncounted,
                });
                // The recency key stays put while the new last_ts is within the window of
                // it (`lazy_order`), else it moves to the new last_ts.
                let key_ts = entry.recency_key_ts().filter(|k| *lazy_order && *ts >= *k && *ts - *k < ORDER_WINDOW_MS);
                entry.last_seq = *seq;
                entry.last_ts = *ts;
                entry.last_from = Some(from.clone());
                entry.preview = preview.clone();
                entry.order_ts = key_ts.filter(|k| k != ts);
            }
            if from == user {
                entry.read_seq = entry.read_seq.max(*seq);
            }
            if old.as_ref() == Some(&entry) {
                return Ok((vec![], Reply::Indexed));
            }
            let previous_order = old.and_then(|o| o.recency_key_ts());
            changes.push(Change::PutIndex {
                user: user.clone(),
                conversation: conversation.clone(),
                entry,
                previous_order,
            });
            Ok((changes, Reply::Indexed))
        }
        Command::MarkRead { user, conversation, seq } => {
            let Some(peer) = conversation.peer_of(user) else {
                return Ok((vec![], Reply::ReadMarked { read_seq: 0, unread: 0 }));
            };
            let old = store.index_entry(user, conversation)?;
            let mut entry = old.clone().unwrap_or_else(|| IndexEntry::new(peer.clone()));
            // Nothing past the last message can be read (a larger mark would hide every
            // later message from the unread count).
            entry.read_seq = entry.read_seq.max((*seq).min(entry.last_seq));
            let reply = Reply::ReadMarked { read_seq: entry.read_seq, unread: entry.unread() };
            if old.as_ref() == Some(&entry) {
                return Ok((vec![], reply));
            }
            let previous_order = old.and_then(|o| o.recency_key_ts());
            Ok((
                vec![Change::PutIndex {
                    user: user.clone(),
                    conversation: conversation.clone(),
                    entry,
                    previous_order,
                }],
                reply,
            ))
        }
        Command::OutboxDone { items } => {
            let changes =
                items.iter().map(|(c, seq)| Change::DeletePending { conversation: c.clone(), seq: *seq }).collect();
            Ok((changes, Reply::Done))
        }
        Command::Receipt { user, conversation, by, receipt, seq, ts, uncounted } => {
            let Some(entry) = store.index_entry(user, conversation)? else {
                return Ok((vec![], Reply::Done));
            };
            if conversation.peer_of(user) != Some(by) {
                return Ok((vec![], Reply::Done));
            }
            // Receipts cover only messages that exist; read implies delivered.
            let seq = (*seq).min(entry.last_seq);
            let mut next = entry.clone();
            next.peer_delivered_seq = next.peer_delivered_seq.max(seq);
            if *receipt == ReceiptKind::Read {
                next.peer_read_seq = next.peer_read_seq.max(seq);
            }
            let advanced = match receipt {
                ReceiptKind::Delivered => next.peer_delivered_seq > entry.peer_delivered_seq,
                ReceiptKind::Read => next.peer_read_seq > entry.peer_read_seq,
            };
            if !advanced {
                return Ok((vec![], Reply::Done));
            }
            let event = InboxEvent::Receipt {
                conversation: conversation.clone(),
                by: by.clone(),
                receipt: *receipt,
                seq,
                ts: *ts,
            };
            let previous_order = entry.recency_key_ts();
            let changes = vec![
                Change::PutInbox { user: user.clone(), n: store.inbox_last(user)? + 1, event, counter: !*uncounted },
                Change::PutIndex {
                    user: user.clone(),
                    conversation: conversation.clone(),
                    entry: next,
                    previous_order,
                },
            ];
            Ok((changes, Reply::Done))
        }
        Command::Register { user } => {
            if store.user_exists(user)? {
                Ok((vec![], Reply::Registered { new: false }))
            } else {
                Ok((vec![Change::PutUser(user.clone())], Reply::Registered { new: true }))
            }
        }
        Command::Ingest { records, first } => {
            if *first && store.has_data()? {
                return Ok((vec![], Reply::Ingested(false)));
            }
            let changes = records.iter().map(|(k, v)| Change::PutRaw { key: k.clone(), value: v.clone() }).collect();
            Ok((changes, Reply::Ingested(true)))
        }
        Command::RevokeTokens { user, before } => {
            let changes = if *before > store.revoked_before(user)? {
                vec![Change::PutRevokedBefore { user: user.clone(), before: *before }]
            } else {
                vec![]
            };
            Ok((changes, Reply::Done))
        }
        Command::Sweep { kind, before_ms, after, limit } => {
            let items = store.sweep_page(*kind, after, (*limit).max(1) as usize)?;
            let next =
                (items.len() >= (*limit).max(1) as usize).then(|| items.last().map(|i| i.cursor.clone())).flatten();
            let mut changes = Vec::new();
            let mut firsts: HashMap<UserId, u64> = HashMap::new();
            for item in items {
                if item.ts >= *before_ms {
                    continue;
                }
                if let SweepRecord::Inbox { user, n } = &item.record {
                    // Never the user's last event: it numbers the next one.
                    if *n >= store.inbox_last(user)? {
                        continue;
                    }
                    let f = firsts.entry(user.clone()).or_insert(0);
                    *f = (*f).max(n + 1);
                }
                changes.push(Change::Delete(item.record));
            }
            for (user, first) in firsts {
                if first > store.inbox_first(&user)? {
                    changes.push(Change::PutInboxFirst { user, first });
                }
            }
            let deleted = changes.iter().filter(|c| matches!(c, Change::Delete(_))).count() as u64;
            Ok((changes, Reply::Swept { deleted, next }))
        }
        Command::CreateAccount { .. }
        | Command::AddSession { .. }
        | Command::RotateSession { .. }
        | Command::EndSession { .. }
        | Command::SetPassword { .. }
        | Command::UseInvite { .. } => apply_account(cmd, store),
        // Batches are built by the shard handle and never nested.
        Command::Batch(_) => Ok((vec![], Reply::Done)),
        Command::SetNode { node } => {
            let old = store.node(node.id)?;
            if old.as_ref().is_some_and(|o| o.removed) {
                // Removing it again is a retry; anything else would take the id back.
                return Ok((vec![], Reply::NodeSet(node.removed)));
            }
            if old.as_ref() == Some(node) {
                return Ok((vec![], Reply::NodeSet(true)));
            }
            Ok((vec![Change::PutNode(node.clone())], Reply::NodeSet(true)))
        }
    }
}

/// Accounts, sessions and invites. A refusal writes nothing.
fn apply_account<S: Store>(cmd: &Command, store: &S) -> Result<(Vec<Change>, Reply), S::Error> {
    let done = |changes: Vec<Change>, outcome| Ok((changes, Reply::Account(outcome)));
    let put = |user: &UserId, account: Account| Change::PutAccount { user: user.clone(), account };
    match cmd {
        Command::CreateAccount { user, password, claim_existing } => {
            if store.account(user)?.is_some() || (!claim_existing && store.user_exists(user)?) {
                return done(vec![], AccountOutcome::Taken);
            }
            let account = Account { password: password.clone(), generation: 0, sessions: vec![] };
            let mut changes = vec![put(user, account)];
            if !store.user_exists(user)? {
                changes.push(Change::PutUser(user.clone()));
            }
            done(changes, AccountOutcome::Created)
        }
        Command::AddSession { user, id, expires_ms, now_ms } => {
            let Some(mut a) = store.account(user)? else { return done(vec![], AccountOutcome::NoAccount) };
            a.sessions.retain(|s| s.expires_ms > *now_ms && s.id != *id);
            a.sessions.push(Session { id: id.clone(), expires_ms: *expires_ms });
            if a.sessions.len() > MAX_SESSIONS {
                a.sessions.sort_by_key(|s| s.expires_ms);
                let excess = a.sessions.len() - MAX_SESSIONS;
                a.sessions.drain(..excess);
            }
            done(vec![put(user, a)], AccountOutcome::SessionAdded)
        }
        Command::RotateSession { user, old, new, expires_ms, now_ms } => {
            let Some(mut a) = store.account(user)? else { return done(vec![], AccountOutcome::NoAccount) };
            let Some(s) = a.sessions.iter_mut().find(|s| s.id == *old && s.expires_ms > *now_ms) else {
                return done(vec![], AccountOutcome::SessionUnknown);
            };
            *s = Session { id: new.clone(), expires_ms: *expires_ms };
            a.sessions.retain(|s| s.expires_ms > *now_ms);
            done(vec![put(user, a)], AccountOutcome::SessionRotated)
        }
        Command::EndSession { user, id } => {
            let Some(mut a) = store.account(user)? else { return done(vec![], AccountOutcome::NoAccount) };
            let before = a.sessions.len();
            a.sessions.retain(|s| s.id != *id);
            let changes = if a.sessions.len() == before { vec![] } else { vec![put(user, a)] };
            done(changes, AccountOutcome::SessionEnded)
        }
        Command::SetPassword { user, password } => {
            let Some(a) = store.account(user)? else { return done(vec![], AccountOutcome::NoAccount) };
            let next = Account { password: password.clone(), generation: a.generation + 1, sessions: vec![] };
            done(vec![put(user, next)], AccountOutcome::PasswordSet)
        }
        Command::UseInvite { invite, user } => match store.invite(invite)? {
            Some(u) if u == *user => done(vec![], AccountOutcome::InviteAccepted),
            Some(_) => done(vec![], AccountOutcome::InviteUsed),
            None => {
                done(vec![Change::PutInvite { id: invite.clone(), user: user.clone() }], AccountOutcome::InviteAccepted)
            }
        },
        _ => Ok((vec![], Reply::Done)),
    }
}

/// `base` as it will be once `changes` recorded so far are committed.
struct Overlay<'a, S> {
    base: &'a S,
    meta: HashMap<ConversationId, ConvMeta>,
    dedup: HashMap<(ConversationId, UserId, String), (u64, u64, u64)>,
    index: HashMap<(UserId, ConversationId), IndexEntry>,
    users: HashSet<UserId>,
    inbox_last: HashMap<UserId, u64>,
    accounts: HashMap<UserId, Account>,
    invites: HashMap<String, UserId>,
    revoked: HashMap<UserId, u64>,
    nodes: HashMap<u64, NodeRecord>,
}

impl<'a, S: Store> Overlay<'a, S> {
    fn new(base: &'a S) -> Self {
        Self {
            base,
            meta: HashMap::new(),
            dedup: HashMap::new(),
            index: HashMap::new(),
            users: HashSet::new(),
            inbox_last: HashMap::new(),
            accounts: HashMap::new(),
            invites: HashMap::new(),
            revoked: HashMap::new(),
            nodes: HashMap::new(),
        }
    }

    fn record(&mut self, ch: &Change) {
        match ch {
            Change::PutConvMeta { conversation, meta } => {
                self.meta.insert(conversation.clone(), meta.clone());
            }
            Change::PutDedup { conversation, from, client_msg_id, seq, ts, attempt } => {
                self.dedup.insert((conversation.clone(), from.clone(), client_msg_id.clone()), (*seq, *ts, *attempt));
            }
            Change::PutIndex { user, conversation, entry, .. } => {
                self.index.insert((user.clone(), conversation.clone()), entry.clone());
            }
            Change::PutUser(u) => {
                self.users.insert(u.clone());
            }
            Change::PutInbox { user, n, .. } => {
                self.inbox_last.insert(user.clone(), *n);
            }
            Change::PutAccount { user, account } => {
                self.accounts.insert(user.clone(), account.clone());
            }
            Change::PutInvite { id, user } => {
                self.invites.insert(id.clone(), user.clone());
            }
            // A swept record is older than its retention window; a command in the same entry
            // that reads it still sees it, as it would have one entry earlier.
            Change::Delete(_) | Change::PutInboxFirst { .. } => {}
            Change::PutRevokedBefore { user, before } => {
                self.revoked.insert(user.clone(), *before);
            }
            // Ingest is proposed alone by `admin restore`, never batched with chat commands.
            Change::PutRaw { .. } => {}
            Change::PutMessage { .. } | Change::PutPending(_) | Change::DeletePending { .. } => {}
            Change::PutNode(n) => {
                self.nodes.insert(n.id, n.clone());
            }
        }
    }
}

impl<S: Store> Store for Overlay<'_, S> {
    type Error = S::Error;
    fn conv_meta(&self, c: &ConversationId) -> Result<Option<ConvMeta>, S::Error> {
        match self.meta.get(c) {
            Some(m) => Ok(Some(m.clone())),
            None => self.base.conv_meta(c),
        }
    }
    fn dedup(&self, c: &ConversationId, from: &UserId, id: &str) -> Result<Option<(u64, u64, u64)>, S::Error> {
        match self.dedup.get(&(c.clone(), from.clone(), id.to_string())) {
            Some(d) => Ok(Some(*d)),
            None => self.base.dedup(c, from, id),
        }
    }
    fn index_entry(&self, user: &UserId, c: &ConversationId) -> Result<Option<IndexEntry>, S::Error> {
        match self.index.get(&(user.clone(), c.clone())) {
            Some(e) => Ok(Some(e.clone())),
            None => self.base.index_entry(user, c),
        }
    }
    fn user_exists(&self, user: &UserId) -> Result<bool, S::Error> {
        if self.users.contains(user) {
            return Ok(true);
        }
        self.base.user_exists(user)
    }
    fn inbox_last(&self, user: &UserId) -> Result<u64, S::Error> {
        match self.inbox_last.get(user) {
            Some(n) => Ok(*n),
            None => self.base.inbox_last(user),
        }
    }
    fn account(&self, user: &UserId) -> Result<Option<Account>, S::Error> {
        match self.accounts.get(user) {
            Some(a) => Ok(Some(a.clone())),
            None => self.base.account(user),
        }
    }
    fn invite(&self, id: &str) -> Result<Option<UserId>, S::Error> {
        match self.invites.get(id) {
            Some(u) => Ok(Some(u.clone())),
            None => self.base.invite(id),
        }
    }
    fn inbox_first(&self, user: &UserId) -> Result<u64, S::Error> {
        self.base.inbox_first(user)
    }
    fn has_data(&self) -> Result<bool, S::Error> {
        self.base.has_data()
    }
    fn revoked_before(&self, user: &UserId) -> Result<u64, S::Error> {
        match self.revoked.get(user) {
            Some(b) => Ok(*b),
            None => self.base.revoked_before(user),
        }
    }
    fn sweep_page(&self, kind: SweepKind, after: &[u8], limit: usize) -> Result<Vec<SweepItem>, S::Error> {
        self.base.sweep_page(kind, after, limit)
    }
    fn node(&self, id: u64) -> Result<Option<NodeRecord>, S::Error> {
        match self.nodes.get(&id) {
            Some(n) => Ok(Some(n.clone())),
            None => self.base.node(id),
        }
    }
}

#[cfg(test)]
mod tests;
