//! The node's write-ahead log: the Raft logs, votes and commit marks of every local shard,
//! in segment files beside sled, made durable by one writer with group commit.
//!
//! Why not sled: the Raft log is append-mostly and read back only for replication and
//! apply. Keeping it in sled cost a sled insert per entry on every replica, a sled flush per
//! commit round and sled's I/O thread pool churning for each; and sled's flush is not an
//! fsync. Here an append is one buffered write plus one shared `fdatasync`.
//!
//! Layout: `<data>/wal/<first-seq>.wal`, each segment up to [`SEGMENT_BYTES`]. A segment is a
//! sequence of frames `[u32 len][u32 crc32][payload]` (little endian); the payload is a JSON
//! [`Record`]. Every segment begins with a checkpoint of every shard's vote, commit mark and
//! purge point, so a segment is never needed for metadata once a newer one exists.
//!
//! The writer thread drains every queued record, writes them in one `write`, calls
//! `fdatasync` once and only then completes the appends and votes it covered: under load,
//! one sync covers many shards' appends (group commit). Segments whose entries are all
//! purged are deleted, oldest first ([`writer`]).
//!
//! Records nobody waits for and that need no sync of their own (commit marks, truncations)
//! do not wake the writer: they wait in the queue for the next record that must be synced,
//! and are written ahead of it in the same round, or for at most [`LAZY_DELAY`]. openraft
//! saves a commit mark after every advance, on every replica, so before this each committed
//! entry cost every node one more wake-up and `write` of the writer thread; a commit mark
//! lost in a crash is learnt again from the leader (and one behind the applied state is
//! taken as the applied index), as before, when it was written but not synced. A writer
//! that found nothing queued for a whole `LAZY_DELAY` sleeps until the next record of
//! either kind, so an idle node's writer does not wake at all.
//!
//! Recovery replays the segments in order. A torn or corrupt frame at the end of the last
//! segment (a crash mid-write) is cut off; one anywhere else refuses the start ([`replay`]).

use crate::metrics::Metrics;
use crate::shard::ShardId;
use crate::types::TypeConfig;
use openraft::storage::LogFlushed;
use openraft::{Entry, LogId, RaftLogId, Vote};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Entries per shard kept decoded in memory (the rest are read back from the segments).
const CACHED_ENTRIES: usize = 2048;
const FRAME_HEADER: usize = 8;
/// A frame larger than this is corruption, not data.
const MAX_FRAME: u32 = 256 << 20;
/// How long records that need no sync of their own wait for one that does (module docs).
pub const LAZY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

type NodeId = u64;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("write-ahead log segment {path} is corrupt at byte {offset}: {reason}; it is not the last segment, so this is not a torn write; restore this node from its peers")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("the write-ahead log writer has stopped")]
    Stopped,
}

/// Per-shard metadata that must survive restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub vote: Option<Vote<NodeId>>,
    pub committed: Option<LogId<NodeId>>,
    pub purged: Option<LogId<NodeId>>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Entry {
        shard: ShardId,
        entry: Entry<TypeConfig>,
    },
    /// Entries from `since` on are gone (a new leader overwrote them).
    Truncate {
        shard: ShardId,
        since: u64,
    },
    Purge {
        shard: ShardId,
        upto: LogId<NodeId>,
    },
    Vote {
        shard: ShardId,
        vote: Vote<NodeId>,
    },
    Committed {
        shard: ShardId,
        committed: Option<LogId<NodeId>>,
    },
    Checkpoint {
        shards: Vec<(ShardId, ShardMeta)>,
    },
    /// Everything about the shard before this is gone: it left this node (a replica move).
    /// Builds before cluster version 3 cannot read it.
    Forget {
        shard: ShardId,
    },
}

/// [`Record::Entry`] by reference: the same JSON without moving the entry.
#[derive(Serialize)]
#[serde(rename = "Record")]
enum EntryRecord<'a> {
    Entry { shard: ShardId, entry: &'a Entry<TypeConfig> },
}

/// Where an entry's frame is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

struct Slot {
    log_id: LogId<NodeId>,
    loc: Option<Loc>,
    entry: Option<Entry<TypeConfig>>,
}

/// One shard's log as held in memory: every live entry's location, recent entries decoded.
#[derive(Default)]
pub struct ShardLog {
    slots: BTreeMap<u64, Slot>,
    cached: std::collections::VecDeque<u64>,
    pub meta: ShardMeta,
}

impl ShardLog {
    pub fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.slots.values().next_back().map(|s| s.log_id).or(self.meta.purged)
    }

    fn remove_from(&mut self, since: u64) {
        let _ = self.slots.split_off(&since);
        self.cached.retain(|i| *i < since);
    }

    fn remove_upto(&mut self, upto: u64) {
        self.slots = self.slots.split_off(&(upto + 1));
        self.cached.retain(|i| *i > upto);
    }

    fn insert(&mut self, entry: Entry<TypeConfig>, loc: Option<Loc>, keep: bool) {
        let index = entry.get_log_id().index;
        self.remove_from(index);
        let log_id = *entry.get_log_id();
        let entry = keep.then_some(entry);
        if entry.is_some() {
            self.cached.push_back(index);
        }
        self.slots.insert(index, Slot { log_id, loc, entry });
        // Evict decoded entries already on disk, oldest first.
        while self.cached.len() > CACHED_ENTRIES {
            let Some(front) = self.cached.front().copied() else { break };
            match self.slots.get_mut(&front) {
                Some(s) if s.loc.is_none() => break,
                Some(s) => {
                    s.entry = None;
                    self.cached.pop_front();
                }
                None => {
                    self.cached.pop_front();
                }
            }
        }
    }
}

/// What to do once a job's records are durable (or failed to become so).
type Callback = Box<dyn FnOnce(io::Result<()>) + Send>;

enum Done {
    Call(Callback),
    Wait(oneshot::Sender<io::Result<()>>),
    Nothing,
}

struct Job {
    frames: Vec<u8>,
    /// For entry frames: (shard, index, log id, offset of the frame within `frames`, len).
    entries: Vec<(ShardId, LogId<NodeId>, usize, u32)>,
    done: Done,
    /// Must be on stable storage before anyone relies on it (and wakes the writer). Lazy
    /// jobs (commit marks, truncations) wait in the queue for a synced one, which covers
    /// them, or for [`LAZY_DELAY`], and are then written without `fdatasync`.
    sync: bool,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Highest entry index per shard written to this segment.
    max_index: HashMap<ShardId, u64>,
}

struct Shared {
    dir: PathBuf,
    shards: Mutex<BTreeMap<ShardId, Arc<Mutex<ShardLog>>>>,
    segments: Mutex<BTreeMap<u64, Segment>>,
}

/// Jobs waiting for the writer, in the order they were submitted.
#[derive(Default)]
struct Queue {
    pending: Mutex<Pending>,
    ready: Condvar,
}

#[derive(Default)]
struct Pending {
    jobs: Vec<Job>,
    /// A job that must be synced waits: the writer goes now.
    urgent: bool,
    /// Every handle of the log is gone: the writer writes what is queued and stops.
    closed: bool,
    /// The writer has stopped: nothing submitted any more would be written.
    stopped: bool,
    /// The writer found nothing queued for a whole `LAZY_DELAY` and sleeps until a job (of
    /// either kind) wakes it.
    idle: bool,
    /// Times the writer woke (tests: an idle writer stays asleep).
    wakeups: u64,
}

impl Queue {
    fn push(&self, job: Job) -> Result<(), WalError> {
        let wake;
        {
            let mut p = lock(&self.pending);
            if p.stopped {
                return Err(WalError::Stopped);
            }
            // A lazy job wakes only an idle writer (which then waits `LAZY_DELAY` for a
            // synced one); a busy writer is never idle, so marks still ride on its rounds.
            wake = job.sync || p.idle;
            p.idle = false;
            p.urgent |= job.sync;
            p.jobs.push(job);
        }
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// The writer's next round: every queued job, once one must be synced, lazy ones have
    /// waited [`LAZY_DELAY`], or the log is closed; `None` once closed and drained. A writer
    /// that finds nothing queued for a whole `LAZY_DELAY` sleeps until the next job, so an
    /// idle node's writer does not wake at all.
    fn take(&self) -> Option<Vec<Job>> {
        let mut p = lock(&self.pending);
        loop {
            if p.urgent || (p.closed && !p.jobs.is_empty()) {
                break;
            }
            if p.closed {
                return None;
            }
            if p.idle {
                p = self.ready.wait(p).unwrap_or_else(|e| e.into_inner());
                p.wakeups += 1;
                continue;
            }
            let (guard, waited) = self.ready.wait_timeout(p, LAZY_DELAY).unwrap_or_else(|e| e.into_inner());
            p = guard;
            p.wakeups += 1;
            if waited.timed_out() {
                if !p.jobs.is_empty() {
                    break;
                }
                p.idle = true;
            }
        }
        p.idle = false;
        p.urgent = false;
        Some(std::mem::take(&mut p.jobs))
    }

    /// The writer stopped (its thread ended or panicked): refuse new jobs and drop the
    /// queued ones, so their waiters hear `Stopped` instead of waiting for ever.
    fn stop(&self) {
        let jobs = {
            let mut p = lock(&self.pending);
            p.stopped = true;
            std::mem::take(&mut p.jobs)
        };
        drop(jobs);
    }
}

/// The submitting side of the queue: when the last handle of the log is dropped, the writer
/// writes what is queued and stops. (A process that exits meanwhile may not let it: what
/// can still be queued then is lazy records, which a crash may lose anyway.)
struct Submitter(Arc<Queue>);

impl Drop for Submitter {
    fn drop(&mut self) {
        lock(&self.0.pending).closed = true;
        self.0.ready.notify_one();
    }
}

/// The node's write-ahead log (cheap to clone).
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
    queue: Arc<Submitter>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_HEADER + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn encode(r: &Record) -> io::Result<Vec<u8>> {
    serde_json::to_vec(r).map(|p| frame(&p)).map_err(io::Error::other)
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

impl Wal {
    /// Opens (or creates) the log under `dir`, replays it and starts the writer thread.
    pub fn open(dir: &Path, metrics: Metrics) -> Result<Self, WalError> {
        Self::open_with(dir, metrics, SEGMENT_BYTES)
    }

    /// [`Wal::open`] with segments of `segment_bytes` (small ones exercise rotation in tests).
    pub fn open_with(dir: &Path, metrics: Metrics, segment_bytes: u64) -> Result<Self, WalError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WalError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut seqs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".wal")?.parse().ok())
            .collect();
        seqs.sort_unstable();
        let (shards, segments, tail) = replay::segments(dir, &seqs)?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            shards: Mutex::new(shards.into_iter().map(|(s, l)| (s, Arc::new(Mutex::new(l)))).collect()),
            segments: Mutex::new(segments),
        });
        let (active, size) = match tail {
            Some(t) => t,
            None => {
                let seq = 1;
                let path = segment_path(dir, seq);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(io(&path))?;
                File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
                lock(&shared.segments).insert(seq, Segment { file: Arc::new(file), path, max_index: HashMap::new() });
                (seq, 0)
            }
        };
        let queue = Arc::new(Queue::default());
        let writer = Writer {
            shared: shared.clone(),
            queue: queue.clone(),
            active,
            size,
            metrics,
            buf: Vec::new(),
            segment_bytes,
        };
        std::thread::Builder::new()
            .name("raftchat-wal".into())
            .spawn(move || writer.run())
            .map_err(|source| WalError::Io { path: dir.to_path_buf(), source })?;
        Ok(Self { shared, queue: Arc::new(Submitter(queue)) })
    }

    /// Shards with anything in the log (entries, a vote, a commit mark or a purge point).
    pub fn shards(&self) -> Vec<ShardId> {
        lock(&self.shared.shards)
            .iter()
            .filter(|(_, l)| {
                let l = lock(l);
                !l.slots.is_empty() || l.meta != ShardMeta::default()
            })
            .map(|(s, _)| *s)
            .collect()
    }

    /// Nothing in the log yet (a fresh data folder).
    pub fn is_empty(&self) -> bool {
        self.shards().is_empty()
    }

    /// The in-memory log of `shard` (created empty if the shard has no records yet).
    pub fn shard(&self, shard: ShardId) -> Arc<Mutex<ShardLog>> {
        lock(&self.shared.shards).entry(shard).or_default().clone()
    }

    fn submit(&self, job: Job) -> Result<(), WalError> {
        self.queue.0.push(job)
    }

    /// Appends `entries` of `shard`; openraft's `cb` is completed once they are fsynced.
    pub fn append(
        &self,
        shard: ShardId,
        log: &Mutex<ShardLog>,
        entries: Vec<Entry<TypeConfig>>,
        cb: LogFlushed<TypeConfig>,
    ) -> io::Result<()> {
        self.append_then(shard, log, entries, Box::new(move |r| cb.log_io_completed(r)))
    }

    /// Appends `entries` of `shard` (readable at once) and calls `done` once they are
    /// fsynced, from the writer thread.
    pub fn append_then(
        &self,
        shard: ShardId,
        log: &Mutex<ShardLog>,
        entries: Vec<Entry<TypeConfig>>,
        done: Callback,
    ) -> io::Result<()> {
        let mut frames = Vec::new();
        let mut located = Vec::with_capacity(entries.len());
        {
            let mut l = lock(log);
            for entry in entries {
                let at = frames.len();
                let log_id = *entry.get_log_id();
                let f = serde_json::to_vec(&EntryRecord::Entry { shard, entry: &entry })
                    .map(|p| frame(&p))
                    .map_err(io::Error::other)?;
                located.push((shard, log_id, at, f.len() as u32));
                frames.extend_from_slice(&f);
                l.insert(entry, None, true);
            }
        }
        match self.submit(Job { frames, entries: located, done: Done::Call(done), sync: true }) {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }

    /// Records a metadata change; waits for its fsync when `durable`.
    /// `durable`: wait until it is synced. A purge is synced (not waited for) even so: the
    /// segments it frees are deleted after its round.
    async fn meta(&self, rec: Record, durable: bool) -> io::Result<()> {
        let sync = durable || matches!(rec, Record::Purge { .. });
        let frames = encode(&rec)?;
        if durable {
            let (tx, rx) = oneshot::channel();
            self.submit(Job { frames, entries: vec![], done: Done::Wait(tx), sync: true }).map_err(io::Error::other)?;
            rx.await.map_err(|_| io::Error::other(WalError::Stopped))?
        } else {
            self.submit(Job { frames, entries: vec![], done: Done::Nothing, sync }).map_err(io::Error::other)
        }
    }

    pub async fn save_vote(&self, shard: ShardId, log: &Mutex<ShardLog>, vote: Vote<NodeId>) -> io::Result<()> {
        lock(log).meta.vote = Some(vote);
        self.meta(Record::Vote { shard, vote }, true).await
    }

    /// Not waited for: a lost commit mark is learnt again from the leader.
    pub async fn save_committed(
        &self,
        shard: ShardId,
        log: &Mutex<ShardLog>,
        committed: Option<LogId<NodeId>>,
    ) -> io::Result<()> {
        lock(log).meta.committed = committed;
        self.meta(Record::Committed { shard, committed }, false).await
    }

    /// Drops entries from `since` on; ordered before any later append of the shard.
    pub async fn truncate(&self, shard: ShardId, log: &Mutex<ShardLog>, since: u64) -> io::Result<()> {
        lock(log).remove_from(since);
        self.meta(Record::Truncate { shard, since }, false).await
    }

    /// Drops entries up to `upto` (their effect is in a durable snapshot).
    pub async fn purge(&self, shard: ShardId, log: &Mutex<ShardLog>, upto: LogId<NodeId>) -> io::Result<()> {
        {
            let mut l = lock(log);
            l.remove_upto(upto.index);
            l.meta.purged = Some(upto);
        }
        self.meta(Record::Purge { shard, upto }, false).await
    }

    /// Forgets everything about `shard` (entries, vote, commit mark, purge point): the
    /// shard left this node and its group is shut down. Durable when this returns; the
    /// segments only its entries kept alive can then be deleted.
    pub async fn forget(&self, shard: ShardId) -> io::Result<()> {
        let frames = encode(&Record::Forget { shard })?;
        let (tx, rx) = oneshot::channel();
        let shared = self.shared.clone();
        // Applied in memory once written: every earlier job of the shard is written by then
        // (the writer takes jobs in order), so no segment gains its entries afterwards.
        let done: Callback = Box::new(move |r: io::Result<()>| {
            if r.is_ok() {
                let log = lock(&shared.shards).get(&shard).cloned();
                if let Some(l) = log {
                    *lock(&l) = ShardLog::default();
                }
                for seg in lock(&shared.segments).values_mut() {
                    seg.max_index.remove(&shard);
                }
            }
            let _ = tx.send(r);
        });
        self.submit(Job { frames, entries: vec![], done: Done::Call(done), sync: true }).map_err(io::Error::other)?;
        rx.await.map_err(|_| io::Error::other(WalError::Stopped))?
    }

    /// Entries `[start, end)` of `shard` that are still in the log, in order.
    pub fn read(&self, log: &Mutex<ShardLog>, start: u64, end: u64) -> io::Result<Vec<Entry<TypeConfig>>> {
        let mut out = Vec::new();
        let mut missing = Vec::new();
        {
            let l = lock(log);
            for (i, s) in l.slots.range(start..end) {
                match (&s.entry, s.loc) {
                    (Some(e), _) => out.push(Some(e.clone())),
                    (None, Some(loc)) => {
                        missing.push((out.len(), *i, loc));
                        out.push(None);
                    }
                    (None, None) => {
                        return Err(io::Error::other(format!("log entry {i} is neither cached nor written")))
                    }
                }
            }
        }
        for (pos, index, loc) in missing {
            let file = lock(&self.shared.segments)
                .get(&loc.segment)
                .map(|s| s.file.clone())
                .ok_or_else(|| io::Error::other(format!("log entry {index}: segment {} is gone", loc.segment)))?;
            let mut buf = vec![0u8; loc.len as usize];
            file.read_exact_at(&mut buf, loc.offset)?;
            let short = || io::Error::other(format!("log entry {index}: frame shorter than its header"));
            let payload = buf.get(FRAME_HEADER..).ok_or_else(short)?;
            let crc = u32::from_le_bytes(buf.get(4..8).ok_or_else(short)?.try_into().unwrap_or_default());
            if crc32fast::hash(payload) != crc {
                return Err(io::Error::other(format!("log entry {index}: checksum mismatch")));
            }
            match serde_json::from_slice(payload).map_err(io::Error::other)? {
                Record::Entry { entry, .. } => out[pos] = Some(entry),
                _ => return Err(io::Error::other(format!("log entry {index}: the frame holds another record"))),
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Number of segment files (for tests and metrics).
    pub fn segments(&self) -> usize {
        lock(&self.shared.segments).len()
    }
}

mod replay;
#[cfg(test)]
mod tests;
mod writer;
use writer::Writer;
