//! Accounts and sessions over HTTP/JSON (documented in `docs/api.md`).
//!
//! - `POST /v1/accounts` `{user, password, invite?}`: sign up, as `registration` allows
//!   (`open`, `invite`, `closed`); with an operator token in any mode, and then it may also
//!   give an account to a user registered without one.
//! - `POST /v1/sessions` `{user, password}`: log in; answers a short-lived access token (the
//!   JWT every other call takes) and an opaque refresh token.
//! - `POST /v1/sessions/refresh` `{refresh_token}`: a new pair; the old refresh token is
//!   spent (rotated on every use).
//! - `POST /v1/sessions/logout` `{refresh_token}`: ends that session.
//! - `POST /v1/accounts/password` `{old_password, new_password}` with a bearer token: a new
//!   password, and every session of the user ends.
//! - `POST /v1/invites` with an operator token: an invite for `registration = "invite"`.
//! - `GET /v1/nodes`: the cluster's nodes' public URLs (clients fail over with it) and the
//!   registration policy. No token needed.
//!
//! State: the account (Argon2id hash, generation, live sessions by the SHA-256 of their
//! refresh token) lives on the user's shard and changes only through its Raft log, so a
//! login works on any node and survives failover; passwords are hashed on the node that
//! takes the request (on a blocking thread) and never logged or replicated. A refresh token
//! is `<user>:<32 random bytes, base64url>`: the user part routes it to its shard. Failed
//! logins are limited per user id and per client address (`429 too_many_failures`).

use super::error::ApiError;
use super::http::{auth_header, json_body, respond};
use crate::chat::{AccountOutcome, Command, Reply, UserId};
use crate::config::Registration;
use crate::node::router::{ShardOp, ShardReply};
use crate::node::Node;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

/// Shortest and longest password accepted (bytes of UTF-8).
pub const MIN_PASSWORD: usize = 8;
pub const MAX_PASSWORD: usize = 1024;

type St = State<Arc<Node>>;
/// The client's address, when the listener put it in the request (`api::listener`).
struct Peer(Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(a)| a.ip())))
    }
}

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/v1/accounts", post(signup))
        .route("/v1/accounts/password", post(change_password))
        .route("/v1/sessions", post(login))
        .route("/v1/sessions/refresh", post(refresh))
        .route("/v1/sessions/logout", post(logout))
        .route("/v1/invites", post(invite))
        .route("/v1/nodes", get(nodes))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignupRequest {
    user: String,
    password: String,
    #[serde(default)]
    invite: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    user: String,
    password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    refresh_token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordRequest {
    old_password: String,
    new_password: String,
}

/// What a login or a refresh answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionTokens {
    pub user: String,
    pub access_token: String,
    /// Seconds since the epoch.
    pub access_expires_at: u64,
    pub refresh_token: String,
    /// Milliseconds since the epoch.
    pub refresh_expires_at_ms: u64,
}

fn check_password(p: &str) -> Result<(), ApiError> {
    if p.len() < MIN_PASSWORD {
        return Err(ApiError::bad_request("weak_password", format!("a password needs at least {MIN_PASSWORD} bytes")));
    }
    if p.len() > MAX_PASSWORD {
        return Err(ApiError::bad_request("password_too_long", format!("a password has at most {MAX_PASSWORD} bytes")));
    }
    Ok(())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// Argon2id with the crate's defaults (19 MiB, 2 passes, 1 lane), a random 16-byte salt, as
/// a PHC string. Runs on a blocking thread: it costs tens of milliseconds of CPU by design.
async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        let salt_bytes: [u8; 16] = rand::random();
        let salt = SaltString::encode_b64(&salt_bytes).map_err(internal)?;
        Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(internal)
    })
    .await
    .map_err(internal)?
}

/// Whether `password` matches the PHC string `hash`. With no account, a fixed hash is checked
/// instead, so a login for an unknown user costs what a wrong password costs.
async fn verify_password(hash: Option<String>, password: String) -> bool {
    static DUMMY: OnceLock<String> = OnceLock::new();
    tokio::task::spawn_blocking(move || {
        let dummy = DUMMY.get_or_init(|| {
            let salt = SaltString::encode_b64(b"raftchat-dummy!!").expect("16 bytes encode");
            Argon2::default().hash_password(b"no such account", &salt).map(|h| h.to_string()).unwrap_or_default()
        });
        let known = hash.is_some();
        let phc = hash.unwrap_or_else(|| dummy.clone());
        let ok = PasswordHash::new(&phc)
            .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false);
        ok && known
    })
    .await
    .unwrap_or(false)
}

fn now_ms() -> u64 {
    crate::storage::sm::now_ms()
}

/// The hash a session is known by.
fn session_id(refresh_token: &str) -> String {
    Sha256::digest(refresh_token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn new_refresh_token(user: &UserId) -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{user}:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The user a refresh token names (it routes the token to the user's shard); anything else
/// is `invalid_refresh_token`.
pub fn refresh_user(token: &str) -> Result<UserId, ApiError> {
    let (user, rest) = token.split_once(':').ok_or_else(malformed_refresh)?;
    if rest.len() != 43 {
        return Err(malformed_refresh());
    }
    UserId::parse(user).map_err(|_| malformed_refresh())
}

fn malformed_refresh() -> ApiError {
    ApiError::bad_request("invalid_refresh_token", "not a refresh token from this cluster")
}

fn session_ended() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "session_ended",
        "this session has ended (logged out, expired, replaced by a newer refresh, or ended by a password change); log in again",
    )
}

fn invalid_credentials() -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "wrong user id or password")
}

/// Proposes an account command on `shard` and returns its outcome.
async fn account_write(node: &Arc<Node>, shard: u32, cmd: Command) -> Result<AccountOutcome, ApiError> {
    node.require_version(2, "accounts")?;
    match node.call(shard, ShardOp::Write(cmd), node.request_deadline()).await? {
        ShardReply::Written(Reply::Account(o)) => Ok(o),
        other => Err(internal(format!("unexpected reply to an account command: {other:?}"))),
    }
}

async fn read_account(node: &Arc<Node>, user: &UserId) -> Result<Option<crate::chat::Account>, ApiError> {
    node.require_version(2, "accounts")?;
    let shard = node.placement.shard_of_user(user);
    match node.call(shard, ShardOp::Account { user: user.clone() }, node.request_deadline()).await? {
        ShardReply::Account(a) => Ok(a),
        other => Err(internal(format!("unexpected reply to an account read: {other:?}"))),
    }
}

/// A new session for `user`: its refresh token stored (hashed) on the user's shard, and an
/// access token.
async fn open_session(node: &Arc<Node>, user: &UserId, replaces: Option<String>) -> Result<SessionTokens, ApiError> {
    let refresh_token = new_refresh_token(user);
    let id = session_id(&refresh_token);
    let now = now_ms();
    let expires_ms = now + node.cfg.refresh_token_ttl_secs * 1000;
    let cmd = match replaces {
        None => Command::AddSession { user: user.clone(), id, expires_ms, now_ms: now },
        Some(old) => Command::RotateSession { user: user.clone(), old, new: id, expires_ms, now_ms: now },
    };
    match account_write(node, node.placement.shard_of_user(user), cmd).await? {
        AccountOutcome::SessionAdded | AccountOutcome::SessionRotated => {}
        AccountOutcome::SessionUnknown | AccountOutcome::NoAccount => return Err(session_ended()),
        other => return Err(internal(format!("unexpected session outcome {other:?}"))),
    }
    let ttl = node.cfg.access_token_ttl_secs;
    // Dated after the user's revocation mark, read fresh: a login right after a password
    // change (in the same second) must not be born revoked.
    let mark = node.revocation_mark(user, std::time::Duration::ZERO).await?;
    let iat = mark.saturating_add(1).max(crate::auth::now_secs());
    let access_token = node.keys.mint_from(user, iat, ttl, false);
    Ok(SessionTokens {
        user: user.to_string(),
        access_token,
        access_expires_at: iat + ttl,
        refresh_token,
        refresh_expires_at_ms: expires_ms,
    })
}

#[tracing::instrument(skip_all)]
async fn signup(State(node): St, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let operator = match auth_header(&headers) {
            None => false,
            Some(h) => {
                let p = node.keys.verify_header(Some(h))?;
                if !p.admin {
                    return Err(ApiError::forbidden(
                        "signing up needs no token; only an operator token may be sent here",
                    ));
                }
                true
            }
        };
        let req: SignupRequest = json_body(body)?;
        let user = UserId::parse(&req.user)?;
        let invite = if operator {
            None
        } else {
            match node.cfg.registration {
                Registration::Open => None,
                Registration::Closed => {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "registration_closed",
                        "this cluster does not take sign-ups; ask its operator for an account",
                    ))
                }
                Registration::Invite => {
                    let Some(inv) = req.invite.as_deref().filter(|i| !i.is_empty()) else {
                        return Err(ApiError::new(
                            StatusCode::FORBIDDEN,
                            "invite_required",
                            "this cluster takes sign-ups with an invite only",
                        ));
                    };
                    Some(node.keys.verify_invite(inv).map_err(|e| {
                        ApiError::new(StatusCode::FORBIDDEN, "invalid_invite", format!("invite not accepted: {e}"))
                    })?)
                }
            }
        };
        check_password(&req.password)?;
        // A taken id is refused before an invite is spent on it.
        if !operator && node.user_exists(&user, node.request_deadline()).await? {
            return Err(user_taken(&user));
        }
        if let Some(id) = invite {
            let shard = node.placement.shard_of_invite(&id);
            if account_write(&node, shard, Command::UseInvite { invite: id, user: user.clone() }).await?
                == AccountOutcome::InviteUsed
            {
                return Err(ApiError::new(StatusCode::FORBIDDEN, "invite_used", "this invite was used already"));
            }
        }
        let password = hash_password(req.password).await?;
        let cmd = Command::CreateAccount { user: user.clone(), password, claim_existing: operator };
        match account_write(&node, node.placement.shard_of_user(&user), cmd).await? {
            AccountOutcome::Created => {
                node.remember_user(&user);
                tracing::info!(%user, by_operator = operator, "account created");
                Ok(serde_json::json!({ "user": user }))
            }
            AccountOutcome::Taken => Err(user_taken(&user)),
            other => Err(internal(format!("unexpected outcome {other:?}"))),
        }
    }
    .await;
    respond(&node, "signup", r)
}

fn user_taken(user: &UserId) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "user_taken", format!("the user id {user} is taken"))
}

#[tracing::instrument(skip_all)]
async fn login(State(node): St, peer: Peer, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let req: LoginRequest = json_body(body)?;
        let user = UserId::parse(&req.user).map_err(|_| invalid_credentials())?;
        let ip = peer.0;
        if let Err(wait) = node.login_failures.check(&user, ip) {
            let ms = wait.as_millis().max(1) as u64;
            return Err(ApiError {
                code: "too_many_failures",
                ..ApiError::rate_limited(
                    format!(
                        "too many failed logins for this user or from this address; try again in {} s",
                        ms.div_ceil(1000)
                    ),
                    ms,
                )
            });
        }
        let account = read_account(&node, &user).await?;
        if !verify_password(account.map(|a| a.password), req.password).await {
            node.login_failures.failed(&user, ip);
            tracing::info!(%user, ?ip, "failed login");
            return Err(invalid_credentials());
        }
        open_session(&node, &user, None).await
    }
    .await;
    respond(&node, "login", r)
}

#[tracing::instrument(skip_all)]
async fn refresh(State(node): St, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let req: RefreshRequest = json_body(body)?;
        let user = refresh_user(&req.refresh_token)?;
        open_session(&node, &user, Some(session_id(&req.refresh_token))).await
    }
    .await;
    respond(&node, "refresh", r)
}

#[tracing::instrument(skip_all)]
async fn logout(State(node): St, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let req: RefreshRequest = json_body(body)?;
        let user = refresh_user(&req.refresh_token)?;
        let cmd = Command::EndSession { user: user.clone(), id: session_id(&req.refresh_token) };
        account_write(&node, node.placement.shard_of_user(&user), cmd).await?;
        Ok(serde_json::json!({ "ended": true }))
    }
    .await;
    respond(&node, "logout", r)
}

#[tracing::instrument(skip_all)]
async fn change_password(
    State(node): St,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        let who = node.keys.verify_header(auth_header(&headers))?;
        let req: PasswordRequest = json_body(body)?;
        check_password(&req.new_password)?;
        let ip = peer.0;
        if let Err(wait) = node.login_failures.check(&who.user, ip) {
            return Err(ApiError::rate_limited(
                "too many failed password checks; try again later",
                wait.as_millis() as u64,
            ));
        }
        let account = read_account(&node, &who.user)
            .await?
            .ok_or_else(|| ApiError::not_found("no_account", format!("{} has no password account", who.user)))?;
        if !verify_password(Some(account.password), req.old_password).await {
            node.login_failures.failed(&who.user, ip);
            return Err(invalid_credentials());
        }
        let password = hash_password(req.new_password).await?;
        let cmd = Command::SetPassword { user: who.user.clone(), password };
        account_write(&node, node.placement.shard_of_user(&who.user), cmd).await?;
        // Access tokens issued before the change stop working too.
        super::ops::revoke_tokens(&node, &who.user).await?;
        tracing::info!(user = %who.user, "password changed; every session and token ended");
        Ok(serde_json::json!({ "user": who.user, "sessions_ended": true }))
    }
    .await;
    respond(&node, "password", r)
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InviteRequest {
    #[serde(default)]
    ttl_secs: Option<u64>,
}

#[tracing::instrument(skip_all)]
async fn invite(State(node): St, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let who = node.keys.verify_header(auth_header(&headers))?;
        if !who.admin {
            return Err(ApiError::forbidden("invites are made with an operator token (raftchat token --admin)"));
        }
        let req: InviteRequest = match body {
            Ok(b) if b.is_empty() => InviteRequest::default(),
            other => json_body(other)?,
        };
        let ttl = req.ttl_secs.unwrap_or(7 * 86_400).clamp(60, 365 * 86_400);
        let (invite, expires_at) = node.keys.mint_invite(ttl);
        Ok(serde_json::json!({ "invite": invite, "expires_at": expires_at }))
    }
    .await;
    respond(&node, "invite", r)
}

/// The nodes clients may connect to, and how sign-up works here.
async fn nodes(State(node): St) -> Response {
    let scheme = if node.cfg.tls_cert_file.is_some() { "https" } else { "http" };
    let list: Vec<serde_json::Value> = node
        .directory
        .members()
        .iter()
        .map(|m| {
            let url = m.public_url.clone().unwrap_or_else(|| format!("{scheme}://{}", m.http));
            serde_json::json!({ "id": m.id, "url": url })
        })
        .collect();
    let body = serde_json::json!({
        "node": node.id,
        "nodes": list,
        "registration": node.cfg.registration.as_str(),
        "max_text_bytes": node.cfg.max_text_bytes,
    });
    respond(&node, "nodes", Ok::<_, ApiError>(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_hash_with_a_salt_and_verify() {
        let h1 = hash_password("correct horse".into()).await.unwrap();
        let h2 = hash_password("correct horse".into()).await.unwrap();
        assert!(h1.starts_with("$argon2id$"), "{h1}");
        assert_ne!(h1, h2, "salted");
        assert!(verify_password(Some(h1.clone()), "correct horse".into()).await);
        assert!(!verify_password(Some(h1), "wrong horse".into()).await);
        assert!(!verify_password(None, "no such account".into()).await, "the dummy never matches");
        assert!(!verify_password(Some("garbage".into()), "x".into()).await);
    }

    #[test]
    fn refresh_tokens_name_their_user_and_nothing_else_parses() {
        let alice = UserId::parse("alice").unwrap();
        let t = new_refresh_token(&alice);
        assert_eq!(refresh_user(&t).unwrap(), alice);
        assert_ne!(session_id(&t), session_id(&new_refresh_token(&alice)));
        for bad in [
            "",
            "alice",
            "alice:short",
            ":AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "a b:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(refresh_user(bad).is_err(), "{bad}");
        }
        assert!(check_password("short").is_err() && check_password("long enough").is_ok());
        assert!(check_password(&"x".repeat(MAX_PASSWORD + 1)).is_err());
    }
}
