//! openraft log storage for one shard: entries in `s<N>.log` keyed by big-endian index,
//! vote / committed / purged ids in `s<N>.meta`.
//!
//! An append is reported flushed only after the node's flusher has fsynced it; the vote is
//! fsynced before `save_vote` returns.

// openraft's traits fix the error type (`StorageError`, large); helpers return it too.
#![allow(clippy::result_large_err)]

use super::flusher::Flusher;
use super::{decode, encode};
use crate::raft::TypeConfig;
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogId, StorageError, StorageIOError, Vote};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

type NodeId = u64;
type SResult<T> = Result<T, StorageError<NodeId>>;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    flusher: Flusher,
    /// Last committed index, for metrics.
    pub committed_index: Arc<AtomicU64>,
}

fn io_err<E: std::error::Error + 'static>(e: E) -> StorageIOError<NodeId> {
    StorageIOError::write_logs(&e)
}

impl LogStore {
    pub fn new(log: sled::Tree, meta: sled::Tree, flusher: Flusher) -> Self {
        Self { log, meta, flusher, committed_index: Arc::new(AtomicU64::new(0)) }
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> SResult<Option<T>> {
        match self.meta.get(key).map_err(|e| StorageIOError::read_logs(&e))? {
            Some(v) => Ok(Some(decode(key, &v).map_err(|e| StorageIOError::read_logs(&e))?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], v: &T) -> SResult<()> {
        self.meta.insert(key, encode(v)).map_err(io_err)?;
        Ok(())
    }
}

fn bound_key(b: Bound<&u64>) -> Bound<[u8; 8]> {
    match b {
        Bound::Included(i) => Bound::Included(i.to_be_bytes()),
        Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<TypeConfig>>> {
        let r = (bound_key(range.start_bound()), bound_key(range.end_bound()));
        let mut out = Vec::new();
        for kv in self.log.range::<[u8; 8], _>(r) {
            let (k, v) = kv.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(decode(&k, &v).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(PURGED)?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((k, v)) => {
                let e: Entry<TypeConfig> = decode(&k, &v).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(*e.get_log_id())
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        self.put_meta(VOTE, vote)?;
        self.flusher.sync().await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> SResult<()> {
        if let Some(c) = committed {
            self.committed_index.store(c.index, Ordering::Relaxed);
        }
        // Not fsynced on its own: it rides along with the next log flush. Losing it only
        // means re-learning the commit index from the leader.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<NodeId>>> {
        let c: Option<Option<LogId<NodeId>>> = self.get_meta(COMMITTED)?;
        let c = c.flatten();
        if let Some(c) = c {
            self.committed_index.store(c.index, Ordering::Relaxed);
        }
        Ok(c)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&e.get_log_id().index.to_be_bytes(), encode(&e));
        }
        self.log.apply_batch(batch).map_err(io_err)?;
        self.flusher.log_flushed(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(log_id.index.to_be_bytes()..).keys() {
            batch.remove(k.map_err(io_err)?);
        }
        self.log.apply_batch(batch).map_err(io_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        // Everything applied so far (state machine, snapshot) must be durable before the
        // log entries that could rebuild it go away.
        self.flusher.sync().await.map_err(io_err)?;
        self.put_meta(PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=log_id.index.to_be_bytes()).keys() {
            batch.remove(k.map_err(io_err)?);
        }
        self.log.apply_batch(batch).map_err(io_err)?;
        Ok(())
    }
}
