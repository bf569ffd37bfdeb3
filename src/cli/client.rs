//! Client commands: they mint a token for `--as <user>` from the cluster secret (operator
//! and demo convenience) or use `--token`, call a node's HTTP API and print JSON.

use crate::api::ops::{ConversationsResponse, HistoryResponse, MarkReadResponse, SendResponse};
use crate::auth::Keys;
use crate::chat::{ConversationId, UserId};
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

/// Where the cluster secret is looked for when no flag or env var names it: the zero-config
/// node's folder, then `raftchat local`'s.
const SECRET_SEARCH: &[&str] = &["raftchat-data", "raftchat-local"];

#[derive(Debug, Args)]
pub struct SecretArgs {
    /// File with the cluster secret (default: the `secret` of ./raftchat-local when --server
    /// is one of its nodes, else ./raftchat-data/secret, then ./raftchat-local/secret;
    /// RAFTCHAT_SECRET overrides).
    #[arg(long, global = true, env = "RAFTCHAT_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
}

impl SecretArgs {
    /// The cluster secret's keys, for no server in particular.
    pub(crate) fn keys(&self) -> anyhow::Result<Keys> {
        self.keys_for(None)
    }

    /// The keys of the cluster `server` belongs to: a folder whose `node*.toml` names the
    /// server's address comes first, so `raftchat-local`'s secret is used for its nodes even
    /// when `raftchat-data` (a zero-config node's folder) is also here.
    pub(crate) fn keys_for(&self, server: Option<&str>) -> anyhow::Result<Keys> {
        if let Some(s) = crate::config::secret_from_env() {
            return Ok(Keys::new(&s));
        }
        let candidates: Vec<PathBuf> = match &self.secret_file {
            Some(p) => vec![p.clone()],
            None => {
                let mut dirs: Vec<&str> = SECRET_SEARCH.to_vec();
                if let Some(addr) = server.and_then(host_port) {
                    dirs.sort_by_key(|d| !folder_serves(std::path::Path::new(d), &addr));
                }
                dirs.iter().map(|d| PathBuf::from(d).join("secret")).collect()
            }
        };
        for p in &candidates {
            if let Ok(s) = crate::config::read_secret_file(p) {
                return Ok(Keys::new(&s));
            }
        }
        bail!("no cluster secret found (looked in {candidates:?}); pass --secret-file or set RAFTCHAT_SECRET")
    }
}

/// A password from `file` (its first line) or RAFTCHAT_PASSWORD, if either is given.
fn password(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok(Some(text.lines().next().unwrap_or_default().to_string()));
    }
    Ok(std::env::var("RAFTCHAT_PASSWORD").ok().filter(|p| !p.is_empty()))
}

/// `host:port` of an `http(s)://host:port/...` URL.
fn host_port(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let hp = rest.split('/').next()?;
    hp.contains(':').then(|| hp.replace("localhost", "127.0.0.1"))
}

/// Whether one of the node configs (`node*.toml`) in `dir` has `addr` as its HTTP address.
fn folder_serves(dir: &std::path::Path, addr: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.starts_with("node")
            && name.ends_with(".toml")
            && crate::config::Config::from_file(&e.path()).is_ok_and(|c| c.http_addr.to_string() == addr)
    })
}

/// An HTTP client that also trusts `ca` (a cluster's own CA) when given.
pub fn http_client(ca: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    Ok(crate::tls::trust_ca(reqwest::Client::builder(), ca)?.build()?)
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// A node's HTTP address (`https://` for a cluster with TLS).
    #[arg(long, env = "RAFTCHAT_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// CA certificate (PEM) to trust for `https://` (the cluster's `ca.pem`).
    #[arg(long, env = "RAFTCHAT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Act as this user (a token is minted from the cluster secret).
    #[arg(long = "as", value_name = "USER")]
    pub as_user: Option<String>,
    /// Bearer token to use instead of --as.
    #[arg(long, env = "RAFTCHAT_TOKEN")]
    pub token: Option<String>,
    /// With --as: log in with the password in this file (first line) instead of minting a
    /// token from the cluster secret. RAFTCHAT_PASSWORD does the same with the password itself.
    #[arg(long, env = "RAFTCHAT_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    #[command(flatten)]
    pub secret: SecretArgs,
}

impl ClientArgs {
    /// The bearer token: `--token`, else a login with `--as` and a password (file or
    /// RAFTCHAT_PASSWORD), else one minted for `--as` from the cluster secret.
    pub async fn token(&self) -> anyhow::Result<String> {
        self.token_at(&self.server).await
    }

    /// [`ClientArgs::token`], logging in at `server` (a failover node) when a password is given.
    pub async fn token_at(&self, server: &str) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let Some(u) = &self.as_user else { bail!("pass --as <user> or --token <token>") };
        let user = UserId::parse(u)?;
        if let Some(password) = password(self.password_file.as_deref())? {
            let resp = http_client(self.ca_file.as_deref())?
                .post(format!("{server}/v1/sessions"))
                .json(&serde_json::json!({ "user": user, "password": password }))
                .send()
                .await
                .context("logging in")?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.context("login reply")?;
            if !status.is_success() {
                bail!("login refused: {status} {}", body["message"].as_str().unwrap_or_default());
            }
            return body["access_token"].as_str().map(str::to_string).context("login reply without access_token");
        }
        Ok(self.secret.keys_for(Some(&self.server))?.mint(&user, 3600, false))
    }
    pub fn user(&self) -> anyhow::Result<UserId> {
        if let Some(u) = &self.as_user {
            return Ok(UserId::parse(u)?);
        }
        let t = self.token.as_deref().unwrap_or_default();
        let payload = t.split('.').nth(1).context("malformed token")?;
        use base64::Engine;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
        let c: crate::auth::Claims = serde_json::from_slice(&bytes)?;
        Ok(UserId::parse(&c.sub)?)
    }
}

async fn call<T: serde::de::DeserializeOwned + serde::Serialize>(req: reqwest::RequestBuilder) -> anyhow::Result<T> {
    let resp = req.send().await.context("request failed")?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    let v: T = serde_json::from_slice(&body)
        .with_context(|| format!("unexpected reply: {}", String::from_utf8_lossy(&body)))?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(v)
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user the token is for.
    pub user: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: u64,
    /// Operator token (may register users).
    #[arg(long)]
    pub admin: bool,
    #[command(flatten)]
    pub secret: SecretArgs,
}

pub fn token(a: TokenArgs) -> anyhow::Result<()> {
    let t = a.secret.keys()?.mint(&UserId::parse(&a.user)?, a.ttl, a.admin);
    println!("{t}");
    Ok(())
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The recipient's user id.
    #[arg(long)]
    pub to: String,
    /// Idempotency key; a retry with the same key never creates a second message.
    #[arg(long)]
    pub id: Option<String>,
    /// The message text (UTF-8).
    pub text: String,
}

pub async fn send(a: SendArgs) -> anyhow::Result<()> {
    let id = a.id.clone().unwrap_or_else(|| format!("cli-{}-{}", std::process::id(), crate::storage::sm::now_ms()));
    let body = serde_json::json!({ "to": a.to, "client_msg_id": id, "text": a.text });
    let req = http_client(a.client.ca_file.as_deref())?
        .post(format!("{}/v1/messages", a.client.server))
        .bearer_auth(a.client.token().await?)
        .json(&body);
    call::<SendResponse>(req).await.map(|_| ())
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The other participant.
    /// The other participant of the conversation.
    #[arg(long)]
    pub with: String,
    /// Only messages with a seq below this (page backwards).
    #[arg(long)]
    pub before: Option<u64>,
    /// Only messages with a seq above this (page forwards).
    #[arg(long)]
    pub after: Option<u64>,
    /// Messages per page (default 50, at most 200).
    #[arg(long)]
    pub limit: Option<u32>,
}

pub async fn history(a: HistoryArgs) -> anyhow::Result<()> {
    let conv = ConversationId::between(&a.client.user()?, &UserId::parse(&a.with)?)?;
    let mut q = vec![];
    if let Some(b) = a.before {
        q.push(("before", b.to_string()));
    }
    if let Some(x) = a.after {
        q.push(("after", x.to_string()));
    }
    if let Some(l) = a.limit {
        q.push(("limit", l.to_string()));
    }
    let req = http_client(a.client.ca_file.as_deref())?
        .get(format!("{}/v1/conversations/{conv}/messages", a.client.server))
        .bearer_auth(a.client.token().await?)
        .query(&q);
    call::<HistoryResponse>(req).await.map(|_| ())
}

#[derive(Debug, Args)]
pub struct ConversationsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Conversations per page (default 50, at most 200).
    #[arg(long)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[arg(long)]
    pub cursor: Option<String>,
}

pub async fn conversations(a: ConversationsArgs) -> anyhow::Result<()> {
    let mut q = vec![];
    if let Some(l) = a.limit {
        q.push(("limit", l.to_string()));
    }
    if let Some(c) = &a.cursor {
        q.push(("cursor", c.clone()));
    }
    let req = http_client(a.client.ca_file.as_deref())?
        .get(format!("{}/v1/conversations", a.client.server))
        .bearer_auth(a.client.token().await?)
        .query(&q);
    call::<ConversationsResponse>(req).await.map(|_| ())
}

#[derive(Debug, Args)]
pub struct MarkReadArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The other participant of the conversation.
    #[arg(long)]
    pub with: String,
    /// Everything up to this seq counts as read.
    #[arg(long)]
    pub seq: u64,
}

pub async fn mark_read(a: MarkReadArgs) -> anyhow::Result<()> {
    let conv = ConversationId::between(&a.client.user()?, &UserId::parse(&a.with)?)?;
    let req = http_client(a.client.ca_file.as_deref())?
        .post(format!("{}/v1/conversations/{conv}/read", a.client.server))
        .bearer_auth(a.client.token().await?)
        .json(&serde_json::json!({ "seq": a.seq }));
    call::<MarkReadResponse>(req).await.map(|_| ())
}

#[derive(Debug, Args)]
pub struct AddUserArgs {
    /// The user id to register.
    pub user: String,
    /// A node's HTTP address (`https://` for a cluster with TLS).
    #[arg(long, env = "RAFTCHAT_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// CA certificate (PEM) to trust for `https://`.
    #[arg(long, env = "RAFTCHAT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub secret: SecretArgs,
}

pub async fn add_user(a: AddUserArgs) -> anyhow::Result<()> {
    let admin = a.secret.keys_for(Some(&a.server))?.mint(&UserId::parse("operator")?, 300, true);
    let req = http_client(a.ca_file.as_deref())?
        .post(format!("{}/v1/users", a.server))
        .bearer_auth(admin)
        .json(&serde_json::json!({ "user": a.user }));
    call::<serde_json::Value>(req).await.map(|_| ())
}

#[derive(Debug, Args)]
pub struct AddAccountArgs {
    /// The user id of the new account (an existing user without an account gets one).
    pub user: String,
    /// A node's HTTP address (`https://` for a cluster with TLS).
    #[arg(long, env = "RAFTCHAT_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// CA certificate (PEM) to trust for `https://`.
    #[arg(long, env = "RAFTCHAT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// File whose first line is the password (else RAFTCHAT_PASSWORD, else a line of stdin).
    #[arg(long, env = "RAFTCHAT_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    #[command(flatten)]
    pub secret: SecretArgs,
}

/// An operator makes a password account (any registration policy).
pub async fn add_account(a: AddAccountArgs) -> anyhow::Result<()> {
    let password = match password(a.password_file.as_deref())? {
        Some(p) => p,
        None => {
            eprintln!("password for {} (one line):", a.user);
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    let admin = a.secret.keys_for(Some(&a.server))?.mint(&UserId::parse("operator")?, 300, true);
    let req = http_client(a.ca_file.as_deref())?
        .post(format!("{}/v1/accounts", a.server))
        .bearer_auth(admin)
        .json(&serde_json::json!({ "user": a.user, "password": password }));
    call::<serde_json::Value>(req).await.map(|_| ())
}

#[derive(Debug, Args)]
pub struct InviteArgs {
    /// A node's HTTP address (`https://` for a cluster with TLS).
    #[arg(long, env = "RAFTCHAT_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// CA certificate (PEM) to trust for `https://`.
    #[arg(long, env = "RAFTCHAT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// How long the invite stays valid, in seconds (default a week).
    #[arg(long, default_value_t = 7 * 86_400)]
    pub ttl_secs: u64,
    #[command(flatten)]
    pub secret: SecretArgs,
}

/// An invite for `registration = "invite"`, usable once.
pub async fn invite(a: InviteArgs) -> anyhow::Result<()> {
    let admin = a.secret.keys_for(Some(&a.server))?.mint(&UserId::parse("operator")?, 300, true);
    let req = http_client(a.ca_file.as_deref())?
        .post(format!("{}/v1/invites", a.server))
        .bearer_auth(admin)
        .json(&serde_json::json!({ "ttl_secs": a.ttl_secs }));
    call::<serde_json::Value>(req).await.map(|_| ())
}
