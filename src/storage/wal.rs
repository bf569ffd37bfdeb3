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
//! purged are deleted, oldest first.
//!
//! Recovery replays the segments in order. A torn or corrupt frame at the end of the last
//! segment (a crash mid-write) is cut off; one anywhere else refuses the start.

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
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::oneshot;

/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Entries per shard kept decoded in memory (the rest are read back from the segments).
const CACHED_ENTRIES: usize = 2048;
const FRAME_HEADER: usize = 8;
/// A frame larger than this is corruption, not data.
const MAX_FRAME: u32 = 256 << 20;

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
    /// Must be on stable storage before anyone relies on it. A round of lazy jobs only
    /// (commit marks, truncations) is written without `fdatasync`; the next synced round
    /// covers it, as it covers everything written to the file before it.
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

/// The node's write-ahead log (cheap to clone).
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Job>,
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

/// Reads the frame at `offset`; `Ok(None)` at a clean end of file.
fn read_frame(file: &File, offset: u64, file_len: u64) -> Result<Option<(Vec<u8>, u32)>, String> {
    if offset == file_len {
        return Ok(None);
    }
    if offset + FRAME_HEADER as u64 > file_len {
        return Err("truncated frame header".into());
    }
    let mut head = [0u8; FRAME_HEADER];
    file.read_exact_at(&mut head, offset).map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(head[..4].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(head[4..].try_into().unwrap_or_default());
    if len > MAX_FRAME || offset + FRAME_HEADER as u64 + len as u64 > file_len {
        return Err(format!("frame of {len} bytes runs past the end"));
    }
    let mut payload = vec![0u8; len as usize];
    file.read_exact_at(&mut payload, offset + FRAME_HEADER as u64).map_err(|e| e.to_string())?;
    if crc32fast::hash(&payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(Some((payload, len + FRAME_HEADER as u32)))
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
        let mut shards: BTreeMap<ShardId, ShardLog> = BTreeMap::new();
        let mut segments = BTreeMap::new();
        let mut tail: Option<(u64, u64)> = None;
        for (k, seq) in seqs.iter().enumerate() {
            let path = segment_path(dir, *seq);
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io(&path))?;
            let len = file.metadata().map_err(io(&path))?.len();
            let last = k + 1 == seqs.len();
            let mut offset = 0u64;
            let mut max_index = HashMap::new();
            loop {
                match read_frame(&file, offset, len) {
                    Ok(None) => break,
                    Ok(Some((payload, flen))) => {
                        let rec: Record = match serde_json::from_slice(&payload) {
                            Ok(r) => r,
                            Err(e) if last => {
                                tracing::warn!(path = %path.display(), offset, cause = %e, "cutting an undecodable record off the log's tail");
                                break;
                            }
                            Err(e) => {
                                return Err(WalError::Corrupt { path, offset, reason: e.to_string() });
                            }
                        };
                        let loc = Loc { segment: *seq, offset, len: flen };
                        if let Record::Forget { shard } = &rec {
                            for seg in segments.values_mut() {
                                let seg: &mut Segment = seg;
                                seg.max_index.remove(shard);
                            }
                        }
                        replay(&mut shards, &mut max_index, rec, loc);
                        offset += flen as u64;
                    }
                    Err(reason) if last => {
                        tracing::warn!(path = %path.display(), offset, %reason, "cutting a torn write off the log's tail");
                        break;
                    }
                    Err(reason) => return Err(WalError::Corrupt { path, offset, reason }),
                }
            }
            if last {
                if offset < len {
                    file.set_len(offset).map_err(io(&path))?;
                    file.sync_all().map_err(io(&path))?;
                }
                tail = Some((*seq, offset));
            }
            segments.insert(*seq, Segment { file: Arc::new(file), path, max_index });
        }
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
        let (tx, rx) = mpsc::channel();
        let writer = Writer { shared: shared.clone(), rx, active, size, metrics, buf: Vec::new(), segment_bytes };
        std::thread::Builder::new()
            .name("raftchat-wal".into())
            .spawn(move || writer.run())
            .map_err(|source| WalError::Io { path: dir.to_path_buf(), source })?;
        Ok(Self { shared, tx })
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
        self.tx.send(job).map_err(|_| WalError::Stopped)
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

fn replay(shards: &mut BTreeMap<ShardId, ShardLog>, max_index: &mut HashMap<ShardId, u64>, rec: Record, loc: Loc) {
    match rec {
        Record::Entry { shard, entry } => {
            let index = entry.get_log_id().index;
            let m = max_index.entry(shard).or_default();
            *m = (*m).max(index);
            let l = shards.entry(shard).or_default();
            if l.meta.purged.is_some_and(|p| index <= p.index) {
                return;
            }
            l.insert(entry, Some(loc), false);
        }
        Record::Truncate { shard, since } => shards.entry(shard).or_default().remove_from(since),
        Record::Purge { shard, upto } => {
            let l = shards.entry(shard).or_default();
            l.remove_upto(upto.index);
            l.meta.purged = Some(upto);
        }
        Record::Vote { shard, vote } => shards.entry(shard).or_default().meta.vote = Some(vote),
        Record::Committed { shard, committed } => shards.entry(shard).or_default().meta.committed = committed,
        Record::Forget { shard } => {
            max_index.remove(&shard);
            shards.remove(&shard);
        }
        Record::Checkpoint { shards: metas } => {
            for (shard, meta) in metas {
                let l = shards.entry(shard).or_default();
                if let Some(p) = meta.purged {
                    if l.meta.purged.is_none_or(|q| q.index < p.index) {
                        l.remove_upto(p.index);
                    }
                }
                l.meta = meta;
            }
        }
    }
}

struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Job>,
    active: u64,
    size: u64,
    metrics: Metrics,
    buf: Vec<u8>,
    segment_bytes: u64,
}

impl Writer {
    fn run(mut self) {
        while let Ok(first) = self.rx.recv() {
            let mut jobs = vec![first];
            while let Ok(j) = self.rx.try_recv() {
                jobs.push(j);
            }
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

#[cfg(test)]
mod tests;
