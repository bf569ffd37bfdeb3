//! Operator endpoints for backup, restore and leadership (operator token required).
//!
//! - `GET /v1/admin/shards/{shard}/snapshot`: a fresh snapshot of the shard as this node's
//!   replica holds it (the node triggers one and waits until it covers everything applied
//!   when the request came), as the snapshot's record bytes; the headers name the shard, the
//!   cluster's shard count and the log index and term the snapshot covers. `raftchat admin
//!   backup` asks each shard's leader.
//! - `POST /v1/admin/shards/{shard}/ingest?first=true|false`: records of a backup (the same
//!   record format) written into the shard through its Raft log as they are; the first chunk
//!   is refused with 409 `shard_not_empty` unless the shard holds no chat data yet.
//!   `raftchat admin restore` sends a backup's shards in chunks of at most [`INGEST_CHUNK`].
//! - `POST /v1/admin/shards/{shard}/transfer-leader` `{"to": N}`: moves the shard's
//!   leadership to node N (`raftchat admin transfer-leader`).
//! - `POST /v1/admin/shards/{shard}/move` `{"from": A, "to": B}`: moves the shard's replica
//!   from node A to node B (`node::membership`; `raftchat admin move-replica`, `add-node`,
//!   `remove-node`, `replace-node`); answers once B is a voter and A dropped its copy (or
//!   says why A did not). Needs cluster version 3.
//! - `GET /v1/admin/nodes`: the cluster's node table (`node::directory`), read from the
//!   directory shard's leader, and this node's address book.
//! - `POST /v1/admin/nodes/{id}/remove`: node `id` leaves the cluster for good (its id is
//!   never taken back); refused with 409 `node_holds_replicas` while any shard still lists
//!   it (`raftchat admin remove-node` and `replace-node` move them first). Cluster version 4.
//!   With `?force=true` (`remove-node --force`, for a dead machine) it is removed at once and
//!   the directory shard leader's re-replication (`node::repair`) moves its replicas away in
//!   its next round; refused (409) while the node answers, unless that leader re-replicates,
//!   and unless every shard it is in keeps a majority of voters that answer and are not
//!   removed and has a spare node that answers.

use super::error::ApiError;
use super::http::{auth_header, respond};
use crate::chat::{Command, Reply};
use crate::node::placement_lock::{LockAnswer, LockOp, TOKEN_HEADER, VERSION as LOCK_VERSION};
use crate::node::router::{ShardOp, ShardReply};
use crate::node::Node;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Largest ingest body: records of a backup, a chunk at a time.
pub const INGEST_CHUNK: usize = 256 << 10;

type St = State<Arc<Node>>;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/admin/shards/{shard}/snapshot", get(snapshot))
        .route("/v1/admin/shards/{shard}/ingest", post(ingest).layer(DefaultBodyLimit::max(INGEST_CHUNK + (64 << 10))))
        .route("/v1/admin/shards/{shard}/transfer-leader", post(transfer_leader))
        .route("/v1/admin/shards/{shard}/move", post(move_replica))
        .route("/v1/admin/nodes", get(nodes))
        .route("/v1/admin/nodes/{id}/remove", post(remove_node))
        .route("/v1/admin/placement/lock", get(lock_state).post(lock_take))
        .route("/v1/admin/placement/unlock", post(lock_release))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TakeBody {
    /// Chosen by the taker; renewals and its moves carry it.
    token: u64,
    /// Who holds it, for whoever is refused ("admin add-node 4 from host h").
    holder: String,
    /// A renewal of a lease already held (kept across a change of shard 0's leader).
    #[serde(default)]
    renew: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    token: u64,
}

fn lock_json(answer: LockAnswer) -> Result<serde_json::Value, ApiError> {
    match (answer.refusal(), &answer) {
        (None, _) => Ok(serde_json::json!({ "state": answer })),
        // Shard 0's leader changed a moment ago: worth asking again in a few seconds.
        (Some(why), LockAnswer::Unsure { .. }) => Err(ApiError::new(StatusCode::CONFLICT, "placement_unsure", why)),
        (Some(why), _) => Err(ApiError::new(StatusCode::CONFLICT, "placement_busy", why)),
    }
}

/// Below [`LOCK_VERSION`] the lock is not used: 404, which the CLI reads as "no lock here".
fn lock_available(node: &Node) -> Result<(), ApiError> {
    if node.cfg.cluster_version >= LOCK_VERSION {
        return Ok(());
    }
    Err(ApiError::not_found(
        "not_available",
        format!(
            "the placement lock needs cluster_version {LOCK_VERSION}; this node runs with {}: placement commands are not coordinated",
            node.cfg.cluster_version
        ),
    ))
}

/// `GET /v1/admin/placement/lock`: who holds the placement lock (`node::placement_lock`).
async fn lock_state(State(node): St, headers: HeaderMap) -> Response {
    let r = async {
        operator(&node, &headers)?;
        lock_available(&node)?;
        let a = node.placement_lock_op(LockOp::Check { token: None }, node.request_deadline()).await?;
        Ok(serde_json::json!({ "state": a, "message": a.refusal() }))
    }
    .await;
    respond(&node, "placement_lock", r)
}

/// `POST /v1/admin/placement/lock` `{"token", "holder", "renew"}`: 200 when taken or
/// renewed, 409 `placement_busy` naming the holder.
async fn lock_take(
    State(node): St,
    headers: HeaderMap,
    body: Result<axum::Json<TakeBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let r = async {
        operator(&node, &headers)?;
        lock_available(&node)?;
        let axum::Json(b) = body.map_err(|e| ApiError::bad_request("invalid_body", e.body_text()))?;
        if b.holder.is_empty() || b.holder.len() > 200 {
            return Err(ApiError::bad_request("invalid_body", "holder must be 1 to 200 bytes"));
        }
        let op = LockOp::Take { token: b.token, holder: b.holder, renew: b.renew };
        lock_json(node.placement_lock_op(op, node.request_deadline()).await?)
    }
    .await;
    respond(&node, "placement_lock", r)
}

/// `POST /v1/admin/placement/unlock` `{"token"}`.
async fn lock_release(
    State(node): St,
    headers: HeaderMap,
    body: Result<axum::Json<ReleaseBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let r = async {
        operator(&node, &headers)?;
        lock_available(&node)?;
        let axum::Json(b) = body.map_err(|e| ApiError::bad_request("invalid_body", e.body_text()))?;
        lock_json(node.placement_lock_op(LockOp::Release { token: b.token }, node.request_deadline()).await?)
    }
    .await;
    respond(&node, "placement_lock", r)
}

/// A placement change asked over the API goes on only while no other holds the placement
/// lock (`node::placement_lock`); its command's token comes in [`TOKEN_HEADER`]. When shard 0
/// cannot answer, the change goes on (with a warning): the lock orders commands, each
/// change is safe without it, and one that needs shard 0 fails on its own.
async fn placement_allowed(node: &Arc<Node>, headers: &HeaderMap) -> Result<(), ApiError> {
    if node.cfg.cluster_version < LOCK_VERSION {
        return Ok(());
    }
    let token = match headers.get(TOKEN_HEADER).map(|v| v.to_str().ok().and_then(|s| s.parse::<u64>().ok())) {
        None => None,
        Some(Some(t)) => Some(t),
        Some(None) => return Err(ApiError::bad_request("invalid_token", format!("{TOKEN_HEADER} must be a number"))),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    match node.placement_lock_op(LockOp::Check { token }, deadline).await {
        Ok(a) => match a.refusal() {
            None => Ok(()),
            Some(why) => Err(ApiError::new(StatusCode::CONFLICT, "placement_busy", why)),
        },
        Err(e) => {
            tracing::warn!(cause = %e, "the placement lock could not be checked; the placement change goes on");
            Ok(())
        }
    }
}

fn operator(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let who = node.keys.verify_header(auth_header(headers))?;
    if !who.admin {
        return Err(ApiError::forbidden("backup and restore need an operator token (raftchat token --admin)"));
    }
    Ok(())
}

fn shard_of(node: &Node, shard: &str) -> Result<u32, ApiError> {
    let n: u32 = shard.parse().map_err(|_| ApiError::bad_request("invalid_shard", "shard must be a number"))?;
    if n >= node.placement.shard_count() {
        return Err(ApiError::not_found(
            "unknown_shard",
            format!("this cluster has shards 0..{}", node.placement.shard_count()),
        ));
    }
    Ok(n)
}

async fn snapshot(State(node): St, headers: HeaderMap, Path(shard): Path<String>) -> Response {
    let r = async {
        operator(&node, &headers)?;
        let shard = shard_of(&node, &shard)?;
        let group = node.local.group(shard).ok_or_else(|| {
            ApiError::not_found(
                "not_replica",
                format!("this node holds no replica of shard {shard}; ask one that does (/status)"),
            )
        })?;
        let applied = group.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        let unavailable = |m: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m);
        group.raft.trigger().snapshot().await.map_err(|e| unavailable(e.to_string()))?;
        // Wait for a snapshot that covers what was applied when the request came.
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let covered = group.raft.metrics().borrow().snapshot.map(|l| l.index).unwrap_or(0);
            if covered >= applied && (applied == 0 || covered > 0) {
                break;
            }
            if tokio::time::Instant::now() > end {
                return Err(unavailable(format!("shard {shard}: no snapshot covering index {applied} within 60 s")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let snap = group
            .raft
            .get_snapshot()
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .ok_or_else(|| unavailable(format!("shard {shard} has no snapshot yet")))?;
        let log = snap.meta.last_log_id;
        // Streamed from the snapshot file: a shard of any size costs a buffer, not its size.
        let file = snap.snapshot.file;
        let len = file.metadata().await.map_err(|e| unavailable(e.to_string()))?.len();
        let body = axum::body::Body::from_stream(futures::stream::unfold(file, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 256 << 10];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok::<_, std::io::Error>(Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        }));
        node.metrics.count_request("http", "backup", "ok");
        Ok((
            [
                ("x-raftchat-shard", shard.to_string()),
                ("x-raftchat-shard-count", node.placement.shard_count().to_string()),
                ("x-raftchat-log-index", log.map(|l| l.index).unwrap_or(0).to_string()),
                ("x-raftchat-log-term", log.map(|l| l.leader_id.term).unwrap_or(0).to_string()),
                ("x-raftchat-format", crate::storage::FORMAT_VERSION.to_string()),
                ("content-type", "application/octet-stream".to_string()),
                ("content-length", len.to_string()),
            ],
            body,
        )
            .into_response())
    }
    .await;
    match r {
        Ok(resp) => resp,
        Err(e) => respond::<()>(&node, "backup", Err(e)),
    }
}

#[derive(Debug, Deserialize)]
struct IngestQuery {
    #[serde(default)]
    first: bool,
}

#[derive(Deserialize)]
struct TransferBody {
    to: u64,
}

/// `POST /v1/admin/shards/{shard}/transfer-leader` `{"to": N}`: the shard's leader (wherever
/// it is) hands its leadership to node N (`node::balance`); answers once N leads.
async fn transfer_leader(
    State(node): St,
    headers: HeaderMap,
    Path(shard): Path<String>,
    body: Result<axum::Json<TransferBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let r = async {
        operator(&node, &headers)?;
        let shard = shard_of(&node, &shard)?;
        let axum::Json(b) = body.map_err(|e| ApiError::bad_request("invalid_body", e.body_text()))?;
        // The leader checks that the target is a voter; this node's view of the voters may
        // lag a replica move by a heartbeat.
        if b.to != node.id && node.peers.addr(b.to).is_none() {
            return Err(ApiError::bad_request(
                "not_replica",
                format!(
                    "node {} is not a member of this cluster, so it holds no replica of shard {shard} (replicas: {:?})",
                    b.to,
                    node.replicas(shard)
                ),
            ));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        match node.call(shard, ShardOp::TransferLeader { to: b.to }, deadline).await? {
            ShardReply::Leader(l) => Ok(serde_json::json!({ "shard": shard, "leader": l })),
            other => {
                Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("unexpected reply {other:?}")))
            }
        }
    }
    .await;
    respond(&node, "transfer_leader", r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoveBody {
    from: u64,
    to: u64,
    /// How long the move may take (a large shard reaches the new node as a streamed
    /// snapshot); default 600 s.
    #[serde(default)]
    timeout_secs: Option<u64>,
}

/// `POST /v1/admin/shards/{shard}/move` `{"from": A, "to": B}` (module docs).
async fn move_replica(
    State(node): St,
    headers: HeaderMap,
    Path(shard): Path<String>,
    body: Result<axum::Json<MoveBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let r = async {
        operator(&node, &headers)?;
        node.require_version(3, "moving a replica")?;
        let shard = shard_of(&node, &shard)?;
        let axum::Json(b) = body.map_err(|e| ApiError::bad_request("invalid_body", e.body_text()))?;
        placement_allowed(&node, &headers).await?;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(b.timeout_secs.unwrap_or(600).clamp(1, 86_400));
        Ok(node.move_replica(shard, b.from, b.to, deadline).await?)
    }
    .await;
    respond(&node, "move_replica", r)
}

async fn ingest(
    State(node): St,
    headers: HeaderMap,
    Path(shard): Path<String>,
    Query(q): Query<IngestQuery>,
    body: Bytes,
) -> Response {
    let r = async {
        operator(&node, &headers)?;
        node.require_version(2, "restore")?;
        let shard = shard_of(&node, &shard)?;
        let records = crate::storage::snapshot::decode_all(&body)
            .map_err(|e| ApiError::bad_request("invalid_records", e.to_string()))?;
        if records.iter().any(|(k, _)| k.first() == Some(&0)) {
            return Err(ApiError::bad_request(
                "invalid_records",
                "records of the state machine's own bookkeeping (keys starting with \\0) are not restored",
            ));
        }
        check_records(&node, shard, &records)?;
        let count = records.len();
        let op = ShardOp::Write(Command::Ingest { records, first: q.first });
        match node.call(shard, op, node.request_deadline()).await? {
            ShardReply::Written(Reply::Ingested(true)) => Ok(serde_json::json!({ "shard": shard, "records": count })),
            ShardReply::Written(Reply::Ingested(false)) => Err(ApiError::new(
                StatusCode::CONFLICT,
                "shard_not_empty",
                format!("shard {shard} already holds data: restore into a new cluster"),
            )),
            other => {
                Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("unexpected reply {other:?}")))
            }
        }
    }
    .await;
    respond(&node, "restore", r)
}

/// Every record of a restore chunk is one the readers and the state machine can use, and
/// belongs on `shard` (by the same placement as live writes): refused whole, with the first
/// bad record named, before anything is written.
fn check_records(node: &Node, shard: u32, records: &[crate::storage::snapshot::Record]) -> Result<(), ApiError> {
    use crate::storage::keys::{check_record, RecordOwner};
    for (i, (k, v)) in records.iter().enumerate() {
        let name = || String::from_utf8_lossy(&k[..k.len().min(120)]).escape_debug().to_string();
        let owner = check_record(k, v)
            .map_err(|e| ApiError::bad_request("invalid_records", format!("record {i} (key \"{}\"): {e}", name())))?;
        let home = match &owner {
            RecordOwner::Conversation(c) => node.placement.shard_of_conversation(c),
            RecordOwner::User(u) => node.placement.shard_of_user(u),
            RecordOwner::Invite(id) => node.placement.shard_of_invite(id),
            RecordOwner::NodeTable => continue,
        };
        if home != shard {
            return Err(ApiError::bad_request(
                "invalid_records",
                format!(
                    "record {i} (key \"{}\") belongs on shard {home}, not {shard}: restore each shard's backup file \
                     into the same shard of a cluster with the same shard count",
                    name()
                ),
            ));
        }
    }
    Ok(())
}

/// `GET /v1/admin/nodes` (module docs).
async fn nodes(State(node): St, headers: HeaderMap) -> Response {
    let r = async {
        operator(&node, &headers)?;
        node.require_version(crate::node::directory::VERSION, "the node table")?;
        node.refresh_directory().await?;
        Ok(serde_json::json!({ "table": node.directory.table(), "book": node.directory.members() }))
    }
    .await;
    respond(&node, "admin_nodes", r)
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

/// `POST /v1/admin/nodes/{id}/remove[?force=true]` (module docs).
async fn remove_node(
    State(node): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Response {
    let r = async {
        operator(&node, &headers)?;
        node.require_version(crate::node::directory::VERSION, "removing a node")?;
        let id: u64 = id.parse().map_err(|_| ApiError::bad_request("invalid_node", "node id must be a number"))?;
        placement_allowed(&node, &headers).await?;
        node.refresh_directory().await?;
        let known = node.directory.members().into_iter().find(|m| m.id == id);
        let rec = match (known, node.directory.table().into_iter().find(|r| r.id == id)) {
            (_, Some(r)) if r.removed => return Ok(serde_json::json!({ "node": id, "removed": true, "note": "already removed" })),
            (Some(a), _) => crate::node::directory::record(&a, true),
            (None, _) => return Err(ApiError::not_found("unknown_node", format!("node {id} is not a member of this cluster"))),
        };
        // Every shard's membership, from its leader: the node must be in none (or, forced,
        // every shard it is in must keep a majority and have a node to take its replica).
        let mut holds = Vec::new();
        let mut members = Vec::new();
        for shard in 0..node.placement.shard_count() {
            let deadline = node.request_deadline();
            match node.call(shard, ShardOp::Members, deadline).await? {
                ShardReply::Members(m) if m.voters.contains(&id) || m.learners.contains(&id) => {
                    holds.push(shard);
                    members.push((shard, m));
                }
                _ => {}
            }
        }
        if q.force && !holds.is_empty() {
            force_check(&node, id, &members).await?;
        } else if !holds.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "node_holds_replicas",
                format!("node {id} still holds replicas of shards {holds:?}: `raftchat admin remove-node {id}` moves them away first"),
            ));
        }
        node.set_node(rec, node.request_deadline()).await.map_err(|e| match e {
            crate::node::directory::SetNodeError::Shard(e) => ApiError::from(e),
            removed => ApiError::new(StatusCode::CONFLICT, "node_removed", removed.to_string()),
        })?;
        node.refresh_directory().await?;
        Ok(serde_json::json!({ "node": id, "removed": true }))
    }
    .await;
    respond(&node, "remove_node", r)
}

/// Whether node `id` may be removed while shards still list it (`?force=true`, for a dead
/// machine): it must not answer (a forced removal never takes a live voter away, so two at
/// once cannot cost a shard its majority); the leader of the directory shard must
/// re-replicate removed nodes (it moves `id`'s replicas in its next round); and every shard
/// `id` is in must keep a majority of voters that answer and are not removed, and have a
/// member that answers and holds no replica of it to take `id`'s place.
async fn force_check(
    node: &Arc<Node>,
    id: u64,
    members: &[(u32, crate::node::membership::Members)],
) -> Result<(), ApiError> {
    let conflict = |code: &'static str, msg: String| Err(ApiError::new(StatusCode::CONFLICT, code, msg));
    // Who answers now: every member is asked (the call re-replication probes with; its
    // answer says whether the peer re-replicates removed nodes).
    let ttl = node.peers.rpc_timeout();
    let shard0 = crate::node::directory::DIRECTORY_SHARD;
    let asked = node.peers.ask_all(node.id, crate::raft::pipe::Kind::Book, shard0, ttl).await;
    let mut answers = vec![node.id];
    let mut repairs = std::collections::BTreeMap::new();
    repairs.insert(node.id, node.directory.known().repairs);
    for (n, a) in asked {
        match a {
            Ok(bytes) => {
                answers.push(n);
                let book: Option<crate::node::directory::Book> = serde_json::from_slice(&bytes).ok();
                repairs.insert(n, book.and_then(|b| b.repairs));
            }
            Err(crate::raft::network::RawError::UnknownCall) => answers.push(n),
            Err(_) => {}
        }
    }
    if answers.contains(&id) {
        return conflict(
            "node_answers",
            format!(
                "node {id} answers: --force is for a node that is down; `raftchat admin remove-node {id}` (without \
                 --force) moves its replicas first"
            ),
        );
    }
    let m0 = match node.call(shard0, ShardOp::Members, node.request_deadline()).await? {
        ShardReply::Members(m) => m,
        _ => return conflict("no_leader", format!("shard {shard0} answered without its membership")),
    };
    let leader = m0.leader;
    if !answers.contains(&leader) {
        return conflict(
            "leader_silent",
            format!("node {leader}, the leader of shard {shard0}, did not answer just now: try again in a moment"),
        );
    }
    // Any voter of shard 0 may lead it next: one that answers and does not re-replicate
    // removed nodes is refused too (one that does not answer cannot be asked).
    if let Some(v) = m0
        .voters
        .iter()
        .find(|v| **v != leader && answers.contains(v) && repairs.get(v).copied().flatten() != Some(true))
    {
        return conflict(
            "repair_off",
            format!(
                "node {v}, a voter of shard {shard0} (which re-replicates from its leader), does not re-replicate removed \
                 nodes (replace_dead_after_secs = 0, or an older build): `raftchat admin replace-node {id} NEW` moves \
                 node {id}'s replicas"
            ),
        );
    }
    match repairs.get(&leader).copied().flatten() {
        Some(true) => {}
        Some(false) => {
            return conflict(
                "repair_off",
                format!(
                    "re-replication is off on node {leader}, the leader of shard {shard0} (replace_dead_after_secs = 0 \
                     or cluster_version below 4), so nothing would move node {id}'s replicas: `raftchat admin \
                     replace-node {id} NEW` moves them"
                ),
            )
        }
        None => {
            return conflict(
                "repair_unknown",
                format!(
                    "node {leader}, the leader of shard {shard0}, does not say that it re-replicates removed nodes \
                     (an older build): upgrade it first, or `raftchat admin replace-node {id} NEW`"
                ),
            )
        }
    }
    let live: Vec<u64> = node
        .directory
        .members()
        .iter()
        .map(|m| m.id)
        .chain(std::iter::once(node.id))
        .filter(|n| *n != id && answers.contains(n) && !node.directory.is_removed(*n))
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    match force_refusal(id, members, |n| !live.contains(&n), &live) {
        None => Ok(()),
        Some((code, msg)) => conflict(code, msg),
    }
}

/// [`force_check`]'s rule on its own: `down` tells nodes that are removed or do not answer,
/// `live` the members that answer (other than `id`; this node included).
fn force_refusal(
    id: u64,
    members: &[(u32, crate::node::membership::Members)],
    down: impl Fn(u64) -> bool,
    live: &[u64],
) -> Option<(&'static str, String)> {
    for (shard, m) in members {
        if !m.voters.contains(&id) && !m.learners.contains(&id) {
            continue;
        }
        let kept = m.voters.iter().filter(|v| **v != id && !down(**v)).count();
        if kept < m.voters.len() / 2 + 1 {
            return Some((
                "quorum_at_risk",
                format!(
                    "shard {shard} would keep {kept} of its {} voters {:?} that answer, fewer than a majority",
                    m.voters.len(),
                    m.voters
                ),
            ));
        }
        let held: Vec<u64> = m.voters.iter().chain(&m.learners).copied().collect();
        if !live.iter().any(|n| !held.contains(n)) {
            return Some((
                "no_spare_node",
                format!(
                    "no node that answers is free to take node {id}'s replica of shard {shard} (held by {held:?}; nodes that answer: {live:?}): add a node first (admin add-node)"
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::force_refusal;
    use crate::node::membership::Members;

    fn m(voters: &[u64]) -> Members {
        Members {
            leader: voters[0],
            index: 1,
            committed: true,
            voters: voters.to_vec(),
            learners: vec![],
            joint: false,
        }
    }

    #[test]
    fn a_forced_removal_needs_a_majority_left_and_a_spare_node() {
        let shards = vec![(0, m(&[1, 2, 3])), (1, m(&[2, 3, 4]))];
        // Node 4 dead, node 1 answering: removing 4 leaves {2, 3} of shard 1, and 1 is spare.
        assert_eq!(force_refusal(4, &shards, |n| n == 4, &[1, 2, 3]), None);
        // Node 3 already down: removing 2 leaves shard 0 with only node 1.
        let r = force_refusal(2, &shards, |n| n == 3, &[1, 4]).unwrap();
        assert_eq!(r.0, "quorum_at_risk", "{}", r.1);
        // Everyone answers, but shard 0 is on every other node that answers.
        let r = force_refusal(1, &shards, |_| false, &[2, 3]).unwrap();
        assert_eq!(r.0, "no_spare_node", "{}", r.1);
        assert!(r.1.contains("shard 0"), "{}", r.1);
    }
}
