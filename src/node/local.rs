//! The shards this node hosts right now. Replica moves ([`super::membership`]) add and drop
//! them while the node runs, so readers take a snapshot of the map (copy on write: a change
//! is rare, a lookup happens on every request).

use super::shard_handle::ShardHandle;
use crate::raft::group::Group;
use crate::shard::ShardId;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

#[derive(Default)]
pub struct Local(RwLock<Arc<BTreeMap<ShardId, Arc<ShardHandle>>>>);

impl Local {
    pub fn new(handles: impl IntoIterator<Item = ShardHandle>) -> Self {
        Self(RwLock::new(Arc::new(handles.into_iter().map(|h| (h.shard(), Arc::new(h))).collect())))
    }

    /// Every hosted shard's handle, as of now.
    pub fn all(&self) -> Arc<BTreeMap<ShardId, Arc<ShardHandle>>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn handle(&self, shard: ShardId) -> Option<Arc<ShardHandle>> {
        self.all().get(&shard).cloned()
    }

    pub fn group(&self, shard: ShardId) -> Option<Group> {
        self.handle(shard).map(|h| h.group.clone())
    }

    pub fn groups(&self) -> Vec<Group> {
        self.all().values().map(|h| h.group.clone()).collect()
    }

    pub fn shards(&self) -> Vec<ShardId> {
        self.all().keys().copied().collect()
    }

    pub fn contains(&self, shard: ShardId) -> bool {
        self.all().contains_key(&shard)
    }

    pub fn insert(&self, h: ShardHandle) {
        let mut cur = self.0.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**cur).clone();
        next.insert(h.shard(), Arc::new(h));
        *cur = Arc::new(next);
    }

    pub fn remove(&self, shard: ShardId) -> Option<Arc<ShardHandle>> {
        let mut cur = self.0.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**cur).clone();
        let gone = next.remove(&shard);
        *cur = Arc::new(next);
        gone
    }
}
