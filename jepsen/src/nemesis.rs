//! The nemesis: a schedule of faults over the run, recorded as a timeline of windows.
//!
//! Faults (`--nemesis` picks the families; they are mixed at random):
//! - `partition`: isolate one node, isolate a shard's leader, majority/minority halves,
//!   majorities ring, bridge (two halves joined only through one node);
//! - `isolate`: only the first two kinds of `partition` (one node, or a shard's leader,
//!   cut off from all others): the rest of the cluster keeps a working majority, so the cut
//!   off replicas fall behind while acknowledged writes continue around them;
//! - `kill`: kill -9 one or two nodes, restart them when the window ends;
//! - `pause`: SIGSTOP a node (often a leader), SIGCONT at the end;
//! - `clock`: skew a node's wall clock by up to ±5 minutes, or jump it back and forth;
//! - `restart`: kill -9 every node at once, then start them all;
//! - `power`: power loss of one node, a majority, or every node: kill -9, then the node's
//!   lazy filesystem ([`crate::lazyfs`]) drops every write that was not fsynced; restarted
//!   when the window ends. With this family every node's data folder is a lazy mount;
//! - `power-all`: `power`, always of every node at once;
//! - `upgrade` (needs `--old-bin`): one node stops gracefully and starts on the other build
//!   (old to new, or new back to old), so the cluster runs mixed builds all along, as
//!   during a rolling upgrade (and a rollback).
//! - `membership`: once or twice, a replica of a random shard moves to a node that did
//!   not hold it, from the shard's leader or a follower; or (one time in five) every replica
//!   of a node moves away, as `admin remove-node --drain-only` does (`POST
//!   /v1/admin/shards/{shard}/move`: learner, catch up, joint consensus, the old node drops
//!   its copy); or (one time in five) a node is replaced, as an operator replaces a
//!   machine: drained, removed from the node table for good (it stops by itself), and its
//!   slot (same addresses) comes back as a new node id with an empty data folder that
//!   joins the running cluster (always the run's first membership fault); or (one time in
//!   five, and the first membership fault after the replacement unless that one rolls a
//!   replacement too) a node dies (kill -9) and stays dead past the nodes'
//!   `replace_dead_after_secs` ([`DEAD_AFTER_SECS`] in runs with this family) and a round of
//!   re-replication, so the directory shard's leader moves its replicas to live nodes;
//!   restarted, it drops the copies that moved away. With that setting, kills, pauses and
//!   isolations longer than about 8 s in these runs start re-replication too. Moves are not
//!   undone, so over a run the placement wanders, nodes lose and regain shards and node ids
//!   change. Not with `upgrade` (builds before cluster version 4 have no node table).
//!
//! A third of the windows combine two families at once. Every window ends by undoing its
//! faults; the run ends with a full heal.

use crate::db::Db;
use crate::net::majorities_ring;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;

/// `replace_dead_after_secs` of the nodes in runs with the membership family.
pub const DEAD_AFTER_SECS: u64 = 8;
/// How long the membership family's dead node stays dead: past [`DEAD_AFTER_SECS`], a
/// repair round (5 s) and some moves.
const DEAD_HOLD: Duration = Duration::from_secs(DEAD_AFTER_SECS + 20);

pub const FAMILIES: &[&str] =
    &["partition", "isolate", "kill", "pause", "clock", "restart", "power", "power-all", "upgrade", "membership"];

#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub start: f64,
    pub end: f64,
    pub family: String,
    pub fault: String,
}

/// Shared state: the timeline and what is active now (for the progress line).
#[derive(Clone, Default)]
pub struct Timeline {
    pub windows: Arc<Mutex<Vec<Window>>>,
    pub active: Arc<Mutex<Option<String>>>,
    pub stop: Arc<AtomicBool>,
}

impl Timeline {
    pub fn active(&self) -> Option<String> {
        self.active.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

enum Undo {
    Nothing,
    Heal,
    Restart(Vec<usize>),
    /// Restart, but only after [`DEAD_HOLD`].
    RestartLate(Vec<usize>),
    Resume(Vec<usize>),
    Clock(Vec<usize>),
}

/// Applies one random fault of `family`; returns its description and how to undo it.
async fn inject(db: &mut Db, family: &str) -> anyhow::Result<(String, Undo)> {
    let n = db.len();
    let mut nodes: Vec<usize> = (0..n).collect();
    nodes.shuffle(&mut rand::rng());
    let pick = rand::rng().random_range(0..5u32);
    match family {
        "partition" | "isolate" => {
            let pick = if family == "isolate" { pick % 2 } else { pick };
            let desc = match pick {
                0 => {
                    db.net.partition(&[vec![nodes[0]], nodes[1..].to_vec()])?;
                    format!("isolate n{}", nodes[0] + 1)
                }
                1 => {
                    let shard = rand::rng().random_range(0..db.shards);
                    let l = db.leader_of(shard).await.unwrap_or(nodes[0]);
                    let rest: Vec<usize> = (0..n).filter(|i| *i != l).collect();
                    db.net.partition(&[vec![l], rest])?;
                    format!("isolate leader of shard {shard} (n{})", l + 1)
                }
                2 if n >= 5 => {
                    let cuts = majorities_ring(&nodes);
                    db.net.cut(&cuts)?;
                    format!("majorities ring {:?}", nodes.iter().map(|i| i + 1).collect::<Vec<_>>())
                }
                3 if n >= 4 => {
                    let bridge = nodes[0];
                    let half = (n - 1) / 2;
                    let (a, b) = nodes[1..].split_at(half);
                    db.net.partition(&[a.to_vec(), b.to_vec()])?;
                    format!("bridge via n{}", bridge + 1)
                }
                _ => {
                    let (a, b) = nodes.split_at(n / 2);
                    db.net.partition(&[a.to_vec(), b.to_vec()])?;
                    format!(
                        "halves {:?} | {:?}",
                        a.iter().map(|i| i + 1).collect::<Vec<_>>(),
                        b.iter().map(|i| i + 1).collect::<Vec<_>>()
                    )
                }
            };
            Ok((desc, Undo::Heal))
        }
        "kill" => {
            let k = if n >= 5 && pick % 2 == 0 { 2 } else { 1 };
            let victims = nodes[..k].to_vec();
            for v in &victims {
                db.kill(*v);
            }
            Ok((format!("kill -9 {:?}", victims.iter().map(|i| i + 1).collect::<Vec<_>>()), Undo::Restart(victims)))
        }
        "pause" => {
            let shard = rand::rng().random_range(0..db.shards);
            let v = if pick < 3 { db.leader_of(shard).await.unwrap_or(nodes[0]) } else { nodes[0] };
            db.pause(v);
            Ok((format!("SIGSTOP n{}", v + 1), Undo::Resume(vec![v])))
        }
        "clock" => {
            let v = nodes[0];
            let offset: i64 = rand::rng().random_range(-300..=300);
            db.set_clock(v, offset)?;
            if pick < 2 {
                // A jump: forward now, back later in the window.
                let w = nodes[1 % n];
                db.set_clock(w, 120)?;
                return Ok((format!("clock n{} {offset:+}s, jump n{} +120s", v + 1, w + 1), Undo::Clock(vec![v, w])));
            }
            Ok((format!("clock n{} {offset:+}s", v + 1), Undo::Clock(vec![v])))
        }
        "restart" => {
            db.kill_all();
            Ok(("kill -9 all nodes".into(), Undo::Restart((0..n).collect())))
        }
        "power" | "power-all" => {
            let pick = if family == "power-all" { 2 } else { pick };
            let (k, what) = match pick % 3 {
                0 => (1, "one node"),
                1 => (n / 2 + 1, "a majority"),
                _ => (n, "every node"),
            };
            let victims = nodes[..k].to_vec();
            let mut dropped = 0;
            for v in &victims {
                dropped += db.power_loss(*v)?;
            }
            let ids: Vec<usize> = victims.iter().map(|i| i + 1).collect();
            Ok((format!("power loss of {what} {ids:?} ({dropped} unsynced bytes dropped)"), Undo::Restart(victims)))
        }
        "upgrade" => Ok((db.switch_build(nodes[0])?, Undo::Nothing)),
        "membership" => {
            if pick == 1 || db.replacements == 0 {
                // Replace a node: drained, removed for good, its slot back as a new id (the
                // run's first membership fault always, so every run with the family has one).
                return Ok((db.replace(nodes[0]).await, Undo::Nothing));
            }
            if pick == 2 || db.deaths == 0 {
                // A node dies long enough for re-replication to move its replicas.
                let v = nodes[0];
                db.kill(v);
                db.deaths += 1;
                return Ok((format!("n{} dead past replace_dead_after_secs", v + 1), Undo::RestartLate(vec![v])));
            }
            if pick == 0 {
                // Empty a node, as `admin remove-node --drain-only` does (later moves bring
                // shards back).
                return Ok((db.drain(nodes[0]).await, Undo::Nothing));
            }
            // Picks 3 and 4: one or two moves, one after the other (each waits for the last).
            let mut done = Vec::new();
            for _ in 0..(pick - 2) {
                done.push(db.move_replica().await);
            }
            Ok((done.join("; "), Undo::Nothing))
        }
        other => anyhow::bail!("unknown nemesis {other:?}; known: {FAMILIES:?}"),
    }
}

async fn undo(db: &mut Db, u: Undo) -> anyhow::Result<()> {
    match u {
        Undo::Nothing => Ok(()),
        Undo::Heal => db.net.heal(),
        Undo::Restart(v) | Undo::RestartLate(v) => {
            for i in v {
                db.start_node(i)?;
            }
            Ok(())
        }
        Undo::Resume(v) => {
            for i in v {
                db.resume(i);
            }
            Ok(())
        }
        Undo::Clock(v) => {
            for i in v {
                db.set_clock(i, 0)?;
            }
            Ok(())
        }
    }
}

/// Runs faults from `families` until `until`: quiet 3–6 s, a fault held 5–12 s, repeat.
pub async fn run(
    db: Arc<AsyncMutex<Db>>,
    families: Vec<String>,
    timeline: Timeline,
    start: std::time::Instant,
    until: Instant,
) -> anyhow::Result<()> {
    if families.is_empty() {
        return Ok(());
    }
    // Families come in shuffled rounds, so every chosen family gets its turn.
    let mut round: Vec<String> = Vec::new();
    loop {
        if round.is_empty() {
            round = families.clone();
            round.shuffle(&mut rand::rng());
        }
        let quiet = Duration::from_millis(rand::rng().random_range(3000..6000));
        if Instant::now() + quiet + Duration::from_secs(5) >= until {
            return Ok(());
        }
        tokio::time::sleep(quiet).await;
        let mut picked = vec![round.pop().expect("refilled above")];
        // A third of the windows combine two families (e.g. a partition while a node is paused).
        if families.len() > 1 && rand::rng().random_bool(1.0 / 3.0) {
            let other: Vec<&String> = families
                .iter()
                .filter(|f| !picked.contains(f) && *f != "restart" && !f.starts_with("power"))
                .filter(|f| !(picked.iter().any(|p| is_partition(p)) && is_partition(f)))
                .collect();
            if let Some(f) = other.choose(&mut rand::rng()) {
                picked.push((*f).clone());
            }
        }
        let mut descs = Vec::new();
        let mut undos = Vec::new();
        {
            let mut g = db.lock().await;
            for family in &picked {
                if family == "clock" && !g.faketime {
                    continue;
                }
                let (d, u) = inject(&mut g, family).await?;
                descs.push(d);
                undos.push(u);
            }
        }
        if descs.is_empty() {
            continue;
        }
        let (family, desc) = (picked.join("+"), descs.join(" + "));
        let t0 = start.elapsed().as_secs_f64();
        *timeline.active.lock().unwrap_or_else(|p| p.into_inner()) = Some(desc.clone());
        let mut hold = Duration::from_millis(rand::rng().random_range(5000..12000));
        if undos.iter().any(|u| matches!(u, Undo::RestartLate(_))) {
            hold = hold.max(DEAD_HOLD);
        }
        let hold = hold.min(until.saturating_duration_since(Instant::now()));
        tokio::time::sleep(hold).await;
        {
            let mut g = db.lock().await;
            for u in undos.into_iter().rev() {
                undo(&mut g, u).await?;
            }
        }
        *timeline.active.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let t1 = start.elapsed().as_secs_f64();
        timeline.windows.lock().unwrap_or_else(|p| p.into_inner()).push(Window {
            start: t0,
            end: t1,
            family,
            fault: desc,
        });
        if timeline.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
}

fn is_partition(family: &str) -> bool {
    family == "partition" || family == "isolate"
}

/// Undoes everything: heal the network, resume, restart dead nodes, reset clocks.
pub fn heal_all(db: &mut Db) -> anyhow::Result<()> {
    db.net.heal()?;
    for i in 0..db.len() {
        db.resume(i);
        db.set_clock(i, 0)?;
        if !db.running(i) {
            db.start_node(i)?;
        }
    }
    Ok(())
}
