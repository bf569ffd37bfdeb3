//! openraft log storage for one shard, on the node's write-ahead log ([`super::wal`]).
//!
//! An append is reported flushed only after the WAL writer has `fdatasync`ed it; a vote is
//! fsynced before `save_vote` returns. Purging first makes the state machine durable (sled
//! flush + `fdatasync`), since the purged entries could otherwise no longer rebuild it.

// openraft's traits fix the error type (`StorageError`, large); helpers return it too.
#![allow(clippy::result_large_err)]

use super::flusher::Flusher;
use super::wal::{ShardLog, Wal};
use crate::shard::ShardId;
use crate::types::TypeConfig;
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type NodeId = u64;
type SResult<T> = Result<T, StorageError<NodeId>>;

#[derive(Clone)]
pub struct LogStore {
    shard: ShardId,
    wal: Wal,
    log: Arc<Mutex<ShardLog>>,
    flusher: Flusher,
    /// Last committed index, for metrics.
    pub committed_index: Arc<AtomicU64>,
}

impl LogStore {
    pub fn new(shard: ShardId, wal: Wal, flusher: Flusher) -> Self {
        let log = wal.shard(shard);
        Self { shard, wal, log, flusher, committed_index: Arc::new(AtomicU64::new(0)) }
    }

    fn meta(&self) -> super::wal::ShardMeta {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).meta.clone()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.wal.read(&self.log, start, end).map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let l = self.log.lock().unwrap_or_else(|p| p.into_inner());
        Ok(LogState { last_purged_log_id: l.meta.purged, last_log_id: l.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        self.wal.save_vote(self.shard, &self.log, *vote).await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        Ok(self.meta().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> SResult<()> {
        if let Some(c) = committed {
            self.committed_index.store(c.index, Ordering::Relaxed);
        }
        self.wal.save_committed(self.shard, &self.log, committed).await.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<NodeId>>> {
        let c = self.meta().committed;
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
        let entries: Vec<_> = entries.into_iter().collect();
        self.wal.append(self.shard, &self.log, entries, callback).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.wal.truncate(self.shard, &self.log, log_id.index).await.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        // Everything applied so far (state machine, snapshot) must be durable before the
        // log entries that could rebuild it go away.
        self.flusher.sync().await.map_err(|e| StorageIOError::write_logs(&e))?;
        self.wal.purge(self.shard, &self.log, log_id).await.map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
