//! The checker: reads a history and names every anomaly with the operations involved.
//!
//! Modelled on Elle's list-append and Jepsen's Kafka checks. A conversation is an
//! append-only list whose order the server makes explicit with `seq`; the longest read of
//! a conversation (the final reads, after heal and quiet) is the reference order.
//!
//! - [`lists`]: acknowledged sends present exactly once (lost writes, duplicates); every
//!   read a gap-free prefix of one order with seq consistent with content (incompatible
//!   orders); no stale reads; definitely-failed sends never appear; retries of one
//!   `client_msg_id` map to one seq.
//! - [`push`]: per subscriber and conversation, pushed seqs strictly increasing, gap-free
//!   between first and last, no duplicates across reconnects, content equal to the order.
//! - [`recent`]: after an ack both users' recent lists show the conversation at least at
//!   that seq; a process's view of a user's list never goes backwards.

pub mod lists;
pub mod push;
pub mod recent;
#[cfg(test)]
mod tests;

use crate::history::{Op, Type, Value};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Anomaly {
    pub kind: &'static str,
    pub message: String,
    /// History indices of the operations involved.
    pub ops: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub valid: bool,
    pub counts: BTreeMap<&'static str, usize>,
    pub anomalies: Vec<Anomaly>,
    pub stats: BTreeMap<&'static str, usize>,
}

/// One invocation with its completion (if any).
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub invoke: &'a Op,
    pub done: Option<&'a Op>,
}

impl Call<'_> {
    pub fn kind(&self) -> Type {
        self.done.map(|d| d.kind).unwrap_or(Type::Info)
    }
    /// When the client saw the outcome (end of history if never).
    pub fn completed_at(&self) -> u64 {
        self.done.map(|d| d.time).unwrap_or(u64::MAX)
    }
}

/// Pairs each process's invocations with the next completion of that process.
pub fn calls(ops: &[Op]) -> Vec<Call<'_>> {
    let mut open: BTreeMap<usize, usize> = BTreeMap::new();
    let mut out: Vec<Call> = Vec::new();
    for op in ops {
        match op.kind {
            Type::Invoke => {
                open.insert(op.process, out.len());
                out.push(Call { invoke: op, done: None });
            }
            _ => {
                if let Some(i) = open.remove(&op.process) {
                    out[i].done = Some(op);
                }
            }
        }
    }
    out
}

pub fn check(ops: &[Op]) -> Verdict {
    let calls = calls(ops);
    let mut anomalies = Vec::new();
    let orders = lists::reference_orders(&calls, &mut anomalies);
    lists::check(&calls, &orders, &mut anomalies);
    push::check(ops, &orders, &mut anomalies);
    recent::check(&calls, &mut anomalies);
    let mut counts = BTreeMap::new();
    for a in &anomalies {
        *counts.entry(a.kind).or_insert(0) += 1;
    }
    let mut stats = BTreeMap::new();
    let mut bump = |k: &'static str| *stats.entry(k).or_insert(0) += 1;
    for c in &calls {
        let f = match &c.invoke.value {
            Value::Send { .. } => "send",
            Value::Read { .. } => "read",
            Value::Recent { .. } => "recent",
            Value::MarkRead { .. } => "mark_read",
            _ => "other",
        };
        bump(f);
        bump(match (f, c.kind()) {
            ("send", Type::Ok) => "send_ok",
            ("send", Type::Fail) => "send_fail",
            ("send", _) => "send_info",
            (_, Type::Ok) => "other_ok",
            _ => "other_not_ok",
        });
    }
    for op in ops {
        match op.value {
            Value::Push { .. } => bump("push"),
            Value::Connect { .. } => bump("subscriber_connect"),
            _ => {}
        }
    }
    stats.insert("conversations", orders.len());
    stats.insert("history_ops", ops.len());
    Verdict { valid: anomalies.is_empty(), counts, anomalies, stats }
}
