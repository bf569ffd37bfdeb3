//! Group commit: one task per node makes log writes durable for every shard at once.
//!
//! Appenders write into sled (buffered) and hand a completion to this task; it drains all
//! completions waiting, runs one [`Storage::sync_blocking`] (sled's flush, then `fdatasync`
//! of its data file), then completes them all. Under load many shards' appends share each
//! fsync (group commit).

use super::Storage;
use crate::metrics::Metrics;
use crate::raft::TypeConfig;
use openraft::storage::LogFlushed;
use std::io;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

pub enum FlushJob {
    Log(LogFlushed<TypeConfig>),
    Wait(oneshot::Sender<io::Result<()>>),
}

#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::UnboundedSender<FlushJob>,
}

impl Flusher {
    pub fn start(db: Storage, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(db, rx, metrics));
        Self { tx }
    }

    /// Completes `cb` after the next fsync.
    pub fn log_flushed(&self, cb: LogFlushed<TypeConfig>) {
        if let Err(mpsc::error::SendError(FlushJob::Log(cb))) = self.tx.send(FlushJob::Log(cb)) {
            cb.log_io_completed(Err(io::Error::other("flusher stopped")));
        }
    }

    /// Waits for an fsync that covers everything written before this call.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(FlushJob::Wait(tx)).map_err(|_| io::Error::other("flusher stopped"))?;
        rx.await.map_err(|_| io::Error::other("flusher stopped"))?
    }
}

async fn run(db: Storage, mut rx: mpsc::UnboundedReceiver<FlushJob>, metrics: Metrics) {
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
        metrics.fsync_seconds.observe(start.elapsed().as_secs_f64());
        metrics.fsync_batch.observe(batch.len() as f64);
        if let Err(e) = &res {
            tracing::error!(cause = %e, "fsync failed");
        }
        for job in batch {
            let r = res.clone().map_err(io::Error::other);
            match job {
                FlushJob::Log(cb) => cb.log_io_completed(r),
                FlushJob::Wait(tx) => {
                    let _ = tx.send(r);
                }
            }
        }
    }
}
