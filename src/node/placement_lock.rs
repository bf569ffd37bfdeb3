//! The cluster's placement lock: one placement change at a time.
//!
//! Each replica move is safe on its own (the shard's leader runs one membership change of
//! a shard at a time), but a placement *command* is a plan of many moves made from one look
//! at the cluster: two of them at once (two operators, or an operator's `add-node` while
//! re-replication moves a dead node's replicas) would each plan against a cluster the other
//! is changing, and the result need not be the fair spread either planned.
//!
//! So a placement command holds a lease first. The lease lives on the leader of the
//! directory shard (shard 0), in memory, reached like any shard op ([`ShardOp`] with a
//! linearizable check first, so only a confirmed leader answers):
//!
//! - [`LockOp::Take`] with a token the taker chose and a name for the holder ("admin
//!   add-node 4 from host h"): granted when free or already held by that token (a renewal),
//!   else the answer names the holder and for how long it has held the lock. A lease lasts
//!   [`TTL`] from its last renewal; holders renew every [`RENEW_EVERY`], so a holder that died
//!   frees it within [`TTL`].
//! - [`LockOp::Release`] frees it (only for its token).
//! - [`LockOp::Check`]: a replica move or node removal asked for over the API carries its
//!   command's token (`x-raftchat-placement-token`); it is refused while another holds the
//!   lock. A move without a token (a direct API call) goes on while nobody holds it.
//! - The repair task, which runs on shard 0's leader, holds the lock (a [`Guard`], renewed
//!   in the background) while it re-replicates, and waits for the next round while an
//!   operator holds it.
//!
//! Leader changes. The lease is not replicated: a new leader of shard 0 does not know what
//! the previous one granted. For [`HANDOFF`] after it became leader (two renewal periods:
//! a live holder has renewed by then) it grants no *new* lease ([`LockAnswer::Unsure`]),
//! while renewals (`renew: true`, which holders send) are taken as they come, so a holder
//! keeps its lease across the change. (A move without a token is not held back in that
//! window: direct API moves are uncoordinated by nature. A leader that does not know when
//! it became leader, e.g. with `prevote` off, waits the whole window from its first lock
//! request of the term. `renew: true` is for renewals: an operator's script that sends it on
//! a first take skips the wait, as the API trusts operators.) A token once released is
//! refused for the rest of the term, so a renewal still in flight when its holder released
//! the lock does not take it back.
//!
//! The lock orders commands, not moves: safety never depends on it (a holder whose lease
//! lapsed during a partition and a new holder could briefly both be moving, each move
//! still safe on its own).

use super::directory::DIRECTORY_SHARD;
use super::router::{ShardError, ShardOp, ShardReply};
use super::Node;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a lease lasts after its last renewal.
pub const TTL: Duration = Duration::from_secs(20);
/// How often holders renew.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// The `cluster_version` from which the lock is used (older builds cannot parse its op:
/// below it, placement commands run uncoordinated).
pub const VERSION: u32 = 5;
/// How long a new leader of shard 0 grants no new lease.
pub const HANDOFF: Duration = Duration::from_secs(11);
/// The HTTP header that carries a placement command's token on its moves and removals.
pub const TOKEN_HEADER: &str = "x-raftchat-placement-token";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum LockOp {
    Take { token: u64, holder: String, renew: bool },
    Release { token: u64 },
    Check { token: Option<u64> },
}

impl From<LockOp> for ShardOp {
    fn from(op: LockOp) -> Self {
        ShardOp::PlacementLock(op)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum LockAnswer {
    /// Taken, renewed, or (for a check) held by the token asked about.
    Granted,
    /// Nobody holds it (a check or a release).
    Free,
    Busy {
        holder: String,
        held_ms: u64,
        expires_in_ms: u64,
    },
    /// Shard 0's leader changed a moment ago: a lease the previous one granted may still run.
    Unsure {
        retry_in_ms: u64,
    },
    /// A renewal of a lease its holder released (in this term).
    Released,
}

impl LockAnswer {
    /// Why a placement change must wait, for an operator; `None` when it may go on.
    pub fn refusal(&self) -> Option<String> {
        match self {
            LockAnswer::Granted | LockAnswer::Free => None,
            LockAnswer::Busy { holder, held_ms, expires_in_ms } => Some(format!(
                "another placement change holds the cluster's placement lock: {holder}, for {:.0} s \
                 (renewed while it runs; should its holder stop renewing, it lapses in {:.0} s); run this once it is done",
                *held_ms as f64 / 1000.0,
                *expires_in_ms as f64 / 1000.0
            )),
            LockAnswer::Released => Some("this placement lease was released: take the lock again".into()),
            LockAnswer::Unsure { retry_in_ms } => Some(format!(
                "shard 0's leader changed a moment ago and cannot tell yet whether a placement change is \
                 running: retry in {:.0} s",
                (*retry_in_ms as f64 / 1000.0).ceil()
            )),
        }
    }
}

struct Held {
    token: u64,
    holder: String,
    since: Instant,
    until: Instant,
}

#[derive(Default)]
struct State {
    held: Option<Held>,
    /// Tokens released in this term (the latest few).
    released: Vec<u64>,
    /// The shard-0 term these answers are given in, and until when new leases wait.
    term: u64,
    unsure_until: Option<Instant>,
}

/// The lease as shard 0's leader keeps it (module docs).
#[derive(Default)]
pub struct PlacementLock {
    state: Mutex<State>,
}

impl PlacementLock {
    /// Answers `op` as the leader of shard 0 in `term`, which it has led for `led`, at `now`.
    pub fn act(&self, op: LockOp, term: u64, led: Duration, now: Instant) -> LockAnswer {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.term != term {
            // Leases are granted per leadership: whatever this node held in an older term
            // may have been replaced by another leader's meanwhile.
            *s =
                State { held: None, released: Vec::new(), term, unsure_until: Some(now + HANDOFF.saturating_sub(led)) };
        }
        if s.held.as_ref().is_some_and(|h| h.until <= now) {
            s.held = None;
        }
        let unsure = s.unsure_until.filter(|u| *u > now);
        let busy = |h: &Held| LockAnswer::Busy {
            holder: h.holder.clone(),
            held_ms: now.duration_since(h.since).as_millis() as u64,
            expires_in_ms: h.until.duration_since(now).as_millis() as u64,
        };
        match op {
            LockOp::Take { token, .. } if s.released.contains(&token) => LockAnswer::Released,
            LockOp::Take { token, holder, renew } => match &mut s.held {
                Some(h) if h.token == token => {
                    h.until = now + TTL;
                    LockAnswer::Granted
                }
                Some(h) => busy(h),
                None => match unsure {
                    Some(u) if !renew => LockAnswer::Unsure { retry_in_ms: u.duration_since(now).as_millis() as u64 },
                    _ => {
                        s.held = Some(Held { token, holder, since: now, until: now + TTL });
                        LockAnswer::Granted
                    }
                },
            },
            LockOp::Release { token } => {
                match &s.held {
                    Some(h) if h.token != token => return busy(h),
                    _ => s.held = None,
                }
                if !s.released.contains(&token) {
                    if s.released.len() >= 64 {
                        s.released.remove(0);
                    }
                    s.released.push(token);
                }
                LockAnswer::Free
            }
            LockOp::Check { token } => match (&s.held, token) {
                (Some(h), Some(t)) if h.token == t => LockAnswer::Granted,
                (Some(h), _) => busy(h),
                // A holder whose lease lapsed (or is not known here yet) goes on, and so does a
                // move without a token (module docs).
                (None, _) => LockAnswer::Free,
            },
        }
    }
}

impl Node {
    /// Runs `op` on shard 0's leader.
    pub async fn placement_lock_op(
        self: &Arc<Self>,
        op: LockOp,
        deadline: tokio::time::Instant,
    ) -> Result<LockAnswer, ShardError> {
        match self.call(DIRECTORY_SHARD, op.into(), deadline).await? {
            ShardReply::Lock(a) => Ok(a),
            other => Err(ShardError::Storage(format!("the placement lock answered {other:?}"))),
        }
    }

    /// Answers `op` here, as shard 0's leader (the caller checked that it leads).
    pub(crate) fn placement_lock_here(&self, op: LockOp) -> LockAnswer {
        let (term, led) = match self.local.group(DIRECTORY_SHARD) {
            Some(g) => (g.raft.metrics().borrow().current_term, led_for(&g)),
            None => (0, Duration::ZERO),
        };
        self.placement_lock.act(op, term, led, Instant::now())
    }

    /// Takes the lock for a task of this node, which leads shard 0 (the repair task): held,
    /// and renewed, until the guard is dropped.
    pub(crate) fn hold_placement_lock(self: &Arc<Self>, holder: String) -> Result<Guard, LockAnswer> {
        let token: u64 = rand::random();
        match self.placement_lock_here(LockOp::Take { token, holder: holder.clone(), renew: false }) {
            LockAnswer::Granted => {}
            other => return Err(other),
        }
        let node = self.clone();
        let renew = Arc::new(move || {
            node.placement_lock_here(LockOp::Take { token, holder: holder.clone(), renew: true }) == LockAnswer::Granted
        });
        let node = self.clone();
        Ok(Guard::new(
            renew,
            Box::new(move || {
                node.placement_lock_here(LockOp::Release { token });
            }),
        ))
    }
}

/// How long this node has led `group` (unknown, e.g. with `prevote` off: taken as just now).
fn led_for(group: &crate::raft::group::Group) -> Duration {
    crate::raft::prevote::leading_for(&group.leading_since).unwrap_or(Duration::ZERO)
}

/// A lease this node holds for one of its own tasks, renewed in the background until
/// dropped (then released). `renew` takes the lock again with the same token.
pub struct Guard {
    renewer: tokio::task::JoinHandle<()>,
    release: Option<Box<dyn FnOnce() + Send>>,
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl Guard {
    pub fn new(renew: Arc<dyn Fn() -> bool + Send + Sync>, release: Box<dyn FnOnce() + Send>) -> Self {
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = lost.clone();
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                if !renew() {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
            }
        });
        Self { renewer, release: Some(release), lost }
    }

    /// Whether every renewal so far kept the lease.
    pub fn held(&self) -> bool {
        !self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.renewer.abort();
        if let Some(r) = self.release.take() {
            r();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(token: u64, renew: bool) -> LockOp {
        LockOp::Take { token, holder: format!("holder {token}"), renew }
    }

    #[test]
    fn one_holder_at_a_time_until_it_releases_or_its_lease_runs_out() {
        let l = PlacementLock::default();
        let t0 = Instant::now();
        // A fresh leader (term 1) grants no new lease for HANDOFF (a renewal it takes; checks pass).
        assert!(matches!(l.act(take(7, false), 1, Duration::ZERO, t0), LockAnswer::Unsure { .. }));
        assert_eq!(l.act(LockOp::Check { token: None }, 1, Duration::ZERO, t0), LockAnswer::Free);
        assert_eq!(l.act(LockOp::Check { token: Some(7) }, 1, Duration::ZERO, t0), LockAnswer::Free);
        let t1 = t0 + HANDOFF;
        assert_eq!(l.act(take(7, false), 1, HANDOFF, t1), LockAnswer::Granted);
        // Another is refused, with the holder named; checks follow the token.
        match l.act(take(8, false), 1, HANDOFF, t1 + Duration::from_secs(3)) {
            LockAnswer::Busy { holder, held_ms, .. } => assert_eq!((holder.as_str(), held_ms), ("holder 7", 3000)),
            other => panic!("{other:?}"),
        }
        assert_eq!(l.act(LockOp::Check { token: Some(7) }, 1, HANDOFF, t1), LockAnswer::Granted);
        assert!(matches!(l.act(LockOp::Check { token: Some(8) }, 1, HANDOFF, t1), LockAnswer::Busy { .. }));
        assert!(matches!(l.act(LockOp::Check { token: None }, 1, HANDOFF, t1), LockAnswer::Busy { .. }));
        assert!(matches!(l.act(LockOp::Release { token: 8 }, 1, HANDOFF, t1), LockAnswer::Busy { .. }));
        // Renewals keep it past the first TTL; without them it lapses.
        let t2 = t1 + TTL - Duration::from_secs(1);
        assert_eq!(l.act(take(7, true), 1, HANDOFF, t2), LockAnswer::Granted);
        assert!(matches!(l.act(take(8, false), 1, HANDOFF, t2 + Duration::from_secs(5)), LockAnswer::Busy { .. }));
        assert_eq!(l.act(take(8, false), 1, HANDOFF, t2 + TTL), LockAnswer::Granted);
        assert_eq!(l.act(LockOp::Release { token: 8 }, 1, HANDOFF, t2 + TTL), LockAnswer::Free);
        assert_eq!(l.act(LockOp::Check { token: None }, 1, HANDOFF, t2 + TTL), LockAnswer::Free);
        // A renewal that arrives after its holder released the lock does not take it back.
        assert_eq!(l.act(take(8, true), 1, HANDOFF, t2 + TTL), LockAnswer::Released);
        assert_eq!(l.act(take(9, false), 1, HANDOFF, t2 + TTL), LockAnswer::Granted);
    }

    #[test]
    fn a_new_term_forgets_the_old_lease_but_keeps_a_renewing_holder() {
        let l = PlacementLock::default();
        let t0 = Instant::now() + TTL;
        // A leader that has led long enough when first asked grants at once.
        let m = PlacementLock::default();
        assert_eq!(m.act(take(3, false), 2, HANDOFF, t0), LockAnswer::Granted);
        assert!(matches!(l.act(take(1, false), 4, Duration::from_secs(1), t0), LockAnswer::Unsure { .. }));
        let t1 = t0 + HANDOFF;
        assert_eq!(l.act(take(1, false), 4, HANDOFF, t1), LockAnswer::Granted);
        // Term 5 (this node led again after another did): holder 1 renews and keeps it;
        // a newcomer waits.
        assert_eq!(l.act(take(1, true), 5, Duration::ZERO, t1), LockAnswer::Granted);
        assert!(matches!(l.act(take(2, false), 5, Duration::ZERO, t1), LockAnswer::Busy { .. }));
        assert!(LockAnswer::Unsure { retry_in_ms: 1500 }.refusal().unwrap().contains("retry in 2 s"));
        assert!(l.act(take(2, false), 5, Duration::ZERO, t1).refusal().unwrap().contains("holder 1"));
        assert_eq!(LockAnswer::Granted.refusal(), None);
    }
}
