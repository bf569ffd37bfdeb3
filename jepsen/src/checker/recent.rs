//! Recent-conversations lists: after a send's ack, both users' lists read later show the
//! conversation at least at that seq; a process never sees a user's list go backwards.

use super::{Anomaly, Call};
use crate::history::{Type, Value};
use std::collections::BTreeMap;

/// (user, conversation).
type UserConv = (String, String);

pub fn check(calls: &[Call], out: &mut Vec<Anomaly>) {
    // (user, conv) -> acks as (completion time, seq, op index), sorted by time.
    let mut acks: BTreeMap<UserConv, Vec<(u64, u64, usize)>> = BTreeMap::new();
    for c in calls {
        if let (Value::Send { conv, from, to, .. }, Some(done)) = (&c.invoke.value, c.done) {
            if let (Type::Ok, Value::Send { seq: Some(s), .. }) = (done.kind, &done.value) {
                for u in [from, to] {
                    acks.entry((u.clone(), conv.clone())).or_default().push((done.time, *s, done.index));
                }
            }
        }
    }
    for v in acks.values_mut() {
        v.sort();
    }
    // process -> (user, conv) -> (last seen seq, op)
    let mut views: BTreeMap<usize, BTreeMap<UserConv, (u64, usize)>> = BTreeMap::new();
    for c in calls {
        let (Value::Recent { user, .. }, Some(done)) = (&c.invoke.value, c.done) else { continue };
        let (Type::Ok, Value::Recent { rows: Some(rows), .. }) = (done.kind, &done.value) else { continue };
        let seen: BTreeMap<&str, u64> = rows.iter().map(|(c, s)| (c.as_str(), *s)).collect();
        for ((u, conv), list) in acks.range((user.clone(), String::new())..) {
            if u != user {
                break;
            }
            let best = list.iter().take_while(|(t, _, _)| *t < c.invoke.time).max_by_key(|(_, s, _)| *s);
            if let Some((_, seq, ack)) = best {
                let shown = seen.get(conv.as_str()).copied().unwrap_or(0);
                if shown < *seq {
                    out.push(Anomaly {
                        kind: "recent-stale",
                        message: format!(
                            "{user}'s recent list read after the ack of {conv} seq {seq} shows it at {shown}"
                        ),
                        ops: vec![*ack, c.invoke.index, done.index],
                    });
                }
            }
        }
        let view = views.entry(c.invoke.process).or_default();
        for (conv, seq) in seen {
            let key = (user.clone(), conv.to_string());
            if let Some((prev, prev_op)) = view.get(&key) {
                if seq < *prev {
                    out.push(Anomaly {
                        kind: "recent-regression",
                        message: format!(
                            "{user}'s recent list went back from {conv} seq {prev} to {seq} for one process"
                        ),
                        ops: vec![*prev_op, done.index],
                    });
                }
            }
            view.insert(key, (seq, done.index));
        }
    }
}
