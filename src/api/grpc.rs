//! The gRPC client API (`raftchat.Chat` in `proto/raftchat.proto`): the same operations
//! as the HTTP API, authenticated by `authorization: Bearer <token>` metadata.

use super::error::ApiError;
use super::ops::{self, SendRequest};
use crate::node::Node;
use crate::pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ChatService {
    node: Arc<Node>,
}

impl ChatService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
    async fn who<T>(&self, req: &Request<T>) -> Result<crate::auth::Principal, ApiError> {
        let h = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        ops::authenticate(&self.node, h).await
    }

    /// Counts the call in `raftchat_requests_total{via="grpc"}` and answers it.
    fn done<T>(&self, op: &str, r: Result<T, ApiError>) -> Result<Response<T>, Status> {
        match r {
            Ok(v) => {
                self.node.metrics.count_request("grpc", op, "ok");
                Ok(Response::new(v))
            }
            Err(e) => {
                self.node.metrics.count_request("grpc", op, e.code);
                Err(e.into())
            }
        }
    }
}

#[tonic::async_trait]
impl pb::chat_server::Chat for ChatService {
    async fn send(&self, req: Request<pb::SendRequest>) -> Result<Response<pb::SendReply>, Status> {
        let r = async {
            let who = self.who(&req).await?;
            let r = req.into_inner();
            let out = ops::send(
                &self.node,
                &who,
                SendRequest { to: r.to, client_msg_id: r.client_msg_id, text: r.text },
                None,
            )
            .await?;
            Ok(pb::SendReply {
                conversation_id: out.conversation_id,
                seq: out.seq,
                ts: out.ts,
                duplicate: out.duplicate,
            })
        }
        .await;
        self.done("send", r)
    }

    async fn history(&self, req: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryReply>, Status> {
        let r = async {
            let who = self.who(&req).await?;
            let r = req.into_inner();
            let out = ops::history(&self.node, &who, &r.conversation_id, r.before, r.after, r.limit).await?;
            Ok(pb::HistoryReply {
                conversation_id: out.conversation_id,
                last_seq: out.last_seq,
                messages: out
                    .messages
                    .into_iter()
                    .map(|m| pb::Message {
                        seq: m.seq,
                        from: m.from.to_string(),
                        text: m.text,
                        ts: m.ts,
                        client_msg_id: m.client_msg_id,
                    })
                    .collect(),
            })
        }
        .await;
        self.done("history", r)
    }

    async fn conversations(
        &self,
        req: Request<pb::ConversationsRequest>,
    ) -> Result<Response<pb::ConversationsReply>, Status> {
        let r = async {
            let who = self.who(&req).await?;
            let r = req.into_inner();
            let out = ops::conversations(&self.node, &who, r.limit, r.cursor.as_deref()).await?;
            Ok(pb::ConversationsReply {
                conversations: out
                    .conversations
                    .into_iter()
                    .map(|c| pb::ConversationSummary {
                        conversation_id: c.conversation_id,
                        peer: c.peer,
                        last_seq: c.last_seq,
                        last_ts: c.last_ts,
                        last_from: c.last_from.unwrap_or_default(),
                        preview: c.preview,
                        read_seq: c.read_seq,
                        unread: c.unread,
                        peer_delivered_seq: c.peer_delivered_seq,
                        peer_read_seq: c.peer_read_seq,
                    })
                    .collect(),
                next_cursor: out.next_cursor,
            })
        }
        .await;
        self.done("conversations", r)
    }

    async fn mark_read(&self, req: Request<pb::MarkReadRequest>) -> Result<Response<pb::MarkReadReply>, Status> {
        let r = async {
            let who = self.who(&req).await?;
            let r = req.into_inner();
            let out = ops::mark_read(&self.node, &who, &r.conversation_id, r.seq).await?;
            Ok(pb::MarkReadReply { read_seq: out.read_seq, unread: out.unread })
        }
        .await;
        self.done("mark_read", r)
    }
}
