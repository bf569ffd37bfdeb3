//! Snapshot builds that do not hold the shard's applies off.
//!
//! A build used to write the whole tree under the state machine's read lock, so a shard's
//! writes waited for it (3–4 s per GB here, every `snapshot_every` entries). sled has no
//! point-in-time view, so a build now makes its consistent cut in steps, applies running
//! between them:
//!
//! 1. Under the read lock (no entry half applied), start recording the keys applies write
//!    ([`Touched`]).
//! 2. Without the lock, write every record of the tree to a file (`base`). A key nobody wrote
//!    since step 1 is read with its final value; one written since may be read with any of
//!    its values, or missed (inserted), or read although deleted since, but it is recorded.
//! 3. Without the lock, a few rounds: take the keys recorded so far and read their values
//!    now into a patch file (a removed key as a tombstone). Keys written again during a round
//!    are recorded again. Rounds stop when few keys were written during the last one.
//! 4. Under the read lock again, briefly: take the last recorded keys, stop recording, read
//!    their values and the applied log id and membership. That log id is what the snapshot
//!    covers: every key has its value at that point, either unwritten since step 1 (step 2
//!    read it) or written since, in which case its last patch was read after its last write.
//! 5. Without the lock, merge `base` and the patches in key order, the latest patch of a key
//!    winning and tombstones dropped, into the snapshot file: the same format as before
//!    ([`super::snapshot`]), so a snapshot built here installs on any build.
//!
//! Memory: the recorded keys (not values; at most [`MAX_TOUCHED`] between two takes, past
//! which the build writes the tree again under the lock, and logs a warning) and the last
//! round's values when they are few ([`SETTLED`]); other patches are files. Disk: the snapshot's size twice more
//! while it is built (`base` and the merged file), beside the current snapshot; a shard
//! nothing was written to during the build skips step 5 (its base file is the snapshot, renamed). Every file
//! is written to disk as it goes ([`PACE_BYTES`]). An entry whose writes failed halfway
//! (sled's error) refuses every later build until a restart completes it. A build gives way
//! to a snapshot install waiting for it: `cancel` is asked before every record of steps 2,
//! 3 and 5 (step 4 is short), and the build's files are deleted.

use super::super::keys;
use super::super::snapshot::{self, RecordReader};
use super::super::StoreError;
use std::collections::BTreeSet;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// A key and its value at some point, `None` if it was removed.
type Patch = (Vec<u8>, Option<Vec<u8>>);
type PatchResult = Result<Patch, StoreError>;

/// Stop the unlocked patch rounds once a round saw at most this many keys written.
const SETTLED: usize = 1_000;
/// At most this many unlocked patch rounds (a shard written faster than a round reads).
const MAX_ROUNDS: usize = 4;

/// At most this many keys recorded between two takes (about 100–200 MB): a build that
/// records more (a shard of many GB written fast while its tree is written) gives up the
/// unlocked way and writes the tree again under the lock ([`Touched::overflowed`]).
pub const MAX_TOUCHED: usize = 1_000_000;

/// The keys applies wrote while a build was recording (step 1 to 4 above).
pub struct Touched {
    /// [`MAX_TOUCHED`] but in tests.
    limit: usize,
    on: AtomicBool,
    /// Recording stopped at [`MAX_TOUCHED`] keys: the keys do not cover every change.
    overflowed: AtomicBool,
    /// An entry's writes failed halfway: the tree may say the entry is applied without all
    /// of its writes (until a restart completes it from its redo record), so no snapshot
    /// may be taken of it. Never cleared.
    failed: AtomicBool,
    keys: Mutex<BTreeSet<Vec<u8>>>,
}

impl Default for Touched {
    fn default() -> Self {
        Self::with_limit(MAX_TOUCHED)
    }
}

impl Touched {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit,
            on: AtomicBool::default(),
            overflowed: AtomicBool::default(),
            failed: AtomicBool::default(),
            keys: Mutex::default(),
        }
    }

    /// Starts recording. Call with the state machine's read lock held.
    pub fn start(&self) {
        self.lock().clear();
        self.overflowed.store(false, Ordering::SeqCst);
        self.on.store(true, Ordering::SeqCst);
    }

    /// Records the keys of an entry's writes, after they reached the tree (a round that takes
    /// the set between a write and its record reads the key again in the next round). Called
    /// with `failed` when the writes stopped halfway: the tree may claim the entry applied
    /// without all of its writes, which no snapshot may capture.
    pub fn record<'a>(&self, written: impl Iterator<Item = &'a [u8]>, failed: bool) {
        if failed {
            self.failed.store(true, Ordering::SeqCst);
        }
        if !self.on.load(Ordering::SeqCst) {
            return;
        }
        let mut keys = self.lock();
        for k in written.filter(|k| *k != keys::REDO) {
            if !keys.contains(k) {
                keys.insert(k.to_vec());
            }
        }
        if keys.len() > self.limit {
            self.overflowed.store(true, Ordering::SeqCst);
            self.on.store(false, Ordering::SeqCst);
            keys.clear();
        }
    }

    /// Whether recording stopped at [`MAX_TOUCHED`] keys since [`Touched::start`].
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::SeqCst)
    }

    /// Refuses a build after an entry's writes failed halfway (see the field).
    pub fn check_whole(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt {
                key: "-".into(),
                reason: "an entry's writes failed halfway; no snapshot until a restart completes it".into(),
            });
        }
        Ok(())
    }

    /// The keys recorded since the last take; recording goes on.
    pub fn take(&self) -> BTreeSet<Vec<u8>> {
        std::mem::take(&mut *self.lock())
    }

    /// Stops recording and returns the keys recorded since the last take.
    pub fn stop(&self) -> BTreeSet<Vec<u8>> {
        self.on.store(false, Ordering::SeqCst);
        self.take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<Vec<u8>>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a build left to merge: the base file and the patch files of the unlocked rounds,
/// deleted when this is dropped.
pub struct Parts {
    files: Vec<std::path::PathBuf>,
    /// How long writing the base file took (for the build's log line).
    pub base: std::time::Duration,
    /// The base file's bytes and records (as [`merge`] counts them).
    base_stats: (u64, u64),
    /// Keys read into patch files: none means the base file is the snapshot as it is.
    patched: usize,
}

impl Drop for Parts {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Asked between records: whether the build should give way (a snapshot install waits).
pub type Cancel<'a> = &'a (dyn Fn() -> bool + Sync);

fn cancelled(cancel: Cancel<'_>) -> Result<(), StoreError> {
    if cancel() {
        Err(StoreError::Cancelled)
    } else {
        Ok(())
    }
}

/// Writes every record of the tree but [`keys::REDO`] to `path` (step 2); returns their
/// bytes and count (as [`merge`] counts them).
fn write_base(tree: &sled::Tree, path: &Path, cancel: Cancel<'_>) -> Result<(u64, u64), StoreError> {
    let io = io_at(path);
    let mut w = BufWriter::with_capacity(1 << 20, Paced::new(std::fs::File::create(path).map_err(&io)?));
    let (mut bytes, mut records) = (0u64, 0u64);
    for kv in tree.iter() {
        cancelled(cancel)?;
        let (k, v) = kv?;
        if k != keys::REDO {
            snapshot::write_record(&mut w, &k, &v).map_err(&io)?;
            records += 1;
            bytes += (k.len() + v.len() + 8) as u64;
        }
    }
    w.flush().map_err(&io)?;
    Ok((bytes, records))
}

/// A build's files are written to disk every [`PACE_BYTES`], waiting for it: its writes
/// then never pile up in the page cache, where the kernel's writeback of a gigabyte at once
/// (at its dirty thresholds, or at the final fsync) holds the disk from the WAL's fsyncs for
/// seconds. It also paces the build to the disk's speed. (Measured in performance.md,
/// "Snapshot builds and the shard's writes": with it, no send refused during the builds.)
const PACE_BYTES: u64 = 8 << 20;

struct Paced {
    file: std::fs::File,
    unsynced: u64,
}

impl Paced {
    fn new(file: std::fs::File) -> Self {
        Self { file, unsynced: 0 }
    }
}

impl Write for Paced {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= PACE_BYTES {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A patch record: the value behind a tag byte, 1 for a value, 0 for a removed key.
fn write_patch(w: &mut impl Write, k: &[u8], v: Option<&[u8]>) -> std::io::Result<()> {
    match v {
        Some(v) => snapshot::write_record(w, k, &[&[1u8][..], v].concat()),
        None => snapshot::write_record(w, k, &[0u8]),
    }
}

fn read_patch((k, v): snapshot::Record) -> PatchResult {
    match v.split_first() {
        Some((1, rest)) => Ok((k, Some(rest.to_vec()))),
        Some((0, [])) => Ok((k, None)),
        _ => Err(StoreError::Corrupt { key: "snapshot patch".into(), reason: "bad tag".into() }),
    }
}

/// Reads the current values of `keys` (sorted) into a patch file at `path` (step 3).
fn write_patches(
    tree: &sled::Tree,
    keys: &BTreeSet<Vec<u8>>,
    path: &Path,
    cancel: Cancel<'_>,
) -> Result<(), StoreError> {
    let io = io_at(path);
    let mut w = BufWriter::with_capacity(1 << 20, Paced::new(std::fs::File::create(path).map_err(&io)?));
    for k in keys {
        cancelled(cancel)?;
        write_patch(&mut w, k, tree.get(k)?.as_deref()).map_err(&io)?;
    }
    w.flush().map_err(&io)
}

/// Steps 2 and 3: the base file, then patch rounds until few keys are written per round.
/// `part(what)` names a new temporary file. `cancel` is asked between records: when it says
/// yes the build stops with [`StoreError::Cancelled`] (its files are deleted).
pub fn unlocked(
    tree: &sled::Tree,
    touched: &Touched,
    part: impl Fn(&str) -> std::path::PathBuf,
    cancel: Cancel<'_>,
) -> Result<Parts, StoreError> {
    let started = std::time::Instant::now();
    let mut parts = Parts { files: vec![part("build-base")], base: Default::default(), base_stats: (0, 0), patched: 0 };
    parts.base_stats = write_base(tree, &parts.files[0], cancel)?;
    parts.base = started.elapsed();
    for _ in 0..MAX_ROUNDS {
        let keys = touched.take();
        let settled = keys.len() <= SETTLED;
        if keys.is_empty() {
            break;
        }
        let path = part("build-patch");
        parts.files.push(path.clone());
        parts.patched += keys.len();
        write_patches(tree, &keys, &path, cancel)?;
        if settled {
            break;
        }
    }
    Ok(parts)
}

impl Parts {
    /// Unlocked patch rounds made.
    pub fn rounds(&self) -> usize {
        self.files.len() - 1
    }
}

/// Step 4 (with the read lock held by the caller): the values of the last recorded keys.
/// When recording overflowed, the tree is written again instead (the old, locked way) and
/// replaces the parts: nothing to patch then.
pub fn last_patch(
    tree: &sled::Tree,
    touched: &Touched,
    parts: &mut Parts,
    part: impl Fn(&str) -> std::path::PathBuf,
) -> Result<Vec<Patch>, StoreError> {
    let last = touched.stop();
    touched.check_whole()?;
    if touched.overflowed() {
        let started = std::time::Instant::now();
        let mut fresh =
            Parts { files: vec![part("build-base")], base: Default::default(), base_stats: (0, 0), patched: 0 };
        fresh.base_stats = write_base(tree, &fresh.files[0], &|| false)?;
        fresh.base = started.elapsed();
        *parts = fresh;
        return Ok(Vec::new());
    }
    if last.len() > SETTLED {
        // The rounds did not settle (writes faster than a round reads): the values go to a
        // patch file, not to memory.
        let path = part("build-patch");
        parts.files.push(path.clone());
        parts.patched += last.len();
        write_patches(tree, &last, &path, &|| false)?;
        return Ok(Vec::new());
    }
    last.into_iter().map(|k| Ok((k.clone(), tree.get(&k)?.map(|v| v.to_vec())))).collect()
}

/// Step 5: merges the parts and `last` into a new snapshot file at `out`, fsynced. Returns
/// its size and its number of records.
/// When nothing was written during the build (no patch, nothing read under the lock: a quiet
/// shard), the base file is the snapshot already: it is synced and renamed to `out`, and the
/// shard is written once instead of twice.
pub fn merge(parts: &mut Parts, last: Vec<Patch>, out: &Path, cancel: Cancel<'_>) -> Result<(u64, u64), StoreError> {
    if parts.patched == 0 && last.is_empty() && parts.files.len() == 1 {
        let base = parts.files[0].clone();
        std::fs::File::open(&base).and_then(|f| f.sync_all()).map_err(io_at(&base))?;
        std::fs::rename(&base, out).map_err(io_at(out))?;
        parts.files.clear();
        return Ok(parts.base_stats);
    }
    let mut streams: Vec<Box<dyn Iterator<Item = PatchResult>>> = Vec::new();
    for (i, f) in parts.files.iter().enumerate() {
        let r = RecordReader::new(BufReader::with_capacity(1 << 20, std::fs::File::open(f).map_err(io_at(f))?));
        if i == 0 {
            streams.push(Box::new(r.map(|rec| rec.map(|(k, v)| (k, Some(v))))));
        } else {
            streams.push(Box::new(r.map(|rec| rec.and_then(read_patch))));
        }
    }
    streams.push(Box::new(last.into_iter().map(Ok)));
    let io = io_at(out);
    let file = std::fs::File::create(out).map_err(&io)?;
    let mut w = BufWriter::with_capacity(1 << 20, Paced::new(file));
    let (mut bytes, mut records) = (0u64, 0u64);
    merge_streams(streams, |k, v| {
        cancelled(cancel)?;
        records += 1;
        bytes += (k.len() + v.len() + 8) as u64;
        snapshot::write_record(&mut w, k, v).map_err(&io)
    })?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?.file;
    file.sync_all().map_err(&io)?;
    Ok((bytes, records))
}

/// Merges key-ordered streams into `emit`, in key order: of the streams holding a key, the
/// last one's value wins; a `None` there drops the key.
fn merge_streams(
    mut streams: Vec<Box<dyn Iterator<Item = PatchResult> + '_>>,
    mut emit: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut heads: Vec<Option<Patch>> = Vec::with_capacity(streams.len());
    for s in streams.iter_mut() {
        heads.push(s.next().transpose()?);
    }
    loop {
        let Some(min) = heads.iter().flatten().map(|(k, _)| k).min().cloned() else {
            return Ok(());
        };
        let mut value = None;
        for (i, head) in heads.iter_mut().enumerate() {
            if head.as_ref().is_some_and(|(k, _)| *k == min) {
                value = head.take().map(|(_, v)| v);
                *head = streams[i].next().transpose()?;
            }
        }
        if let Some(Some(v)) = value {
            emit(&min, &v)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::snapshot::SnapshotDir;
    use super::*;

    fn stream(v: Vec<(&str, Option<&str>)>) -> Box<dyn Iterator<Item = PatchResult>> {
        Box::new(
            v.into_iter()
                .map(|(k, v)| Ok((k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))))
                .collect::<Vec<_>>()
                .into_iter(),
        )
    }

    #[test]
    fn the_last_stream_holding_a_key_wins_and_tombstones_drop_it() {
        let base = stream(vec![("a", Some("1")), ("b", Some("1")), ("c", Some("1")), ("e", Some("1"))]);
        let round = stream(vec![("b", Some("2")), ("c", None), ("d", Some("2")), ("f", None)]);
        let last = stream(vec![("c", Some("3")), ("d", None), ("g", Some("3"))]);
        let mut out = Vec::new();
        merge_streams(vec![base, round, last], |k, v| {
            out.push((String::from_utf8(k.to_vec()).unwrap(), String::from_utf8(v.to_vec()).unwrap()));
            Ok(())
        })
        .unwrap();
        let want = [("a", "1"), ("b", "2"), ("c", "3"), ("e", "1"), ("g", "3")];
        assert_eq!(out, want.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>());
    }

    /// A scratch tree, and a snapshot folder whose `part` names a build's files.
    fn scratch() -> (sled::Db, sled::Tree, SnapshotDir, tempfile::TempDir) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("t").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::open(dir.path().join("s0"), None).unwrap();
        (db, t, snaps, dir)
    }

    #[test]
    fn recording_stops_past_its_limit_and_a_failed_entry_refuses_every_later_build() {
        let (_db, t, snaps, _dir) = scratch();
        let name = |what: &str| snaps.part(what);
        t.insert(b"a", b"1").unwrap();

        // Past the limit: recording stops, and the last step writes the tree again.
        let touched = Touched::with_limit(2);
        touched.start();
        let mut parts = unlocked(&t, &touched, name, &|| false).unwrap();
        t.insert(b"b", b"2").unwrap();
        touched.record([&b"a"[..], b"b", b"c"].into_iter(), false);
        assert!(touched.overflowed() && touched.take().is_empty());
        touched.record([&b"d"[..]].into_iter(), false);
        assert!(touched.take().is_empty(), "no longer recording");
        let replaced = parts.files.clone();
        let last = last_patch(&t, &touched, &mut parts, name).unwrap();
        assert!(last.is_empty() && parts.rounds() == 0);
        assert!(replaced.iter().all(|f| !f.exists()), "the replaced parts are deleted");
        let out = snaps.path().join("out");
        assert_eq!(merge(&mut parts, last, &out, &|| false).unwrap().1, 2, "both keys, read under the lock");
        let fresh = parts.files.clone();
        drop(parts);
        assert!(fresh.iter().all(|f| !f.exists()), "the parts are deleted");
        let left: Vec<_> = std::fs::read_dir(snaps.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("out")], "only the snapshot is left");

        // A new build starts afresh.
        touched.start();
        assert!(!touched.overflowed());
        touched.record([&b"a"[..]].into_iter(), false);
        assert_eq!(touched.take().len(), 1);

        // An entry whose writes failed halfway: no build from then on, recording or not.
        touched.stop();
        touched.record([&b"a"[..]].into_iter(), true);
        touched.start();
        let mut parts = unlocked(&t, &touched, name, &|| false).unwrap();
        assert!(last_patch(&t, &touched, &mut parts, name).is_err());
    }

    /// A last round too large for memory goes to a patch file, and wins the merge.
    #[test]
    fn a_last_round_that_did_not_settle_is_a_file() {
        let (_db, t, snaps, _dir) = scratch();
        let name = |what: &str| snaps.part(what);
        let touched = Touched::default();
        touched.start();
        let mut parts = unlocked(&t, &touched, name, &|| false).unwrap();
        let keys: Vec<Vec<u8>> = (0..SETTLED as u32 + 5).map(|i| i.to_be_bytes().to_vec()).collect();
        for k in &keys {
            t.insert(k, b"v").unwrap();
        }
        touched.record(keys.iter().map(Vec::as_slice), false);
        let rounds = parts.rounds();
        let last = last_patch(&t, &touched, &mut parts, name).unwrap();
        assert!(last.is_empty() && parts.rounds() == rounds + 1);
        assert_eq!(merge(&mut parts, last, &snaps.path().join("out"), &|| false).unwrap().1, keys.len() as u64);
    }

    /// The paced writer writes everything through its syncs.
    #[test]
    fn paced_writes_reach_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = BufWriter::with_capacity(1 << 20, Paced::new(std::fs::File::create(&path).unwrap()));
        let block: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        for _ in 0..(PACE_BYTES / (1 << 20) * 2 + 3) {
            w.write_all(&block).unwrap();
        }
        let paced = w.into_inner().map_err(|e| e.into_error()).unwrap();
        assert_eq!(paced.unsynced, 3 << 20, "synced every {PACE_BYTES} bytes along the way");
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, (PACE_BYTES / (1 << 20) * 2 + 3) << 20);
        assert!(data.chunks(1 << 20).all(|c| c == block.as_slice()));
    }

    #[test]
    fn patch_records_round_trip_and_a_bad_tag_is_refused() {
        let mut buf = Vec::new();
        write_patch(&mut buf, b"k", Some(b"")).unwrap();
        write_patch(&mut buf, b"gone", None).unwrap();
        let got: Vec<Patch> =
            RecordReader::new(&buf[..]).map(|r| r.and_then(read_patch)).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, vec![(b"k".to_vec(), Some(Vec::new())), (b"gone".to_vec(), None)]);
        assert!(read_patch((b"k".to_vec(), vec![2])).is_err());
        assert!(read_patch((b"k".to_vec(), vec![0, 1])).is_err());
    }

    #[test]
    fn a_build_asked_to_give_way_stops_and_leaves_no_files() {
        let (_db, t, snaps, _dir) = scratch();
        for i in 0..5_000u32 {
            t.insert(i.to_be_bytes(), vec![1u8; 50]).unwrap();
        }
        let name = |what: &str| snaps.part(what);
        let asked = std::sync::atomic::AtomicU64::new(0);
        // Yes from the 1,000th record on: the base file is cut short.
        let cancel = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1_000;
        let touched = Touched::default();
        touched.start();
        assert!(matches!(unlocked(&t, &touched, name, &cancel), Err(StoreError::Cancelled)));
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1_001, "asked before each record until yes");
        assert_eq!(std::fs::read_dir(snaps.path()).unwrap().count(), 0, "the parts are deleted");
        // The merge gives way too (a key written meanwhile: there is something to merge).
        let mut parts = unlocked(&t, &touched, name, &|| false).unwrap();
        t.insert(b"new", b"1").unwrap();
        touched.record([&b"new"[..]].into_iter(), false);
        let last = last_patch(&t, &touched, &mut parts, name).unwrap();
        assert_eq!(last.len(), 1);
        let out = snaps.path().join("out");
        assert!(matches!(merge(&mut parts, last, &out, &|| true), Err(StoreError::Cancelled)));
    }

    #[test]
    fn a_quiet_build_renames_its_base_file_instead_of_merging() {
        let (_db, t, snaps, _dir) = scratch();
        for i in 0..3_000u32 {
            t.insert(i.to_be_bytes(), vec![2u8; 30]).unwrap();
        }
        t.insert(keys::REDO, b"redo").unwrap();
        let name = |what: &str| snaps.part(what);
        let touched = Touched::default();
        touched.start();
        let mut parts = unlocked(&t, &touched, name, &|| false).unwrap();
        let last = last_patch(&t, &touched, &mut parts, name).unwrap();
        assert!(last.is_empty() && parts.rounds() == 0, "nothing written: no patch");
        let out = snaps.path().join("out");
        use std::os::unix::fs::MetadataExt;
        let base_inode = std::fs::metadata(&parts.files[0]).unwrap().ino();
        // (Asked to give way: only a merge would; a rename is not worth stopping.)
        let (bytes, records) = merge(&mut parts, last, &out, &|| true).unwrap();
        drop(parts);
        assert_eq!(std::fs::metadata(&out).unwrap().ino(), base_inode, "the base file itself, not a copy");
        let data = std::fs::read(&out).unwrap();
        assert_eq!((bytes, records), (data.len() as u64, 3_000), "the base's counts are the file's");
        let recs = crate::storage::snapshot::decode_all(&data).unwrap();
        let want: Vec<_> = t
            .iter()
            .map(|kv| kv.unwrap())
            .filter(|(k, _)| k != keys::REDO)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert!(recs == want, "the snapshot is the tree's records in key order, without the redo record");
        let left: Vec<_> = std::fs::read_dir(snaps.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("out")], "the base was renamed, nothing else left");
    }
}
