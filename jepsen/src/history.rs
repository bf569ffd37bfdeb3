//! The history: every client operation as an `invoke` followed by `ok` (it happened),
//! `fail` (it definitely did not happen) or `info` (unknown), with the process, a
//! monotonic timestamp and values. Written as JSON lines and as Jepsen EDN in Elle's
//! list-append shape (a conversation is a list; a send appends its `client_msg_id`).

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// What an operation did and saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Value {
    /// `seq` is known on `ok`.
    Send {
        conv: String,
        from: String,
        to: String,
        id: String,
        seq: Option<u64>,
    },
    /// A full read of a conversation: `(seq, from, id)` in order.
    Read {
        conv: String,
        user: String,
        msgs: Option<Vec<(u64, String, String)>>,
    },
    /// A user's recent-conversations list: `(conv, last_seq)`.
    Recent {
        user: String,
        rows: Option<Vec<(String, u64)>>,
    },
    MarkRead {
        conv: String,
        user: String,
        seq: u64,
    },
    /// One pushed message received by a user's subscriber.
    Push {
        user: String,
        conv: String,
        seq: u64,
        from: String,
        id: String,
        cursor: String,
    },
    /// A subscriber (re)connected (to the op's `node`), resuming from `cursor`.
    Connect {
        user: String,
        cursor: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub index: usize,
    pub process: usize,
    #[serde(rename = "type")]
    pub kind: Type,
    /// Nanoseconds since the run started (monotonic).
    pub time: u64,
    /// Node the operation was sent to.
    pub node: usize,
    #[serde(flatten)]
    pub value: Value,
    /// Error text of fail/info.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Part of the final reads after heal and quiet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_final: bool,
}

/// Thread-safe recorder shared by all workers.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Recorder {
    pub fn new() -> Self {
        Self { start: Instant::now(), ops: Arc::new(Mutex::new(Vec::new())) }
    }
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
    pub fn record(&self, process: usize, kind: Type, node: usize, value: Value, error: Option<String>, is_final: bool) {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let index = ops.len();
        ops.push(Op { index, process, kind, time: self.now(), node, value, error, is_final });
    }
    pub fn snapshot(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn len(&self) -> usize {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

pub fn write_jsonl(ops: &[Op], w: &mut impl Write) -> std::io::Result<()> {
    for op in ops {
        serde_json::to_writer(&mut *w, op)?;
        w.write_all(b"\n")?;
    }
    Ok(())
}

pub fn read_jsonl(text: &str) -> anyhow::Result<Vec<Op>> {
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
}

fn edn_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Jepsen EDN, one map per line, in Elle's list-append form: a send is
/// `[[:append "<conv>" "<id>"]]`, a read `[[:r "<conv>" ["<id>" ...]]]` (nil until known).
/// Pushes, recent-list reads and mark-reads are kept with their own `:f`.
pub fn write_edn(ops: &[Op], w: &mut impl Write) -> std::io::Result<()> {
    for op in ops {
        let kind = match op.kind {
            Type::Invoke => ":invoke",
            Type::Ok => ":ok",
            Type::Fail => ":fail",
            Type::Info => ":info",
        };
        let (f, value) = match &op.value {
            Value::Send { conv, id, .. } => (":txn", format!("[[:append {} {}]]", edn_str(conv), edn_str(id))),
            Value::Read { conv, msgs, .. } => {
                let v = match msgs {
                    Some(m) => format!("[{}]", m.iter().map(|(_, _, id)| edn_str(id)).collect::<Vec<_>>().join(" ")),
                    None => "nil".into(),
                };
                (":txn", format!("[[:r {} {v}]]", edn_str(conv)))
            }
            Value::Recent { user, rows } => {
                let v = match rows {
                    Some(r) => format!(
                        "[{}]",
                        r.iter().map(|(c, s)| format!("[{} {s}]", edn_str(c))).collect::<Vec<_>>().join(" ")
                    ),
                    None => "nil".into(),
                };
                (":recent", format!("{{:user {} :rows {v}}}", edn_str(user)))
            }
            Value::MarkRead { conv, user, seq } => {
                (":mark-read", format!("{{:conv {} :user {} :seq {seq}}}", edn_str(conv), edn_str(user)))
            }
            Value::Push { user, conv, seq, id, cursor, .. } => (
                ":push",
                format!(
                    "{{:user {} :conv {} :seq {seq} :id {} :cursor {}}}",
                    edn_str(user),
                    edn_str(conv),
                    edn_str(id),
                    edn_str(cursor)
                ),
            ),
            Value::Connect { user, cursor } => (
                ":connect",
                format!(
                    "{{:user {} :cursor {}}}",
                    edn_str(user),
                    cursor.as_deref().map(edn_str).unwrap_or("nil".into())
                ),
            ),
        };
        writeln!(
            w,
            "{{:index {}, :type {kind}, :f {f}, :process {}, :time {}, :node {}, :value {value}}}",
            op.index, op.process, op.time, op.node
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_round_trips_and_edn_is_list_append() {
        let r = Recorder::new();
        let send = Value::Send { conv: "a~b".into(), from: "a".into(), to: "b".into(), id: "p1-1".into(), seq: None };
        r.record(1, Type::Invoke, 0, send.clone(), None, false);
        let acked =
            Value::Send { conv: "a~b".into(), from: "a".into(), to: "b".into(), id: "p1-1".into(), seq: Some(1) };
        r.record(1, Type::Ok, 0, acked, None, false);
        let read =
            Value::Read { conv: "a~b".into(), user: "a".into(), msgs: Some(vec![(1, "a".into(), "p1-1".into())]) };
        r.record(2, Type::Ok, 1, read, None, true);
        let connect = Value::Connect { user: "a".into(), cursor: Some("1.0".into()) };
        r.record(3, Type::Ok, 2, connect, None, false);
        let push = Value::Push {
            user: "b".into(),
            conv: "a~b".into(),
            seq: 1,
            from: "a".into(),
            id: "p1-1".into(),
            cursor: "1.1".into(),
        };
        r.record(3, Type::Ok, 2, push, None, false);
        let ops = r.snapshot();
        let mut buf = Vec::new();
        write_jsonl(&ops, &mut buf).unwrap();
        assert_eq!(read_jsonl(std::str::from_utf8(&buf).unwrap()).unwrap(), ops);
        let mut edn = Vec::new();
        write_edn(&ops, &mut edn).unwrap();
        let edn = String::from_utf8(edn).unwrap();
        assert!(edn.contains(r#":type :invoke, :f :txn, :process 1"#), "{edn}");
        assert!(edn.contains(r#":value [[:append "a~b" "p1-1"]]"#), "{edn}");
        assert!(edn.contains(r#":value [[:r "a~b" ["p1-1"]]]"#), "{edn}");
    }
}
