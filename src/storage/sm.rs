//! openraft state machine for one shard: applies [`Command`]s through the pure
//! [`crate::chat::state::apply`] and commits each entry's changes together with the
//! applied log id in one atomic sled batch. Also builds and installs snapshots.
//!
//! Snapshots are files ([`super::snapshot`]): the shard's whole state-machine tree as
//! records, written a record at a time while applies go on and made a consistent cut at the
//! end ([`build`]: the keys written meanwhile are read again, briefly under the read lock
//! that holds off `apply`), sent and received in 1 MiB chunks, installed a batch of at most
//! 4 MiB at a time. An install is not one atomic batch: the snapshot's meta is first recorded under
//! [`INSTALLING`] (durably), and a node restarted midway loads the file again at open.

mod build;

use super::flusher::Flusher;
use super::keys::{self, ShardView};
use super::points::{Cached, PointCache};
use super::snapshot::{self, SnapFile, SnapshotDir};
use super::{decode, encode, StoreError};
use crate::cache::RecentCache;
use crate::chat::{state, InboxEvent, Reply, UserId};
use crate::types::TypeConfig;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogId, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::broadcast;
use tokio::sync::RwLock;

type NodeId = u64;
type Node = openraft::BasicNode;
type SResult<T> = Result<T, StorageError<NodeId>>;
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, Node>);

/// The current snapshot's meta (its file is [`SnapshotDir::file_of`] its id).
const SNAP_META: &[u8] = b"snapshot.meta";
/// Where builds before snapshot files kept the snapshot itself; moved to a file at open.
const SNAP_DATA: &[u8] = b"snapshot.data";
/// The meta of a snapshot being installed: present at open, the install is redone.
const INSTALLING: &[u8] = b"snapshot.installing";

/// Fault injection for tests (`RAFTCHAT_FAULT=crash-on-joint`): the process aborts when it
/// applies a joint membership config (two voter sets), before it returns. On the leader
/// that change's caller is never answered, so openraft's second step (the new voters) is
/// never proposed: the shard is left committed in the joint config, as when a leader
/// crashes between the two steps. Off unless the variable is set.
pub const CRASH_ON_JOINT: &str = "crash-on-joint";

fn crash_on_joint() -> bool {
    crate::types::fault() == Some(CRASH_ON_JOINT)
}

fn sm_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

#[derive(Clone)]
pub struct StateMachine {
    pub view: ShardView,
    meta: sled::Tree,
    flusher: Flusher,
    pub cache: Arc<RecentCache>,
    /// What applying reads on every message, kept decoded ([`super::points`]).
    points: Arc<std::sync::Mutex<PointCache>>,
    /// Held for writing by `apply` and `install_snapshot`, for reading by snapshot builds
    /// and by multi-key reads ([`StateMachine::read_lock`]).
    lock: Arc<RwLock<()>>,
    /// One snapshot build or install at a time (each replaces the current snapshot file).
    snap_lock: Arc<tokio::sync::Mutex<()>>,
    /// Installs waiting for `snap_lock` (a [`Waiting`] each): a running build gives way
    /// ([`build`]'s `cancel`).
    install_waiting: Arc<std::sync::atomic::AtomicUsize>,
    /// The keys applies write while a snapshot is being built ([`build`]).
    touched: Arc<build::Touched>,
    /// Set once the shard left this node ([`StateMachine::close`]): nothing writes any more.
    closed: Arc<std::sync::atomic::AtomicBool>,
    snaps: SnapshotDir,
    /// New inbox events of this shard's users, as they are applied (delivery reads these).
    pub inbox_tx: broadcast::Sender<InboxNotice>,
    /// The marks ([`keys::MARKS`], bit i for mark i) the tree holds and the folder's label
    /// covers.
    marked: Arc<std::sync::atomic::AtomicU32>,
}

/// What the state machine tells live inbox readers.
#[derive(Debug, Clone)]
pub enum InboxNotice {
    /// Event number `n` of `user` was applied.
    Event(UserId, u64, InboxEvent),
    /// The shard's state was replaced by a snapshot: re-read from storage.
    Resync,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl StateMachine {
    /// Holds applies off while the guard lives. An entry's writes reach sled a key at a
    /// time, so a read of more than one key (a history page and its conversation's meta, a
    /// recent-conversations list and its entries) takes this first to see whole entries:
    /// without it a list read mid-apply can miss a conversation or show it twice.
    pub async fn read_lock(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.lock.read().await
    }

    /// The shard leaves this node: waits for a running apply, snapshot build or install to
    /// end and refuses every later one (openraft's state-machine worker may still hold
    /// queued applies after `Raft::shutdown`), so that deleting the shard's state is final.
    pub async fn close(&self) {
        let _one = self.snap_lock.lock().await;
        let _g = self.lock.write().await;
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Corrupt { key: "-".into(), reason: "the shard left this node".into() });
        }
        Ok(())
    }

    /// Opens the shard's state, first completing an entry a crash cut short (see
    /// [`keys::Writes`]) or a snapshot install a crash cut short, and moving a snapshot
    /// kept inside sled by an older build into its file. `snap_dir` is the shard's snapshot
    /// folder.
    pub fn open(
        tree: sled::Tree,
        meta: sled::Tree,
        flusher: Flusher,
        cache: Arc<RecentCache>,
        snap_dir: PathBuf,
    ) -> Result<Self, StoreError> {
        keys::Writes::recover(&tree)?;
        let current: Option<SnapshotMeta<NodeId, Node>> = match meta.get(SNAP_META)? {
            Some(m) => Some(decode(SNAP_META, &m)?),
            None => None,
        };
        let installing: Option<SnapshotMeta<NodeId, Node>> = match meta.get(INSTALLING)? {
            Some(m) => Some(decode(INSTALLING, &m)?),
            None => None,
        };
        // Keep the file of the snapshot being installed if there is one, else the current one.
        let keep = installing.as_ref().or(current.as_ref()).map(|m| m.snapshot_id.clone());
        let snaps = SnapshotDir::open(snap_dir, keep.as_deref())?;
        if let (Some(m), Some(data)) = (&current, meta.get(SNAP_DATA)?) {
            let part = snaps.part("migrate");
            let io = |source| StoreError::Io { path: part.clone(), source };
            let write = || -> std::io::Result<()> {
                let f = std::fs::File::create(&part)?;
                std::io::Write::write_all(&mut &f, &data)?;
                f.sync_all()?;
                snaps.publish(&part, &m.snapshot_id).map(|_| ())
            };
            write().map_err(io)?;
            meta.remove(SNAP_DATA)?;
            tracing::info!(snapshot = %m.snapshot_id, "moved the snapshot kept in sled into its file");
        }
        let (inbox_tx, _) = broadcast::channel(4096);
        let sm = Self {
            view: ShardView { tree },
            meta,
            flusher,
            cache,
            points: Arc::default(),
            lock: Arc::new(RwLock::new(())),
            snap_lock: Arc::new(tokio::sync::Mutex::new(())),
            install_waiting: Arc::default(),
            touched: Arc::default(),
            closed: Arc::default(),
            snaps,
            inbox_tx,
            marked: Arc::default(),
        };
        sm.note_marks()?;
        if let Some(m) = installing {
            // Crashed midway through an install: its file was complete and fsynced before
            // the tree was touched, so load it again. Made durable by the first sync after.
            let path = sm.snaps.file_of(&m.snapshot_id);
            let records = load_tree(&sm.view.tree, &path, &m)?;
            sm.note_marks()?;
            sm.finish_install(&m)?;
            tracing::info!(snapshot = %m.snapshot_id, records, "completed a snapshot install a restart cut short");
        }
        Ok(sm)
    }

    /// Labels the data folder with the format the tree's marks ask for: 2 if it holds inbox
    /// events without the counter, 3 if it holds recency keys behind their entries (at open,
    /// and after a snapshot install; `storage::FormatLabel`).
    fn note_marks(&self) -> Result<(), StoreError> {
        let mut marked = 0;
        for (i, (mark, format)) in keys::MARKS.into_iter().enumerate() {
            if self.view.tree.contains_key(mark)? && self.flusher.label.needs(format) {
                marked |= 1 << i;
            }
        }
        self.marked.store(marked, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Bit of `mark` in `marked`.
    fn mark_bit(mark: &[u8]) -> u32 {
        keys::MARKS.iter().position(|(m, _)| *m == mark).map_or(0, |i| 1 << i)
    }

    /// Names `meta` the current snapshot and clears the install mark, in one batch.
    fn finish_install(&self, meta: &SnapshotMeta<NodeId, Node>) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        b.insert(SNAP_META, encode(meta));
        b.remove(INSTALLING);
        b.remove(SNAP_DATA);
        self.meta.apply_batch(b)?;
        Ok(())
    }

    fn read_applied(&self) -> Result<AppliedState, StoreError> {
        let tree = &self.view.tree;
        let applied = match tree.get(keys::APPLIED)? {
            Some(v) => decode(keys::APPLIED, &v)?,
            None => None,
        };
        let membership = match tree.get(keys::MEMBERSHIP)? {
            Some(v) => decode(keys::MEMBERSHIP, &v)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    fn points(&self) -> std::sync::MutexGuard<'_, PointCache> {
        self.points.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply_one(&self, entry: &Entry<TypeConfig>) -> Result<Reply, StoreError> {
        let log_id = *entry.get_log_id();
        let mut batch = keys::Writes::default();
        let mut staged = keys::Staged::default();
        let mut points = self.points();
        let reply = match &entry.payload {
            EntryPayload::Blank => Reply::Done,
            EntryPayload::Normal(cmd) => {
                let (changes, reply) = state::apply(cmd, &Cached::new(&self.view, &mut points))?;
                staged = self.view.stage(changes, &mut batch);
                reply
            }
            EntryPayload::Membership(m) => {
                if m.get_joint_config().len() > 1 && crash_on_joint() {
                    tracing::error!(%log_id, "fault injection: aborting while applying a joint membership config");
                    std::process::abort();
                }
                let sm = StoredMembership::new(Some(log_id), m.clone());
                batch.insert(keys::MEMBERSHIP, encode(&sm));
                Reply::Done
            }
        };
        // The first write that needs a newer format (an event without the counter, a
        // recency key left behind its entry) marks the tree, in the same entry's writes; the
        // folder is labelled first (an early label is harmless, a late one is not: a crash
        // in between would leave such writes in a folder an older build accepts).
        // A label that could not be written is tried again by the next such entry.
        let marked = self.marked.load(std::sync::atomic::Ordering::Relaxed);
        let mut newly_marked = 0;
        for mark in staged.marks().filter(|m| marked & Self::mark_bit(m) == 0) {
            if self.flusher.label.needs(keys::format_of_mark(mark).unwrap_or(1)) {
                newly_marked |= Self::mark_bit(mark);
            }
            batch.insert(mark, []);
        }
        batch.insert(keys::APPLIED, encode(&Some(log_id)));
        let committed = batch.commit(&self.view.tree);
        self.touched.record(batch.0.iter().map(|(k, _)| k.as_slice()), committed.is_err());
        if committed.is_err() {
            points.clear();
        }
        committed?;
        self.marked.fetch_or(newly_marked, std::sync::atomic::Ordering::Relaxed);
        points.written(&staged);
        drop(points);
        let now = now_ms();
        for (c, seq) in staged.deleted_messages {
            self.cache.forget_through(&c, seq);
        }
        for (c, m) in staged.messages {
            self.cache.insert(&c, m, now);
        }
        for (u, n, e) in staged.inbox {
            // No receivers is fine: nobody is subscribed here.
            let _ = self.inbox_tx.send(InboxNotice::Event(u, n, e));
        }
        Ok(reply)
    }
}

/// Replaces the tree's contents by the snapshot file's records and `meta`'s applied log id
/// and membership, in bounded batches (not atomic: [`INSTALLING`] covers a crash midway).
fn load_tree(tree: &sled::Tree, path: &Path, meta: &SnapshotMeta<NodeId, Node>) -> Result<u64, StoreError> {
    const BATCH_BYTES: usize = 4 << 20;
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in tree.iter().keys().take(10_000) {
            batch.remove(k?);
            n += 1;
        }
        if n == 0 {
            break;
        }
        tree.apply_batch(batch)?;
    }
    let io = |source| StoreError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut records = 0u64;
    let mut batch = sled::Batch::default();
    let mut held = 0usize;
    for rec in snapshot::RecordReader::new(std::io::BufReader::with_capacity(1 << 20, file)) {
        let (k, v) = rec?;
        held += k.len() + v.len();
        batch.insert(k, v);
        records += 1;
        if held >= BATCH_BYTES {
            tree.apply_batch(std::mem::take(&mut batch))?;
            held = 0;
        }
    }
    batch.insert(keys::APPLIED, encode(&meta.last_log_id));
    batch.insert(keys::MEMBERSHIP, encode(&meta.last_membership));
    tree.apply_batch(batch)?;
    Ok(records)
}

fn join_err(e: tokio::task::JoinError) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &std::io::Error::other(format!("snapshot task failed: {e}"))).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &std::io::Error::other(e.to_string())).into()
}

/// Counts an install as waiting for `snap_lock` until dropped (also when its future is).
struct Waiting(Arc<std::sync::atomic::AtomicUsize>);

impl Waiting {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A build stopped for an install (see `build_snapshot`): the current snapshot stands.
/// (`cancel` says yes only with a current snapshot; `None` cannot come.)
#[allow(clippy::result_large_err)] // openraft's own error type, as its trait methods return it
fn give_way(current: Option<Snapshot<TypeConfig>>, started: std::time::Instant) -> SResult<Snapshot<TypeConfig>> {
    let current = current.ok_or_else(|| snap_err("a snapshot build gave way without a current snapshot"))?;
    tracing::info!(
        after_ms = started.elapsed().as_millis() as u64,
        snapshot = %current.meta.snapshot_id,
        "snapshot build stopped: a snapshot install waits for it (the current snapshot stands)"
    );
    Ok(current)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let _one = self.snap_lock.lock().await;
        self.check_open().map_err(snap_err)?;
        let started = std::time::Instant::now();
        // A build gives way to an install that waits for it (a follower sent a snapshot by
        // its leader would otherwise wait the whole build): it stops and answers with the
        // current snapshot, opened now (under the lock, so no install replaced it), which
        // openraft takes as "nothing newer". Without one (none yet, or its file cannot be
        // opened) there is nothing to answer with, and the build goes on: an error here
        // would stop the shard's Raft core.
        let mut current = RaftStateMachine::get_current_snapshot(&mut self.clone()).await.ok().flatten();
        let cancel = {
            let has_current = current.is_some();
            let waiting = self.install_waiting.clone();
            move || has_current && waiting.load(std::sync::atomic::Ordering::SeqCst) > 0
        };
        {
            let _g = self.lock.read().await;
            self.touched.start();
        }
        let (tree, touched, snaps, c) =
            (self.view.tree.clone(), self.touched.clone(), self.snaps.clone(), cancel.clone());
        let parts =
            tokio::task::spawn_blocking(move || build::unlocked(&tree, &touched, |what| snaps.part(what), &c)).await;
        let mut parts = match parts {
            Ok(Ok(parts)) => parts,
            Ok(Err(StoreError::Cancelled)) => {
                self.touched.stop();
                return give_way(current.take(), started);
            }
            Ok(Err(e)) => {
                self.touched.stop();
                return Err(snap_err(e));
            }
            Err(e) => {
                self.touched.stop();
                return Err(join_err(e));
            }
        };
        let (parts, applied, membership, last, held) = {
            let _g = self.lock.read().await;
            let locked = std::time::Instant::now();
            let (tree, touched, snaps) = (self.view.tree.clone(), self.touched.clone(), self.snaps.clone());
            let (parts, last) = tokio::task::spawn_blocking(move || {
                let last = build::last_patch(&tree, &touched, &mut parts, |what| snaps.part(what));
                (parts, last)
            })
            .await
            .map_err(join_err)?;
            let last = last.map_err(snap_err)?;
            let (applied, membership) = self.read_applied().map_err(sm_err)?;
            (parts, applied, membership, last, locked.elapsed())
        };
        if self.touched.overflowed() {
            tracing::warn!(
                max_keys = build::MAX_TOUCHED,
                held_ms = held.as_millis() as u64,
                "a snapshot build saw too many keys written meanwhile; it wrote the tree again holding the shard's applies"
            );
        }
        let (patched, base_ms, rounds) = (last.len(), parts.base.as_millis() as u64, parts.rounds());
        let merging = std::time::Instant::now();
        let id = match applied {
            Some(l) => format!("{}-{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index, now_ms()),
            None => format!("empty-{}", now_ms()),
        };
        let (snaps, id2, part) = (self.snaps.clone(), id.clone(), self.snaps.part("build"));
        let merged = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let mut parts = parts;
            let built = build::merge(&mut parts, last, &part, &cancel).and_then(|(bytes, records)| {
                let path =
                    snaps.publish(&part, &id2).map_err(|source| StoreError::Io { path: part.clone(), source })?;
                Ok((bytes, records, path))
            });
            if built.is_err() {
                let _ = std::fs::remove_file(&part);
            }
            built
        })
        .await
        .map_err(join_err)?;
        let (bytes, records, path) = match merged {
            Ok(done) => done,
            Err(StoreError::Cancelled) => return give_way(current.take(), started),
            Err(e) => return Err(snap_err(e)),
        };
        let merge_ms = merging.elapsed().as_millis() as u64;
        let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id: id };
        self.meta.insert(SNAP_META, encode(&meta)).map_err(|e| sm_err(e.into()))?;
        self.flusher.sync().await.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        // Only now that the meta names the new file durably may the old one go.
        let _ = self.meta.remove(SNAP_DATA);
        if let Err(e) = self.snaps.remove_others(&meta.snapshot_id) {
            tracing::warn!(cause = %e, "could not delete an older snapshot file");
        }
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes,
            records,
            base_ms,
            rounds,
            patched,
            merge_ms,
            applies_held_ms = held.as_millis() as u64,
            took_ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        let file = tokio::fs::File::open(&path).await.map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Snapshot { meta, snapshot: Box::new(SnapFile { file, path }) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> SResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        self.read_applied().map_err(sm_err)
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<Reply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let _g = self.lock.write().await;
        self.check_open().map_err(sm_err)?;
        let mut replies = Vec::new();
        for e in entries {
            let reply = self.apply_one(&e).map_err(|err| StorageIOError::apply(*e.get_log_id(), &err))?;
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<SnapFile>> {
        // A receive starts only when the previous one ended (installed, or abandoned for a
        // newer snapshot): its file, if still here, is garbage. (openraft runs this and
        // install_snapshot one at a time on its state-machine worker.)
        if let Err(e) = self.snaps.remove_parts("recv") {
            tracing::warn!(cause = %e, "could not delete an abandoned snapshot receive");
        }
        let path = self.snaps.part("recv");
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(SnapFile { file, path }))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, Node>, snapshot: Box<SnapFile>) -> SResult<()> {
        // A build running meanwhile stops at its next record (`build_snapshot`).
        let waiting = Waiting::new(&self.install_waiting);
        let _one = self.snap_lock.lock().await;
        drop(waiting);
        self.check_open().map_err(snap_err)?;
        let SnapFile { mut file, path: part } = *snapshot;
        let werr = |e: std::io::Error| StorageError::from(StorageIOError::write_snapshot(None, &e));
        {
            use tokio::io::AsyncWriteExt;
            file.flush().await.map_err(werr)?;
        }
        file.sync_all().await.map_err(werr)?;
        drop(file);
        let snaps = self.snaps.clone();
        let id = meta.snapshot_id.clone();
        let label = self.flusher.label.clone();
        // Read it through once before anything is replaced: a truncated or corrupt file
        // fails here, leaving the shard's state as it was.
        let path = tokio::task::spawn_blocking(move || -> Result<PathBuf, StoreError> {
            let io = |source| StoreError::Io { path: part.clone(), source };
            let mut format = 1;
            let checked = std::fs::File::open(&part).map_err(io).and_then(|f| {
                snapshot::RecordReader::new(std::io::BufReader::with_capacity(1 << 20, f))
                    .try_for_each(|r| r.map(|(k, _)| format = format.max(keys::format_of_mark(&k).unwrap_or(1))))
            });
            if let Err(e) = checked {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
            // Labelled before the tree holds such writes (`storage::FormatLabel`); a failure
            // is logged, and tried again once the tree is loaded (`note_marks`).
            if format > 1 {
                label.needs(format);
            }
            snaps.publish(&part, &id).map_err(io)
        })
        .await
        .map_err(join_err)?
        .map_err(snap_err)?;
        // From here until the meta names the snapshot, a restart redoes the install.
        self.meta.insert(INSTALLING, encode(meta)).map_err(|e| sm_err(e.into()))?;
        self.flusher.sync().await.map_err(werr)?;
        let records = {
            let _g = self.lock.write().await;
            let (tree, p, m) = (self.view.tree.clone(), path.clone(), meta.clone());
            self.points().clear();
            let records = tokio::task::spawn_blocking(move || load_tree(&tree, &p, &m))
                .await
                .map_err(join_err)?
                .map_err(sm_err)?;
            self.cache.clear();
            let _ = self.inbox_tx.send(InboxNotice::Resync);
            self.note_marks().map_err(sm_err)?;
            records
        };
        self.finish_install(meta).map_err(sm_err)?;
        self.flusher.sync().await.map_err(werr)?;
        if let Err(e) = self.snaps.remove_others(&meta.snapshot_id) {
            tracing::warn!(cause = %e, "could not delete an older snapshot file");
        }
        tracing::info!(snapshot = %meta.snapshot_id, records, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        // A build that just finished deletes the file of the meta read an instant before:
        // read the meta again then (the new file was in place before the meta named it).
        for _ in 0..3 {
            let Some(m) = self.meta.get(SNAP_META).map_err(|e| sm_err(e.into()))? else {
                return Ok(None);
            };
            let meta: SnapshotMeta<NodeId, Node> = decode(SNAP_META, &m).map_err(sm_err)?;
            let path = self.snaps.file_of(&meta.snapshot_id);
            match tokio::fs::File::open(&path).await {
                Ok(file) => return Ok(Some(Snapshot { meta, snapshot: Box::new(SnapFile { file, path }) })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if self.meta.get(SNAP_META).map_err(|e| sm_err(e.into()))?.as_deref() == Some(&m[..]) {
                        // openraft builds a new one when it needs one.
                        tracing::warn!(snapshot = %meta.snapshot_id, path = %path.display(), "snapshot file missing");
                        return Ok(None);
                    }
                }
                Err(e) => {
                    // Not fatal (e.g. out of file descriptors): openraft asks again, or
                    // builds a new snapshot when it needs one.
                    tracing::warn!(snapshot = %meta.snapshot_id, cause = %e, "cannot open the snapshot file");
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
