//! Conversations as append-only lists: lost writes, duplicates, incompatible orders,
//! stale reads, failed writes that appear, retries that diverge.

use super::{Anomaly, Call};
use crate::history::{Type, Value};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A message as reads show it: `(seq, from, client_msg_id)`.
pub type Msg = (u64, String, String);

/// A successful read: (history index, messages, whether it is a final read).
type ReadRef<'a> = (usize, &'a Vec<Msg>, bool);

/// The reference order of each conversation: its longest read, and which op read it.
pub struct Order {
    pub msgs: Vec<Msg>,
    pub op: usize,
    /// Whether a final read (after heal) saw it.
    pub has_final: bool,
}

fn anomaly(kind: &'static str, message: String, ops: Vec<usize>) -> Anomaly {
    Anomaly { kind, message, ops }
}

/// Every successful read must be a gap-free list starting at seq 1, without duplicate
/// ids, and a prefix of every longer read. Returns the longest read per conversation.
pub fn reference_orders(calls: &[Call], out: &mut Vec<Anomaly>) -> BTreeMap<String, Order> {
    let mut reads: BTreeMap<String, Vec<ReadRef>> = BTreeMap::new();
    for c in calls {
        if let (Value::Read { conv, .. }, Some(done)) = (&c.invoke.value, c.done) {
            if let (Type::Ok, Value::Read { msgs: Some(m), .. }) = (done.kind, &done.value) {
                reads.entry(conv.clone()).or_default().push((done.index, m, done.is_final));
            }
        }
    }
    let mut orders = BTreeMap::new();
    for (conv, rs) in reads {
        for (idx, m, _) in &rs {
            for (i, (seq, _, _)) in m.iter().enumerate() {
                if *seq != i as u64 + 1 {
                    out.push(anomaly(
                        "gap",
                        format!("{conv}: read has seq {seq} at position {} (seq must run 1, 2, ...)", i + 1),
                        vec![*idx],
                    ));
                    break;
                }
            }
            let mut seen = HashSet::new();
            for (seq, from, id) in m.iter() {
                if !seen.insert((from, id)) {
                    out.push(anomaly(
                        "duplicate",
                        format!("{conv}: message {from}/{id} appears twice (again at seq {seq})"),
                        vec![*idx],
                    ));
                }
            }
        }
        let (lidx, longest, _) = rs.iter().max_by_key(|(i, m, _)| (m.len(), *i)).expect("at least one read");
        for (idx, m, _) in &rs {
            if let Some(pos) = m.iter().zip(longest.iter()).position(|(a, b)| a != b) {
                out.push(anomaly(
                    "incompatible-order",
                    format!("{conv}: at seq {} one read has {:?}, another {:?}", pos + 1, m[pos], longest[pos]),
                    vec![*idx, *lidx],
                ));
            }
        }
        let has_final = rs.iter().any(|(_, _, f)| *f);
        orders.insert(conv, Order { msgs: (*longest).clone(), op: *lidx, has_final });
    }
    orders
}

pub fn check(calls: &[Call], orders: &BTreeMap<String, Order>, out: &mut Vec<Anomaly>) {
    // Every attempt of one message, keyed by (conv, from, id).
    let mut attempts: HashMap<(String, String, String), Vec<&Call>> = HashMap::new();
    for c in calls {
        if let Value::Send { conv, from, id, .. } = &c.invoke.value {
            attempts.entry((conv.clone(), from.clone(), id.clone())).or_default().push(c);
        }
    }
    let positions: HashMap<&str, HashMap<(&str, &str), u64>> = orders
        .iter()
        .map(|(conv, o)| (conv.as_str(), o.msgs.iter().map(|(s, f, i)| ((f.as_str(), i.as_str()), *s)).collect()))
        .collect();

    // Acked seq of each message, for stale-read checks: conv -> [(ack time, seq, op)].
    let mut acks: BTreeMap<&str, Vec<(u64, u64, usize)>> = BTreeMap::new();
    for ((conv, from, id), tries) in &attempts {
        let oks: Vec<(u64, usize, u64)> = tries
            .iter()
            .filter_map(|c| match (c.kind(), c.done.map(|d| &d.value)) {
                (Type::Ok, Some(Value::Send { seq: Some(s), .. })) => {
                    Some((*s, c.done.map(|d| d.index).unwrap_or(0), c.completed_at()))
                }
                _ => None,
            })
            .collect();
        let stored = positions.get(conv.as_str()).and_then(|p| p.get(&(from.as_str(), id.as_str()))).copied();
        let order = orders.get(conv.as_str());
        if let Some((seq, idx, _)) = oks.first() {
            if oks.iter().any(|(s, _, _)| s != seq) {
                let seqs: Vec<u64> = oks.iter().map(|o| o.0).collect();
                out.push(anomaly(
                    "retry-divergence",
                    format!("{conv}: retries of {from}/{id} were acknowledged with different seqs {seqs:?}"),
                    oks.iter().map(|o| o.1).collect(),
                ));
            }
            match (stored, order) {
                (None, Some(o)) if o.has_final => out.push(anomaly(
                    "lost-write",
                    format!("{conv}: {from}/{id} was acknowledged with seq {seq} but is missing from the final read ({} messages)", o.msgs.len()),
                    vec![*idx, o.op],
                )),
                (None, _) => out.push(anomaly("unverified", format!("{conv}: no final read to check acknowledged {from}/{id}"), vec![*idx])),
                (Some(s), Some(o)) if s != *seq => out.push(anomaly(
                    "seq-mismatch",
                    format!("{conv}: {from}/{id} was acknowledged with seq {seq} but stored at seq {s}"),
                    vec![*idx, o.op],
                )),
                _ => {}
            }
            for (seq, idx, t) in &oks {
                acks.entry(conv.as_str()).or_default().push((*t, *seq, *idx));
            }
        } else if tries.iter().all(|c| c.kind() == Type::Fail) {
            if let (Some(s), Some(o)) = (stored, order) {
                let idxs = tries.iter().filter_map(|c| c.done.map(|d| d.index)).chain([o.op]).collect();
                out.push(anomaly(
                    "failed-write-appeared",
                    format!("{conv}: {from}/{id} definitely failed yet is stored at seq {s}"),
                    idxs,
                ));
            }
        }
    }

    // Stale reads: a read invoked after an ack must contain that message.
    for v in acks.values_mut() {
        v.sort();
    }
    for c in calls {
        let (Value::Read { conv, .. }, Some(done)) = (&c.invoke.value, c.done) else { continue };
        let (Type::Ok, Value::Read { msgs: Some(m), .. }) = (done.kind, &done.value) else { continue };
        let Some(list) = acks.get(conv.as_str()) else { continue };
        let before: Vec<&(u64, u64, usize)> = list.iter().take_while(|(t, _, _)| *t < c.invoke.time).collect();
        if let Some((_, seq, ack)) = before.iter().max_by_key(|(_, s, _)| *s) {
            if (m.len() as u64) < *seq {
                out.push(anomaly(
                    "stale-read",
                    format!("{conv}: read invoked after seq {seq} was acknowledged returned only {} messages", m.len()),
                    vec![*ack, c.invoke.index, done.index],
                ));
            }
        }
    }
}
