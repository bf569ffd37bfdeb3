//! openraft state machine for one shard: applies [`Command`]s through the pure
//! [`crate::chat::state::apply`] and commits each entry's changes together with the
//! applied log id in one atomic sled batch. Also builds and installs snapshots.
//!
//! Snapshot format: the shard's whole state-machine tree as a sequence of
//! `[u32 key len][key][u32 value len][value]` records (big-endian lengths). A snapshot is
//! built under a read lock that holds off `apply`, so it is a consistent cut; installing one
//! replaces the tree in one atomic batch.

use super::flusher::Flusher;
use super::keys::{self, ShardView};
use super::{decode, encode, StoreError};
use crate::cache::RecentCache;
use crate::chat::{state, InboxEvent, Reply, UserId};
use crate::types::TypeConfig;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogId, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use std::io::Cursor;
use std::sync::Arc;
use tokio::sync::broadcast;
use tokio::sync::RwLock;

type NodeId = u64;
type Node = openraft::BasicNode;
type SResult<T> = Result<T, StorageError<NodeId>>;
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, Node>);
type Records<'a> = Vec<(&'a [u8], &'a [u8])>;

const SNAP_META: &[u8] = b"snapshot.meta";
const SNAP_DATA: &[u8] = b"snapshot.data";

fn sm_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

#[derive(Clone)]
pub struct StateMachine {
    pub view: ShardView,
    meta: sled::Tree,
    flusher: Flusher,
    pub cache: Arc<RecentCache>,
    /// Held for writing by `apply` and `install_snapshot`, for reading by snapshot builds.
    lock: Arc<RwLock<()>>,
    /// New inbox events of this shard's users, as they are applied (delivery reads these).
    pub inbox_tx: broadcast::Sender<InboxNotice>,
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
    /// Opens the shard's state, first completing an entry a crash cut short (see
    /// [`keys::Writes`]).
    pub fn open(
        tree: sled::Tree,
        meta: sled::Tree,
        flusher: Flusher,
        cache: Arc<RecentCache>,
    ) -> Result<Self, StoreError> {
        keys::Writes::recover(&tree)?;
        let (inbox_tx, _) = broadcast::channel(4096);
        Ok(Self { view: ShardView { tree }, meta, flusher, cache, lock: Arc::new(RwLock::new(())), inbox_tx })
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

    fn apply_one(&self, entry: &Entry<TypeConfig>) -> Result<Reply, StoreError> {
        let log_id = *entry.get_log_id();
        let mut batch = keys::Writes::default();
        let mut staged = keys::Staged::default();
        let reply = match &entry.payload {
            EntryPayload::Blank => Reply::Done,
            EntryPayload::Normal(cmd) => {
                let (changes, reply) = state::apply::<ShardView>(cmd, &self.view)?;
                staged = self.view.stage(changes, &mut batch);
                reply
            }
            EntryPayload::Membership(m) => {
                let sm = StoredMembership::new(Some(log_id), m.clone());
                batch.insert(keys::MEMBERSHIP, encode(&sm));
                Reply::Done
            }
        };
        batch.insert(keys::APPLIED, encode(&Some(log_id)));
        batch.commit(&self.view.tree)?;
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

fn encode_snapshot(tree: &sled::Tree) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    for kv in tree.iter() {
        let (k, v) = kv?;
        if k == keys::REDO {
            continue;
        }
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(&k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(&v);
    }
    Ok(out)
}

fn take_record<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], StoreError> {
    let corrupt = || StoreError::Corrupt { key: "snapshot".into(), reason: "truncated record".into() };
    let (len, tail) = rest.split_at_checked(4).ok_or_else(corrupt)?;
    let len = u32::from_be_bytes(len.try_into().map_err(|_| corrupt())?) as usize;
    let (item, tail) = tail.split_at_checked(len).ok_or_else(corrupt)?;
    *rest = tail;
    Ok(item)
}

pub fn decode_snapshot(data: &[u8]) -> Result<Records<'_>, StoreError> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let k = take_record(&mut rest)?;
        let v = take_record(&mut rest)?;
        out.push((k, v));
    }
    Ok(out)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let (meta, data) = {
            let _g = self.lock.read().await;
            let (applied, membership) = self.read_applied().map_err(sm_err)?;
            let data = encode_snapshot(&self.view.tree).map_err(sm_err)?;
            let id = match applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, now_ms()),
                None => format!("empty-{}", now_ms()),
            };
            (SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id: id }, data)
        };
        self.meta.insert(SNAP_META, encode(&meta)).map_err(|e| sm_err(e.into()))?;
        self.meta.insert(SNAP_DATA, data.clone()).map_err(|e| sm_err(e.into()))?;
        self.flusher.sync().await.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
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

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> SResult<()> {
        let data = snapshot.into_inner();
        {
            let _g = self.lock.write().await;
            let records = decode_snapshot(&data).map_err(sm_err)?;
            let mut batch = sled::Batch::default();
            for k in self.view.tree.iter().keys() {
                batch.remove(k.map_err(|e| sm_err(e.into()))?);
            }
            for (k, v) in records {
                batch.insert(k, v);
            }
            batch.insert(keys::APPLIED, encode(&meta.last_log_id));
            batch.insert(keys::MEMBERSHIP, encode(&meta.last_membership));
            self.view.tree.apply_batch(batch).map_err(|e| sm_err(e.into()))?;
            self.cache.clear();
            let _ = self.inbox_tx.send(InboxNotice::Resync);
        }
        self.meta.insert(SNAP_META, encode(meta)).map_err(|e| sm_err(e.into()))?;
        self.meta.insert(SNAP_DATA, data.as_slice()).map_err(|e| sm_err(e.into()))?;
        self.flusher.sync().await.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        let m = self.meta.get(SNAP_META).map_err(|e| sm_err(e.into()))?;
        let d = self.meta.get(SNAP_DATA).map_err(|e| sm_err(e.into()))?;
        match (m, d) {
            (Some(m), Some(d)) => {
                let meta: SnapshotMeta<NodeId, Node> = decode(SNAP_META, &m).map_err(sm_err)?;
                Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(d.to_vec())) }))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_records_round_trip_and_truncation_is_caught() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("t").unwrap();
        t.insert(b"a", b"1").unwrap();
        t.insert(b"bb", b"").unwrap();
        let data = encode_snapshot(&t).unwrap();
        let recs = decode_snapshot(&data).unwrap();
        assert_eq!(recs, vec![(&b"a"[..], &b"1"[..]), (&b"bb"[..], &b""[..])]);
        assert!(decode_snapshot(&data[..data.len() - 1]).is_err());
    }
}
