//! The gRPC service peers call: Raft RPCs of every local shard group and forwarded shard
//! operations. Every call must carry the cluster's peer key.

use super::router::{ShardError, ShardOp};
use super::Node;
use crate::pb;
use crate::raft::network::{PEER_KEY_HEADER, PEER_TO_HEADER};
use crate::raft::pipe::Kind as PipeKind;
use openraft::raft::InstallSnapshotRequest;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

pub struct PeerService {
    node: Arc<Node>,
    /// Becomes true when the node stops serving peers (the last step of its shutdown):
    /// long-lived streams (pipes, inbox subscriptions) then end, so the peer server's
    /// graceful stop does not wait for peers that would keep them open for ever.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// The peer listener's interceptor: runs on the request's headers, before the body is read.
/// A call meant for another node id (`x-raftchat-to`; older builds send none) is refused.
pub fn check_key(keys: &crate::auth::Keys, me: u64, req: Request<()>) -> Result<Request<()>, Status> {
    key_ok(keys, req.metadata())?;
    if let Some(to) = req.metadata().get(PEER_TO_HEADER).and_then(|v| v.to_str().ok()) {
        if to.parse::<u64>().ok() != Some(me) {
            return Err(Status::failed_precondition(format!(
                "this is node {me}, not node {to}: the caller's address book is wrong (see the node table, GET /v1/admin/nodes)"
            )));
        }
    }
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
    pub fn new(node: Arc<Node>, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { node, stop }
    }

    /// Resolves when the node stops serving peers.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.clone();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    }

    /// The interceptor already checked the key; checked again here so the service is never
    /// exposed without it by a change to the server's set-up.
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        key_ok(&self.node.keys, req.metadata())
    }

    fn group(&self, g: u32) -> Result<crate::raft::group::Group, Status> {
        self.node
            .local
            .group(g)
            .ok_or_else(|| Status::not_found(format!("node {} does not replicate shard {g}", self.node.id)))
    }
}

fn not_a_voter(node: u64, shard: u32) -> Status {
    Status::failed_precondition(format!("node {node} is not a voter of shard {shard}'s group: no vote"))
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(v).map_err(|e| Status::internal(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(b).map_err(|e| Status::invalid_argument(format!("undecodable payload: {e}")))
}

type InboxStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::InboxItem, Status>> + Send>>;
type PipeStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::PipeBatch, Status>> + Send>>;

impl PeerService {
    /// Runs one pipe frame (see `raft::pipe`) and answers it with the same id.
    async fn run_frame(node: Arc<Node>, f: pb::PipeFrame) -> pb::PipeFrame {
        let answer = |r: Result<Vec<u8>, Status>| match r {
            Ok(payload) => pb::PipeFrame { id: f.id, payload, ..Default::default() },
            Err(s) => pb::PipeFrame { id: f.id, error: s.message().to_string(), ..Default::default() },
        };
        let group = || {
            node.local
                .group(f.group)
                .ok_or_else(|| Status::not_found(format!("node {} does not replicate shard {}", node.id, f.group)))
        };
        let r = match PipeKind::from_u32(f.kind) {
            Some(PipeKind::AppendEntries) => match (group(), parse(&f.payload)) {
                (Ok(g), Ok(rpc)) => json(&g.append_entries(rpc).await),
                (Err(e), _) | (_, Err(e)) => Err(e),
            },
            Some(PipeKind::Vote) => match (group(), parse(&f.payload)) {
                (Ok(g), Ok(_)) if !node.votes_in(&g) => Err(not_a_voter(node.id, f.group)),
                (Ok(g), Ok(rpc)) => json(&g.raft.vote(rpc).await),
                (Err(e), _) | (_, Err(e)) => Err(e),
            },
            Some(PipeKind::Forward) => match parse::<ShardOp>(&f.payload) {
                Ok(op) => {
                    let budget = Duration::from_millis(f.budget_ms.min(node.cfg.request_timeout_ms));
                    let res: Result<_, ShardError> = node.execute_local(f.group, op, Instant::now() + budget).await;
                    json(&res)
                }
                Err(e) => Err(e),
            },
            Some(PipeKind::PreVote) => match group() {
                Ok(g) => json(&node.pre_vote_answer(&g)),
                Err(e) => Err(e),
            },
            Some(PipeKind::Elect) => match group() {
                Ok(g) => json(&node.elect_now(&g).await),
                Err(e) => Err(e),
            },
            Some(PipeKind::Host) => json(&node.host_shard(f.group).await),
            Some(PipeKind::Locate) => json(&node.locate_answer(f.group)),
            Some(PipeKind::Book) => json(&node.directory.known()),
            Some(PipeKind::Drop) => {
                let budget = Duration::from_millis(f.budget_ms.min(node.cfg.request_timeout_ms));
                json(&node.drop_shard(f.group, Instant::now() + budget).await)
            }
            None => Err(Status::invalid_argument(format!("{} {}", crate::raft::pipe::UNKNOWN_KIND, f.kind))),
        };
        answer(r)
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    type SubscribeStream = InboxStream;
    type PipeStream = PipeStream;

    /// The peer pipe's server end: every frame runs in its own task and is answered when
    /// done, answers queued together leaving in one message.
    async fn pipe(&self, req: Request<tonic::Streaming<pb::PipeBatch>>) -> Result<Response<PipeStream>, Status> {
        self.check(&req)?;
        let mut inbound = req.into_inner();
        let node = self.node.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<pb::PipeFrame>();
        tokio::spawn(async move {
            while let Ok(Some(batch)) = inbound.message().await {
                for f in batch.frames {
                    let (node, tx) = (node.clone(), tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(Self::run_frame(node, f).await);
                    });
                }
            }
        });
        // Coalescing: the first answer found makes the stream yield once (wake itself and
        // say pending), so that answers finishing in the tasks already runnable leave in
        // the same message (see `raft::pipe`).
        let mut yielded = false;
        let out = futures::stream::poll_fn(move |cx| {
            if !yielded && !rx.is_empty() {
                yielded = true;
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            yielded = false;
            let mut frames = Vec::new();
            loop {
                match rx.poll_recv(cx) {
                    std::task::Poll::Ready(Some(f)) if frames.len() < 256 => frames.push(f),
                    std::task::Poll::Ready(Some(f)) => {
                        frames.push(f);
                        break;
                    }
                    std::task::Poll::Ready(None) if frames.is_empty() => return std::task::Poll::Ready(None),
                    std::task::Poll::Ready(None) | std::task::Poll::Pending => break,
                }
            }
            if frames.is_empty() {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(Some(Ok(pb::PipeBatch { frames })))
            }
        });
        // The stream ends when the node stops serving peers; the peer's pipe task then fails
        // what was outstanding (as for a broken stream) and finds the node gone.
        Ok(Response::new(Box::pin(futures::StreamExt::take_until(out, self.stopped()))))
    }

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
        Ok(Response::new(Box::pin(futures::StreamExt::take_until(stream, self.stopped()))))
    }
    async fn raft(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let node = &self.node;
        match pb::RaftKind::try_from(r.kind) {
            Ok(pb::RaftKind::Locate) => {
                return Ok(Response::new(pb::RaftReply { payload: json(&node.locate_answer(r.group))? }))
            }
            Ok(pb::RaftKind::Book) => {
                return Ok(Response::new(pb::RaftReply { payload: json(&node.directory.known())? }))
            }
            Ok(pb::RaftKind::HostShard) => {
                return Ok(Response::new(pb::RaftReply { payload: json(&node.host_shard(r.group).await)? }))
            }
            Ok(pb::RaftKind::DropShard) => {
                let deadline = Instant::now() + Duration::from_millis(node.cfg.request_timeout_ms);
                return Ok(Response::new(pb::RaftReply { payload: json(&node.drop_shard(r.group, deadline).await)? }));
            }
            _ => {}
        }
        let group = self.group(r.group)?;
        let raft = &group.raft;
        let payload = match pb::RaftKind::try_from(r.kind) {
            Ok(pb::RaftKind::AppendEntries) => json(&group.append_entries(parse(&r.payload)?).await)?,
            Ok(pb::RaftKind::Vote) if !self.node.votes_in(&group) => return Err(not_a_voter(self.node.id, r.group)),
            Ok(pb::RaftKind::Vote) => json(&raft.vote(parse(&r.payload)?).await)?,
            Ok(pb::RaftKind::PreVote) => json(&self.node.pre_vote_answer(&group))?,
            Ok(pb::RaftKind::Elect) => json(&self.node.elect_now(&group).await)?,
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
        let leader_vote = rpc.vote;
        let res = raft.install_snapshot(rpc).await;
        // Accepted (not refused for a higher vote): the leader is in contact.
        if matches!(&res, Ok(r) if r.vote == leader_vote) {
            self.group(c.group)?.contact.note();
        }
        let payload = json(&res)?;
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
