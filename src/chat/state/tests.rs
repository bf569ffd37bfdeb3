//! Unit tests of the chat state machine, run against an in-memory store.

use super::*;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

/// An in-memory store that applies changes, to drive `apply` through sequences.
#[derive(Default)]
struct Mem {
    meta: BTreeMap<ConversationId, ConvMeta>,
    dedup: BTreeMap<(ConversationId, UserId, String), (u64, u64, u64)>,
    index: BTreeMap<(UserId, ConversationId), IndexEntry>,
    users: BTreeSet<UserId>,
    messages: BTreeMap<(ConversationId, u64), Message>,
    pending: BTreeSet<(ConversationId, u64)>,
    inbox: BTreeMap<(UserId, u64), InboxEvent>,
    accounts: BTreeMap<UserId, Account>,
    invites: BTreeMap<String, UserId>,
    inbox_first: BTreeMap<UserId, u64>,
    revoked: BTreeMap<UserId, u64>,
    nodes: BTreeMap<u64, NodeRecord>,
}

impl Store for Mem {
    type Error = Infallible;
    fn conv_meta(&self, c: &ConversationId) -> Result<Option<ConvMeta>, Infallible> {
        Ok(self.meta.get(c).cloned())
    }
    fn dedup(&self, c: &ConversationId, f: &UserId, id: &str) -> Result<Option<(u64, u64, u64)>, Infallible> {
        Ok(self.dedup.get(&(c.clone(), f.clone(), id.to_string())).copied())
    }
    fn index_entry(&self, u: &UserId, c: &ConversationId) -> Result<Option<IndexEntry>, Infallible> {
        Ok(self.index.get(&(u.clone(), c.clone())).cloned())
    }
    fn user_exists(&self, u: &UserId) -> Result<bool, Infallible> {
        Ok(self.users.contains(u))
    }
    fn inbox_last(&self, u: &UserId) -> Result<u64, Infallible> {
        Ok(self.inbox.range((u.clone(), 0)..=(u.clone(), u64::MAX)).next_back().map(|((_, n), _)| *n).unwrap_or(0))
    }
    fn account(&self, u: &UserId) -> Result<Option<Account>, Infallible> {
        Ok(self.accounts.get(u).cloned())
    }
    fn invite(&self, id: &str) -> Result<Option<UserId>, Infallible> {
        Ok(self.invites.get(id).cloned())
    }
    fn inbox_first(&self, u: &UserId) -> Result<u64, Infallible> {
        Ok(self.inbox_first.get(u).copied().unwrap_or(1))
    }
    fn revoked_before(&self, u: &UserId) -> Result<u64, Infallible> {
        Ok(self.revoked.get(u).copied().unwrap_or(0))
    }
    fn has_data(&self) -> Result<bool, Infallible> {
        Ok(!self.meta.is_empty() || !self.users.is_empty())
    }
    fn sweep_page(&self, kind: SweepKind, after: &[u8], limit: usize) -> Result<Vec<SweepItem>, Infallible> {
        // Cursors here are the records' debug strings: ordered, unique, enough for tests.
        let mut all: Vec<SweepItem> = match kind {
            SweepKind::Dedup => self
                .dedup
                .iter()
                .map(|((c, f, id), (_, ts, _))| SweepItem {
                    cursor: format!("{c}\0{f}\0{id}").into_bytes(),
                    ts: *ts,
                    record: SweepRecord::Dedup { conversation: c.clone(), from: f.clone(), client_msg_id: id.clone() },
                })
                .collect(),
            SweepKind::Inbox => self
                .inbox
                .iter()
                .map(|((u, n), e)| SweepItem {
                    cursor: format!("{u}\0{n:020}").into_bytes(),
                    ts: e.ts(),
                    record: SweepRecord::Inbox { user: u.clone(), n: *n },
                })
                .collect(),
            SweepKind::Messages => self
                .messages
                .iter()
                .map(|((c, seq), m)| SweepItem {
                    cursor: format!("{c}\0{seq:020}").into_bytes(),
                    ts: m.ts,
                    record: SweepRecord::Message { conversation: c.clone(), seq: *seq },
                })
                .collect(),
        };
        all.sort_by(|a, b| a.cursor.cmp(&b.cursor));
        Ok(all.into_iter().filter(|i| after.is_empty() || i.cursor.as_slice() > after).take(limit).collect())
    }
    fn node(&self, id: u64) -> Result<Option<NodeRecord>, Infallible> {
        Ok(self.nodes.get(&id).cloned())
    }
}

impl Mem {
    fn run(&mut self, cmd: Command) -> Reply {
        let (changes, reply) = apply(&cmd, self).unwrap();
        for ch in changes {
            match ch {
                Change::PutMessage { conversation, message } => {
                    self.messages.insert((conversation, message.seq), message);
                }
                Change::PutConvMeta { conversation, meta } => {
                    self.meta.insert(conversation, meta);
                }
                Change::PutDedup { conversation, from, client_msg_id, seq, ts, attempt } => {
                    self.dedup.insert((conversation, from, client_msg_id), (seq, ts, attempt));
                }
                Change::PutIndex { user, conversation, entry, .. } => {
                    self.index.insert((user, conversation), entry);
                }
                Change::PutPending(p) => {
                    self.pending.insert((p.conversation, p.seq));
                }
                Change::DeletePending { conversation, seq } => {
                    self.pending.remove(&(conversation, seq));
                }
                Change::PutUser(u) => {
                    self.users.insert(u);
                }
                Change::PutInbox { user, n, event, .. } => {
                    assert_eq!(n, self.inbox_last(&user).unwrap() + 1, "inbox numbers are dense");
                    self.inbox.insert((user, n), event);
                }
                Change::PutAccount { user, account } => {
                    self.accounts.insert(user, account);
                }
                Change::PutInvite { id, user } => {
                    self.invites.insert(id, user);
                }
                Change::Delete(SweepRecord::Dedup { conversation, from, client_msg_id }) => {
                    self.dedup.remove(&(conversation, from, client_msg_id));
                }
                Change::Delete(SweepRecord::Inbox { user, n }) => {
                    self.inbox.remove(&(user, n));
                }
                Change::Delete(SweepRecord::Message { conversation, seq }) => {
                    self.messages.remove(&(conversation, seq));
                }
                Change::PutInboxFirst { user, first } => {
                    self.inbox_first.insert(user, first);
                }
                Change::PutRevokedBefore { user, before } => {
                    self.revoked.insert(user, before);
                }
                Change::PutRaw { .. } => {}
                Change::PutNode(n) => {
                    self.nodes.insert(n.id, n);
                }
            }
        }
        reply
    }
}

fn u(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}
fn conv() -> ConversationId {
    ConversationId::between(&u("alice"), &u("bob")).unwrap()
}
fn append(from: &str, to: &str, id: &str, ts: u64) -> Command {
    Command::Append {
        conversation: conv(),
        from: u(from),
        to: u(to),
        client_msg_id: id.into(),
        text: format!("text of {id}"),
        ts,
        attempt: 0,
    }
}
fn index(user: &str, from: &str, seq: u64, ts: u64) -> Command {
    // Counted and uncounted events mix, as while a cluster moves to cluster version 6.
    Command::IndexUpdate {
        user: u(user),
        conversation: conv(),
        from: u(from),
        seq,
        ts,
        preview: format!("p{seq}"),
        uncounted: seq.is_multiple_of(2),
        // And lazy recency keys with exact ones, as while it moves to 7.
        lazy_order: seq.is_multiple_of(3),
    }
}

#[test]
fn seq_is_gap_free_from_one_and_ts_never_goes_back() {
    let mut m = Mem::default();
    assert_eq!(m.run(append("alice", "bob", "a1", 100)), Reply::Appended { seq: 1, ts: 100, duplicate: false });
    assert_eq!(m.run(append("bob", "alice", "b1", 90)), Reply::Appended { seq: 2, ts: 100, duplicate: false });
    assert_eq!(m.run(append("alice", "bob", "a2", 120)), Reply::Appended { seq: 3, ts: 120, duplicate: false });
    let seqs: Vec<u64> = m.messages.keys().map(|(_, s)| *s).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(m.pending.len(), 3, "every new message enters the outbox");
}

#[test]
fn retried_client_msg_id_returns_the_original_seq_and_writes_nothing() {
    let mut m = Mem::default();
    m.run(append("alice", "bob", "k", 100));
    m.run(append("alice", "bob", "other", 101));
    let (changes, reply) = apply(&append("alice", "bob", "k", 500), &m).unwrap();
    assert!(changes.is_empty());
    assert_eq!(reply, Reply::Appended { seq: 1, ts: 100, duplicate: true });
    // The same key from the other participant is a different message.
    assert_eq!(m.run(append("bob", "alice", "k", 102)), Reply::Appended { seq: 3, ts: 102, duplicate: false });
}

#[test]
fn index_merge_is_idempotent_and_order_independent() {
    let mut a = Mem::default();
    a.run(index("bob", "alice", 1, 10));
    a.run(index("bob", "alice", 3, 30));
    a.run(index("bob", "alice", 2, 20));
    a.run(index("bob", "alice", 3, 30));
    let mut b = Mem::default();
    b.run(index("bob", "alice", 3, 30));
    b.run(index("bob", "alice", 1, 10));
    // What a user sees is the same; where the recency key sits (`order_ts`, within the
    // window of last_ts) may depend on the order the updates came in.
    let visible = |e: &IndexEntry| IndexEntry { order_ts: None, ..e.clone() };
    let ea = a.index.values().next().unwrap();
    assert_eq!(visible(ea), visible(b.index.values().next().unwrap()));
    assert_eq!((ea.last_seq, ea.last_ts, ea.preview.as_str()), (3, 30, "p3"));
    assert_eq!(ea.peer, u("alice"));
    assert_eq!(ea.unread(), 3);
    // A replayed update changes nothing, so it writes nothing.
    let (changes, _) = apply(&index("bob", "alice", 2, 20), &a).unwrap();
    assert!(changes.is_empty());
}

fn inbox(m: &Mem, user: &str) -> Vec<InboxEvent> {
    m.inbox.iter().filter(|((u, _), _)| u.as_str() == user).map(|(_, e)| e.clone()).collect()
}

#[test]
fn inbox_ranges_cover_every_message_once_whatever_the_update_order() {
    let mut m = Mem::default();
    m.run(index("bob", "alice", 2, 20));
    m.run(index("bob", "alice", 1, 10)); // late and subsumed: no event
    m.run(index("bob", "alice", 5, 50));
    m.run(index("bob", "alice", 5, 50)); // replay: no event
    let ranges: Vec<(u64, u64)> = inbox(&m, "bob")
        .into_iter()
        .map(|e| match e {
            InboxEvent::Messages { after_seq, to_seq, .. } => (after_seq, to_seq),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ranges, vec![(0, 2), (2, 5)]);
}

#[test]
fn receipts_advance_once_are_clamped_and_reach_the_senders_inbox() {
    let mut m = Mem::default();
    for s in 1..=3 {
        m.run(index("alice", "alice", s, s));
    }
    let receipt = |kind, seq| Command::Receipt {
        user: u("alice"),
        conversation: conv(),
        by: u("bob"),
        receipt: kind,
        seq,
        ts: 0,
        uncounted: true,
    };
    m.run(receipt(ReceiptKind::Delivered, 2));
    m.run(receipt(ReceiptKind::Delivered, 1)); // backwards: nothing
    m.run(receipt(ReceiptKind::Read, 99)); // clamped to last_seq 3
    m.run(receipt(ReceiptKind::Read, 3)); // replay: nothing
    let e = m.index.get(&(u("alice"), conv())).unwrap();
    assert_eq!((e.peer_delivered_seq, e.peer_read_seq), (3, 3));
    let receipts: Vec<(ReceiptKind, u64)> = inbox(&m, "alice")
        .into_iter()
        .filter_map(|e| match e {
            InboxEvent::Receipt { receipt, seq, .. } => Some((receipt, seq)),
            _ => None,
        })
        .collect();
    assert_eq!(receipts, vec![(ReceiptKind::Delivered, 2), (ReceiptKind::Read, 3)]);
    // Only the conversation's peer can issue receipts.
    let forged = Command::Receipt {
        user: u("alice"),
        conversation: conv(),
        by: u("alice"),
        receipt: ReceiptKind::Read,
        seq: 3,
        ts: 0,
        uncounted: true,
    };
    assert!(apply(&forged, &m).unwrap().0.is_empty());
}

#[test]
fn sweeps_expire_old_keys_and_inbox_events_in_bounded_steps() {
    let mut m = Mem::default();
    // Ten messages from alice at ts 1000..1009, indexed for bob (ten inbox events).
    for i in 0..10u64 {
        m.run(append("alice", "bob", &format!("k{i}"), 1000 + i));
        m.run(index("bob", "alice", i + 1, 1000 + i));
    }
    assert_eq!(m.dedup.len(), 10);
    let sweep = |kind, after: Vec<u8>| Command::Sweep { kind, before_ms: 1005, after, limit: 4 };
    // Dedup: three steps of at most four records; the five older than 1005 go.
    let mut after = Vec::new();
    let mut steps = 0;
    loop {
        let Reply::Swept { next, .. } = m.run(sweep(SweepKind::Dedup, after.clone())) else { panic!() };
        steps += 1;
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(steps, 3);
    assert_eq!(m.dedup.len(), 5);
    // A retry of a swept key is a new message (past the retry horizon); a kept one is not.
    assert!(matches!(m.run(append("alice", "bob", "k0", 2000)), Reply::Appended { duplicate: false, seq: 11, .. }));
    assert!(matches!(m.run(append("alice", "bob", "k9", 2000)), Reply::Appended { duplicate: true, seq: 10, .. }));
    // Inbox: events 1..=5 go, the first kept is 6.
    let mut after = Vec::new();
    while let Reply::Swept { next: Some(n), .. } = m.run(sweep(SweepKind::Inbox, after.clone())) {
        after = n;
    }
    assert_eq!(m.inbox.keys().map(|(_, n)| *n).collect::<Vec<_>>(), vec![6, 7, 8, 9, 10]);
    assert_eq!(m.inbox_first(&u("bob")).unwrap(), 6);
    // The last event is kept whatever its age (it numbers the next one).
    let all = Command::Sweep { kind: SweepKind::Inbox, before_ms: u64::MAX, after: vec![], limit: 100 };
    m.run(all);
    assert_eq!(m.inbox.keys().map(|(_, n)| *n).collect::<Vec<_>>(), vec![10]);
    assert_eq!(m.inbox_first(&u("bob")).unwrap(), 10);
    // Messages: retention deletes by age, seqs of the rest unchanged.
    let msgs = Command::Sweep { kind: SweepKind::Messages, before_ms: 1003, after: vec![], limit: 100 };
    assert_eq!(m.run(msgs), Reply::Swept { deleted: 3, next: None });
    assert_eq!(m.messages.keys().next().map(|(_, s)| *s), Some(4));
}

#[test]
fn sending_reads_everything_before_it() {
    let mut m = Mem::default();
    m.run(index("alice", "bob", 1, 10));
    m.run(index("alice", "bob", 2, 20));
    assert_eq!(m.index.values().next().unwrap().unread(), 2);
    m.run(index("alice", "alice", 3, 30));
    let e = m.index.values().next().unwrap();
    assert_eq!((e.read_seq, e.unread()), (3, 0));
}

#[test]
fn read_marker_never_moves_backwards() {
    let mut m = Mem::default();
    for s in 1..=5 {
        m.run(index("bob", "alice", s, s * 10));
    }
    let mark = |seq| Command::MarkRead { user: u("bob"), conversation: conv(), seq };
    assert_eq!(m.run(mark(4)), Reply::ReadMarked { read_seq: 4, unread: 1 });
    assert_eq!(m.run(mark(2)), Reply::ReadMarked { read_seq: 4, unread: 1 });
    assert_eq!(m.run(mark(5)), Reply::ReadMarked { read_seq: 5, unread: 0 });
}

#[test]
fn outbox_done_clears_pending_and_registration_is_idempotent() {
    let mut m = Mem::default();
    m.run(append("alice", "bob", "a", 1));
    m.run(append("alice", "bob", "b", 2));
    m.run(Command::OutboxDone { items: vec![(conv(), 1)] });
    assert_eq!(m.pending.iter().map(|(_, s)| *s).collect::<Vec<_>>(), vec![2]);
    assert_eq!(m.run(Command::Register { user: u("zoe") }), Reply::Registered { new: true });
    assert_eq!(m.run(Command::Register { user: u("zoe") }), Reply::Registered { new: false });
}

/// A batch must have exactly the effect of its commands applied one by one.
#[test]
fn a_batch_equals_its_commands_applied_in_order() {
    let cmds = vec![
        append("alice", "bob", "a1", 100),
        append("bob", "alice", "b1", 90),
        append("alice", "bob", "a1", 130),
        index("alice", "alice", 1, 100),
        index("bob", "alice", 1, 100),
        index("bob", "bob", 2, 100),
        index("bob", "alice", 1, 100),
        Command::Register { user: u("zoe") },
        Command::Register { user: u("zoe") },
        Command::MarkRead { user: u("bob"), conversation: conv(), seq: 1 },
        Command::OutboxDone { items: vec![(conv(), 1)] },
    ];
    let mut one_by_one = Mem::default();
    let singles: Vec<Reply> = cmds.iter().cloned().map(|c| one_by_one.run(c)).collect();
    let mut batched = Mem::default();
    assert_eq!(batched.run(Command::Batch(cmds)), Reply::Batch(singles.clone()));
    assert_eq!(singles[2], Reply::Appended { seq: 1, ts: 100, duplicate: true });
    assert_eq!(batched.messages, one_by_one.messages);
    assert_eq!(batched.index, one_by_one.index);
    assert_eq!(batched.inbox, one_by_one.inbox);
    assert_eq!(batched.pending, one_by_one.pending);
    assert_eq!(batched.users, one_by_one.users);
}

#[test]
fn only_a_different_attempt_is_a_duplicate() {
    let mut m = Mem::default();
    let mut first = append("alice", "bob", "a1", 100);
    let Command::Append { attempt, .. } = &mut first else { unreachable!() };
    *attempt = 7;
    assert_eq!(m.run(first.clone()), Reply::Appended { seq: 1, ts: 100, duplicate: false });
    // The node retrying the same client request internally: not a duplicate.
    assert_eq!(m.run(first.clone()), Reply::Appended { seq: 1, ts: 100, duplicate: false });
    // The client sending the same client_msg_id again (a new request): a duplicate.
    let Command::Append { attempt, .. } = &mut first else { unreachable!() };
    *attempt = 8;
    assert_eq!(m.run(first), Reply::Appended { seq: 1, ts: 100, duplicate: true });
    assert_eq!(m.messages.len(), 1);
}

#[test]
fn index_update_for_a_non_participant_is_ignored() {
    let mut m = Mem::default();
    let reply = m.run(index("mallory", "alice", 1, 1));
    assert_eq!(reply, Reply::Indexed);
    assert!(m.index.is_empty());
}

#[test]
fn accounts_sessions_rotate_end_and_a_password_change_ends_them_all() {
    let mut m = Mem::default();
    let acct =
        |claim| Command::CreateAccount { user: u("ann"), password: "$argon2id$h1".into(), claim_existing: claim };
    assert_eq!(m.run(acct(false)), Reply::Account(AccountOutcome::Created));
    assert!(m.users.contains(&u("ann")), "an account registers its user");
    assert_eq!(m.run(acct(true)), Reply::Account(AccountOutcome::Taken));
    // A user registered by an operator is not claimed by a sign-up, only by the operator.
    m.run(Command::Register { user: u("op_made") });
    let claim = |c| Command::CreateAccount { user: u("op_made"), password: "h".into(), claim_existing: c };
    assert_eq!(m.run(claim(false)), Reply::Account(AccountOutcome::Taken));
    assert_eq!(m.run(claim(true)), Reply::Account(AccountOutcome::Created));

    let add = |id: &str, exp| Command::AddSession { user: u("ann"), id: id.into(), expires_ms: exp, now_ms: 100 };
    assert_eq!(m.run(add("s1", 1000)), Reply::Account(AccountOutcome::SessionAdded));
    assert_eq!(m.run(add("s2", 1000)), Reply::Account(AccountOutcome::SessionAdded));
    let rotate = |old: &str, new: &str, now| Command::RotateSession {
        user: u("ann"),
        old: old.into(),
        new: new.into(),
        expires_ms: 2000,
        now_ms: now,
    };
    assert_eq!(m.run(rotate("s1", "s1b", 200)), Reply::Account(AccountOutcome::SessionRotated));
    // A rotated token is spent; an expired one is dead.
    assert_eq!(m.run(rotate("s1", "s1c", 200)), Reply::Account(AccountOutcome::SessionUnknown));
    assert_eq!(m.run(rotate("s2", "s2b", 1000)), Reply::Account(AccountOutcome::SessionUnknown));
    assert_eq!(
        m.run(Command::EndSession { user: u("ann"), id: "s1b".into() }),
        Reply::Account(AccountOutcome::SessionEnded)
    );
    assert_eq!(m.run(rotate("s1b", "x", 300)), Reply::Account(AccountOutcome::SessionUnknown));
    m.run(add("s3", 5000));
    assert_eq!(
        m.run(Command::SetPassword { user: u("ann"), password: "$argon2id$h2".into() }),
        Reply::Account(AccountOutcome::PasswordSet)
    );
    assert_eq!(m.run(rotate("s3", "y", 300)), Reply::Account(AccountOutcome::SessionUnknown));
    let a = m.accounts[&u("ann")].clone();
    assert_eq!((a.generation, a.password.as_str(), a.sessions.len()), (1, "$argon2id$h2", 0));
    // Sessions are bounded.
    for i in 0..(MAX_SESSIONS + 5) {
        m.run(add(&format!("many{i}"), 10_000 + i as u64));
    }
    assert_eq!(m.accounts[&u("ann")].sessions.len(), MAX_SESSIONS);
    assert_eq!(
        m.run(Command::AddSession { user: u("nobody"), id: "z".into(), expires_ms: 1, now_ms: 0 }),
        Reply::Account(AccountOutcome::NoAccount)
    );
}

#[test]
fn a_revocation_mark_only_moves_forward() {
    let mut m = Mem::default();
    m.run(Command::RevokeTokens { user: u("ann"), before: 100 });
    m.run(Command::RevokeTokens { user: u("ann"), before: 50 });
    assert_eq!(m.revoked_before(&u("ann")).unwrap(), 100);
    assert_eq!(m.revoked_before(&u("bob")).unwrap(), 0);
}

#[test]
fn an_invite_is_used_once() {
    let mut m = Mem::default();
    let use_by = |who: &str| Command::UseInvite { invite: "inv1".into(), user: u(who) };
    assert_eq!(m.run(use_by("ann")), Reply::Account(AccountOutcome::InviteAccepted));
    assert_eq!(m.run(use_by("ann")), Reply::Account(AccountOutcome::InviteAccepted), "a retry is fine");
    assert_eq!(m.run(use_by("bob")), Reply::Account(AccountOutcome::InviteUsed));
}

#[test]
fn a_removed_node_id_is_never_taken_back() {
    let mut m = Mem::default();
    let rec = |addr: &str, removed: bool| NodeRecord {
        id: 4,
        peer: addr.into(),
        grpc: "g".into(),
        http: "h".into(),
        public_url: None,
        removed,
    };
    let set = |n: NodeRecord| Command::SetNode { node: n };
    assert_eq!(m.run(set(rec("10.0.0.4:7000", false))), Reply::NodeSet(true));
    assert_eq!(m.run(set(rec("10.0.0.9:7000", false))), Reply::NodeSet(true), "a node may move");
    assert_eq!(m.nodes[&4].peer, "10.0.0.9:7000");
    assert_eq!(m.run(set(rec("10.0.0.9:7000", true))), Reply::NodeSet(true));
    assert_eq!(m.run(set(rec("10.0.0.9:7000", true))), Reply::NodeSet(true), "removing again is a no-op");
    assert_eq!(m.run(set(rec("10.0.0.4:7000", false))), Reply::NodeSet(false), "removed for good");
    assert!(m.nodes[&4].removed);
    // In one batch, a later command sees the removal of an earlier one.
    let mut m = Mem::default();
    let batch = Command::Batch(vec![set(rec("a", true)), set(rec("b", false))]);
    assert_eq!(m.run(batch), Reply::Batch(vec![Reply::NodeSet(true), Reply::NodeSet(false)]));
}
