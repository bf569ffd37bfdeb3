//! HTTP/JSON client API (axum). Every `/v1` call needs `Authorization: Bearer <token>`.
//! See `docs/api.md` for the calls with curl examples.

use super::listener::{Gate, Place};
use super::ops::{self, MarkReadRequest, RegisterRequest, SendRequest};
use super::ApiError;
use crate::node::admission::Permit;
use crate::node::Node;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

type St = State<Arc<Node>>;

pub fn router(node: Arc<Node>) -> Router {
    let limit = node.cfg.max_body_bytes;
    let cors = cors(&node);
    let app = Router::new()
        .merge(super::accounts::routes())
        .merge(super::admin::routes())
        .merge(super::web::routes())
        .route("/v1/messages", post(send))
        .route("/v1/conversations", get(conversations))
        .route("/v1/conversations/{id}/messages", get(history))
        .route("/v1/conversations/{id}/read", post(mark_read))
        .route("/v1/users", post(register))
        .route("/v1/users/{id}", get(lookup_user))
        .route("/v1/users/{id}/revoke-tokens", post(revoke_tokens))
        .route("/v1/ws", get(super::ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .fallback(|| async { ApiError::not_found("no_route", "no such endpoint; see docs/api.md") })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on this endpoint; see docs/api.md"),
            )
        })
        .layer(DefaultBodyLimit::max(limit));
    app.layer(cors).with_state(node)
}

/// CORS for browser clients on other origins: the cluster's own nodes (the page served by
/// one node fails over to another; the node table's members as this node knows them now,
/// so a node that joined later counts too) and `cors_origins`. Requests from any other
/// origin get no CORS headers, so browsers refuse to hand them the answers.
fn cors(node: &Arc<Node>) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderValue, Method};
    let fixed: Vec<String> = node.cfg.cors_origins.iter().map(|o| o.trim_end_matches('/').to_string()).collect();
    let node = node.clone();
    let allowed = move |origin: &HeaderValue, _: &axum::http::request::Parts| {
        let Ok(origin) = origin.to_str() else { return false };
        if fixed.iter().any(|o| o == origin) {
            return true;
        }
        let scheme = if node.cfg.tls_cert_file.is_some() { "https" } else { "http" };
        node.directory.members().iter().any(|m| {
            let url = m.public_url.clone().unwrap_or_else(|| format!("{scheme}://{}", m.http));
            url.trim_end_matches('/') == origin
        })
    };
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::AllowOrigin::predicate(allowed))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(600))
}

pub(crate) fn auth_header(h: &HeaderMap) -> Option<&str> {
    h.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

/// Parses a JSON body, turning every failure into a 4xx with a JSON error.
pub(crate) fn json_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "request body exceeds max_body_bytes")
        } else {
            ApiError::bad_request("invalid_body", r.body_text())
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request("invalid_json", format!("request body: {e}")))
}

fn path_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(id)| id).map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// Counts the request by operation and outcome, then renders it.
pub(crate) fn respond<T: Serialize>(node: &Node, op: &str, r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => {
            node.metrics.count_request("http", op, "ok");
            Json(v).into_response()
        }
        Err(e) => {
            node.metrics.count_request("http", op, e.code);
            // An overloaded node refuses many requests a second; they are counted, not logged.
            if e.status.is_server_error() && e.code != "overloaded" {
                tracing::warn!(op, error = %e, "request failed");
            }
            e.into_response()
        }
    }
}

/// What the listener's front runtime decided about a send (see [`front_gate`]).
#[derive(Clone)]
enum FrontVerdict {
    /// Admitted: the node-wide permit, for the handler to take.
    Admitted(Arc<Mutex<Option<Permit>>>),
    /// Past the node's admission limit: answered `503 overloaded` on the front runtime.
    Overloaded,
    /// The user has no send left in their rate: `429 rate_limited` on the front runtime
    /// (with the wait), so that one user's flood cannot hold the node's permits.
    RateLimited(crate::chat::UserId, std::time::Duration),
    /// The body did not arrive within `header_read_timeout_ms` (or the connection broke).
    BodyUnread,
}

/// Node-wide admission of HTTP sends, on the listener's front runtime (`api::listener`), so
/// that a send past the limit is refused at once instead of waiting for a turn on the node's
/// runtime, which is what is busy when the node is overloaded. While the node is at its
/// limit, a `POST /v1/messages` with a `Content-Length` within `max_body_bytes` is answered
/// `503 overloaded` after its body is read, before its token is looked at. Otherwise, for
/// `POST /v1/messages` with a token whose signature and expiry check out (revocation is
/// checked later, on the node's runtime) and a `Content-Length` within `max_body_bytes`:
/// the body is read there (within
/// `header_read_timeout_ms`); the send takes its user's send-rate token (or is answered `429
/// rate_limited` there), then its admission permit, or is answered `503 overloaded` on the
/// spot. The permit goes with the request to its handler, so nothing can take it in
/// between; the adaptive limit times the send from when its handler starts (authentication
/// included). Any other request, and a send without a valid token or a
/// length, runs on the node's runtime as before (a send then takes its permit there).
pub fn front_gate(node: Arc<Node>) -> Gate {
    Arc::new(move |req: axum::http::Request<hyper::body::Incoming>| {
        let node = node.clone();
        async move {
            let limit = node.cfg.max_body_bytes;
            let is_send = req.method() == axum::http::Method::POST && req.uri().path() == "/v1/messages";
            let length = req
                .headers()
                .get(axum::http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            if !is_send || length.is_none_or(|n| n > limit) {
                return (Place::Node, req.map(axum::body::Body::new));
            }
            // A node already at its limit refuses before checking the token: when it refuses
            // thousands of sends a second, the signature check was about a sixth of the front
            // runtime's time. (Otherwise the token is checked before the body is read, so that
            // no one without a valid token can hold a permit by trickling a body.)
            let who = if node.admission.is_full() {
                None
            } else {
                match node.keys.verify_header(auth_header(req.headers())) {
                    Ok(who) => Some(who),
                    Err(_) => return (Place::Node, req.map(axum::body::Body::new)),
                }
            };
            let (parts, body) = req.into_parts();
            let wait = std::time::Duration::from_millis(node.cfg.header_read_timeout_ms);
            let read = tokio::time::timeout(wait, axum::body::to_bytes(axum::body::Body::new(body), limit)).await;
            let Ok(Ok(bytes)) = read else {
                let mut req = axum::http::Request::from_parts(parts, axum::body::Body::empty());
                req.extensions_mut().insert(FrontVerdict::BodyUnread);
                return (Place::Front, req);
            };
            let mut req = axum::http::Request::from_parts(parts, axum::body::Body::from(bytes));
            let Some(who) = who else {
                req.extensions_mut().insert(FrontVerdict::Overloaded);
                return (Place::Front, req);
            };
            // The user's token is taken here with the permit (before any await), so one
            // user's flood holds at most their burst of the node's permits.
            if let Err(wait) = node.send_rate.take(&who.user) {
                req.extensions_mut().insert(FrontVerdict::RateLimited(who.user, wait));
                return (Place::Front, req);
            }
            match node.admission.try_acquire() {
                Some(p) => {
                    req.extensions_mut().insert(FrontVerdict::Admitted(Arc::new(Mutex::new(Some(p)))));
                    (Place::Node, req)
                }
                None => {
                    req.extensions_mut().insert(FrontVerdict::Overloaded);
                    (Place::Front, req)
                }
            }
        }
        .boxed()
    })
}

#[tracing::instrument(skip_all)]
async fn send(
    State(node): St,
    front: Option<Extension<FrontVerdict>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let admitted = match front {
        None => None,
        Some(Extension(FrontVerdict::Admitted(p))) => {
            p.lock().unwrap_or_else(|p| p.into_inner()).take().map(|mut p| {
                p.start_now();
                p
            })
        }
        Some(Extension(FrontVerdict::Overloaded)) => {
            return respond::<ops::SendResponse>(&node, "send", Err(ops::node_overloaded(&node)))
        }
        Some(Extension(FrontVerdict::RateLimited(user, wait))) => {
            return respond::<ops::SendResponse>(&node, "send", Err(ops::user_rate_limited(&node, &user, wait)))
        }
        Some(Extension(FrontVerdict::BodyUnread)) => {
            let e = ApiError::bad_request("invalid_body", "the request body did not arrive in time");
            return respond::<ops::SendResponse>(&node, "send", Err(e));
        }
    };
    let r = async {
        let who = ops::authenticate(&node, auth_header(&headers)).await?;
        let req: SendRequest = json_body(body)?;
        ops::send(&node, &who, req, admitted).await
    }
    .await;
    respond(&node, "send", r)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
}

#[tracing::instrument(skip_all)]
async fn history(
    State(node): St,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> Response {
    let r = async {
        let who = ops::authenticate(&node, auth_header(&headers)).await?;
        let (id, q) = (path_id(id)?, query(q)?);
        ops::history(&node, &who, &id, q.before, q.after, q.limit).await
    }
    .await;
    respond(&node, "history", r)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConversationsQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

#[tracing::instrument(skip_all)]
async fn conversations(
    State(node): St,
    headers: HeaderMap,
    q: Result<Query<ConversationsQuery>, QueryRejection>,
) -> Response {
    let r = async {
        let who = ops::authenticate(&node, auth_header(&headers)).await?;
        let q = query(q)?;
        ops::conversations(&node, &who, q.limit, q.cursor.as_deref()).await
    }
    .await;
    respond(&node, "conversations", r)
}

#[tracing::instrument(skip_all)]
async fn mark_read(
    State(node): St,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let who = ops::authenticate(&node, auth_header(&headers)).await?;
        let id = path_id(id)?;
        let req: MarkReadRequest = json_body(body)?;
        ops::mark_read(&node, &who, &id, req.seq).await
    }
    .await;
    respond(&node, "mark_read", r)
}

#[tracing::instrument(skip_all)]
async fn register(State(node): St, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let who = ops::authenticate(&node, auth_header(&headers)).await?;
        let req: RegisterRequest = json_body(body)?;
        ops::register(&node, &who, &req.user).await?;
        Ok(serde_json::json!({ "user": req.user }))
    }
    .await;
    respond(&node, "register", r)
}

/// Whether a user id exists (any authenticated user may ask: ids are how people find each
/// other). 404 `unknown_user` when it does not.
#[tracing::instrument(skip_all)]
async fn lookup_user(State(node): St, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> Response {
    let r = async {
        ops::authenticate(&node, auth_header(&headers)).await?;
        let user = crate::chat::UserId::parse(&path_id(id)?)?;
        if node.user_exists(&user, node.request_deadline()).await? {
            Ok(serde_json::json!({ "user": user }))
        } else {
            Err(ApiError::not_found("unknown_user", format!("there is no user {user}")))
        }
    }
    .await;
    respond(&node, "lookup_user", r)
}

/// Revokes every token of a user issued before now ("log out everywhere"): the user
/// themselves, or an operator. Refresh tokens (sessions) are not touched; a password change
/// ends those too.
#[tracing::instrument(skip_all)]
async fn revoke_tokens(State(node): St, headers: HeaderMap, id: Result<Path<String>, PathRejection>) -> Response {
    let r = async {
        let who = ops::authenticate(&node, auth_header(&headers)).await?;
        let user = crate::chat::UserId::parse(&path_id(id)?)?;
        if who.user != user && !who.admin {
            return Err(ApiError::forbidden("only the user or an operator may revoke a user's tokens"));
        }
        let before = ops::revoke_tokens(&node, &user).await?;
        Ok(serde_json::json!({ "user": user, "revoked_before": before }))
    }
    .await;
    respond(&node, "revoke_tokens", r)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(node): St) -> Response {
    let missing = node.shards_without_leader();
    if missing.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({ "ready": true }))).into_response()
    } else {
        let body = serde_json::json!({
            "ready": false, "code": "no_leader",
            "message": format!("shards without a leader: {missing:?}"), "shards": missing
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn metrics(State(node): St) -> Response {
    node.refresh_metrics();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics.render()).into_response()
}

/// This node's view of its shard groups, for operators and the test fixture.
async fn status(State(node): St) -> Response {
    let mut shards: Vec<serde_json::Value> = node
        .local
        .groups()
        .iter()
        .map(|g| {
            let m = g.raft.metrics().borrow().clone();
            serde_json::json!({
                "shard": g.shard,
                "replicas": node.replicas(g.shard),
                "learners": m.membership_config.membership().learner_ids().collect::<Vec<_>>(),
                // Between the two steps of a voter change (both voter sets in `replicas`).
                "joint": m.membership_config.membership().get_joint_config().len() > 1,
                "preferred_leader": node.preferred_leader(g.shard),
                "state": format!("{:?}", m.state),
                "leader": m.current_leader,
                "term": m.current_term,
                "last_log_index": m.last_log_index,
                "committed_index": g.committed(),
                "applied_index": m.last_applied.map(|l| l.index),
                "snapshot_index": m.snapshot.map(|l| l.index),
                "snapshot_bytes": crate::node::shard_snapshot_bytes(&node.cfg.data_dir, g.shard),
                "purged_index": m.purged.map(|l| l.index),
                // On the leader: each replica's matched log index.
                "matched": m.replication.as_ref().map(|r| {
                    r.iter().map(|(id, l)| (id.to_string(), l.map(|l| l.index).unwrap_or(0))).collect::<std::collections::BTreeMap<_, _>>()
                }),
            })
        })
        .collect();
    shards.sort_by_key(|v| v["shard"].as_u64());
    let disk: std::collections::BTreeMap<&str, u64> = crate::node::disk_usage(&node.cfg.data_dir).into_iter().collect();
    Json(serde_json::json!({
        "node": node.id,
        "version": env!("CARGO_PKG_VERSION"),
        "commit": option_env!("RAFTCHAT_GIT_COMMIT").unwrap_or("unknown"),
        "shard_count": node.placement.shard_count(),
        // The nodes the cluster was created with (null: a node that joined and has not
        // learnt them yet).
        "founders": node.directory.founders(),
        "disk_bytes": disk,
        "shards": shards,
    }))
    .into_response()
}
