//! One harness run: set up the network and nodes, run clients and the nemesis, heal, wait,
//! do final reads, check, and write the run folder:
//!
//! - `history.jsonl` and `history.edn` (Elle list-append shape),
//! - `nemesis.json` (the fault timeline), `verdict.json`, `summary.txt`,
//! - `latency.svg` (latency and throughput with fault windows shaded),
//! - `n<N>.log`, `n<N>.toml` and data of every node.

use crate::checker::{self, Verdict};
use crate::client::{self, Target};
use crate::db::Db;
use crate::history::{self, Recorder};
use crate::nemesis::{self, Timeline};
use crate::net::{self, Net};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Opts {
    pub nodes: usize,
    pub time: u64,
    pub nemesis: Vec<String>,
    pub rate: f64,
    pub concurrency: usize,
    pub users: usize,
    pub shards: u32,
    pub quiet: u64,
    /// Config keys set on every node.
    pub set: Vec<(String, toml::Value)>,
    pub bin: PathBuf,
    /// An older build for mixed-build runs (the `upgrade` nemesis).
    pub old_bin: Option<PathBuf>,
    pub out: PathBuf,
}

fn progress(phase: &str, rec: &Recorder, last: &mut (usize, f64), timeline: &Timeline) {
    let (n, t) = (rec.len(), rec.elapsed_secs());
    let rate = (n - last.0) as f64 / (t - last.1).max(0.001);
    *last = (n, t);
    let fault = timeline.active().unwrap_or_else(|| "none".into());
    eprintln!("[{t:6.1}s] {phase:<8} {rate:7.1} events/s  {n:7} history events  fault: {fault}");
}

pub async fn run(o: Opts) -> anyhow::Result<Verdict> {
    net::preflight()?;
    for f in &o.nemesis {
        anyhow::ensure!(
            nemesis::FAMILIES.contains(&f.as_str()),
            "unknown nemesis {f:?}; choose from {:?}",
            nemesis::FAMILIES
        );
    }
    anyhow::ensure!(
        o.old_bin.is_some() || !o.nemesis.iter().any(|f| f == "upgrade"),
        "the upgrade nemesis needs --old-bin (an older raftchat build)"
    );
    // A reused folder would start the nodes on an earlier run's data, whose messages the
    // checker cannot account for (it once flagged them as failed sends that appeared).
    if o.out.exists() && std::fs::read_dir(&o.out)?.next().is_some() {
        anyhow::bail!("run folder {} is not empty: pass a new --out or remove it", o.out.display());
    }
    std::fs::create_dir_all(&o.out)?;
    let out = o.out.canonicalize()?;
    let net = Net { nodes: o.nodes };
    eprintln!(
        "setup: {} nodes in network namespaces on bridge {} (run folder {})",
        o.nodes,
        net::BRIDGE,
        out.display()
    );
    net.setup()?;
    let result = run_inner(&o, net.clone(), out.clone()).await;
    net.teardown();
    result
}

async fn run_inner(o: &Opts, net: Net, out: PathBuf) -> anyhow::Result<Verdict> {
    let power = o.nemesis.iter().any(|f| f.starts_with("power"));
    let mut set = o.set.clone();
    // With the membership family, a node dead for a few seconds has its replicas moved
    // (re-replication), so runs see it happen, also during plain kills.
    if o.nemesis.iter().any(|f| f == "membership") && !set.iter().any(|(k, _)| k == "replace_dead_after_secs") {
        set.push(("replace_dead_after_secs".into(), toml::Value::Integer(nemesis::DEAD_AFTER_SECS as i64)));
    }
    let db = Db::start(net, &o.bin, o.old_bin.as_deref(), &out, o.shards, power, set)?;
    if !db.faketime && o.nemesis.iter().any(|f| f == "clock") {
        eprintln!(
            "warning: {} not found (apt-get install libfaketime): clock faults are skipped",
            crate::db::LIBFAKETIME
        );
    }
    db.wait_ready(Duration::from_secs(90)).await?;
    let users: Vec<String> = (1..=o.users).map(|i| format!("u{i}")).collect();
    let http = reqwest::Client::new();
    for u in &users {
        let mut tries = 0;
        loop {
            let r = http
                .post(format!("{}/v1/users", db.url(0)))
                .bearer_auth(db.cluster.admin_token())
                .json(&serde_json::json!({"user": u}))
                .send()
                .await;
            if matches!(&r, Ok(r) if r.status().is_success()) {
                break;
            }
            tries += 1;
            anyhow::ensure!(tries < 50, "cannot register users: {r:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let target = Target {
        urls: (0..o.nodes).map(|i| db.url(i)).collect(),
        tokens: Arc::new(users.iter().map(|u| (u.clone(), db.cluster.token(u))).collect::<HashMap<_, _>>()),
        users: users.clone(),
    };
    let rec = Recorder::new();
    let start = std::time::Instant::now();
    let main_end = Instant::now() + Duration::from_secs(o.time);
    let subs_end = main_end + Duration::from_secs(o.quiet + 120);
    let subs: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, u)| tokio::spawn(client::subscriber(1000 + i, u.clone(), target.clone(), rec.clone(), subs_end)))
        .collect();
    let interval = Duration::from_secs_f64(o.concurrency as f64 / o.rate.max(0.1));
    let workers: Vec<_> = (0..o.concurrency)
        .map(|p| tokio::spawn(client::worker(p, target.clone(), rec.clone(), interval, main_end)))
        .collect();
    let db = Arc::new(AsyncMutex::new(db));
    let timeline = Timeline::default();
    let nem = tokio::spawn(nemesis::run(db.clone(), o.nemesis.clone(), timeline.clone(), start, main_end));
    let mut last = (0, 0.0);
    while Instant::now() < main_end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        progress("run", &rec, &mut last, &timeline);
    }
    for w in workers {
        let _ = w.await;
    }
    match nem.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("nemesis error: {e:#}"),
        Err(e) => eprintln!("nemesis task failed: {e}"),
    }
    eprintln!("heal: network healed, nodes resumed and restarted, clocks reset; quiet for {}s", o.quiet);
    {
        let mut g = db.lock().await;
        nemesis::heal_all(&mut g)?;
    }
    let quiet_end = Instant::now() + Duration::from_secs(o.quiet);
    while Instant::now() < quiet_end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        progress("quiet", &rec, &mut last, &timeline);
    }
    // A node that does not come back after everything healed is a finding, not a broken run
    // (e.g. state a power loss left inconsistent): the history is still checked and the
    // verdict says so.
    let unrecovered = match db.lock().await.wait_ready(Duration::from_secs(60)).await {
        Ok(()) => None,
        Err(e) => {
            eprintln!("warning: {e:#}");
            Some(format!("{e:#}"))
        }
    };
    eprintln!("final reads of every conversation");
    let missing = client::final_reads(&target, &rec, 2000, Duration::from_secs(60)).await;
    if missing > 0 {
        eprintln!("warning: {missing} conversations could not be read at the end");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for s in subs {
        s.abort();
    }
    let terms = {
        let g = db.lock().await;
        let mut t = raft_terms(&(0..g.len()).map(|i| g.url(i)).collect::<Vec<_>>()).await;
        if o.old_bin.is_some() {
            t += &format!("builds at the end: {}\n", g.builds());
        }
        t
    };

    let ops = rec.snapshot();
    let windows = timeline.windows.lock().unwrap_or_else(|p| p.into_inner()).clone();
    history::write_jsonl(&ops, &mut std::io::BufWriter::new(std::fs::File::create(out.join("history.jsonl"))?))?;
    history::write_edn(&ops, &mut std::io::BufWriter::new(std::fs::File::create(out.join("history.edn"))?))?;
    std::fs::write(out.join("nemesis.json"), serde_json::to_string_pretty(&windows)?)?;
    let mut verdict = checker::check(&ops);
    if let Some(e) = unrecovered {
        verdict.valid = false;
        *verdict.counts.entry("node-unrecovered").or_default() += 1;
        verdict.anomalies.push(checker::Anomaly {
            kind: "node-unrecovered",
            message: format!("after the final heal a node did not become ready: {e}"),
            ops: Vec::new(),
        });
    }
    std::fs::write(out.join("verdict.json"), serde_json::to_string_pretty(&verdict)?)?;
    let title = format!("raftchat: {} nodes, {}s, nemesis {}, {} ops", o.nodes, o.time, o.nemesis.join(","), ops.len());
    std::fs::write(out.join("latency.svg"), crate::plot::svg(&ops, &windows, &title))?;
    let mut summary = summary(o, &verdict, &windows);
    summary += &terms;
    std::fs::write(out.join("summary.txt"), &summary)?;
    eprintln!("{summary}");
    eprintln!("run folder: {}", out.display());
    drop(db);
    Ok(verdict)
}

/// Elections during the run, from the nodes' `/status`: each shard's term (the highest any
/// node reports) started at 1 when the cluster was created, so `term - 1` elections followed.
async fn raft_terms(urls: &[String]) -> String {
    let http = reqwest::Client::new();
    let mut term: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for u in urls {
        let Ok(r) = http.get(format!("{u}/status")).timeout(Duration::from_secs(3)).send().await else { continue };
        let Ok(v) = r.json::<serde_json::Value>().await else { continue };
        for g in v["shards"].as_array().into_iter().flatten() {
            if let (Some(s), Some(t)) = (g["shard"].as_u64(), g["term"].as_u64()) {
                let e = term.entry(s).or_default();
                *e = (*e).max(t);
            }
        }
    }
    let elections: u64 = term.values().map(|t| t.saturating_sub(1)).sum();
    format!(
        "raft terms at the end: {} elections after the first over {} shards (highest term {})\n",
        elections,
        term.len(),
        term.values().max().copied().unwrap_or(0)
    )
}

pub fn summary(o: &Opts, v: &Verdict, windows: &[nemesis::Window]) -> String {
    let mut s = format!(
        "nodes {} time {}s nemesis {} rate {}/s concurrency {}\n",
        o.nodes,
        o.time,
        o.nemesis.join(","),
        o.rate,
        o.concurrency
    );
    s += &format!("faults: {}\n", windows.len());
    for w in windows {
        s += &format!("  {:6.1}s - {:6.1}s  {:<9} {}\n", w.start, w.end, w.family, w.fault);
    }
    s += &format!("stats: {:?}\n", v.stats);
    if v.valid {
        s += "verdict: VALID (no anomalies)\n";
    } else {
        s += &format!("verdict: INVALID {:?}\n", v.counts);
        for a in v.anomalies.iter().take(20) {
            s += &format!("  {}: {} (ops {:?})\n", a.kind, a.message, a.ops);
        }
    }
    s
}
