//! Shards and placement: which shard owns a key, which nodes replicate a shard.
//!
//! `shard(key) = fnv1a64(key) mod S`: FNV-1a is fixed by its spec, so every node and every
//! build agrees (Rust's `DefaultHasher` is randomized per process and may change between
//! releases). Conversations hash as `c/<conversation id>`, users as `u/<user id>`.

use crate::chat::{ConversationId, UserId};

pub type NodeId = u64;
pub type ShardId = u32;

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Maps keys to shards and shards to replica nodes for a fixed shard count and node set.
#[derive(Debug, Clone)]
pub struct Placement {
    shards: u32,
    /// Sorted node ids.
    nodes: Vec<NodeId>,
}

impl Placement {
    /// `nodes` may be in any order; it must not be empty and `shards` must be > 0
    /// (both checked by `Config::validate`).
    pub fn new(shards: u32, mut nodes: Vec<NodeId>) -> Self {
        nodes.sort_unstable();
        nodes.dedup();
        Self { shards, nodes }
    }
    pub fn shard_count(&self) -> u32 {
        self.shards
    }
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }
    pub fn shard_of_conversation(&self, c: &ConversationId) -> ShardId {
        (fnv1a64(format!("c/{c}").as_bytes()) % u64::from(self.shards)) as ShardId
    }
    pub fn shard_of_user(&self, u: &UserId) -> ShardId {
        (fnv1a64(format!("u/{u}").as_bytes()) % u64::from(self.shards)) as ShardId
    }
    /// Where an invite's "used by" record lives.
    pub fn shard_of_invite(&self, id: &str) -> ShardId {
        (fnv1a64(format!("v/{id}").as_bytes()) % u64::from(self.shards)) as ShardId
    }
    /// The min(3, N) replicas of `shard`, its preferred leader first. Consecutive shards
    /// start on consecutive nodes, so initial leaders are spread evenly.
    pub fn replicas(&self, shard: ShardId) -> Vec<NodeId> {
        let n = self.nodes.len();
        let r = n.min(3);
        (0..r).map(|i| self.nodes[(shard as usize + i) % n]).collect()
    }
    /// Shards that `node` replicates.
    pub fn local_shards(&self, node: NodeId) -> Vec<ShardId> {
        (0..self.shards).filter(|s| self.replicas(*s).contains(&node)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn shard_of_a_key_is_pinned() {
        // Pinned values: if these change, existing clusters would lose their data's home.
        let p = Placement::new(8, vec![1, 2, 3]);
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        let c = ConversationId::between(&alice, &bob).unwrap();
        let got = (p.shard_of_user(&alice), p.shard_of_user(&bob), p.shard_of_conversation(&c));
        let want =
            ((fnv1a64(b"u/alice") % 8) as u32, (fnv1a64(b"u/bob") % 8) as u32, (fnv1a64(b"c/alice~bob") % 8) as u32);
        assert_eq!(got, want);
    }

    #[test]
    fn replicas_and_leaders_are_spread() {
        let p = Placement::new(8, vec![3, 1, 2, 4, 5]);
        for s in 0..8 {
            let r = p.replicas(s);
            assert_eq!(r.len(), 3);
            let mut d = r.clone();
            d.dedup();
            assert_eq!(d.len(), 3, "distinct replicas");
        }
        let mut first = [0; 6];
        for s in 0..8 {
            first[p.replicas(s)[0] as usize] += 1;
        }
        assert!(first[1..].iter().all(|c| (1..=2).contains(c)), "{first:?}");
        assert_eq!(Placement::new(4, vec![7]).replicas(2), vec![7]);
        assert_eq!(Placement::new(4, vec![1, 2]).local_shards(2), vec![0, 1, 2, 3]);
    }
}
