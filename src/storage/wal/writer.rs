//! The writer thread: takes every queued job once one must be synced (lazy ones wait for
//! it, or for `LAZY_DELAY`), writes their frames in one `write`, calls `fdatasync` once
//! (unless every job is lazy) and only then completes them (group commit); rotates segments
//! and deletes those whose entries are all purged.

use super::{encode, lock, segment_path, Done, Job, Loc, Queue, Record, Segment, ShardMeta, Shared};
use crate::metrics::Metrics;
use crate::shard::ShardId;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) queue: Arc<Queue>,
    pub(super) active: u64,
    pub(super) size: u64,
    pub(super) metrics: Metrics,
    pub(super) buf: Vec<u8>,
    pub(super) segment_bytes: u64,
}

impl Writer {
    pub(super) fn run(mut self) {
        // However the loop ends (the log closed, or a panic), later submissions are refused.
        struct Stop(Arc<Queue>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.stop();
            }
        }
        let _stop = Stop(self.queue.clone());
        while let Some(jobs) = self.queue.take() {
            let start = Instant::now();
            let res = self.write(&jobs);
            self.metrics.fsync_seconds.observe(start.elapsed().as_secs_f64());
            self.metrics.fsync_batch.observe(jobs.len() as f64);
            match &res {
                // Segments this write made garbage (a purge) go before anyone hears of it.
                Ok(_) => self.collect_garbage(),
                Err(e) => tracing::error!(cause = %e, "write-ahead log write failed"),
            }
            for j in jobs {
                let r = res.as_ref().map(|_| ()).map_err(|e| io::Error::new(e.kind(), e.to_string()));
                match j.done {
                    Done::Call(f) => f(r),
                    Done::Wait(tx) => {
                        let _ = tx.send(r);
                    }
                    Done::Nothing => {}
                }
            }
        }
    }

    fn write(&mut self, jobs: &[Job]) -> io::Result<()> {
        let total: usize = jobs.iter().map(|j| j.frames.len()).sum();
        if self.size > 0 && self.size + total as u64 > self.segment_bytes {
            self.rotate()?;
        }
        let (file, seg) = {
            let segs = lock(&self.shared.segments);
            let s = segs.get(&self.active).ok_or_else(|| io::Error::other("active segment missing"))?;
            (s.file.clone(), self.active)
        };
        self.buf.clear();
        let base = self.size;
        let mut located = Vec::new();
        for j in jobs {
            let at = base + self.buf.len() as u64;
            for (shard, log_id, off, len) in &j.entries {
                located.push((*shard, *log_id, Loc { segment: seg, offset: at + *off as u64, len: *len }));
            }
            self.buf.extend_from_slice(&j.frames);
        }
        // Positioned writes: the descriptor's own offset is not the segment's end after a
        // reopen (and never needs to be).
        file.write_all_at(&self.buf, base)?;
        if !cfg!(feature = "fault-unsynced-wal") && jobs.iter().any(|j| j.sync) {
            file.sync_data()?;
            self.metrics.fsync_rounds.inc();
        }
        self.size += self.buf.len() as u64;
        // Entries now have a place on disk; their decoded copies may be evicted later.
        let shards = lock(&self.shared.shards).clone();
        let mut max_index: HashMap<ShardId, u64> = HashMap::new();
        for (shard, log_id, loc) in located {
            let m = max_index.entry(shard).or_default();
            *m = (*m).max(log_id.index);
            if let Some(l) = shards.get(&shard) {
                if let Some(s) = lock(l).slots.get_mut(&log_id.index) {
                    if s.log_id == log_id {
                        s.loc = Some(loc);
                    }
                }
            }
        }
        if let Some(s) = lock(&self.shared.segments).get_mut(&seg) {
            for (shard, i) in max_index {
                let m = s.max_index.entry(shard).or_default();
                *m = (*m).max(i);
            }
        }
        Ok(())
    }

    /// Starts a new segment, opening with a checkpoint of every shard's metadata.
    fn rotate(&mut self) -> io::Result<()> {
        // Lazy records at the old segment's end must not be lost behind synced ones in the
        // new segment (a truncation would come undone under newer entries).
        if let Some(old) = lock(&self.shared.segments).get(&self.active) {
            old.file.sync_data()?;
        }
        let seq = self.active + 1;
        let path = segment_path(&self.shared.dir, seq);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        let metas: Vec<(ShardId, ShardMeta)> =
            lock(&self.shared.shards).iter().map(|(s, l)| (*s, lock(l).meta.clone())).collect();
        let cp = encode(&Record::Checkpoint { shards: metas })?;
        file.write_all_at(&cp, 0)?;
        file.sync_data()?;
        File::open(&self.shared.dir)?.sync_all()?;
        lock(&self.shared.segments).insert(seq, Segment { file: Arc::new(file), path, max_index: HashMap::new() });
        self.active = seq;
        self.size = cp.len() as u64;
        tracing::info!(segment = seq, "started a new write-ahead log segment");
        Ok(())
    }

    /// Deletes the oldest segments whose entries are all purged.
    fn collect_garbage(&mut self) {
        loop {
            let purged: HashMap<ShardId, u64> = lock(&self.shared.shards)
                .iter()
                .map(|(s, l)| (*s, lock(l).meta.purged.map(|p| p.index).unwrap_or(0)))
                .collect();
            let mut segs = lock(&self.shared.segments);
            let Some((&oldest, seg)) = segs.iter().next() else { return };
            if oldest == self.active {
                return;
            }
            let done = seg.max_index.iter().all(|(s, i)| purged.get(s).is_some_and(|p| i <= p));
            if !done {
                return;
            }
            let path = seg.path.clone();
            segs.remove(&oldest);
            drop(segs);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "deleted a fully purged write-ahead log segment"),
                Err(e) => tracing::warn!(path = %path.display(), cause = %e, "cannot delete a purged log segment"),
            }
        }
    }
}
