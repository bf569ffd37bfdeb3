//! Recovery: reading the segments back at open, frame by frame, into every shard's log.
//! A torn or corrupt frame at the end of the last segment (a crash mid-write) is cut off;
//! one anywhere else refuses the start.

use super::{segment_path, Loc, Record, Segment, ShardLog, WalError, FRAME_HEADER, MAX_FRAME};
use crate::shard::ShardId;
use openraft::RaftLogId;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// What replaying the segments `seqs` (in order) under `dir` found: every shard's log, the
/// segments, and the last one's number and length (where appends go on), if any.
#[allow(clippy::type_complexity)]
pub(super) fn segments(
    dir: &Path,
    seqs: &[u64],
) -> Result<(BTreeMap<ShardId, ShardLog>, BTreeMap<u64, Segment>, Option<(u64, u64)>), WalError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WalError::Io { path, source }
    };
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
    Ok((shards, segments, tail))
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
