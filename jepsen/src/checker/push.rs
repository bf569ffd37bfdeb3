//! Push streams: per subscriber (user) and conversation, received seqs strictly increase
//! with no gap and no duplicate across reconnects, and content matches the reference order.

use super::lists::Order;
use super::Anomaly;
use crate::history::{Op, Value};
use std::collections::BTreeMap;

/// One push as received: (seq, from, id, history index).
type Received<'a> = (u64, &'a str, &'a str, usize);

pub fn check(ops: &[Op], orders: &BTreeMap<String, Order>, out: &mut Vec<Anomaly>) {
    let mut streams: BTreeMap<(&str, &str), Vec<Received>> = BTreeMap::new();
    for op in ops {
        if let Value::Push { user, conv, seq, from, id, .. } = &op.value {
            streams.entry((user.as_str(), conv.as_str())).or_default().push((
                *seq,
                from.as_str(),
                id.as_str(),
                op.index,
            ));
        }
    }
    for ((user, conv), pushes) in streams {
        for w in pushes.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let kind = if b.0 == a.0 {
                Some("push-duplicate")
            } else if b.0 < a.0 {
                Some("push-reorder")
            } else if b.0 > a.0 + 1 {
                Some("push-gap")
            } else {
                None
            };
            if let Some(kind) = kind {
                out.push(Anomaly {
                    kind,
                    message: format!("{user}'s stream of {conv}: seq {} followed by seq {}", a.0, b.0),
                    ops: vec![a.3, b.3],
                });
            }
        }
        if let Some(order) = orders.get(conv) {
            for (seq, from, id, idx) in &pushes {
                match order.msgs.get((*seq as usize).wrapping_sub(1)) {
                    Some((_, f, i)) if f == from && i == id => {}
                    Some(expected) => out.push(Anomaly {
                        kind: "push-content",
                        message: format!(
                            "{user} was pushed {from}/{id} as seq {seq} of {conv}, the history has {expected:?}"
                        ),
                        ops: vec![*idx, order.op],
                    }),
                    None if order.has_final => out.push(Anomaly {
                        kind: "push-phantom",
                        message: format!(
                            "{user} was pushed seq {seq} of {conv}, past the final history's {} messages",
                            order.msgs.len()
                        ),
                        ops: vec![*idx, order.op],
                    }),
                    None => {}
                }
            }
        }
    }
}
