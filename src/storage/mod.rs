//! Storage: the Raft logs in the node's write-ahead log, the chat state in sled (one
//! `sled::Db` per node, two trees per shard).
//!
//! - [`wal`]: the write-ahead log (segment files, one writer, group commit with
//!   `fdatasync`): every shard's log entries, votes and commit marks.
//! - [`log`]: openraft's `RaftLogStorage` for one shard, on the WAL.
//! - [`flusher`]: makes sled durable on request (before log purges, after snapshots).
//! - [`sm`]: openraft's `RaftStateMachine` on the `s<N>.sm` tree (the current snapshot's
//!   meta in `s<N>.meta`), driving the pure [`crate::chat::state`] machine, plus snapshots.
//! - [`snapshot`]: snapshot files under `<data_dir>/snapshots/s<N>/`, streamed a record at
//!   a time.
//! - [`keys`]: the key layout of the state-machine tree and the read queries over it.
//!
//! The rest of the code sees sled only through these types (the storage seam).
//!
//! **Durable means fsynced.** sled's `Db::flush` ends in `sync_file_range` on Linux, which
//! neither persists the file's size nor flushes the device's write cache. Raft log appends
//! and votes are reported durable only after the WAL's `fdatasync` covers them; sled (the
//! state machine, rebuilt from the log after a crash) is made durable by
//! [`Storage::sync_blocking`], a flush followed by an `fdatasync` of sled's data file
//! (`<data>/db/db`), before any log entry it depends on is purged.

pub mod flusher;
pub mod keys;
pub mod log;
pub mod points;
pub mod sm;
pub mod snapshot;
pub mod wal;

use crate::shard::ShardId;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record under key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("I/O on {path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("data directory was created with {found} shards but the config says {configured}; the shard count is fixed at cluster creation")]
    ShardCountMismatch { found: u32, configured: u32 },
    #[error("{path} holds data of on-disk format {found:?}, which this build of raftchat (format {FORMAT_VERSION}) does not know: run the build that wrote it, or a newer one that can read it")]
    UnknownFormat { path: std::path::PathBuf, found: String },
    #[error("the snapshot build gave way to a snapshot install")]
    Cancelled,
}

/// The on-disk format (the WAL's records, the state machine's key layout and values) this
/// build reads and writes. A data folder carries it in `FORMAT`; a node refuses to start on
/// a folder of a version it does not know instead of misreading it. Bump it with any change
/// older builds would misread, and teach the new build to read (or convert) the old version.
///
/// 1: every inbox event keeps the user's inbox counter (`n/`). 2: inbox events may leave the
/// counter behind (`cluster_version` 6, `chat::command::UNCOUNTED_VERSION`); a build that
/// knows only 1 would number a user's next event from a stale counter and overwrite events.
/// 3: a recency key (`o/`) may sit up to `chat::types::ORDER_WINDOW_MS` behind its entry's
/// `last_ts` (`cluster_version` 7, `chat::command::LAZY_ORDER_VERSION`); a build that knows
/// only 1 and 2 would leave the old key behind when it moves one (the conversation listed
/// twice) and list such entries out of order.
///
/// This build reads all three. A folder is labelled with the format its node's
/// `cluster_version` proposes ([`format_for`]: 3 from 7, 2 at 6, else 1), so that during a
/// rolling upgrade a node can still be rolled back to the older build, and higher when it
/// applies (or installs) writes of a newer format that a peer proposed ([`FormatLabel`]).
pub const FORMAT_VERSION: u32 = 3;
/// The label of a folder whose node runs below `cluster_version` 6 (see [`FORMAT_VERSION`]).
pub const FORMAT_COUNTED: u32 = 1;

/// The on-disk format a node at `cluster_version` writes (see [`FORMAT_VERSION`]).
pub fn format_for(cluster_version: u32) -> u32 {
    if cluster_version >= crate::chat::command::LAZY_ORDER_VERSION {
        3
    } else if cluster_version >= crate::chat::command::UNCOUNTED_VERSION {
        2
    } else {
        FORMAT_COUNTED
    }
}
const FORMAT_FILE: &str = "FORMAT";

/// Checks (or, for a new folder, writes) `<dir>/FORMAT`, and labels a folder of an older
/// format with `want` (the format the node's `cluster_version` writes, [`format_for`]). A
/// folder made before the file existed holds format 1 and is labelled so.
pub fn check_format(dir: &Path, want: u32) -> Result<(), StoreError> {
    let path = dir.join(FORMAT_FILE);
    let io = |source| StoreError::Io { path: path.clone(), source };
    let label = |v: u32| write_label(dir, v).map_err(io);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let found = text.trim();
            match parse_label(found) {
                Some(v) if (FORMAT_COUNTED..=FORMAT_VERSION).contains(&v) => {
                    if v < want {
                        tracing::info!(from = v, to = want, "data folder labelled with the newer on-disk format of this cluster_version: older builds refuse it from now on");
                        label(want)?;
                    }
                    Ok(())
                }
                _ => Err(StoreError::UnknownFormat { path, found: found.chars().take(64).collect() }),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => label(want),
        Err(e) => Err(io(e)),
    }
}

fn parse_label(text: &str) -> Option<u32> {
    text.trim().strip_prefix("raftchat-data ").and_then(|v| v.parse::<u32>().ok())
}

/// Writes `<dir>/FORMAT` saying `v`, durably (a new file renamed over the old one).
fn write_label(dir: &Path, v: u32) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("FORMAT.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "raftchat-data {v}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(FORMAT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The data folder's format label while the node runs. A node configured below
/// `cluster_version` 6 keeps format 1 (it can be rolled back), but a peer at a higher
/// version may propose writes of a newer format (inbox events without the counter at 6,
/// recency keys behind their entries at 7), which this node then applies (or receives in
/// a snapshot): from then on an older build would misread them, so the folder is labelled
/// at that moment ([`FormatLabel::needs`]).
pub struct FormatLabel {
    dir: PathBuf,
    current: std::sync::Mutex<u32>,
}

impl FormatLabel {
    fn read(dir: &Path) -> Self {
        let current = std::fs::read_to_string(dir.join(FORMAT_FILE)).ok().and_then(|t| parse_label(&t)).unwrap_or(0);
        Self { dir: dir.to_path_buf(), current: std::sync::Mutex::new(current) }
    }

    /// This node's state now holds writes of on-disk format `format` (2: inbox events
    /// without the counter; 3: recency keys behind their entries): label the folder so if it
    /// is not yet (once; later calls cost a lock). Returns whether the folder is labelled so
    /// now. A failure is logged, not returned as an error: the write that was applied stays
    /// applied, and the next call tries again.
    pub fn needs(&self, format: u32) -> bool {
        let format = format.min(FORMAT_VERSION);
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *cur >= format {
            return true;
        }
        match write_label(&self.dir, format) {
            Ok(()) => {
                tracing::info!(
                    from = *cur,
                    to = format,
                    "data folder labelled with a newer on-disk format: this node applied writes a node at a higher \
                     cluster_version proposed (older builds refuse the folder from now on)"
                );
                *cur = format;
                true
            }
            Err(e) => {
                tracing::error!(cause = %e, format, "could not label the data folder with a newer on-disk format");
                false
            }
        }
    }

    /// The label as this process last wrote or read it.
    pub fn current(&self) -> u32 {
        *self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The node's database.
#[derive(Clone)]
pub struct Storage {
    db: sled::Db,
    /// The folder's format label ([`FormatLabel`]).
    pub label: std::sync::Arc<FormatLabel>,
    /// sled's one data file, kept open so every sync can `fdatasync` it.
    data_file: std::sync::Arc<std::fs::File>,
}

impl Storage {
    /// Opens (or creates) the database under `dir` with a page cache of `cache_bytes` and
    /// pins the shard count.
    pub fn open(dir: &Path, shards: u32, cache_bytes: u64) -> Result<Self, StoreError> {
        // No periodic background flush: sled holds state the WAL can rebuild, and is made
        // durable explicitly (`sync_blocking`) before the log entries behind it are purged.
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()?;
        let io = |e: std::io::Error| StoreError::Io { path: dir.join("db"), source: e };
        let data_file = std::fs::File::open(dir.join("db").join("db")).map_err(io)?;
        // sled writes its `conf` file without syncing it; a power loss right after creation
        // would leave it empty.
        if let Ok(conf) = std::fs::File::open(dir.join("db").join("conf")) {
            conf.sync_all().map_err(io)?;
        }
        // The directory entries of sled's files must survive a power loss too.
        std::fs::File::open(dir.join("db")).and_then(|d| d.sync_all()).map_err(io)?;
        let cluster = db.open_tree("cluster")?;
        match cluster.get("shards")? {
            Some(v) => {
                let found =
                    u32::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                        key: "cluster/shards".into(),
                        reason: "not 4 bytes".into(),
                    })?);
                if found != shards {
                    return Err(StoreError::ShardCountMismatch { found, configured: shards });
                }
            }
            None => {
                cluster.insert("shards", &shards.to_be_bytes())?;
                db.flush()?;
                data_file.sync_data().map_err(io)?;
            }
        }
        Ok(Self { db, label: std::sync::Arc::new(FormatLabel::read(dir)), data_file: std::sync::Arc::new(data_file) })
    }

    /// Blocking: writes everything sled holds in memory and `fdatasync`s it. When this
    /// returns Ok, every write made before the call is on stable storage.
    pub fn sync_blocking(&self) -> std::io::Result<usize> {
        let bytes = self.db.flush().map_err(std::io::Error::other)?;
        if std::env::var_os("XX_NOSYNC").is_none() {
            self.data_file.sync_data()?;
        }
        Ok(bytes)
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The shard's snapshot tree and state-machine tree.
    pub fn shard_trees(&self, shard: ShardId) -> Result<(sled::Tree, sled::Tree), StoreError> {
        Ok((self.db.open_tree(format!("s{shard}.meta"))?, self.db.open_tree(format!("s{shard}.sm"))?))
    }

    /// A record of the node-local `cluster` tree, if written.
    fn cluster_get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let cluster = self.db.open_tree("cluster")?;
        cluster.get(key)?.map(|v| decode(format!("cluster/{key}").as_bytes(), &v)).transpose()
    }

    /// Writes a record of the `cluster` tree, durably.
    fn cluster_put<T: serde::Serialize>(&self, key: &str, v: &T) -> Result<(), StoreError> {
        self.db.open_tree("cluster")?.insert(key, encode(v))?;
        self.sync_blocking().map_err(|source| StoreError::Io { path: "db".into(), source })?;
        Ok(())
    }

    /// The shards this node hosts, as last recorded (replica moves change the set); `None`
    /// for a data folder from before replica moves, or a fresh one.
    pub fn hosted(&self) -> Result<Option<Vec<ShardId>>, StoreError> {
        self.cluster_get("hosted")
    }

    pub fn set_hosted(&self, shards: &[ShardId]) -> Result<(), StoreError> {
        self.cluster_put("hosted", &shards)
    }

    /// The nodes the cluster was created with, as this node recorded them: the placement
    /// function's input for good (`members` may grow later; see `node::membership`).
    pub fn founders(&self) -> Result<Option<Vec<u64>>, StoreError> {
        self.cluster_get("founders")
    }

    pub fn set_founders(&self, nodes: &[u64]) -> Result<(), StoreError> {
        self.cluster_put("founders", &nodes)
    }

    /// The cluster's node table as this node last read it (`node::directory`).
    pub fn directory(&self) -> Result<Vec<crate::chat::NodeRecord>, StoreError> {
        Ok(self.cluster_get("directory")?.unwrap_or_default())
    }

    pub fn set_directory(&self, records: &[crate::chat::NodeRecord]) -> Result<(), StoreError> {
        self.cluster_put("directory", &records)
    }

    /// Shards that came to this node by a replica move (not at the cluster's creation).
    pub fn moved_in(&self) -> Result<Vec<ShardId>, StoreError> {
        Ok(self.cluster_get("moved_in")?.unwrap_or_default())
    }

    pub fn set_moved_in(&self, shards: &[ShardId]) -> Result<(), StoreError> {
        self.cluster_put("moved_in", &shards)
    }

    /// Where shards this node gave away went: (shard, the index of the membership entry that
    /// left this node out, its voters). Routing follows these (see `node::membership`).
    pub fn moved(&self) -> Result<Vec<(ShardId, u64, Vec<u64>)>, StoreError> {
        Ok(self.cluster_get("moved")?.unwrap_or_default())
    }

    pub fn set_moved(&self, moved: &[(ShardId, u64, Vec<u64>)]) -> Result<(), StoreError> {
        self.cluster_put("moved", &moved)
    }

    /// Empties a shard's trees (its state machine and snapshot meta): the shard left this
    /// node.
    pub fn clear_shard(&self, shard: ShardId) -> Result<(), StoreError> {
        let (meta, sm) = self.shard_trees(shard)?;
        sm.clear()?;
        meta.clear()?;
        self.sync_blocking().map_err(|source| StoreError::Io { path: "db".into(), source })?;
        Ok(())
    }

    /// [`Storage::sync_blocking`] off the async threads.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.sync_blocking())
            .await
            .map_err(|e| StoreError::Corrupt { key: "-".into(), reason: format!("flush task failed: {e}") })?
            .map_err(|source| StoreError::Io { path: "db".into(), source })?;
        Ok(())
    }
}

/// Decodes a JSON record, naming the key on failure.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: e.to_string() })
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize to JSON")
}
