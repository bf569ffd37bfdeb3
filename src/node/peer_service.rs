//! The gRPC service peers call: Raft RPCs of every local shard group and forwarded shard
//! operations. Every call must carry the cluster's peer key.

use super::router::{ShardError, ShardOp};
use super::Node;
use crate::pb;
use crate::raft::network::PEER_KEY_HEADER;
use openraft::raft::InstallSnapshotRequest;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

pub struct PeerService {
    node: Arc<Node>,
}

/// The peer listener's interceptor: runs on the request's headers, before the body is read.
pub fn check_key(keys: &crate::auth::Keys, req: Request<()>) -> Result<Request<()>, Status> {
    key_ok(keys, req.metadata())?;
    Ok(req)
}

fn key_ok(keys: &crate::auth::Keys, md: &tonic::metadata::MetadataMap) -> Result<(), Status> {
    let key = md.get(PEER_KEY_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    if keys.verify_peer(key) {
        Ok(())
    } else {
        Err(Status::unauthenticated("missing or wrong peer key: is this node configured with the cluster's secret?"))
    }
}

impl PeerService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// The interceptor already checked the key; checked again here so the service is never
    /// exposed without it by a change to the server's set-up.
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        key_ok(&self.node.keys, req.metadata())
    }

    fn group(&self, g: u32) -> Result<&crate::raft::group::Group, Status> {
        self.node
            .groups
            .get(&g)
            .ok_or_else(|| Status::not_found(format!("node {} does not replicate shard {g}", self.node.id)))
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(v).map_err(|e| Status::internal(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(b).map_err(|e| Status::invalid_argument(format!("undecodable payload: {e}")))
}

type InboxStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::InboxItem, Status>> + Send>>;

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    type SubscribeStream = InboxStream;

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<InboxStream>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let user = crate::chat::UserId::parse(&r.user).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let encode = |item: &crate::node::inbox::InboxItem| {
            serde_json::to_vec(item)
                .map(|payload| pb::InboxItem { payload })
                .map_err(|e| Status::internal(e.to_string()))
        };
        let stream: InboxStream = match self.node.local_inbox(user, r.after) {
            Ok(mut rx) => Box::pin(async_stream(move |tx| async move {
                while let Some(item) = rx.recv().await {
                    if tx.send(encode(&item)).await.is_err() {
                        return;
                    }
                }
            })),
            Err(e) => Box::pin(futures::stream::once(futures::future::ready(encode(&Err(e))))),
        };
        Ok(Response::new(stream))
    }
    async fn raft(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let raft = &self.group(r.group)?.raft;
        let payload = match pb::RaftKind::try_from(r.kind) {
            Ok(pb::RaftKind::AppendEntries) => json(&raft.append_entries(parse(&r.payload)?).await)?,
            Ok(pb::RaftKind::Vote) => json(&raft.vote(parse(&r.payload)?).await)?,
            _ => return Err(Status::invalid_argument(format!("unknown raft rpc kind {}", r.kind))),
        };
        Ok(Response::new(pb::RaftReply { payload }))
    }

    async fn snapshot(&self, req: Request<pb::SnapshotChunk>) -> Result<Response<pb::RaftReply>, Status> {
        self.check(&req)?;
        let c = req.into_inner();
        let raft = &self.group(c.group)?.raft;
        let rpc = InstallSnapshotRequest {
            vote: parse(&c.vote)?,
            meta: parse(&c.meta)?,
            offset: c.offset,
            data: c.data,
            done: c.done,
        };
        let payload = json(&raft.install_snapshot(rpc).await)?;
        Ok(Response::new(pb::RaftReply { payload }))
    }

    async fn forward(&self, req: Request<pb::ForwardRequest>) -> Result<Response<pb::ForwardReply>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let op: ShardOp = parse(&r.op)?;
        let budget = Duration::from_millis(r.budget_ms.min(self.node.cfg.request_timeout_ms));
        let res: Result<_, ShardError> = self.node.execute_local(r.shard, op, Instant::now() + budget).await;
        Ok(Response::new(pb::ForwardReply { payload: json(&res)? }))
    }
}

/// A stream fed by a task through a small channel.
fn async_stream<T, F, Fut>(f: F) -> impl futures::Stream<Item = T> + Send
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}
