//! The recent-conversations listing ([`ShardView::recent`]): a user's entries newest first,
//! from recency keys that may sit up to `ORDER_WINDOW_MS` behind their entries.

use super::{order, order_prefix, order_prefix_at, ShardView, LAZY_ORDER};
use crate::chat::state::Store;
use crate::chat::types::ORDER_WINDOW_MS;
use crate::chat::{ConversationId, IndexEntry, UserId};
use crate::storage::StoreError;

impl ShardView {
    /// A user's entries, newest first (by `last_ts`, then conversation id), starting after
    /// `after` (the order key `order(u, last_ts, conv)` of the last entry of the previous
    /// page), at most `limit`. Returns each entry with that key of it.
    ///
    /// A recency key's timestamp `k` is at most [`ORDER_WINDOW_MS`] behind its entry's
    /// `last_ts` (`k <= last_ts < k + window`; before cluster version 7 always `k ==
    /// last_ts`). So the keys are read newest first and their entries held back until no key
    /// still to come can hold a newer one: once a key at `k` is read, every later key's entry
    /// has `last_ts < k + window`. A page reads the keys of one window past its last entry:
    /// for most users a few more than the page, for one who wrote to a thousand people in a
    /// minute a thousand (index reads under the shard's read lock, as any page is). A shard
    /// that never held a lagging key (no [`LAZY_ORDER`] mark, which is written in the same
    /// entry as the first such key) is read with no window: the page and one key more.
    pub fn recent(
        &self,
        u: &UserId,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<(ConversationId, IndexEntry, Vec<u8>)>, StoreError> {
        let prefix = order_prefix(u);
        let window = if self.tree.contains_key(LAZY_ORDER)? { ORDER_WINDOW_MS } else { 0 };
        let ts_of = |key: &[u8]| -> Option<u64> {
            let b = key.get(prefix.len()..prefix.len() + 8)?;
            Some(!u64::from_be_bytes(b.try_into().ok()?))
        };
        // Entries at or before the cursor's last_ts have keys at or before it too.
        let start = match after.as_deref().and_then(ts_of) {
            Some(ts) => order_prefix_at(u, ts),
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        // Entries read but not yet known to be next, by their order key.
        let mut held = Held::new();
        type Held = std::collections::BTreeMap<Vec<u8>, (ConversationId, IndexEntry)>;
        // Moves the held entries that are next to `out`: all of them at the end (`below`
        // None), else those no key at or below `below` can precede.
        fn emit(
            held: &mut Held,
            below: Option<u64>,
            window: u64,
            out: &mut Vec<(ConversationId, IndexEntry, Vec<u8>)>,
            limit: usize,
        ) {
            while out.len() < limit {
                match held.first_key_value() {
                    Some((_, (_, e))) if below.is_none_or(|k| e.last_ts >= k.saturating_add(window)) => {
                        let Some((key, (c, e))) = held.pop_first() else { break };
                        out.push((c, e, key));
                    }
                    _ => break,
                }
            }
        }
        for kv in self.tree.range(start..) {
            let (key, _) = kv?;
            if !key.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            // A key shorter than prefix + timestamp is corrupt, not a reason to panic.
            let corrupt =
                |reason: &str| StoreError::Corrupt { key: String::from_utf8_lossy(&key).into(), reason: reason.into() };
            let key_ts = ts_of(&key).ok_or_else(|| corrupt("short recency key"))?;
            let conv_bytes = key.get(prefix.len() + 8..).unwrap_or_default();
            let conv = std::str::from_utf8(conv_bytes)
                .ok()
                .and_then(|s| ConversationId::parse(s).ok())
                .ok_or_else(|| corrupt("bad conversation id"))?;
            emit(&mut held, Some(key_ts), window, &mut out, limit);
            // A key the entry no longer names (it moved meanwhile) is skipped: the entry
            // is listed at its own key.
            if let Some(e) = self.index_entry(u, &conv)?.filter(|e| e.recency_key_ts() == Some(key_ts)) {
                let at = order(u, e.last_ts, &conv);
                if after.as_ref().is_none_or(|a| at > *a) {
                    held.insert(at, (conv, e));
                }
            }
        }
        emit(&mut held, None, window, &mut out, limit);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode, Writes};
    use super::*;

    fn tree() -> sled::Tree {
        sled::Config::new().temporary(true).open().unwrap().open_tree("t").unwrap()
    }

    /// Recency keys left up to a window behind their entries (cluster version 7), mixed with
    /// keys at their entries' last_ts (below 7, or once the window passed): every listing,
    /// whatever the page size, is every entry once, newest `last_ts` first (ties by
    /// conversation id), pages follow on from their cursors, and no key is left behind. An
    /// update within the window writes no recency key at all.
    #[test]
    fn recent_lists_entries_in_order_whatever_their_keys_lag() {
        use crate::chat::state::apply;
        use crate::chat::Command;
        let view = ShardView { tree: tree() };
        let me = UserId::parse("me").unwrap();
        let peers: Vec<UserId> = (0..12).map(|i| UserId::parse(&format!("p{i:02}")).unwrap()).collect();
        let mut rng = 0x9E3779B97F4A7C15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut seqs = vec![0u64; peers.len()];
        let mut now = 1_000_000u64;
        let (mut lazy_kept, mut moved) = (0, 0);
        for step in 0..3_000u64 {
            // Mostly seconds apart, now and then past the window; sometimes the same ms.
            now += match next(20) {
                0 => ORDER_WINDOW_MS + next(ORDER_WINDOW_MS),
                1 | 2 => 0,
                _ => next(2_000),
            };
            let p = next(peers.len() as u64) as usize;
            let conversation = ConversationId::between(&me, &peers[p]).unwrap();
            let cmd = if next(8) == 0 {
                Command::MarkRead { user: me.clone(), conversation, seq: seqs[p] }
            } else {
                seqs[p] += 1;
                Command::IndexUpdate {
                    user: me.clone(),
                    conversation,
                    from: peers[p].clone(),
                    seq: seqs[p],
                    ts: now,
                    preview: String::new(),
                    uncounted: true,
                    lazy_order: next(4) != 0,
                }
            };
            let (changes, _) = apply(&cmd, &view).unwrap();
            let mut w = Writes::default();
            let staged = view.stage(changes, &mut w);
            // As the state machine does (`StateMachine::apply_one`).
            for mark in staged.marks() {
                w.insert(mark.to_vec(), Vec::new());
            }
            let order_writes = w.0.iter().filter(|(k, _)| k.starts_with(&order_prefix(&me))).count();
            if let (Command::IndexUpdate { lazy_order: true, .. }, Some((_, _, e))) = (&cmd, staged.entries.first()) {
                if e.order_ts.is_some() {
                    lazy_kept += 1;
                    assert_eq!(order_writes, 0, "an update within the window leaves the key alone");
                } else {
                    moved += 1;
                }
            }
            w.commit(&view.tree).unwrap();
            if step % 150 != 149 {
                continue;
            }
            let mut want: Vec<(Vec<u8>, ConversationId)> = Vec::new();
            for kv in view.tree.scan_prefix(b"i/me\0") {
                let (k, v) = kv.unwrap();
                let e: IndexEntry = decode(&k, &v).unwrap();
                let c = ConversationId::parse(std::str::from_utf8(&k[5..]).unwrap()).unwrap();
                if e.last_seq > 0 {
                    assert!(e.recency_ts() <= e.last_ts && e.last_ts - e.recency_ts() < ORDER_WINDOW_MS);
                    assert!(view.tree.contains_key(order(&me, e.recency_ts(), &c)).unwrap(), "{c}: its key exists");
                    want.push((order(&me, e.last_ts, &c), c));
                }
            }
            want.sort();
            assert_eq!(view.tree.scan_prefix(order_prefix(&me)).count(), want.len(), "no key left behind");
            let want: Vec<ConversationId> = want.into_iter().map(|(_, c)| c).collect();
            for limit in [1usize, 2, 5, 100] {
                let (mut got, mut cursor) = (Vec::new(), None);
                loop {
                    let after = cursor.take().map(|c: Vec<u8>| [order_prefix(&me), c].concat());
                    let mut rows = view.recent(&me, after, limit + 1).unwrap();
                    let more = rows.len() > limit;
                    rows.truncate(limit);
                    cursor = rows.last().filter(|_| more).map(|(_, _, k)| k[order_prefix(&me).len()..].to_vec());
                    got.extend(rows.into_iter().map(|(c, _, _)| c));
                    if cursor.is_none() {
                        break;
                    }
                }
                assert_eq!(got, want, "step {step}, pages of {limit}");
            }
        }
        assert!(lazy_kept > 1_000 && moved > 200, "both kinds of update ran: {lazy_kept} kept, {moved} moved");
    }

    /// Not a test: what a first page of 20 recent conversations costs to read, for a user
    /// with `n` conversations whose last messages are `gap` ms apart, with the keys moved by
    /// every message (cluster version 6) and left within the window (7). Each conversation
    /// gets 5 messages 5 s apart (so its key lags at 7). Prints microseconds per page.
    /// `cargo test --release --lib storage::keys::recent::tests::recent_page_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn recent_page_cost() {
        use crate::chat::state::apply;
        use crate::chat::Command;
        for (n, gap) in [(200u64, 1_000u64), (200, 10), (2_000, 10)] {
            for lazy in [false, true] {
                let dir = tempfile::tempdir().unwrap();
                let storage = crate::storage::Storage::open(dir.path(), 1, 256 << 20).unwrap();
                let view = ShardView { tree: storage.shard_trees(0).unwrap().1 };
                let me = UserId::parse("me").unwrap();
                for round in 0..5u64 {
                    for i in 0..n {
                        let peer = UserId::parse(&format!("p{i}")).unwrap();
                        let cmd = Command::IndexUpdate {
                            user: me.clone(),
                            conversation: ConversationId::between(&me, &peer).unwrap(),
                            from: peer,
                            seq: round + 1,
                            ts: 1_000_000 + i * gap + round * 5_000,
                            preview: "x".repeat(60),
                            uncounted: true,
                            lazy_order: lazy,
                        };
                        let (changes, _) = apply(&cmd, &view).unwrap();
                        let mut w = Writes::default();
                        let staged = view.stage(changes, &mut w);
                        for mark in staged.marks() {
                            w.insert(mark.to_vec(), Vec::new());
                        }
                        w.commit(&view.tree).unwrap();
                    }
                }
                let pages = 2_000;
                let started = std::time::Instant::now();
                for _ in 0..pages {
                    assert_eq!(view.recent(&me, None, 21).unwrap().len(), 21);
                }
                println!(
                    "recent_page_cost {n} conversations, last messages {gap} ms apart, keys {}: {:.1} us per page of 20",
                    if lazy { "left within the window (7)" } else { "moved (6)" },
                    started.elapsed().as_secs_f64() * 1e6 / pages as f64
                );
            }
        }
    }
}
