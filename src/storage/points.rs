//! The state machine's cache of the records every message reads on every replica: a
//! conversation's meta (its last seq), each participant's recent-conversations entry, and
//! the number of each participant's last inbox event.
//!
//! Applying a send reads these before it writes them, on every replica of the conversation's
//! shard and of both users' shards. Read from sled, they cost a tree descent each, and the
//! last inbox event a reverse range scan (`get_lt`; the counter that used to be read instead
//! is no longer written, see `chat::command::UNCOUNTED_VERSION`): together about a tenth of
//! a node's CPU at full load (`docs/performance.md`). The cache keeps the decoded values the
//! state machine last read or wrote.
//!
//! Only the apply path uses it, under the state machine's write lock, so it never sees a
//! write other than its own:
//! - [`Cached`] answers the state machine's reads from the cache and reads sled on a miss
//!   (absence is cached too);
//! - after an entry's writes are committed, [`PointCache::written`] takes its new values
//!   (write-through); if the commit fails, the cache is cleared (sled's state is then not
//!   known);
//! - anything else that changes the tree clears it: a snapshot install, and a restore's raw
//!   records (`Ingest`), which may carry any of these keys.
//!
//! Each map holds at most [`MAX_PER_MAP`] records and starts over when full: a bound, not an
//! eviction policy (a busy shard re-reads what it needs). It is not counted in `cache_bytes`.

use super::keys::{ShardView, Staged};
use super::StoreError;
use crate::chat::state::{Store, SweepItem};
use crate::chat::types::{Account, ConvMeta};
use crate::chat::SweepKind;
use crate::chat::{ConversationId, IndexEntry, NodeRecord, UserId};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;

/// Records per map (three maps per shard replica; an index entry with its key is about 300
/// bytes, so a shard replica's cache stays under about 2 MB; with many shards per node, count
/// it beside `cache_bytes`).
pub const MAX_PER_MAP: usize = 4_096;

#[derive(Default)]
pub struct PointCache {
    metas: HashMap<ConversationId, Option<ConvMeta>>,
    entries: HashMap<(UserId, ConversationId), Option<IndexEntry>>,
    inbox_last: HashMap<UserId, u64>,
}

fn put<K: Hash + Eq, V>(map: &mut HashMap<K, V>, k: K, v: V) {
    if map.len() >= MAX_PER_MAP && !map.contains_key(&k) {
        map.clear();
    }
    map.insert(k, v);
}

impl PointCache {
    pub fn clear(&mut self) {
        self.metas.clear();
        self.entries.clear();
        self.inbox_last.clear();
    }

    /// Takes the values an entry wrote, once they are committed.
    pub fn written(&mut self, staged: &Staged) {
        if staged.raw {
            self.clear();
            return;
        }
        for (c, meta) in &staged.metas {
            put(&mut self.metas, c.clone(), Some(meta.clone()));
        }
        for (u, c, entry) in &staged.entries {
            put(&mut self.entries, (u.clone(), c.clone()), Some(entry.clone()));
        }
        for (u, n, _) in &staged.inbox {
            put(&mut self.inbox_last, u.clone(), *n);
        }
    }

    pub fn len(&self) -> usize {
        self.metas.len() + self.entries.len() + self.inbox_last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The state machine's view for one entry: `view`, with the cached reads in front of it.
pub struct Cached<'a> {
    view: &'a ShardView,
    cache: RefCell<&'a mut PointCache>,
}

impl<'a> Cached<'a> {
    pub fn new(view: &'a ShardView, cache: &'a mut PointCache) -> Self {
        Self { view, cache: RefCell::new(cache) }
    }
}

impl Store for Cached<'_> {
    type Error = StoreError;
    fn conv_meta(&self, c: &ConversationId) -> Result<Option<ConvMeta>, StoreError> {
        if let Some(m) = self.cache.borrow().metas.get(c) {
            return Ok(m.clone());
        }
        let m = self.view.conv_meta(c)?;
        put(&mut self.cache.borrow_mut().metas, c.clone(), m.clone());
        Ok(m)
    }
    fn dedup(&self, c: &ConversationId, from: &UserId, id: &str) -> Result<Option<(u64, u64, u64)>, StoreError> {
        self.view.dedup(c, from, id)
    }
    fn index_entry(&self, u: &UserId, c: &ConversationId) -> Result<Option<IndexEntry>, StoreError> {
        let key = (u.clone(), c.clone());
        if let Some(e) = self.cache.borrow().entries.get(&key) {
            return Ok(e.clone());
        }
        let e = self.view.index_entry(u, c)?;
        put(&mut self.cache.borrow_mut().entries, key, e.clone());
        Ok(e)
    }
    fn user_exists(&self, u: &UserId) -> Result<bool, StoreError> {
        self.view.user_exists(u)
    }
    fn inbox_last(&self, u: &UserId) -> Result<u64, StoreError> {
        if let Some(n) = self.cache.borrow().inbox_last.get(u) {
            return Ok(*n);
        }
        let n = self.view.inbox_last(u)?;
        put(&mut self.cache.borrow_mut().inbox_last, u.clone(), n);
        Ok(n)
    }
    fn account(&self, u: &UserId) -> Result<Option<Account>, StoreError> {
        self.view.account(u)
    }
    fn invite(&self, id: &str) -> Result<Option<UserId>, StoreError> {
        self.view.invite(id)
    }
    fn has_data(&self) -> Result<bool, StoreError> {
        self.view.has_data()
    }
    fn revoked_before(&self, u: &UserId) -> Result<u64, StoreError> {
        self.view.revoked_before(u)
    }
    fn inbox_first(&self, u: &UserId) -> Result<u64, StoreError> {
        self.view.inbox_first(u)
    }
    fn sweep_page(&self, kind: SweepKind, after: &[u8], limit: usize) -> Result<Vec<SweepItem>, StoreError> {
        self.view.sweep_page(kind, after, limit)
    }
    fn node(&self, id: u64) -> Result<Option<NodeRecord>, StoreError> {
        self.view.node(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::state::apply;
    use crate::chat::{Command, ReceiptKind};
    use crate::storage::keys::{self, Writes};

    fn view() -> ShardView {
        ShardView { tree: sled::Config::new().temporary(true).open().unwrap().open_tree("t").unwrap() }
    }

    fn dump(v: &ShardView) -> Vec<(Vec<u8>, Vec<u8>)> {
        v.tree
            .iter()
            .map(|kv| kv.unwrap())
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .filter(|(k, _)| k != keys::REDO)
            .collect()
    }

    /// Applies `cmd` as the state machine does, with the cache or without.
    fn run(v: &ShardView, cache: Option<&mut PointCache>, cmd: &Command) -> crate::chat::Reply {
        let (changes, reply) = match cache {
            Some(c) => {
                let (changes, reply) = apply(cmd, &Cached::new(v, c)).unwrap();
                let mut w = Writes::default();
                let staged = v.stage(changes, &mut w);
                w.commit(&v.tree).unwrap();
                c.written(&staged);
                return reply;
            }
            None => apply(cmd, v).unwrap(),
        };
        let mut w = Writes::default();
        v.stage(changes, &mut w);
        w.commit(&v.tree).unwrap();
        reply
    }

    /// The same commands through the cache and straight from sled leave the same state and
    /// get the same replies: repeated conversations, read markers, receipts, a sweep, a
    /// restore's raw records that rewrite a user's inbox (the cache must let go of them),
    /// and a cache that starts over when full.
    #[test]
    fn cached_reads_answer_as_sled_does() {
        let (plain, cached) = (view(), view());
        let mut cache = PointCache::default();
        let users: Vec<UserId> = (0..6).map(|i| UserId::parse(&format!("u{i}")).unwrap()).collect();
        let mut cmds = Vec::new();
        for i in 0..300u64 {
            let (a, b) = (&users[(i % 6) as usize], &users[((i * 7 + 1) % 6) as usize]);
            if a == b {
                continue;
            }
            let conversation = ConversationId::between(a, b).unwrap();
            cmds.push(Command::Append {
                conversation: conversation.clone(),
                from: a.clone(),
                to: b.clone(),
                client_msg_id: format!("m{}", i % 250),
                text: format!("text {i}"),
                ts: 1_000 + i,
                attempt: i,
            });
            let seq = i / 6 + 1;
            for u in [a, b] {
                cmds.push(Command::IndexUpdate {
                    user: u.clone(),
                    conversation: conversation.clone(),
                    from: a.clone(),
                    seq,
                    ts: 1_000 + i,
                    preview: format!("p{i}"),
                    uncounted: i % 3 == 0,
                    lazy_order: i % 2 == 0,
                });
            }
            if i % 5 == 0 {
                cmds.push(Command::MarkRead { user: b.clone(), conversation: conversation.clone(), seq });
                cmds.push(Command::Receipt {
                    user: a.clone(),
                    conversation: conversation.clone(),
                    by: b.clone(),
                    receipt: ReceiptKind::Read,
                    seq,
                    ts: 1_000 + i,
                    uncounted: true,
                });
            }
            if i == 150 {
                cmds.push(Command::Sweep { kind: SweepKind::Inbox, before_ms: 1_100, after: Vec::new(), limit: 1_000 });
                // A restore's records: event 500 of u1, so u1's next event is 501.
                let event = crate::chat::InboxEvent::Messages {
                    conversation: ConversationId::between(&users[0], &users[1]).unwrap(),
                    after_seq: 0,
                    to_seq: 1,
                    ts: 1,
                };
                cmds.push(Command::Ingest {
                    records: vec![(keys::inbox(&users[1], 500), crate::storage::encode(&event))],
                    first: false,
                });
            }
            // Batches, as the shard handle proposes them.
            if i % 50 == 49 {
                let tail = cmds.split_off(cmds.len() - 3);
                cmds.push(Command::Batch(tail));
            }
        }
        for (n, cmd) in cmds.iter().enumerate() {
            if n == 400 {
                // Full: every map starts over.
                for i in 0..MAX_PER_MAP {
                    put(&mut cache.inbox_last, UserId::parse(&format!("x{i}")).unwrap(), 1);
                }
            }
            assert_eq!(run(&plain, None, cmd), run(&cached, Some(&mut cache), cmd), "command {n}: {cmd:?}");
        }
        assert_eq!(dump(&plain), dump(&cached));
        assert!(plain.inbox_last(&users[1]).unwrap() > 500, "the ingested event numbered the next ones");
        assert!(cache.len() <= 3 * MAX_PER_MAP);
        assert!(!cache.is_empty());
    }

    /// The state machine's view as it was before cluster version 6 and this cache: the
    /// number of a user's last inbox event read from the counter (`n/`).
    struct Counted<'a>(&'a ShardView);

    impl Store for Counted<'_> {
        type Error = StoreError;
        fn conv_meta(&self, c: &ConversationId) -> Result<Option<ConvMeta>, StoreError> {
            self.0.conv_meta(c)
        }
        fn dedup(&self, c: &ConversationId, f: &UserId, id: &str) -> Result<Option<(u64, u64, u64)>, StoreError> {
            self.0.dedup(c, f, id)
        }
        fn index_entry(&self, u: &UserId, c: &ConversationId) -> Result<Option<IndexEntry>, StoreError> {
            self.0.index_entry(u, c)
        }
        fn user_exists(&self, u: &UserId) -> Result<bool, StoreError> {
            self.0.user_exists(u)
        }
        fn inbox_last(&self, u: &UserId) -> Result<u64, StoreError> {
            Ok(self.0.tree.get(keys::inbox_last(u))?.map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap())))
        }
        fn account(&self, u: &UserId) -> Result<Option<Account>, StoreError> {
            self.0.account(u)
        }
        fn invite(&self, id: &str) -> Result<Option<UserId>, StoreError> {
            self.0.invite(id)
        }
        fn has_data(&self) -> Result<bool, StoreError> {
            self.0.has_data()
        }
        fn revoked_before(&self, u: &UserId) -> Result<u64, StoreError> {
            self.0.revoked_before(u)
        }
        fn inbox_first(&self, u: &UserId) -> Result<u64, StoreError> {
            self.0.inbox_first(u)
        }
        fn sweep_page(&self, k: SweepKind, after: &[u8], limit: usize) -> Result<Vec<SweepItem>, StoreError> {
            self.0.sweep_page(k, after, limit)
        }
        fn node(&self, id: u64) -> Result<Option<NodeRecord>, StoreError> {
            self.0.node(id)
        }
    }

    /// This thread's time on a CPU (ns), not counting time other processes had the core.
    fn on_cpu_ns() -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Not a test: what applying a send costs one replica on real sled trees, by path: "old"
    /// (the counter written and read, no cache, the recency keys moved by every message),
    /// "v6" (no counter, this cache, keys moved: `cluster_version` 6) and "v7" (recency keys
    /// left in place within `ORDER_WINDOW_MS`: 7). A send is the `raftchat bench` load: a
    /// message between two of 200 users, its two index updates and its outbox confirmation,
    /// proposed in batches of `b` commands. Prints microseconds per send; asserts nothing.
    /// `cargo test --release --lib storage::points::tests::apply_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn apply_cost() {
        let users: Vec<UserId> = (0..200).map(|i| UserId::parse(&format!("user{i}")).unwrap()).collect();
        let mut rng = 0x2545F4914F6CDD1Du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let sends: Vec<Vec<Command>> = (0..30_000u64)
            .map(|i| {
                let a = &users[(next() % 200) as usize];
                let mut b = &users[(next() % 200) as usize];
                if a == b {
                    b = &users[(users.iter().position(|u| u == a).unwrap() + 1) % 200];
                }
                let conversation = ConversationId::between(a, b).unwrap();
                let update = |u: &UserId, uncounted| Command::IndexUpdate {
                    user: u.clone(),
                    conversation: conversation.clone(),
                    from: a.clone(),
                    seq: 0, // set below
                    ts: 1_700_000_000_000 + i,
                    preview: "x".repeat(60),
                    uncounted,
                    lazy_order: false,
                };
                vec![
                    Command::Append {
                        conversation: conversation.clone(),
                        from: a.clone(),
                        to: b.clone(),
                        client_msg_id: format!("c{i}"),
                        text: "x".repeat(100),
                        ts: 1_700_000_000_000 + i,
                        attempt: i + 1,
                    },
                    update(a, false),
                    update(b, false),
                ]
            })
            .collect();
        for batch in [1usize, 16] {
            for path in ["v7", "v6", "old", "v7", "v6", "old", "v7", "v6", "old"] {
                let new = path != "old";
                // A node's sled, as `serve` opens it (256 MiB page cache).
                let dir = tempfile::tempdir().unwrap();
                let storage = crate::storage::Storage::open(dir.path(), 1, 256 << 20).unwrap();
                let v = ShardView { tree: storage.shard_trees(0).unwrap().1 };
                let mut cache = PointCache::default();
                let started = std::time::Instant::now();
                let mut timed_from = None;
                let entry = |cmds: Vec<Command>, cache: &mut PointCache| {
                    let cmd = if cmds.len() == 1 { cmds.into_iter().next().unwrap() } else { Command::Batch(cmds) };
                    let (changes, reply) = if new {
                        apply(&cmd, &Cached::new(&v, cache)).unwrap()
                    } else {
                        apply(&cmd, &Counted(&v)).unwrap()
                    };
                    let mut w = Writes::default();
                    let staged = v.stage(changes, &mut w);
                    w.insert(keys::APPLIED.to_vec(), vec![0u8; 40]);
                    w.commit(&v.tree).unwrap();
                    if new {
                        cache.written(&staged);
                    }
                    match reply {
                        crate::chat::Reply::Batch(r) => r,
                        r => vec![r],
                    }
                };
                for (n, chunk) in sends.chunks(batch).enumerate() {
                    if n * batch == 10_000 {
                        timed_from = Some((std::time::Instant::now(), on_cpu_ns()));
                    }
                    // The messages first (their seqs go into the index updates), then the
                    // index updates, then the outbox confirmations: one entry each.
                    let replies = entry(chunk.iter().map(|s| s[0].clone()).collect(), &mut cache);
                    let mut updates = Vec::new();
                    let mut outbox = Vec::new();
                    for (send, reply) in chunk.iter().zip(replies) {
                        let crate::chat::Reply::Appended { seq, .. } = reply else { panic!("not appended: {reply:?}") };
                        let Command::Append { conversation, .. } = &send[0] else { unreachable!() };
                        for u in &send[1..] {
                            let mut u = u.clone();
                            if let Command::IndexUpdate { seq: s, uncounted, lazy_order, .. } = &mut u {
                                *s = seq;
                                *uncounted = new;
                                *lazy_order = path == "v7";
                            }
                            updates.push(u);
                        }
                        outbox.push((conversation.clone(), seq));
                    }
                    entry(updates, &mut cache);
                    entry(vec![Command::OutboxDone { items: outbox }], &mut cache);
                }
                let (wall, cpu) = timed_from.unwrap();
                println!(
                    "apply_cost batch {batch:>2} {}: {:.1} us on CPU per send ({:.1} us wall; last 20,000 of 30,000; all {:.1} s)",
                    path,
                    (on_cpu_ns() - cpu) as f64 / 1e3 / 20_000.0,
                    wall.elapsed().as_secs_f64() * 1e6 / 20_000.0,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
}
