//! What an operator meets first: `raftchat local` (ready, a node's death reported at once,
//! `restart N`), the CLI picking the right cluster's secret, a clear error for a refused
//! `chat`, single-cause error messages, metrics present from start-up, one log line for a
//! dead peer, JSON logs. Real processes, real sockets.

mod common;

use raftchat::fixture::free_port;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_raftchat");

/// Lines of a child's stderr, read on a thread.
fn lines_of(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `needle`; returns it (panics with what was seen otherwise).
fn expect_line(rx: &mpsc::Receiver<String>, needle: &str, within: Duration) -> String {
    let end = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    panic!("no line with {needle:?} within {within:?}; saw:\n{}", seen.join("\n"));
}

/// The pid of the `raftchat serve` started in `cwd` with config `cfg` (relative to `cwd`).
fn pid_of_node(cwd: &Path, cfg: &str) -> Option<u32> {
    let out = Command::new("pgrep").arg("-f").arg(cfg).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .find(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|d| d == cwd))
}

/// Three consecutive free ports' base (best effort: the first is free, the next two usually).
fn port_base() -> u16 {
    loop {
        let p = free_port().unwrap();
        if p < 60_000 && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_cluster_reports_a_death_at_once_restarts_it_and_the_cli_finds_its_secret() {
    let work = tempfile::tempdir().unwrap();
    // A zero-config node's folder with another cluster's secret, as after the README's first
    // section: the CLI must still use raftchat-local's secret for raftchat-local's nodes.
    std::fs::create_dir(work.path().join("raftchat-data")).unwrap();
    std::fs::write(work.path().join("raftchat-data/secret"), "another-cluster-secret-0123456789abcdef").unwrap();
    let (http, grpc, peer) = (port_base(), port_base(), port_base());
    let mut local = Command::new(BIN)
        .current_dir(work.path())
        .args(["local", "--dir", "raftchat-local"])
        .args(["--http-port", &http.to_string(), "--grpc-port", &grpc.to_string(), "--peer-port", &peer.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(local.stderr.take().unwrap());
    expect_line(&lines, "the cluster is ready", Duration::from_secs(90));

    let server = format!("http://127.0.0.1:{}", http + 1);
    let cli = |args: &[&str]| {
        Command::new(BIN).current_dir(work.path()).args(args).env_remove("RAFTCHAT_SECRET").output().unwrap()
    };
    let out = cli(&["add-user", "bob", "--server", &server]);
    assert!(out.status.success(), "add-user: {}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["send", "--server", &server, "--as", "alice", "--to", "bob", "hello"]);
    assert!(out.status.success(), "send: {}", String::from_utf8_lossy(&out.stderr));
    // The other secret is still what a zero-config node's address gets.
    let out = cli(&[
        "send",
        "--server",
        &server,
        "--as",
        "alice",
        "--to",
        "bob",
        "x",
        "--secret-file",
        "raftchat-data/secret",
    ]);
    assert!(!out.status.success(), "a foreign secret must be refused");

    // `chat` with a token the cluster refuses stops with the reason instead of retrying.
    let mut chat = Command::new(BIN)
        .current_dir(work.path())
        .args(["chat", "--server", &server, "--as", "alice", "--with", "bob", "--secret-file", "raftchat-data/secret"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = chat.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = chat.kill();
            panic!("chat kept retrying a refused token");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut chat.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("401") && err.contains("invalid_token"), "chat's error: {err}");

    // A node's death is reported at once, with how to start it again; `restart 3` does.
    let cwd = work.path().canonicalize().unwrap();
    let pid = pid_of_node(&cwd, "raftchat-local/node3.toml").expect("node 3 runs");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let died = expect_line(&lines, "node 3 died", Duration::from_secs(3));
    assert!(died.contains("restart 3") && died.contains("node3.log"), "{died}");
    local.stdin.as_mut().unwrap().write_all(b"restart 3\n").unwrap();
    expect_line(&lines, "node 3 is back and ready", Duration::from_secs(60));
    assert_ne!(pid_of_node(&cwd, "raftchat-local/node3.toml"), Some(pid));

    // Ctrl-C (SIGTERM here) stops every node cleanly.
    unsafe { libc::kill(local.id() as i32, libc::SIGTERM) };
    let st = local.wait().unwrap();
    assert!(st.success(), "raftchat local exited with {st}");
    for n in 1..=3 {
        assert_eq!(
            pid_of_node(&cwd, &format!("raftchat-local/node{n}.toml")),
            None,
            "node {n} outlived raftchat local"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taken_port_is_reported_once_with_its_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--http-addr", &addr, "--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains(&format!("cannot listen on {addr}")), "{err}");
    assert_eq!(last.matches("Address already in use").count(), 1, "cause repeated: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_metric_is_exported_from_start_up() {
    // Three nodes: some metrics exist only where there are followers (replication lag).
    let c = common::start(3, |_| {}).await;
    let body = c.http.get(format!("{}/metrics", c.url(0))).send().await.unwrap().text().await.unwrap();
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    let section = docs.split("## Metrics").nth(1).expect("a metrics section").split("\n## ").next().unwrap();
    let mut names = Vec::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = row.split('|').nth(1).unwrap();
        for name in first_cell.split('`').skip(1).step_by(2) {
            names.push(name.split('{').next().unwrap().to_string());
        }
    }
    assert!(names.len() >= 30, "metric table parsed: {names:?}");
    let missing: Vec<_> =
        names.iter().filter(|n| !body.lines().any(|l| !l.starts_with('#') && l.starts_with(n.as_str()))).collect();
    assert!(missing.is_empty(), "documented but not exported at start-up: {missing:?}");
    for needed in
        ["process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total", "raftchat_build_info{"]
    {
        assert!(body.contains(needed), "{needed} missing");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_peer_costs_one_log_line_not_dozens_a_second() {
    let mut c = common::start(3, |_| {}).await;
    // Under read load: every linearizable read checks leadership with every voter, and
    // openraft logs each failed check (once per source line every 10 s since `logs`).
    let users = ["ga", "gb", "gc", "gd"];
    for u in users {
        c.register(0, u).await;
    }
    let mut convs = Vec::new();
    for (k, a) in users.iter().enumerate() {
        let b = users[(k + 1) % users.len()];
        convs.push((a.to_string(), c.send_ok(0, a, b, &format!("g{k}"), "hi").await.conversation_id));
    }
    c.kill(2).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let count = |i: usize| std::fs::read_to_string(c.dir.join(format!("node{i}.log"))).unwrap().lines().count();
    let before = [count(1), count(2)];
    let until = std::time::Instant::now() + Duration::from_secs(6);
    let mut reads = 0;
    while std::time::Instant::now() < until {
        for (user, conv) in &convs {
            let h = c.full_history(reads % 2, user, conv).await;
            assert_eq!(h.messages.len(), 1);
            reads += 1;
        }
    }
    assert!(reads >= 24, "only {reads} reads in 6 s");
    for (k, i) in [1, 2].into_iter().enumerate() {
        let text = std::fs::read_to_string(c.dir.join(format!("node{i}.log"))).unwrap();
        let new: Vec<&str> = text.lines().skip(before[k]).collect();
        assert!(
            new.len() <= 10,
            "node {i}: {} lines in 6 s with a dead peer and {reads} reads:\n{}",
            new.len(),
            new.join("\n")
        );
    }
    let text = std::fs::read_to_string(c.dir.join("node1.log")).unwrap();
    let all_unreachable: Vec<&str> =
        text.lines().filter(|l| l.contains("peer unreachable") && l.contains("peer=3")).collect();
    assert!(!all_unreachable.is_empty(), "the dead peer was never reported");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let mut node = Command::new(BIN)
        .args(["serve", "--log-format", "json", "--data-dir", dir.path().to_str().unwrap()])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(["--grpc-addr", &format!("127.0.0.1:{}", free_port().unwrap())])
        .args(["--peer-addr", &format!("127.0.0.1:{}", free_port().unwrap())])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(node.stderr.take().unwrap());
    let first = lines.recv_timeout(Duration::from_secs(30)).expect("a log line");
    unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
    let _ = node.wait();
    let v: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_data_folder_of_an_unknown_format_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let args = |d: &Path| {
        vec![
            "serve".to_string(),
            "--data-dir".into(),
            d.display().to_string(),
            "--http-addr".into(),
            format!("127.0.0.1:{}", free_port().unwrap()),
            "--grpc-addr".into(),
            format!("127.0.0.1:{}", free_port().unwrap()),
            "--peer-addr".into(),
            format!("127.0.0.1:{}", free_port().unwrap()),
        ]
    };
    let run = |a: Vec<String>| async move {
        let mut node = Command::new(BIN).args(&a).stderr(Stdio::null()).spawn().unwrap();
        let health = format!("http://{}/healthz", a[a.iter().position(|x| x == "--http-addr").unwrap() + 1]);
        let end = Instant::now() + Duration::from_secs(30);
        while reqwest::get(&health).await.is_err() {
            assert!(Instant::now() < end, "node did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unsafe { libc::kill(node.id() as i32, libc::SIGTERM) };
        assert!(node.wait().unwrap().success());
    };
    // A new folder of a node below cluster_version 6 gets format 1, which older builds read
    // (so the node can still be rolled back during a rolling upgrade)...
    let config = dir.path().join("v5.toml");
    std::fs::write(&config, "cluster_version = 5\n").unwrap();
    let data = dir.path().join("data");
    let mut a = args(&data);
    a.extend(["--config".to_string(), config.display().to_string()]);
    run(a).await;
    let format = data.join("FORMAT");
    assert_eq!(std::fs::read_to_string(&format).unwrap().trim(), "raftchat-data 1");
    // ...and is labelled 2 once the node runs with cluster_version 6: its inbox events no
    // longer keep the counter older builds number them from...
    let config6 = dir.path().join("v6.toml");
    std::fs::write(&config6, "cluster_version = 6\n").unwrap();
    let mut a = args(&data);
    a.extend(["--config".to_string(), config6.display().to_string()]);
    run(a).await;
    assert_eq!(std::fs::read_to_string(&format).unwrap().trim(), "raftchat-data 2");
    // ...and 3 with cluster_version 7 (the default): its recency keys may lag their entries.
    run(args(&data)).await;
    assert_eq!(std::fs::read_to_string(&format).unwrap().trim(), "raftchat-data 3");
    // ...and one of a format this build does not know is refused, untouched.
    std::fs::write(&format, "raftchat-data 99\n").unwrap();
    let out = Command::new(BIN).args(args(&data)).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("on-disk format \"raftchat-data 99\"") && err.contains("does not know"), "{err}");
    assert_eq!(std::fs::read_to_string(&format).unwrap(), "raftchat-data 99\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_status_shows_every_shard_its_leader_and_who_is_down() {
    let mut c = common::start(3, |_| {}).await;
    c.register(0, "ben").await;
    c.send_ok(0, "amy", "ben", "a1", "hello").await;
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let out = run(&["admin", "status", "--server", &c.url(1)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for node in 0..3 {
        assert!(text.contains(&c.url(node)), "node {node} missing:\n{text}");
    }
    // Every shard, each with a leader.
    let shard_rows: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("SHARD")).skip(1).collect();
    assert_eq!(shard_rows.len(), 8, "{text}");
    assert!(shard_rows.iter().all(|r| !r.contains("none")), "{text}");
    // The JSON view carries the same, per node.
    let json_out = run(&["admin", "status", "--json", "--server", &c.url(0)]);
    let v: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!(v["status"]["2"]["shards"].as_array().unwrap().len(), 8);
    assert!(v["status"]["1"]["disk_bytes"]["wal"].as_u64().unwrap() > 0);
    assert!(text.lines().any(|l| l.starts_with("SHARD") && l.contains("SNAPSHOT")), "{text}");

    // A shard's size: its snapshot files, in /status, the metrics and the table.
    let snap = c
        .http
        .get(format!("{}/v1/admin/shards/0/snapshot", c.url(0)))
        .bearer_auth(c.admin_token())
        .send()
        .await
        .unwrap();
    assert!(snap.status().is_success(), "{}", snap.status());
    let got = snap.bytes().await.unwrap().len() as u64;
    let (holder, bytes) = common::eventually(Duration::from_secs(30), "a node reports shard 0's snapshot", || async {
        for i in 0..3 {
            let s = c.status(i).await.ok()?;
            let g = s["shards"].as_array()?.iter().find(|g| g["shard"].as_u64() == Some(0))?.clone();
            if g["snapshot_bytes"].as_u64().unwrap_or(0) > 0 {
                return Some((i, g["snapshot_bytes"].as_u64()?));
            }
        }
        None
    })
    .await;
    assert_eq!(bytes, got, "the snapshot's size on disk is what the backup endpoint sent");
    assert_eq!(c.metric(holder, "raftchat_shard_snapshot_bytes{shard=\"0\"}").await, bytes as f64);

    c.kill(2).unwrap();
    let out = run(&["admin", "status", "--server", &c.url(0)]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("nodes not answering: 3"), "{text}");
    let members = run(&["admin", "members", "--server", &c.url(0)]);
    let text = String::from_utf8_lossy(&members.stdout).to_string();
    assert!(text.lines().any(|l| l.starts_with('3') && l.contains("down")), "{text}");
}

/// Nodes that share a machine (`raftchat local`, `raftchat bench --local`) divide its cores
/// among their runtimes; `TOKIO_WORKER_THREADS` sets a node's worker threads, and a bad
/// value is refused with a clear message instead of a panic inside tokio.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_sharing_a_machine_divide_its_cores_and_a_bad_thread_count_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["serve", "--data-dir", "/nonexistent/never-created"])
        .env("TOKIO_WORKER_THREADS", "lots")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad thread count must stop the node: {err}");
    assert!(err.contains("TOKIO_WORKER_THREADS") && err.contains("from 1 to 1024"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let workers = |dir: &Path, i: usize| -> Option<usize> {
        let log = std::fs::read_to_string(dir.join(format!("node{i}.log"))).ok()?;
        let at = log.find("worker_threads=")? + "worker_threads=".len();
        log[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    let cores = std::thread::available_parallelism().unwrap().get();
    for (share, want) in [(true, raftchat::fixture::shared_worker_threads(3)), (false, cores)] {
        let dir = tempfile::tempdir().unwrap();
        let spec = raftchat::fixture::Spec { share_cores: share, ..raftchat::fixture::Spec::new(3, dir.path()) };
        let c = raftchat::fixture::Cluster::start(Path::new(BIN), &spec).unwrap();
        c.wait_all_ready(Duration::from_secs(60)).await.unwrap();
        for i in 1..=3 {
            assert_eq!(workers(dir.path(), i), Some(want), "node {i}, sharing cores: {share}");
        }
    }
    assert_eq!(raftchat::fixture::shared_worker_threads(3), (cores / 3).max(1));
    assert_eq!(raftchat::fixture::shared_worker_threads(1), cores);
}
