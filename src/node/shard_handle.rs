//! The per-shard handle: the one owner of proposing, batching, admission and
//! linearizable reads for a shard this node replicates.
//!
//! Proposing. openraft 0.9 turns every `client_write` into its own log entry and waits for
//! it, so one command per entry caps a shard at roughly one entry per replication round.
//! The handle's batcher task instead drains every command queued for the shard into one
//! [`Command::Batch`] entry (up to `max_batch` commands), with at most `batches_in_flight`
//! entries outstanding; while they are in flight the next batch fills up. Under light load a
//! batch holds one command and adds no delay; under heavy load a batch holds hundreds and the
//! cost of a replication round and an fsync is shared by all of them.
//!
//! Admission. Client-initiated commands (new messages) are admitted only while the shard's
//! queued commands and bytes stay under their bounds; the excess is refused at once with
//! [`ShardError::Overloaded`], so overload sheds work instead of growing queues. Commands
//! that finish work already admitted (index updates, outbox confirmations) are never
//! refused: shedding them would only turn an accepted send into a late failure.
//!
//! Reads. Linearizable reads wait for one leadership check that *started* after the read
//! arrived; concurrent reads share it (openraft 0.9 sends a heartbeat round per
//! `ensure_linearizable` call).

use super::router::ShardError;
use crate::chat::{Command, Reply};
use crate::metrics::Metrics;
use crate::raft::group::Group;
use crate::shard::ShardId;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

/// Who asks for a proposal, which decides whether admission control may refuse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New work from a client (a new message): refused when the shard is saturated.
    Client,
    /// Work that completes something already admitted: always queued.
    Internal,
}

/// Bounds of one shard's proposal queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Commands per log entry.
    pub max_batch: usize,
    /// Log entries proposed and not yet applied.
    pub batches_in_flight: usize,
    /// Client commands queued or in flight before new ones are refused.
    pub max_queued: usize,
    /// Bytes of client commands queued or in flight before new ones are refused.
    pub max_queued_bytes: usize,
    /// The `Retry-After` hint given with a refusal.
    pub retry_after_ms: u64,
}

struct Job {
    cmd: Command,
    tx: oneshot::Sender<Result<Reply, ShardError>>,
}

/// A shard this node replicates, as the rest of the node uses it.
pub struct ShardHandle {
    pub group: Group,
    tx: mpsc::UnboundedSender<Job>,
    queued: Arc<AtomicUsize>,
    queued_bytes: Arc<AtomicUsize>,
    limits: Limits,
    metrics: Metrics,
    reads_started: AtomicU64,
    reads_last_ok: tokio::sync::Mutex<u64>,
    /// The batcher's in-flight slots: holding them all holds new proposals back.
    slots: Arc<Semaphore>,
    /// One membership change of the shard at a time on this node (a replica move's learner
    /// and voter change, or taking removed learners out): two interleaved would make a new
    /// joint config out of one still being finished.
    pub membership: Arc<tokio::sync::Mutex<()>>,
}

/// Gives back an admitted command's share of the queue bounds when it is answered.
struct Admitted {
    queued: Arc<AtomicUsize>,
    queued_bytes: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.queued_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl ShardHandle {
    pub fn start(group: Group, limits: Limits, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(limits.batches_in_flight.max(1)));
        tokio::spawn(batcher(group.clone(), rx, limits, metrics.clone(), slots.clone()));
        Self {
            group,
            tx,
            queued: Arc::default(),
            queued_bytes: Arc::default(),
            limits,
            metrics,
            reads_started: AtomicU64::new(0),
            reads_last_ok: tokio::sync::Mutex::new(0),
            slots,
            membership: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    pub fn shard(&self) -> ShardId {
        self.group.shard
    }

    /// Holds new proposals back (they wait in the queue) until the permit is dropped, once
    /// the batches in flight are done: a leadership transfer needs the target to hold the
    /// leader's whole log, which a leader still appending never lets it.
    pub async fn pause_proposals(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = self.limits.batches_in_flight.max(1) as u32;
        self.slots.clone().acquire_many_owned(n).await.ok()
    }

    /// Proposes `cmd` through the shard's Raft log (batched with whatever else is queued) and
    /// waits until it is applied here.
    pub async fn propose(&self, cmd: Command, admission: Admission, deadline: Instant) -> Result<Reply, ShardError> {
        let shard = self.shard();
        let kind = cmd.kind();
        let start = std::time::Instant::now();
        let _admitted = match admission {
            Admission::Client => Some(self.admit(cmd.approx_bytes())?),
            Admission::Internal => None,
        };
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Job { cmd, tx })
            .map_err(|_| ShardError::Unavailable { shard, reason: "the shard is shutting down".into() })?;
        let res = match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(ShardError::Timeout { shard }),
            Ok(Err(_)) => Err(ShardError::Unavailable { shard, reason: "the proposal was dropped".into() }),
            Ok(Ok(r)) => r,
        };
        if res.is_ok() {
            self.metrics.proposal_seconds.with_label_values(&[kind]).observe(start.elapsed().as_secs_f64());
        }
        res
    }

    fn admit(&self, bytes: usize) -> Result<Admitted, ShardError> {
        let n = self.queued.fetch_add(1, Ordering::AcqRel);
        let b = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        let admitted = Admitted { queued: self.queued.clone(), queued_bytes: self.queued_bytes.clone(), bytes };
        if n >= self.limits.max_queued || b + bytes > self.limits.max_queued_bytes {
            drop(admitted);
            self.metrics.shed.with_label_values(&["shard"]).inc();
            return Err(ShardError::Overloaded { shard: self.shard(), retry_after_ms: self.limits.retry_after_ms });
        }
        Ok(admitted)
    }

    /// Returns once this node is confirmed leader by a quorum after the call began and has
    /// applied everything committed before it.
    pub async fn linearize(&self, deadline: Instant) -> Result<(), ShardError> {
        let shard = self.shard();
        let arrival = self.reads_started.load(Ordering::SeqCst);
        let fut = async {
            let mut last_ok = self.reads_last_ok.lock().await;
            if *last_ok > arrival {
                return Ok(());
            }
            let id = self.reads_started.fetch_add(1, Ordering::SeqCst) + 1;
            match self.group.raft.ensure_linearizable().await {
                Ok(_) => {
                    *last_ok = id;
                    Ok(())
                }
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(ShardError::NotLeader { shard, leader: f.leader_id })
                }
                Err(e) => Err(ShardError::Unavailable { shard, reason: e.to_string() }),
            }
        };
        tokio::time::timeout_at(deadline, fut).await.map_err(|_| ShardError::Timeout { shard })?
    }
}

/// Drains the queue into batches, keeping at most `batches_in_flight` of them proposed.
async fn batcher(
    group: Group,
    mut rx: mpsc::UnboundedReceiver<Job>,
    limits: Limits,
    metrics: Metrics,
    slots: Arc<Semaphore>,
) {
    loop {
        // The first job, then a slot (an idle batcher holds none, so `pause_proposals` can
        // take them all), then whatever queued meanwhile.
        let Some(first) = rx.recv().await else {
            return;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < limits.max_batch.max(1) {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // A waiter that gave up (its deadline passed) was told "outcome unknown"; not
        // proposing its command keeps that promise and saves the work.
        jobs.retain(|j| !j.tx.is_closed());
        if jobs.is_empty() {
            continue;
        }
        metrics.proposal_batch.observe(jobs.len() as f64);
        let raft = group.raft.clone();
        let shard = group.shard;
        tokio::spawn(async move {
            let _slot = slot;
            let (mut cmds, txs): (Vec<Command>, Vec<_>) = jobs.into_iter().map(|j| (j.cmd, j.tx)).unzip();
            let single = cmds.len() == 1;
            let cmd = if single { cmds.pop().expect("one command") } else { Command::Batch(cmds) };
            let res = raft.client_write(cmd).await;
            let fail = |e: ShardError, txs: Vec<oneshot::Sender<Result<Reply, ShardError>>>| {
                for tx in txs {
                    let _ = tx.send(Err(e.clone()));
                }
            };
            match res {
                Ok(resp) => match resp.data {
                    Reply::Batch(replies) if !single && replies.len() == txs.len() => {
                        for (tx, r) in txs.into_iter().zip(replies) {
                            let _ = tx.send(Ok(r));
                        }
                    }
                    r if single => {
                        let _ = txs.into_iter().next().map(|tx| tx.send(Ok(r)));
                    }
                    r => fail(ShardError::Storage(format!("a batch of {} got the reply {r:?}", txs.len())), txs),
                },
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    fail(ShardError::NotLeader { shard, leader: f.leader_id }, txs)
                }
                Err(e) => fail(ShardError::Unavailable { shard, reason: e.to_string() }, txs),
            }
        });
    }
}
