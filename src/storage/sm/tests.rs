//! The state machine against real sled trees and snapshot files: snapshot records, builds
//! while entries apply, installs (a crash cut short, a corrupt file), reads under the lock.

use super::*;

#[test]
fn snapshot_records_round_trip_and_truncation_is_caught() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let t = db.open_tree("t").unwrap();
    t.insert(b"a", b"1").unwrap();
    t.insert(b"bb", b"").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("x.part");
    let snaps = SnapshotDir::open(dir.path().join("s0"), None).unwrap();
    let name = |what: &str| snaps.part(what);
    let touched = build::Touched::default();
    touched.start();
    let mut parts = build::unlocked(&t, &touched, name, &|| false).unwrap();
    let last = build::last_patch(&t, &touched, &mut parts, name).unwrap();
    let (bytes, records) = build::merge(&mut parts, last, &part, &|| false).unwrap();
    assert_eq!(records, 2);
    let data = std::fs::read(&part).unwrap();
    assert_eq!(bytes, data.len() as u64);
    let recs = snapshot::decode_all(&data).unwrap();
    assert_eq!(recs, vec![(b"a".to_vec(), b"1".to_vec()), (b"bb".to_vec(), Vec::new())]);
    assert!(snapshot::decode_all(&data[..data.len() - 1]).is_err());

    // Loading replaces every key and records the applied id and membership.
    let other = db.open_tree("o").unwrap();
    other.insert(b"stale", b"x").unwrap();
    let meta =
        SnapshotMeta { last_log_id: None, last_membership: StoredMembership::default(), snapshot_id: "s".into() };
    assert_eq!(load_tree(&other, &part, &meta).unwrap(), 2);
    assert!(other.get(b"stale").unwrap().is_none());
    assert_eq!(other.get(b"a").unwrap().unwrap().as_ref(), b"1");
    assert!(other.get(keys::APPLIED).unwrap().is_some());
}

fn opened(dir: &Path) -> (crate::storage::Storage, sled::Tree, sled::Tree, Flusher, Arc<RecentCache>) {
    let storage = crate::storage::Storage::open(dir, 1, 8 << 20).unwrap();
    let flusher = Flusher::start(storage.clone(), crate::metrics::Metrics::new());
    let (meta, tree) = storage.shard_trees(0).unwrap();
    let counter = |n: &str| prometheus::IntCounter::new(n, n).unwrap();
    let cache = Arc::new(RecentCache::new(1 << 20, counter("h"), counter("m")));
    (storage, meta, tree, flusher, cache)
}

fn meta_at(index: u64, id: &str) -> SnapshotMeta<NodeId, Node> {
    let log = LogId::new(openraft::CommittedLeaderId::new(3, 1), index);
    SnapshotMeta { last_log_id: Some(log), last_membership: StoredMembership::default(), snapshot_id: id.into() }
}

#[tokio::test]
async fn an_install_a_crash_cut_short_is_completed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, meta_t, tree, flusher, cache) = opened(dir.path());
    let snap_dir = dir.path().join("snapshots").join("s0");
    let snaps = SnapshotDir::open(snap_dir.clone(), None).unwrap();
    let meta = meta_at(42, "3-1-42-7");
    let part = snaps.part("recv");
    let mut data = Vec::new();
    snapshot::write_record(&mut data, b"a", b"1").unwrap();
    snapshot::write_record(&mut data, b"b", b"2").unwrap();
    std::fs::write(&part, &data).unwrap();
    snaps.publish(&part, &meta.snapshot_id).unwrap();
    // The crash came after some of the old keys were removed and a few new ones written.
    tree.insert(b"a", b"old").unwrap();
    tree.insert(b"stale", b"x").unwrap();
    meta_t.insert(INSTALLING, encode(&meta)).unwrap();

    let mut sm = StateMachine::open(tree.clone(), meta_t.clone(), flusher, cache, snap_dir).unwrap();
    assert_eq!(tree.get(b"a").unwrap().unwrap().as_ref(), b"1");
    assert_eq!(tree.get(b"b").unwrap().unwrap().as_ref(), b"2");
    assert!(tree.get(b"stale").unwrap().is_none());
    assert!(meta_t.get(INSTALLING).unwrap().is_none());
    assert_eq!(sm.read_applied().unwrap().0.map(|l| l.index), Some(42));
    let cur = sm.get_current_snapshot().await.unwrap().expect("the installed snapshot is current");
    assert_eq!(cur.meta.snapshot_id, "3-1-42-7");
}

#[tokio::test]
async fn a_snapshot_kept_in_sled_moves_to_its_file_and_builds_replace_files() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, meta_t, tree, flusher, cache) = opened(dir.path());
    let snap_dir = dir.path().join("snapshots").join("s0");
    let mut data = Vec::new();
    snapshot::write_record(&mut data, b"k", b"v").unwrap();
    meta_t.insert(SNAP_META, encode(&meta_at(5, "old-5"))).unwrap();
    meta_t.insert(SNAP_DATA, data.clone()).unwrap();
    tree.insert(b"k", b"v").unwrap();

    let mut sm = StateMachine::open(tree, meta_t.clone(), flusher, cache, snap_dir.clone()).unwrap();
    assert!(meta_t.get(SNAP_DATA).unwrap().is_none());
    assert_eq!(std::fs::read(snap_dir.join("old-5.snap")).unwrap(), data);
    let cur = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(cur.meta.snapshot_id, "old-5");

    // A build writes a new file, names it, and deletes the old one.
    let built = sm.build_snapshot().await.unwrap();
    let files: Vec<_> = std::fs::read_dir(&snap_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files, vec![built.snapshot.path.clone()]);
    assert_eq!(
        snapshot::decode_all(&std::fs::read(&built.snapshot.path).unwrap()).unwrap(),
        vec![(b"k".to_vec(), b"v".to_vec())]
    );
}

/// A build gives way to an install waiting for it when a current snapshot exists (it
/// answers with that one, which openraft takes as nothing newer), and not otherwise.
#[tokio::test]
async fn a_build_gives_way_to_a_waiting_install_only_when_a_snapshot_exists() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, meta_t, tree, flusher, cache) = opened(dir.path());
    let snap_dir = dir.path().join("snapshots").join("s0");
    for i in 0..2_000u32 {
        tree.insert(i.to_be_bytes(), vec![3u8; 40]).unwrap();
    }
    let mut sm = StateMachine::open(tree, meta_t, flusher, cache, snap_dir.clone()).unwrap();
    sm.apply((0..10).map(index_update)).await.unwrap();
    let waiting = Waiting::new(&sm.install_waiting);
    // No snapshot yet: the build completes all the same.
    let first = sm.build_snapshot().await.unwrap();
    assert_eq!(first.meta.last_log_id.map(|l| l.index), Some(10));
    sm.apply((10..20).map(index_update)).await.unwrap();
    // Now it gives way: the answer is the current snapshot, and no new file is left.
    let again = sm.build_snapshot().await.unwrap();
    assert_eq!(again.meta, first.meta);
    let files: Vec<_> = std::fs::read_dir(&snap_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files, vec![first.snapshot.path.clone()]);
    // With no install waiting it builds.
    drop(waiting);
    let newer = sm.build_snapshot().await.unwrap();
    assert_eq!(newer.meta.last_log_id.map(|l| l.index), Some(20));
    assert_ne!(newer.meta.snapshot_id, first.meta.snapshot_id);
    // A current snapshot whose file is gone is nothing to answer with: the build goes on
    // (an error would stop the shard's Raft core).
    std::fs::remove_file(&newer.snapshot.path).unwrap();
    sm.apply((20..25).map(index_update)).await.unwrap();
    let waiting = Waiting::new(&sm.install_waiting);
    let rebuilt = sm.build_snapshot().await.unwrap();
    assert_eq!(rebuilt.meta.last_log_id.map(|l| l.index), Some(25));
    drop(waiting);

    // An install that stops waiting for the lock (its future dropped) is no longer counted.
    let held = sm.snap_lock.clone().lock_owned().await;
    let mut other = sm.clone();
    let file = other.begin_receiving_snapshot().await.unwrap();
    let meta = rebuilt.meta.clone();
    let install = async move { other.install_snapshot(&meta, file).await };
    assert!(tokio::time::timeout(std::time::Duration::from_millis(100), install).await.is_err());
    assert_eq!(sm.install_waiting.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(held);
}

#[tokio::test]
async fn a_corrupt_received_snapshot_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, meta_t, tree, flusher, cache) = opened(dir.path());
    tree.insert(b"k", b"v").unwrap();
    let mut sm =
        StateMachine::open(tree.clone(), meta_t.clone(), flusher, cache, dir.path().join("snapshots/s0")).unwrap();
    let mut good = Vec::new();
    snapshot::write_record(&mut good, b"a", b"1").unwrap();
    snapshot::write_record(&mut good, b"b", b"2").unwrap();

    let mut recv = sm.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *recv, &good[..good.len() - 1]).await.unwrap();
    let part = recv.path.clone();
    assert!(sm.install_snapshot(&meta_at(9, "3-1-9-1"), recv).await.is_err());
    assert_eq!(tree.get(b"k").unwrap().unwrap().as_ref(), b"v", "the state is untouched");
    assert!(meta_t.get(INSTALLING).unwrap().is_none());
    assert!(!part.exists(), "the bad file is gone");

    let mut recv = sm.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *recv, &good).await.unwrap();
    sm.install_snapshot(&meta_at(9, "3-1-9-2"), recv).await.unwrap();
    assert!(tree.get(b"k").unwrap().is_none());
    assert_eq!(tree.get(b"b").unwrap().unwrap().as_ref(), b"2");
    assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().meta.snapshot_id, "3-1-9-2");
}

/// Index updates of 20 users with 5 peers each, log index `i + 1` (their writes add,
/// replace and remove keys: inbox events, counters, entries, recency keys).
fn index_update(i: u64) -> Entry<TypeConfig> {
    use crate::chat::{Command, ConversationId, UserId};
    let user = UserId::parse(&format!("u{}", i % 20)).unwrap();
    let from = UserId::parse(&format!("p{}", (i / 20) % 5)).unwrap();
    let conversation = ConversationId::between(&user, &from).unwrap();
    let cmd = Command::IndexUpdate {
        user,
        conversation,
        from,
        seq: i + 1,
        ts: 1_000_000 + i,
        preview: "hi".into(),
        uncounted: i % 2 == 1,
        lazy_order: false,
    };
    Entry::<TypeConfig> {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i + 1),
        payload: EntryPayload::Normal(cmd),
    }
}

fn records_of(tree: &sled::Tree) -> Vec<snapshot::Record> {
    tree.iter().map(|kv| kv.unwrap()).filter(|(k, _)| k != keys::REDO).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
}

/// A snapshot is built while entries go on being applied (applies no longer wait for a
/// build), and it is a consistent cut all the same: its records are exactly the state of
/// a replica that applied the log up to the index the snapshot claims. The old build,
/// which held applies off while it wrote, fails the first assertion (its snapshot
/// covered only what was applied before it started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_while_entries_apply_is_the_state_at_its_index() {
    built_during_applies(None).await;
}

/// The same when more keys are written during the build than it records: it writes the
/// tree again under the lock, and the snapshot is still the state at its index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_records_too_many_keys_is_still_the_state_at_its_index() {
    built_during_applies(Some(20)).await;
}

async fn built_during_applies(touched_limit: Option<usize>) {
    let filler = |tree: &sled::Tree| {
        let mut b = sled::Batch::default();
        for i in 0..60_000u32 {
            b.insert([b"f/".as_slice(), &i.to_be_bytes()].concat(), vec![7u8; 100]);
        }
        tree.apply_batch(b).unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    let (_s, meta_t, tree, flusher, cache) = opened(dir.path());
    filler(&tree);
    let mut sm = StateMachine::open(tree, meta_t, flusher, cache, dir.path().join("snapshots/s0")).unwrap();
    if let Some(limit) = touched_limit {
        sm.touched = Arc::new(build::Touched::with_limit(limit));
    }
    sm.apply((0..100).map(index_update)).await.unwrap();

    let applied = Arc::new(std::sync::atomic::AtomicU64::new(100));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut applier = sm.clone();
    let (count, halt) = (applied.clone(), stop.clone());
    let applies = tokio::spawn(async move {
        let mut i = 100;
        while !halt.load(std::sync::atomic::Ordering::SeqCst) {
            applier.apply([index_update(i)]).await.unwrap();
            i += 1;
            count.store(i, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let before = applied.load(std::sync::atomic::Ordering::SeqCst);
    let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let after = applied.load(std::sync::atomic::Ordering::SeqCst);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    applies.await.unwrap();
    let claimed = built.meta.last_log_id.unwrap().index;
    assert_eq!(sm.touched.overflowed(), touched_limit.is_some(), "the build recorded past its limit or not");
    assert!(
        claimed >= before + 10 && claimed <= after + 1,
        "the snapshot covers entries applied while it was built: index {claimed}, {before} applied when the build began, {after} when it ended"
    );

    let other = tempfile::tempdir().unwrap();
    let (_s2, meta2, tree2, flusher2, cache2) = opened(other.path());
    filler(&tree2);
    let mut replica =
        StateMachine::open(tree2.clone(), meta2, flusher2, cache2, other.path().join("snapshots/s0")).unwrap();
    for chunk in (0..claimed).collect::<Vec<_>>().chunks(500) {
        replica.apply(chunk.iter().map(|i| index_update(*i))).await.unwrap();
    }
    let got = snapshot::decode_all(&std::fs::read(&built.snapshot.path).unwrap()).unwrap();
    let want = records_of(&tree2);
    assert_eq!(got.len(), want.len(), "records in the snapshot and in the replica at index {claimed}");
    assert!(got == want, "the snapshot differs from the replica's state at index {claimed}");
}

/// A recent-conversations read under [`StateMachine::read_lock`] never sees an entry
/// half applied, however the applies and reads interleave (an entry's writes reach sled
/// a key at a time: a conversation moving to the top has its new order key written
/// before its old one goes, so an unguarded read sees it twice, or, written the other way
/// round, not at all, as a fault run once saw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_read_under_the_read_lock_sees_whole_entries() {
    use crate::chat::{Command, ConversationId, UserId};
    let dir = tempfile::tempdir().unwrap();
    let (_s, meta_t, tree, flusher, cache) = opened(dir.path());
    let mut sm = StateMachine::open(tree, meta_t, flusher, cache, dir.path().join("snapshots/s0")).unwrap();
    let me = UserId::parse("u4").unwrap();
    let convs: Vec<(UserId, ConversationId)> = ["u1", "u2", "u3", "u5"]
        .iter()
        .map(|p| {
            let peer = UserId::parse(p).unwrap();
            (peer.clone(), ConversationId::between(&me, &peer).unwrap())
        })
        .collect();
    let entry = |i: u64| {
        let (peer, conversation) = convs[(i % 4) as usize].clone();
        let cmd = Command::IndexUpdate {
            user: me.clone(),
            conversation,
            from: peer,
            seq: i / 4 + 1,
            ts: 1_000_000 + i,
            preview: String::new(),
            uncounted: true,
            // Every update moves its key (the half-applied state this test looks for).
            lazy_order: false,
        };
        let log_id = LogId::new(openraft::CommittedLeaderId::new(1, 1), i + 1);
        Entry::<TypeConfig> { log_id, payload: EntryPayload::Normal(cmd) }
    };
    sm.apply((0..4).map(entry)).await.unwrap();

    let reader = sm.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let user = me.clone();
    let reads = tokio::spawn(async move {
        let mut reads = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let rows = {
                let _g = reader.read_lock().await;
                reader.view.recent(&user, None, 100).unwrap()
            };
            let mut seen: Vec<String> = rows.iter().map(|(c, _, _)| c.to_string()).collect();
            seen.sort();
            seen.dedup();
            assert_eq!((rows.len(), seen.len()), (4, 4), "read {reads}: {seen:?}");
            reads += 1;
            tokio::task::yield_now().await;
        }
        reads
    });
    for i in 4..4000 {
        sm.apply([entry(i)]).await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reads.await.unwrap();
    assert!(reads > 100, "the reader ran alongside the applies ({reads} reads)");
}

/// The FORMAT label of `dir`.
fn label(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("FORMAT")).unwrap().trim().to_string()
}

/// A folder labelled `format` whose tree holds `mark` (a crash came between the apply that
/// wrote it and the label): its label before and after the state machine opens.
fn labels_opening_a_tree_with(format: u32, mark: &[u8]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    crate::storage::check_format(dir.path(), format).unwrap();
    let (_s, meta_t, tree, flusher, cache) = opened(dir.path());
    tree.insert(mark, b"").unwrap();
    let before = label(dir.path());
    StateMachine::open(tree, meta_t, flusher, cache, dir.path().join("snapshots/s0")).unwrap();
    (before, label(dir.path()))
}

/// Another replica, format 1, installs `built`: its label before and after.
async fn labels_installing(built: &Snapshot<TypeConfig>) -> (String, String) {
    let other = tempfile::tempdir().unwrap();
    crate::storage::check_format(other.path(), 1).unwrap();
    let (_s, meta_t, tree, flusher, cache) = opened(other.path());
    let mut sm = StateMachine::open(tree, meta_t, flusher, cache, other.path().join("snapshots/s0")).unwrap();
    let before = label(other.path());
    let data = std::fs::read(&built.snapshot.path).unwrap();
    let mut recv = sm.begin_receiving_snapshot().await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut *recv, &data).await.unwrap();
    sm.install_snapshot(&built.meta, recv).await.unwrap();
    (before, label(other.path()))
}

/// A node configured below `cluster_version` 6 keeps format 1 until it applies an inbox
/// event a node at 6 proposed without the counter, or installs a snapshot holding one: the
/// folder is then labelled 2 (older builds would misnumber such events), and stays so
/// across a restart. Events with the counter leave it at 1.
#[tokio::test]
async fn applying_or_installing_uncounted_events_labels_the_folder() {
    let counted = |i: u64| {
        let mut e = index_update(i * 2);
        if let EntryPayload::Normal(crate::chat::Command::IndexUpdate { uncounted, .. }) = &mut e.payload {
            assert!(!*uncounted);
        }
        e
    };
    let dir = tempfile::tempdir().unwrap();
    crate::storage::check_format(dir.path(), 1).unwrap();
    let built = {
        let (_s, meta_t, tree, flusher, cache) = opened(dir.path());
        let mut sm = StateMachine::open(tree.clone(), meta_t, flusher, cache, dir.path().join("snapshots/s0")).unwrap();
        sm.apply((0..3).map(counted)).await.unwrap();
        assert_eq!(label(dir.path()), "raftchat-data 1", "events with the counter");
        assert!(tree.get(keys::UNCOUNTED).unwrap().is_none());
        sm.apply([index_update(7)]).await.unwrap(); // odd: without the counter
        assert_eq!(label(dir.path()), "raftchat-data 2");
        assert!(tree.get(keys::UNCOUNTED).unwrap().is_some());
        sm.build_snapshot().await.unwrap()
    };
    // A tree that holds the mark at open (a crash came between the apply and the label).
    let (before, after) = labels_opening_a_tree_with(1, keys::UNCOUNTED);
    assert_eq!(before, "raftchat-data 1");
    assert_eq!(after, "raftchat-data 2");
    // Another replica, format 1, installs that snapshot.
    let (before, after) = labels_installing(&built).await;
    assert_eq!(before, "raftchat-data 1");
    assert_eq!(after, "raftchat-data 2");
}

/// A node configured below `cluster_version` 7 labels its folder 3 when it applies an index
/// update that leaves a recency key behind its entry (a peer at 7 proposed it), or installs
/// a snapshot holding one; a lazy update that moves the key (the window passed) does not.
#[tokio::test]
async fn applying_or_installing_lazy_recency_keys_labels_the_folder() {
    use crate::chat::{Command, ConversationId, UserId};
    let (me, peer) = (UserId::parse("me").unwrap(), UserId::parse("peer").unwrap());
    let conversation = ConversationId::between(&me, &peer).unwrap();
    let update = |i: u64, seq: u64, ts: u64| Entry::<TypeConfig> {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
        payload: EntryPayload::Normal(Command::IndexUpdate {
            user: me.clone(),
            conversation: conversation.clone(),
            from: peer.clone(),
            seq,
            ts,
            preview: String::new(),
            uncounted: false,
            lazy_order: true,
        }),
    };
    let window = crate::chat::types::ORDER_WINDOW_MS;
    let dir = tempfile::tempdir().unwrap();
    crate::storage::check_format(dir.path(), 1).unwrap();
    let built = {
        let (_s, meta_t, tree, flusher, cache) = opened(dir.path());
        let mut sm = StateMachine::open(tree.clone(), meta_t, flusher, cache, dir.path().join("snapshots/s0")).unwrap();
        // The first message makes the key; the next, a window later, moves it.
        sm.apply([update(1, 1, 1_000_000), update(2, 2, 1_000_000 + window)]).await.unwrap();
        assert_eq!(label(dir.path()), "raftchat-data 1", "keys at their entries' last_ts");
        assert!(tree.get(keys::LAZY_ORDER).unwrap().is_none());
        // Within the window: the key stays behind.
        sm.apply([update(3, 3, 1_000_001 + window)]).await.unwrap();
        assert_eq!(label(dir.path()), "raftchat-data 3");
        assert!(tree.get(keys::LAZY_ORDER).unwrap().is_some());
        let listed = ShardView { tree: tree.clone() }.recent(&me, None, 10).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.order_ts, Some(1_000_000 + window));
        sm.build_snapshot().await.unwrap()
    };
    // A tree that holds the mark at open (a crash came between the apply and the label).
    let (before, after) = labels_opening_a_tree_with(2, keys::LAZY_ORDER);
    assert_eq!(before, "raftchat-data 2");
    assert_eq!(after, "raftchat-data 3");
    // Another replica, format 1, installs that snapshot.
    assert_eq!(labels_installing(&built).await.1, "raftchat-data 3");
    // A restore (`Ingest`) of an entry whose key lags, into a folder of format 2.
    let restored = tempfile::tempdir().unwrap();
    crate::storage::check_format(restored.path(), 2).unwrap();
    let (_s, meta_t, tree, flusher, cache) = opened(restored.path());
    let mut sm =
        StateMachine::open(tree.clone(), meta_t, flusher, cache, restored.path().join("snapshots/s0")).unwrap();
    let mut entry = crate::chat::IndexEntry::new(peer.clone());
    (entry.last_seq, entry.last_ts, entry.order_ts) = (3, 1_000_001 + window, Some(1_000_000 + window));
    let records = vec![
        (keys::index(&me, &conversation), crate::storage::encode(&entry)),
        (keys::order(&me, 1_000_000 + window, &conversation), Vec::new()),
    ];
    let ingest = |i: u64, records: Vec<(Vec<u8>, Vec<u8>)>| Entry::<TypeConfig> {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
        payload: EntryPayload::Normal(Command::Ingest { records, first: i == 1 }),
    };
    entry.order_ts = None;
    let exact = vec![(keys::index(&peer, &conversation), crate::storage::encode(&entry))];
    sm.apply([ingest(1, exact)]).await.unwrap();
    assert_eq!(label(restored.path()), "raftchat-data 2", "entries at their keys");
    sm.apply([ingest(2, records)]).await.unwrap();
    assert_eq!(label(restored.path()), "raftchat-data 3");
    assert!(tree.get(keys::LAZY_ORDER).unwrap().is_some());
}
