//! Snapshot files: a shard's snapshots are built into, sent from, received into and
//! installed from files, a record at a time, so no snapshot is ever whole in memory.
//!
//! Layout: `<data_dir>/snapshots/s<N>/<id>.snap`, the shard's current snapshot (its meta,
//! with the id, is in the shard's `s<N>.meta` tree), plus `*.part` files being built or
//! received. A file becomes a `.snap` only complete and fsynced (rename, then an fsync of
//! the folder), and the meta names it only after that, so a crash leaves at worst an
//! unnamed file, which [`SnapshotDir::open`] deletes.
//!
//! Format (unchanged from the in-memory snapshots, and the format of `admin backup`
//! files): a sequence of `[u32 key len][key][u32 value len][value]` records, big-endian
//! lengths, in key order. [`RecordReader`] reads it back one record at a time and refuses
//! a truncated file or a length past [`MAX_RECORD`] (a corrupt length would otherwise ask
//! for gigabytes).

use super::StoreError;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

/// The longest key or value a snapshot record may hold (a message is far smaller).
pub const MAX_RECORD: usize = 64 << 20;

/// Appends one record to `w`.
pub fn write_record(w: &mut impl Write, k: &[u8], v: &[u8]) -> io::Result<()> {
    w.write_all(&(k.len() as u32).to_be_bytes())?;
    w.write_all(k)?;
    w.write_all(&(v.len() as u32).to_be_bytes())?;
    w.write_all(v)
}

/// Reads records one at a time (see the module docs).
pub struct RecordReader<R> {
    r: R,
    done: bool,
}

impl<R: Read> RecordReader<R> {
    pub fn new(r: R) -> Self {
        Self { r, done: false }
    }

    /// The next field, or None at a clean end of input (only where a record may start).
    fn field(&mut self, first: bool) -> Result<Option<Vec<u8>>, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { key: "snapshot".into(), reason };
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.r.read(&mut len[got..]) {
                Ok(0) if got == 0 && first => return Ok(None),
                Ok(0) => return Err(corrupt("truncated record".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::Io { path: "snapshot".into(), source: e }),
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_RECORD {
            return Err(corrupt(format!("a record of {len} bytes (at most {MAX_RECORD})")));
        }
        let mut buf = vec![0u8; len];
        self.r.read_exact(&mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => corrupt("truncated record".into()),
            _ => StoreError::Io { path: "snapshot".into(), source: e },
        })?;
        Ok(Some(buf))
    }
}

impl<R: Read> Iterator for RecordReader<R> {
    type Item = Result<Record, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rec = match self.field(true) {
            Ok(Some(k)) => self.field(false).map(|v| (k, v.unwrap_or_default())),
            Ok(None) => {
                self.done = true;
                return None;
            }
            Err(e) => Err(e),
        };
        if rec.is_err() {
            self.done = true;
        }
        Some(rec)
    }
}

/// One key and its value.
pub type Record = (Vec<u8>, Vec<u8>);

/// A whole snapshot held in memory (backup chunks, tests), decoded.
pub fn decode_all(data: &[u8]) -> Result<Vec<Record>, StoreError> {
    RecordReader::new(data).collect()
}

/// openraft's snapshot data: an open snapshot file and its path (install needs to know
/// which file it received into).
#[derive(Debug)]
pub struct SnapFile {
    pub file: tokio::fs::File,
    pub path: PathBuf,
}

impl tokio::io::AsyncRead for SnapFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SnapFile {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncSeek for SnapFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }
    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

/// One shard's snapshot folder.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    /// Opens (creating) the folder and deletes what a crash left: `.part` files and
    /// snapshots other than `current`.
    pub fn open(dir: PathBuf, current: Option<&str>) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        // The folders' entries must survive a power loss (every open: a crash may have
        // come between creating them and syncing their parents).
        for d in dir.ancestors().skip(1).take(2).filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(d).and_then(|f| f.sync_all()).map_err(io)?;
        }
        let me = Self { dir: dir.clone() };
        let keep = current.map(|id| me.file_of(id));
        me.remove_where(|p| Some(p) != keep.as_deref()).map_err(io)?;
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where snapshot `id` is kept. Ids come from the leader's meta: anything but
    /// `[A-Za-z0-9_-]` is replaced so an id cannot name a path elsewhere.
    pub fn file_of(&self, id: &str) -> PathBuf {
        let safe: String = id
            .chars()
            .take(120)
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        self.dir.join(format!("{safe}.snap"))
    }

    /// A fresh file name for a snapshot being built or received.
    pub fn part(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}-{}-{:08x}.part", super::sm::now_ms(), rand::random::<u32>()))
    }

    /// Makes the complete, fsynced `part` the snapshot `id` (rename, then an fsync of the
    /// folder so the new name survives a power loss).
    pub fn publish(&self, part: &Path, id: &str) -> io::Result<PathBuf> {
        let path = self.file_of(id);
        std::fs::rename(part, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }

    /// Deletes every complete snapshot but `keep`'s. Files being built or received
    /// (`.part`) stay: a build may finish while a snapshot streams in.
    pub fn remove_others(&self, keep: &str) -> io::Result<()> {
        let keep = self.file_of(keep);
        self.remove_where(|p| p != keep && p.extension().is_some_and(|e| e == "snap"))
    }

    /// Deletes the `.part` files named `<what>-...` (an abandoned receive or build).
    pub fn remove_parts(&self, what: &str) -> io::Result<()> {
        let prefix = format!("{what}-");
        self.remove_where(|p| {
            p.extension().is_some_and(|e| e == "part")
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix))
        })
    }

    fn remove_where(&self, doomed: impl Fn(&Path) -> bool) -> io::Result<()> {
        for e in std::fs::read_dir(&self.dir)? {
            let path = e?.path();
            if path.is_file() && doomed(&path) {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stream_back_and_bad_input_is_refused() {
        let mut buf = Vec::new();
        write_record(&mut buf, b"a", b"1").unwrap();
        write_record(&mut buf, b"bb", b"").unwrap();
        let recs = decode_all(&buf).unwrap();
        assert_eq!(recs, vec![(b"a".to_vec(), b"1".to_vec()), (b"bb".to_vec(), Vec::new())]);
        // Cut anywhere but between records: refused.
        for cut in (1..buf.len()).filter(|c| *c != 10) {
            assert!(decode_all(&buf[..cut]).is_err(), "truncated at {cut}");
        }
        // A length past the bound is refused before anything is allocated for it.
        let mut huge = (u32::MAX).to_be_bytes().to_vec();
        huge.extend_from_slice(b"x");
        assert!(matches!(decode_all(&huge), Err(StoreError::Corrupt { .. })));
        assert!(decode_all(&[]).unwrap().is_empty());
    }

    #[test]
    fn publish_names_the_file_and_open_removes_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let d = SnapshotDir::open(tmp.path().join("s0"), None).unwrap();
        let part = d.part("build");
        std::fs::write(&part, b"data").unwrap();
        let stray = d.part("recv");
        std::fs::write(&stray, b"half").unwrap();
        let path = d.publish(&part, "1-2-3").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        // Replacing the current snapshot leaves a snapshot being received alone...
        let older = d.part("build");
        std::fs::write(&older, b"old").unwrap();
        let older = d.publish(&older, "0-0-1").unwrap();
        d.remove_others("1-2-3").unwrap();
        assert!(!older.exists() && stray.exists());
        // ...until that receive is abandoned.
        d.remove_parts("recv").unwrap();
        assert!(!stray.exists());
        std::fs::write(&stray, b"half").unwrap();
        assert!(d.file_of("../../etc/passwd").starts_with(d.path()));
        let d = SnapshotDir::open(tmp.path().join("s0"), Some("1-2-3")).unwrap();
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(left, vec![path]);
    }
}
