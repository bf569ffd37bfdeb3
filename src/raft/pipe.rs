//! The peer pipe: one long-lived gRPC stream per peer that carries this node's Raft RPCs
//! (AppendEntries, Vote) and forwarded shard operations to it, many frames per message.
//!
//! Why. A unary gRPC call costs an HTTP/2 stream: HEADERS with HPACK on both sides, a
//! trailer, a server task and tower's layers, for a payload of a few hundred bytes. A send
//! makes about six peer calls (two forwards, AppendEntries of about two log entries to two
//! followers), so at a few hundred sends a second this per-call cost was a large share of a
//! node's CPU. On the pipe a call is one frame in a `PipeBatch`; calls queued together leave
//! in one message, their answers come back the same way (in completion order, so a slow
//! forwarded send never holds up an AppendEntries answer).
//!
//! How. [`Pipe::call`] hands the frame to the peer's pipe task through a channel and waits
//! for the answer with the same id. The task opens the stream on first use (`Peer/Pipe`,
//! with the peer key in the headers like every peer call), writes what is queued, routes
//! answers to their callers, and ends when the stream breaks: every call then outstanding
//! fails as [`PipeError::Broken`] (the callers treat it like an unreachable peer) and the
//! next call opens a new stream. Deadlines stay with the callers. A peer running an older
//! build answers `UNIMPLEMENTED`; the pipe then says [`PipeError::Unsupported`] for a while
//! and the callers use the unary RPCs, so a rolling upgrade keeps working.
//!
//! Coalescing. tokio runs a task woken by the running one next (its LIFO slot), so the pipe
//! task used to wake for the first call of a burst and write it alone, before the tasks that
//! were about to add theirs got a turn: about ten socket writes per send on each node at
//! 1,000 sends/s. The pipe task therefore yields once after the first call arrives, and the
//! server's answer stream does the same (`node::peer_service`): the tasks already runnable
//! queue their frames first, and they leave in one message. Measured: node 1's `writev`
//! calls at 1,000 sends/s fell from 3,400–3,800/s to 2,450–3,000/s (docs/performance.md).

use crate::pb;
use crate::pb::peer_client::PeerClient;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

/// What a frame asks for (`PipeFrame.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    AppendEntries = 1,
    Vote = 2,
    Forward = 3,
    PreVote = 4,
    Elect = 5,
    /// Host a shard (a replica moves here; `node::membership`); reply `Result<(), ShardError>`.
    Host = 6,
    /// Drop a shard (its replica moved away).
    Drop = 7,
    /// "Where is this shard?": reply `Option<(u64, Vec<NodeId>)>` (membership index, voters).
    Locate = 8,
    /// "Which nodes do you know?": reply `Vec<NodeRecord>` (`node::directory`).
    Book = 9,
}

impl Kind {
    pub fn from_u32(k: u32) -> Option<Self> {
        match k {
            1 => Some(Kind::AppendEntries),
            2 => Some(Kind::Vote),
            3 => Some(Kind::Forward),
            4 => Some(Kind::PreVote),
            5 => Some(Kind::Elect),
            6 => Some(Kind::Host),
            7 => Some(Kind::Drop),
            8 => Some(Kind::Locate),
            9 => Some(Kind::Book),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PipeError {
    /// The peer does not serve pipes (an older build): use the unary RPC.
    #[error("the peer does not serve the pipe")]
    Unsupported,
    /// The stream could not be opened or broke with the call outstanding; its outcome is
    /// unknown.
    #[error("peer stream: {0}")]
    Broken(String),
    /// The peer received the call but could not run it (e.g. it does not replicate the group).
    #[error("{0}")]
    Refused(String),
}

/// How long a peer that answered `UNIMPLEMENTED` is served by the unary RPCs before the pipe
/// is tried again (it may have been upgraded meanwhile).
const RETRY_UNSUPPORTED: Duration = Duration::from_secs(30);

/// How a peer's answer to a frame kind it does not know begins.
pub const UNKNOWN_KIND: &str = "unknown pipe frame kind";

/// Frames per `PipeBatch` at most.
const MAX_FRAMES: usize = 256;

type Answer = oneshot::Sender<Result<Vec<u8>, PipeError>>;

struct Job {
    frame: pb::PipeFrame,
    answer: Answer,
}

enum State {
    Idle,
    Open(mpsc::UnboundedSender<Job>),
    Unsupported(Instant),
}

/// The pipe to one peer.
pub struct Pipe {
    state: Mutex<State>,
}

impl Default for Pipe {
    fn default() -> Self {
        Self { state: Mutex::new(State::Idle) }
    }
}

impl Pipe {
    /// False while the peer is known not to serve pipes (then use the unary RPCs).
    pub fn usable(&self) -> bool {
        match &*self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Unsupported(since) => since.elapsed() >= RETRY_UNSUPPORTED,
            _ => true,
        }
    }

    /// Sends one call and waits for its answer (the caller bounds the wait).
    /// `open` makes the stream's client and the request metadata when a stream is needed.
    pub async fn call(
        &self,
        kind: Kind,
        group: u32,
        budget: Duration,
        payload: Vec<u8>,
        open: impl FnOnce() -> Option<(PeerClient<Channel>, tonic::metadata::MetadataMap)>,
    ) -> Result<Vec<u8>, PipeError> {
        let (answer, rx) = oneshot::channel();
        let frame = pb::PipeFrame {
            id: 0,
            kind: kind as u32,
            group,
            budget_ms: budget.as_millis() as u64,
            payload,
            error: String::new(),
        };
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let State::Unsupported(since) = &*state {
                if since.elapsed() < RETRY_UNSUPPORTED {
                    return Err(PipeError::Unsupported);
                }
                *state = State::Idle;
            }
            let job = Job { frame, answer };
            let unsent = match &*state {
                // An error means its task ended (the stream broke): open a new one.
                State::Open(tx) => tx.send(job).err().map(|e| e.0),
                _ => Some(job),
            };
            if let Some(job) = unsent {
                let Some((client, md)) = open() else {
                    return Err(PipeError::Broken("no client for the peer".into()));
                };
                let (tx, jobs) = mpsc::unbounded_channel();
                let _ = tx.send(job);
                *state = State::Open(tx);
                tokio::spawn(run(client, md, jobs));
            }
        }
        wait(&self.state, rx).await
    }
}

async fn wait(state: &Mutex<State>, rx: oneshot::Receiver<Result<Vec<u8>, PipeError>>) -> Result<Vec<u8>, PipeError> {
    match rx.await {
        Ok(r) => {
            if matches!(r, Err(PipeError::Unsupported)) {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                if !matches!(*state, State::Unsupported(_)) {
                    *state = State::Unsupported(Instant::now());
                }
            }
            r
        }
        Err(_) => Err(PipeError::Broken("the peer stream ended".into())),
    }
}

/// The pipe task: opens the stream, writes queued calls, routes answers (module docs).
async fn run(
    mut client: PeerClient<Channel>,
    md: tonic::metadata::MetadataMap,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<pb::PipeBatch>();
    let outbound = futures::stream::poll_fn(move |cx| out_rx.poll_recv(cx));
    let mut req = tonic::Request::new(outbound);
    *req.metadata_mut() = md;
    let mut pending: HashMap<u64, Answer> = HashMap::new();
    let mut next_id = 1u64;
    // Queue what arrives while the stream opens: the first message goes out with the
    // request, so opening costs no extra round trip.
    let first = drain(&mut jobs, &mut pending, &mut next_id);
    if !first.frames.is_empty() {
        let _ = out_tx.send(first);
    }
    let opened = tokio::time::timeout(Duration::from_secs(5), client.pipe(req)).await;
    let cause = match opened {
        Err(_) => "the peer did not open the stream within 5s".to_string(),
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            fail_all(&mut pending, &mut jobs, PipeError::Unsupported);
            return;
        }
        Ok(Err(status)) => status.message().to_string(),
        Ok(Ok(resp)) => {
            let mut inbound = resp.into_inner();
            loop {
                tokio::select! {
                    job = jobs.recv() => {
                        let Some(job) = job else { return };
                        // Let the tasks already runnable queue their calls too, so that
                        // they leave in this message (module docs: coalescing).
                        tokio::task::yield_now().await;
                        let mut batch = drain(&mut jobs, &mut pending, &mut next_id);
                        batch.frames.insert(0, register(job, &mut pending, &mut next_id));
                        if out_tx.send(batch).is_err() {
                            break "the peer stream closed".to_string();
                        }
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(batch)) => {
                            for f in batch.frames {
                                if let Some(tx) = pending.remove(&f.id) {
                                    let r = if f.error.is_empty() { Ok(f.payload) } else { Err(PipeError::Refused(f.error)) };
                                    let _ = tx.send(r);
                                }
                            }
                            // Callers that gave up (deadline) leave closed senders behind.
                            if pending.len() > 4096 {
                                pending.retain(|_, tx| !tx.is_closed());
                            }
                        }
                        Ok(None) => break "the peer closed the stream".to_string(),
                        Err(status) => break status.message().to_string(),
                    }
                }
            }
        }
    };
    fail_all(&mut pending, &mut jobs, PipeError::Broken(cause));
}

fn register(job: Job, pending: &mut HashMap<u64, Answer>, next_id: &mut u64) -> pb::PipeFrame {
    let mut frame = job.frame;
    frame.id = *next_id;
    *next_id += 1;
    pending.insert(frame.id, job.answer);
    frame
}

/// Takes what is queued (up to [`MAX_FRAMES`]) as one batch.
fn drain(
    jobs: &mut mpsc::UnboundedReceiver<Job>,
    pending: &mut HashMap<u64, Answer>,
    next_id: &mut u64,
) -> pb::PipeBatch {
    let mut frames = Vec::new();
    while frames.len() < MAX_FRAMES - 1 {
        match jobs.try_recv() {
            Ok(job) => frames.push(register(job, pending, next_id)),
            Err(_) => break,
        }
    }
    pb::PipeBatch { frames }
}

fn fail_all(pending: &mut HashMap<u64, Answer>, jobs: &mut mpsc::UnboundedReceiver<Job>, e: PipeError) {
    jobs.close();
    for (_, tx) in pending.drain() {
        let _ = tx.send(Err(e.clone()));
    }
    while let Ok(job) = jobs.try_recv() {
        let _ = job.answer.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer of an older build: its gRPC server answers the unknown `Peer/Pipe` with
    /// `UNIMPLEMENTED` (grpc-status 12), as tonic does for any method it does not have.
    async fn older_peer() -> std::net::SocketAddr {
        let app = axum::Router::new().fallback(|| async {
            ([("content-type", "application/grpc"), ("grpc-status", "12"), ("grpc-message", "unknown method")], "")
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn client(addr: std::net::SocketAddr) -> PeerClient<Channel> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("endpoint").connect_lazy();
        PeerClient::new(ch)
    }

    #[tokio::test]
    async fn an_older_peer_is_called_unary_for_a_while() {
        let addr = older_peer().await;
        let pipe = Pipe::default();
        assert!(pipe.usable());
        let open = || Some((client(addr), tonic::metadata::MetadataMap::new()));
        let r = pipe.call(Kind::Vote, 0, Duration::from_secs(1), b"{}".to_vec(), open).await;
        assert!(matches!(r, Err(PipeError::Unsupported)), "{r:?}");
        assert!(!pipe.usable(), "callers now use the unary RPCs");
        let r = pipe.call(Kind::Vote, 0, Duration::from_secs(1), b"{}".to_vec(), || None).await;
        assert!(matches!(r, Err(PipeError::Unsupported)), "no new stream is tried: {r:?}");
    }

    #[tokio::test]
    async fn a_peer_that_is_down_fails_the_call_and_the_next_call_tries_again() {
        // A port nobody listens on.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let pipe = Pipe::default();
        let open = || Some((client(addr), tonic::metadata::MetadataMap::new()));
        let r = pipe.call(Kind::Forward, 3, Duration::from_secs(1), b"{}".to_vec(), open).await;
        assert!(matches!(r, Err(PipeError::Broken(_))), "{r:?}");
        assert!(pipe.usable(), "a broken stream is not an older peer");
        let mut tried = false;
        let _ = pipe
            .call(Kind::Forward, 3, Duration::from_secs(1), b"{}".to_vec(), || {
                tried = true;
                None
            })
            .await;
        assert!(tried, "the next call opens a new stream");
    }
}
