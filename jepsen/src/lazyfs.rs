//! A FUSE filesystem that loses what was not fsynced, in the spirit of Jepsen's LazyFS.
//!
//! Each node's data folder is mounted from a backing folder. File *data* written through
//! the mount stays in this process's memory (per file, as a list of pending writes) until
//! the file is `fsync`ed or `fdatasync`ed; only then does it reach the backing file (and
//! its `fsync`). [`LazyFs::power_loss`] forgets every pending write, as a power cut forgets
//! the page cache. Reads see pending writes, so a running node notices nothing.
//!
//! Truncation is lazy too: a file truncated and rewritten but not fsynced keeps its old
//! contents after a power loss. Simplification (in favour of the system under test, so it
//! hides no bug of its own): directory operations (create, mkdir, rename, unlink) reach the
//! backing folder at once, as if the directory were synced after each. Files are opened with
//! `direct_io` and attributes are never cached, so the kernel's page cache cannot keep
//! data this filesystem dropped. `sync_file_range` never reaches a FUSE filesystem: data
//! "synced" that way is lost here, as it can be on a real disk.

use fuser::consts::FOPEN_DIRECT_IO;
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

#[derive(Default)]
struct Pending {
    writes: Vec<(u64, Vec<u8>)>,
    /// Logical size including pending writes and truncations.
    size: u64,
    /// The backing file is cut to this length at the next fsync (an unsynced truncation).
    cut: Option<u64>,
}

#[derive(Default)]
struct State {
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    pending: HashMap<u64, Pending>,
    files: HashMap<u64, File>,
    next_fh: u64,
    /// Bytes written through the mount and dropped by power losses (for the run's report).
    lost_bytes: u64,
}

/// A handle on a mounted lazy filesystem (cheap to clone).
#[derive(Clone)]
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    backing: PathBuf,
}

/// The mounted filesystem; unmounted when dropped.
pub struct Mounted {
    pub fs: LazyFs,
    _session: fuser::BackgroundSession,
}

fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl LazyFs {
    /// Mounts a lazy view of `backing` at `mountpoint` (both created if missing).
    pub fn mount(backing: &Path, mountpoint: &Path) -> anyhow::Result<Mounted> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let mut st = State { next_ino: ROOT + 1, next_fh: 1, ..State::default() };
        st.paths.insert(ROOT, PathBuf::new());
        st.inos.insert(PathBuf::new(), ROOT);
        let fs = LazyFs { state: Arc::new(Mutex::new(st)), backing: backing.to_path_buf() };
        let opts = [MountOption::FSName("raftchat-lazyfs".into()), MountOption::DefaultPermissions];
        let session = fuser::spawn_mount2(Fuse(fs.clone()), mountpoint, &opts)
            .map_err(|e| anyhow::anyhow!("mounting the lazy filesystem at {}: {e}", mountpoint.display()))?;
        Ok(Mounted { fs, _session: session })
    }

    /// Forgets every write not yet fsynced; returns how many bytes were dropped.
    pub fn power_loss(&self) -> u64 {
        let mut st = lock(&self.state);
        let dropped: u64 = st.pending.values().flat_map(|p| p.writes.iter()).map(|(_, d)| d.len() as u64).sum();
        st.pending.clear();
        st.files.clear();
        st.lost_bytes += dropped;
        dropped
    }

    pub fn lost_bytes(&self) -> u64 {
        lock(&self.state).lost_bytes
    }

    fn real(&self, rel: &Path) -> PathBuf {
        self.backing.join(rel)
    }
}

struct Fuse(LazyFs);

impl Fuse {
    fn path_of(&self, st: &State, ino: u64) -> Option<PathBuf> {
        st.paths.get(&ino).cloned()
    }

    fn ino_for(st: &mut State, rel: PathBuf) -> u64 {
        if let Some(i) = st.inos.get(&rel) {
            return *i;
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        st.inos.insert(rel.clone(), ino);
        st.paths.insert(ino, rel);
        ino
    }

    /// The file or directory at `rel` is gone: drop its inode and anything pending on it.
    fn forget_path(st: &mut State, rel: &Path) {
        if let Some(ino) = st.inos.remove(rel) {
            st.paths.remove(&ino);
            st.pending.remove(&ino);
            st.files.remove(&ino);
        }
    }

    fn attr(&self, st: &State, ino: u64, rel: &Path) -> Result<FileAttr, i32> {
        let md = std::fs::symlink_metadata(self.0.real(rel)).map_err(|e| errno(&e))?;
        let kind = if md.is_dir() { FileType::Directory } else { FileType::RegularFile };
        let size = match st.pending.get(&ino) {
            Some(p) => p.size,
            None => md.len(),
        };
        let t = |s: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t(md.atime()),
            mtime: t(md.mtime()),
            ctime: t(md.ctime()),
            crtime: t(md.ctime()),
            kind,
            perm: (md.permissions().mode() & 0o7777) as u16,
            nlink: md.nlink() as u32,
            uid: md.uid(),
            gid: md.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn file(&self, st: &mut State, ino: u64) -> Result<File, i32> {
        if let Some(f) = st.files.get(&ino) {
            return f.try_clone().map_err(|e| errno(&e));
        }
        let rel = self.path_of(st, ino).ok_or(libc::ENOENT)?;
        let f = OpenOptions::new().read(true).write(true).open(self.0.real(&rel)).map_err(|e| errno(&e))?;
        let out = f.try_clone().map_err(|e| errno(&e))?;
        st.files.insert(ino, f);
        Ok(out)
    }
}

impl Filesystem for Fuse {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut st = lock(&self.0.state);
        let Some(dir) = self.path_of(&st, parent) else { return reply.error(libc::ENOENT) };
        let rel = dir.join(name);
        if let Err(e) = std::fs::symlink_metadata(self.0.real(&rel)) {
            if std::env::var_os("LAZYFS_DEBUG").is_some() {
                eprintln!("lazyfs lookup {parent} {rel:?}: {e}");
            }
            return reply.error(libc::ENOENT);
        }
        let ino = Self::ino_for(&mut st, rel.clone());
        match self.attr(&st, ino, &rel) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let st = lock(&self.0.state);
        let Some(rel) = self.path_of(&st, ino) else { return reply.error(libc::ENOENT) };
        match self.attr(&st, ino, &rel) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut st = lock(&self.0.state);
        let Some(rel) = self.path_of(&st, ino) else { return reply.error(libc::ENOENT) };
        let real = self.0.real(&rel);
        if let Some(m) = mode {
            if let Err(e) = std::fs::set_permissions(&real, std::fs::Permissions::from_mode(m & 0o7777)) {
                return reply.error(errno(&e));
            }
        }
        if let Some(n) = size {
            // Lazy, like data: reaches the backing file at the next fsync.
            let real_len = std::fs::metadata(&real).map(|m| m.len()).unwrap_or(0);
            let p = st.pending.entry(ino).or_insert_with(|| Pending { writes: Vec::new(), size: real_len, cut: None });
            for (off, data) in p.writes.iter_mut() {
                if *off >= n {
                    data.clear();
                } else if *off + data.len() as u64 > n {
                    data.truncate((n - *off) as usize);
                }
            }
            p.size = n;
            p.cut = Some(p.cut.map_or(n, |c| c.min(n)));
        }
        match self.attr(&st, ino, &rel) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let mut st = lock(&self.0.state);
        let Some(dir) = self.path_of(&st, parent) else { return reply.error(libc::ENOENT) };
        let rel = dir.join(name);
        if let Err(e) = std::fs::create_dir(self.0.real(&rel)) {
            return reply.error(errno(&e));
        }
        let _ = std::fs::set_permissions(self.0.real(&rel), std::fs::Permissions::from_mode(mode & 0o7777));
        let ino = Self::ino_for(&mut st, rel.clone());
        match self.attr(&st, ino, &rel) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut st = lock(&self.0.state);
        let Some(dir) = self.path_of(&st, parent) else { return reply.error(libc::ENOENT) };
        let rel = dir.join(name);
        if let Err(e) = std::fs::remove_file(self.0.real(&rel)) {
            return reply.error(errno(&e));
        }
        Self::forget_path(&mut st, &rel);
        reply.ok();
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut st = lock(&self.0.state);
        let Some(dir) = self.path_of(&st, parent) else { return reply.error(libc::ENOENT) };
        let rel = dir.join(name);
        if let Err(e) = std::fs::remove_dir(self.0.real(&rel)) {
            return reply.error(errno(&e));
        }
        Self::forget_path(&mut st, &rel);
        reply.ok();
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut st = lock(&self.0.state);
        let (Some(a), Some(b)) = (self.path_of(&st, parent), self.path_of(&st, newparent)) else {
            return reply.error(libc::ENOENT);
        };
        let (from, to) = (a.join(name), b.join(newname));
        if let Err(e) = std::fs::rename(self.0.real(&from), self.0.real(&to)) {
            return reply.error(errno(&e));
        }
        // The replaced file (if any) is gone; the moved one keeps its inode and pending data.
        Self::forget_path(&mut st, &to);
        let moved: Vec<(PathBuf, u64)> =
            st.inos.iter().filter(|(p, _)| p.starts_with(&from)).map(|(p, i)| (p.clone(), *i)).collect();
        for (p, ino) in moved {
            // (`join("")` would add a trailing slash and make the file look like a directory.)
            let np = match p.strip_prefix(&from) {
                Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
                _ => to.clone(),
            };
            st.inos.remove(&p);
            st.inos.insert(np.clone(), ino);
            st.paths.insert(ino, np);
        }
        reply.ok();
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let mut st = lock(&self.0.state);
        match self.file(&mut st, ino) {
            Ok(_) => {
                let fh = st.next_fh;
                st.next_fh += 1;
                reply.opened(fh, FOPEN_DIRECT_IO)
            }
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = lock(&self.0.state);
        let Some(dir) = self.path_of(&st, parent) else { return reply.error(libc::ENOENT) };
        let rel = dir.join(name);
        let mut oo = OpenOptions::new();
        oo.read(true).write(true).create(true).mode(mode & 0o7777);
        if flags & libc::O_EXCL != 0 {
            oo.create_new(true);
        }
        let f = match oo.open(self.0.real(&rel)) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        let ino = Self::ino_for(&mut st, rel.clone());
        if flags & libc::O_TRUNC != 0 {
            st.pending.insert(ino, Pending { writes: Vec::new(), size: 0, cut: Some(0) });
        }
        st.files.insert(ino, f);
        let fh = st.next_fh;
        st.next_fh += 1;
        match self.attr(&st, ino, &rel) {
            Ok(a) => reply.created(&TTL, &a, 0, fh, FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let mut st = lock(&self.0.state);
        let f = match self.file(&mut st, ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        let offset = offset.max(0) as u64;
        let backing_len = f.metadata().map(|m| m.len()).unwrap_or(0);
        // Bytes past an unsynced truncation are gone from the file's current view.
        let real_len = st.pending.get(&ino).and_then(|p| p.cut).map_or(backing_len, |c| c.min(backing_len));
        let len = st.pending.get(&ino).map(|p| p.size).unwrap_or(backing_len);
        if offset >= len {
            return reply.data(&[]);
        }
        let n = (size as u64).min(len - offset) as usize;
        let mut buf = vec![0u8; n];
        if offset < real_len {
            let m = ((real_len - offset) as usize).min(n);
            if let Err(e) = f.read_exact_at(&mut buf[..m], offset) {
                return reply.error(errno(&e));
            }
        }
        if let Some(p) = st.pending.get(&ino) {
            let end = offset + n as u64;
            for (off, data) in &p.writes {
                let (ws, we) = (*off, *off + data.len() as u64);
                if we <= offset || ws >= end {
                    continue;
                }
                let (s, e) = (ws.max(offset), we.min(end));
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&data[(s - ws) as usize..(e - ws) as usize]);
            }
        }
        reply.data(&buf);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut st = lock(&self.0.state);
        let real_len = match st.pending.contains_key(&ino) {
            true => 0,
            false => match self.path_of(&st, ino).map(|r| std::fs::metadata(self.0.real(&r))) {
                Some(Ok(m)) => m.len(),
                _ => return reply.error(libc::ENOENT),
            },
        };
        let p = st.pending.entry(ino).or_insert_with(|| Pending { writes: Vec::new(), size: real_len, cut: None });
        let offset = offset.max(0) as u64;
        p.size = p.size.max(offset + data.len() as u64);
        p.writes.push((offset, data.to_vec()));
        reply.written(data.len() as u32);
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        // close() is not a sync.
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let mut st = lock(&self.0.state);
        let Some(p) = st.pending.remove(&ino) else { return reply.ok() };
        let f = match self.file(&mut st, ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        if let Some(c) = p.cut {
            if let Err(e) = f.set_len(c) {
                return reply.error(errno(&e));
            }
        }
        for (off, data) in &p.writes {
            if let Err(e) = f.write_all_at(data, *off) {
                return reply.error(errno(&e));
            }
        }
        if let Err(e) = f.set_len(p.size).and_then(|_| f.sync_all()) {
            return reply.error(errno(&e));
        }
        reply.ok();
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let mut st = lock(&self.0.state);
        let Some(rel) = self.path_of(&st, ino) else { return reply.error(libc::ENOENT) };
        let rd = match std::fs::read_dir(self.0.real(&rel)) {
            Ok(rd) => rd,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut entries = vec![(ino, FileType::Directory, ".".into()), (ROOT, FileType::Directory, "..".into())];
        for e in rd.flatten() {
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                _ => FileType::RegularFile,
            };
            let child = Self::ino_for(&mut st, rel.join(e.file_name()));
            entries.push((child, kind, e.file_name()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }
}
