//! The write-through cache of the last 24 hours of messages, one per local shard.
//!
//! Every applied message is written here as well as to sled (leaders and followers alike,
//! so a new leader starts warm). Per conversation it holds a contiguous run of the newest
//! messages; a history page is served from it only if the whole page lies in that run.
//! Memory is bounded by a byte budget: the globally oldest messages go first, and so do
//! messages older than 24 hours.

use crate::chat::{ConversationId, Message};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

pub const WINDOW_MS: u64 = 24 * 3600 * 1000;

pub struct RecentCache {
    budget: usize,
    inner: Mutex<Inner>,
    pub hits: prometheus::IntCounter,
    pub misses: prometheus::IntCounter,
}

#[derive(Default)]
struct Inner {
    convs: HashMap<ConversationId, VecDeque<Message>>,
    /// Insertion order across conversations: (conversation, seq, bytes).
    order: VecDeque<(ConversationId, u64, usize)>,
    bytes: usize,
}

fn size_of(m: &Message) -> usize {
    m.text.len() + m.client_msg_id.len() + m.from.as_str().len() + 64
}

impl RecentCache {
    pub fn new(budget: usize, hits: prometheus::IntCounter, misses: prometheus::IntCounter) -> Self {
        Self { budget, inner: Mutex::new(Inner::default()), hits, misses }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a newly applied message through to the cache.
    pub fn insert(&self, conv: &ConversationId, msg: Message, now_ms: u64) {
        let mut g = self.lock();
        let inner = &mut *g;
        let q = inner.convs.entry(conv.clone()).or_default();
        if q.back().is_some_and(|b| b.seq + 1 != msg.seq) {
            // Not contiguous (e.g. after a snapshot install): start the run again.
            inner.bytes -= q.iter().map(size_of).sum::<usize>();
            q.clear();
        }
        let sz = size_of(&msg);
        inner.order.push_back((conv.clone(), msg.seq, sz));
        q.push_back(msg);
        inner.bytes += sz;
        Self::evict(inner, self.budget, now_ms);
    }

    fn evict(inner: &mut Inner, budget: usize, now_ms: u64) {
        let horizon = now_ms.saturating_sub(WINDOW_MS);
        while let Some((conv, seq, sz)) = inner.order.front().cloned() {
            let Some(q) = inner.convs.get_mut(&conv) else {
                inner.order.pop_front();
                continue;
            };
            let front = q.front().map(|m| (m.seq, m.ts));
            match front {
                Some((s, ts)) if s == seq => {
                    if inner.bytes <= budget && ts >= horizon {
                        break;
                    }
                    q.pop_front();
                    inner.bytes -= sz;
                    if q.is_empty() {
                        inner.convs.remove(&conv);
                    }
                    inner.order.pop_front();
                }
                // Stale bookkeeping of a run that was restarted.
                _ => {
                    inner.order.pop_front();
                }
            }
        }
    }

    /// Messages `lo..=hi` of `conv` if they are all cached; counts a hit or a miss.
    pub fn range(&self, conv: &ConversationId, lo: u64, hi: u64, now_ms: u64) -> Option<Vec<Message>> {
        let g = self.lock();
        let horizon = now_ms.saturating_sub(WINDOW_MS);
        let hit = g.convs.get(conv).and_then(|q| {
            let first = q.front()?;
            let last = q.back()?;
            if first.seq <= lo && hi <= last.seq {
                let from = (lo - first.seq) as usize;
                let to = (hi - first.seq) as usize;
                let page: Vec<Message> = q.range(from..=to).cloned().collect();
                page.iter().all(|m| m.ts >= horizon).then_some(page)
            } else {
                None
            }
        });
        if hit.is_some() {
            self.hits.inc();
        } else {
            self.misses.inc();
        }
        hit
    }

    /// Drops cached messages of `conv` up to `seq` (deleted by message retention, oldest
    /// first).
    pub fn forget_through(&self, conv: &ConversationId, seq: u64) {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(q) = inner.convs.get_mut(conv) else { return };
        let mut freed = 0;
        while q.front().is_some_and(|m| m.seq <= seq) {
            if let Some(m) = q.pop_front() {
                freed += size_of(&m);
            }
        }
        if q.is_empty() {
            inner.convs.remove(conv);
        }
        // Their `order` entries are stale now; eviction skips those.
        inner.bytes -= freed;
    }

    /// Drops everything (snapshot install replaces the shard's state).
    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::UserId;

    fn msg(seq: u64, ts: u64) -> Message {
        Message { seq, from: UserId::parse("a").unwrap(), text: "x".repeat(34), ts, client_msg_id: "c".into() }
    }
    fn cache(budget: usize) -> RecentCache {
        RecentCache::new(
            budget,
            prometheus::IntCounter::new("h", "h").unwrap(),
            prometheus::IntCounter::new("m", "m").unwrap(),
        )
    }

    #[test]
    fn serves_contiguous_runs_and_counts() {
        let c = cache(1 << 20);
        let conv = ConversationId::parse("a~b").unwrap();
        for s in 1..=10 {
            c.insert(&conv, msg(s, 1000 + s), 2000);
        }
        let page = c.range(&conv, 3, 5, 2000).unwrap();
        assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(c.range(&conv, 9, 11, 2000).is_none());
        assert_eq!((c.hits.get(), c.misses.get()), (1, 1));
        // A gap restarts the run.
        c.insert(&conv, msg(20, 1100), 2000);
        assert!(c.range(&conv, 10, 10, 2000).is_none());
        assert_eq!(c.range(&conv, 20, 20, 2000).unwrap().len(), 1);
    }

    #[test]
    fn stays_within_budget_and_window() {
        let c = cache(1000); // 10 messages of 100 bytes
        let conv = ConversationId::parse("a~b").unwrap();
        for s in 1..=50 {
            c.insert(&conv, msg(s, 10), 20);
        }
        assert!(c.bytes() <= 1000);
        assert!(c.range(&conv, 41, 50, 20).is_some());
        assert!(c.range(&conv, 40, 50, 20).is_none());
        // Older than 24 hours: evicted on the next insert.
        c.insert(&conv, msg(51, WINDOW_MS + 100), WINDOW_MS + 100);
        assert!(c.range(&conv, 50, 51, WINDOW_MS + 100).is_none());
        assert!(c.range(&conv, 51, 51, WINDOW_MS + 100).is_some());
    }
}
