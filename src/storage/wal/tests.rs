//! The write-ahead log against real files: replay after reopening, torn tails, corruption,
//! truncation, purge and segment deletion.

use super::*;
use crate::chat::{Command, UserId};
use openraft::{CommittedLeaderId, EntryPayload};
use std::sync::mpsc as std_mpsc;

fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Command::Register {
            user: UserId::parse(&format!("user{index}")).expect("valid id"),
        }),
    }
}

/// Appends and waits until the writer reports them durable.
fn append(wal: &Wal, shard: ShardId, entries: Vec<Entry<TypeConfig>>) {
    let log = wal.shard(shard);
    let (tx, rx) = std_mpsc::channel();
    wal.append_then(shard, &log, entries, Box::new(move |r| tx.send(r).expect("test waits"))).expect("queued");
    rx.recv().expect("writer answers").expect("durable");
}

fn indexes(wal: &Wal, shard: ShardId) -> Vec<(u64, u64)> {
    let log = wal.shard(shard);
    wal.read(&log, 0, u64::MAX).expect("readable").iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

#[test]
fn entries_votes_and_commit_marks_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
        append(&wal, 1, (1..=100).map(|i| entry(1, i)).collect());
        append(&wal, 2, (1..=5).map(|i| entry(3, i)).collect());
        let log = wal.shard(2);
        let vote = Vote::new_committed(3, 2);
        rt().block_on(async {
            wal.save_committed(2, &log, Some(LogId::new(CommittedLeaderId::new(3, 1), 4))).await.unwrap();
            wal.save_vote(2, &log, vote).await.unwrap();
        });
    }
    let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
    assert_eq!(indexes(&wal, 1), (1..=100).map(|i| (1, i)).collect::<Vec<_>>());
    assert_eq!(indexes(&wal, 2), (1..=5).map(|i| (3, i)).collect::<Vec<_>>());
    let log = wal.shard(2);
    let meta = log.lock().unwrap().meta.clone();
    assert_eq!(meta.vote, Some(Vote::new_committed(3, 2)));
    assert_eq!(meta.committed.map(|c| c.index), Some(4));
    // Entries read back from disk (not the in-memory copies) decode to what was written.
    assert_eq!(wal.read(&wal.shard(1), 40, 43).unwrap(), vec![entry(1, 40), entry(1, 41), entry(1, 42)]);
}

/// Appends after a reopen go after the existing records, not over them.
#[test]
fn appends_after_reopening_extend_the_log() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3u64 {
        let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
        append(&wal, 1, (round * 10 + 1..=round * 10 + 10).map(|i| entry(1, i)).collect());
    }
    let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
    assert_eq!(indexes(&wal, 1), (1..=30).map(|i| (1, i)).collect::<Vec<_>>());
    assert_eq!(wal.read(&wal.shard(1), 1, 2).unwrap(), vec![entry(1, 1)], "read back from disk");
}

#[test]
fn a_torn_tail_is_cut_off_and_appends_continue_after_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
        append(&wal, 1, (1..=10).map(|i| entry(1, i)).collect());
    }
    let seg = segment_path(dir.path(), 1);
    let good = std::fs::metadata(&seg).unwrap().len();
    // A crash in the middle of the next write: a header promising more than is there.
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, &[200, 0, 0, 0, 1, 2, 3, 4, b'{', b'"']).unwrap();
    drop(f);
    let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good, "the torn bytes are cut off");
    assert_eq!(indexes(&wal, 1).len(), 10);
    append(&wal, 1, vec![entry(1, 11)]);
    drop(wal);
    let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
    assert_eq!(indexes(&wal, 1), (1..=11).map(|i| (1, i)).collect::<Vec<_>>());
}

#[test]
fn corruption_before_the_last_segment_refuses_the_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open_with(dir.path(), Metrics::new(), 4096).unwrap();
        for i in 1..=200 {
            append(&wal, 1, vec![entry(1, i)]);
        }
        assert!(wal.segments() > 2, "small segments rotate");
    }
    let first = segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&first).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&first, bytes).unwrap();
    match Wal::open(dir.path(), Metrics::new()) {
        Err(WalError::Corrupt { path, .. }) => assert_eq!(path, first),
        Err(e) => panic!("expected corruption, got {e}"),
        Ok(_) => panic!("a corrupt segment must refuse the start"),
    }
}

#[test]
fn truncation_replaces_entries_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
        append(&wal, 7, (1..=10).map(|i| entry(1, i)).collect());
        let log = wal.shard(7);
        rt().block_on(wal.truncate(7, &log, 6)).unwrap();
        append(&wal, 7, (6..=8).map(|i| entry(2, i)).collect());
        assert_eq!(log.lock().unwrap().last_log_id().map(|l| (l.leader_id.term, l.index)), Some((2, 8)));
    }
    let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
    let want: Vec<(u64, u64)> = (1..=5).map(|i| (1, i)).chain((6..=8).map(|i| (2, i))).collect();
    assert_eq!(indexes(&wal, 7), want);
}

#[test]
fn purged_segments_are_deleted_and_the_rest_replays() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open_with(dir.path(), Metrics::new(), 4096).unwrap();
        for i in 1..=300 {
            append(&wal, 1, vec![entry(1, i)]);
        }
        let before = wal.segments();
        let log = wal.shard(1);
        rt().block_on(wal.purge(1, &log, LogId::new(CommittedLeaderId::new(1, 1), 290))).unwrap();
        // The purge record is written (and old segments collected) by the next write.
        append(&wal, 1, vec![entry(1, 301)]);
        assert!(wal.segments() < before, "fully purged segments go: {before} -> {}", wal.segments());
    }
    let wal = Wal::open_with(dir.path(), Metrics::new(), 4096).unwrap();
    assert_eq!(indexes(&wal, 1), (291..=301).map(|i| (1, i)).collect::<Vec<_>>());
    let log = wal.shard(1);
    assert_eq!(log.lock().unwrap().meta.purged.map(|p| p.index), Some(290));
}

#[test]
fn appends_of_many_shards_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let wal = Wal::open(dir.path(), metrics.clone()).unwrap();
    let (tx, rx) = std_mpsc::channel();
    for shard in 0..8u32 {
        let log = wal.shard(shard);
        for i in 1..=50 {
            let tx = tx.clone();
            wal.append_then(shard, &log, vec![entry(1, i)], Box::new(move |r| tx.send(r).unwrap())).unwrap();
        }
    }
    for _ in 0..400 {
        rx.recv().unwrap().unwrap();
    }
    let syncs = metrics.fsync_seconds.get_sample_count();
    assert!(syncs < 400, "400 appends took {syncs} syncs: no group commit");
    for shard in 0..8u32 {
        assert_eq!(indexes(&wal, shard).len(), 50);
    }
}

/// Commit marks alone are written without an fdatasync, and without waking the writer for
/// each (they wait up to `LAZY_DELAY` for a synced record); an append after them syncs, and
/// the marks written before it are on disk with it.
#[test]
fn commit_marks_ride_on_the_next_synced_round() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    {
        let wal = Wal::open(dir.path(), metrics.clone()).unwrap();
        let log = wal.shard(4);
        rt().block_on(async {
            for i in 1..=20 {
                wal.save_committed(4, &log, Some(LogId::new(CommittedLeaderId::new(1, 1), i))).await.unwrap();
                // Spread out: a writer woken by each mark would write it alone.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        // Let the writer drain the marks.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::metadata(segment_path(dir.path(), 1)).unwrap().len() == 0 {
            assert!(std::time::Instant::now() < deadline, "marks never written");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(metrics.fsync_rounds.get(), 0, "commit marks alone are not synced");
        let rounds = metrics.fsync_batch.get_sample_count();
        // One round per LAZY_DELAY (100 ms) at most; a slow machine may stretch the marks
        // over a few of them, never over 20.
        assert!(rounds <= 5, "20 commit marks took {rounds} write rounds: each woke the writer");
        append(&wal, 4, vec![entry(1, 1)]);
        assert_eq!(metrics.fsync_rounds.get(), 1);
        let log = wal.shard(5);
        rt().block_on(wal.save_vote(5, &log, Vote::new_committed(2, 1))).unwrap();
        assert_eq!(metrics.fsync_rounds.get(), 2, "votes are synced");
    }
    let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
    assert_eq!(wal.shard(4).lock().unwrap().meta.committed.map(|c| c.index), Some(20));
}

/// Lazy records still queued when the log is closed are written before the writer stops;
/// a log whose writer stopped refuses new records instead of queueing them for no one.
#[test]
fn lazy_records_queued_at_close_are_written() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
        let log = wal.shard(3);
        rt().block_on(wal.save_committed(3, &log, Some(LogId::new(CommittedLeaderId::new(1, 1), 7)))).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::metadata(segment_path(dir.path(), 1)).unwrap().len() == 0 {
        assert!(std::time::Instant::now() < deadline, "the queued mark was never written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
    assert_eq!(wal.shard(3).lock().unwrap().meta.committed.map(|c| c.index), Some(7));
    wal.queue.0.stop();
    let log = wal.shard(3);
    assert!(rt().block_on(wal.save_vote(3, &log, Vote::new_committed(1, 1))).is_err());
}

/// A shard that left the node is forgotten: its entries and vote are gone now and after a
/// reopen, the segments only it kept alive are deleted, the other shards are untouched, and
/// the shard can come back with a fresh log.
#[test]
fn a_forgotten_shard_is_gone_after_reopening_and_frees_its_segments() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open_with(dir.path(), Metrics::new(), 4096).unwrap();
        for i in 1..=200 {
            append(&wal, 1, vec![entry(1, i)]);
        }
        append(&wal, 2, (1..=3).map(|i| entry(2, i)).collect());
        let log1 = wal.shard(1);
        let log2 = wal.shard(2);
        rt().block_on(async {
            wal.save_vote(1, &log1, Vote::new_committed(5, 1)).await.unwrap();
            // Shard 2 purges its entries, so only shard 1 keeps the old segments alive.
            wal.purge(2, &log2, LogId::new(CommittedLeaderId::new(2, 1), 3)).await.unwrap();
        });
        let before = wal.segments();
        rt().block_on(wal.forget(1)).unwrap();
        assert!(indexes(&wal, 1).is_empty());
        assert_eq!(log1.lock().unwrap().meta, ShardMeta::default());
        // Garbage goes with the next write.
        append(&wal, 2, vec![entry(2, 4)]);
        assert!(wal.segments() < before, "segments only shard 1 used go: {before} -> {}", wal.segments());
    }
    {
        let wal = Wal::open_with(dir.path(), Metrics::new(), 4096).unwrap();
        assert!(indexes(&wal, 1).is_empty());
        assert_eq!(wal.shard(1).lock().unwrap().meta, ShardMeta::default());
        assert_eq!(indexes(&wal, 2), vec![(2, 4)]);
        // The shard comes back (moved here again) with a log of its own.
        append(&wal, 1, vec![entry(9, 1), entry(9, 2)]);
    }
    let wal = Wal::open_with(dir.path(), Metrics::new(), 4096).unwrap();
    assert_eq!(indexes(&wal, 1), vec![(9, 1), (9, 2)]);
}

/// An idle writer sleeps: after its last round it looks once more (`LAZY_DELAY`) and then
/// waits for the next job, instead of waking every `LAZY_DELAY` for ever; the next lazy
/// record still reaches the disk within about `LAZY_DELAY`, and the next append is synced.
#[test]
fn an_idle_writer_does_not_wake() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
    let log = wal.shard(2);
    rt().block_on(async {
        wal.save_committed(2, &log, Some(LogId::new(CommittedLeaderId::new(1, 1), 1))).await.unwrap();
    });
    let wakeups = || lock(&wal.queue.0.pending).wakeups;
    // The mark's round, then one look a LAZY_DELAY later, then sleep.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lock(&wal.queue.0.pending).idle {
        assert!(std::time::Instant::now() < deadline, "the writer never went idle");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let before = wakeups();
    std::thread::sleep(LAZY_DELAY * 10);
    let idle = wakeups() - before;
    assert!(idle <= 1, "the idle writer woke {idle} times in 10 LAZY_DELAYs");
    // A lazy record wakes the sleeping writer and is written within about LAZY_DELAY.
    let len = || std::fs::metadata(segment_path(dir.path(), 1)).unwrap().len();
    let written = len();
    rt().block_on(async {
        wal.save_committed(2, &log, Some(LogId::new(CommittedLeaderId::new(1, 1), 2))).await.unwrap();
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while len() == written {
        assert!(std::time::Instant::now() < deadline, "the mark queued to an idle writer was never written");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop((log, wal));
    let wal = Wal::open(dir.path(), Metrics::new()).unwrap();
    assert_eq!(wal.shard(2).lock().unwrap().meta.committed.map(|c| c.index), Some(2));
}
