//! Durable state-machine checkpoints: one task per node makes sled's contents durable on
//! request (before a log purge, after a snapshot is built or installed).
//!
//! Callers wait on [`Flusher::sync`]; the task drains every request waiting, runs one
//! [`Storage::sync_blocking`] (sled's flush, then `fdatasync` of its data file) and answers
//! them all. The Raft log itself does not go through here but through the write-ahead log
//! ([`super::wal`]).

use super::Storage;
use crate::metrics::Metrics;
use std::io;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// A caller waiting for the next sync.
type Waiter = oneshot::Sender<io::Result<()>>;

#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::UnboundedSender<Waiter>,
    /// The data folder's format label, for the state machines (they hold the flusher).
    pub label: std::sync::Arc<super::FormatLabel>,
}

impl Flusher {
    pub fn start(db: Storage, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let label = db.label.clone();
        tokio::spawn(run(db, rx, metrics));
        Self { tx, label }
    }

    /// Waits for an fsync that covers everything written before this call.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| io::Error::other("flusher stopped"))?;
        rx.await.map_err(|_| io::Error::other("flusher stopped"))?
    }
}

async fn run(db: Storage, mut rx: mpsc::UnboundedReceiver<Waiter>, metrics: Metrics) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(job) = rx.try_recv() {
            batch.push(job);
        }
        let start = Instant::now();
        let db2 = db.clone();
        let res = match tokio::task::spawn_blocking(move || db2.sync_blocking()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("flush task: {e}")),
        };
        metrics.sled_sync_seconds.observe(start.elapsed().as_secs_f64());
        if let Err(e) = &res {
            tracing::error!(cause = %e, "fsync failed");
        }
        for job in batch {
            let r = res.clone().map_err(io::Error::other);
            let _ = job.send(r);
        }
    }
}
