//! Hand-made histories, one per anomaly: the checker must flag each, and pass a clean one.

use super::check;
use crate::history::{Op, Type, Value};

#[derive(Default)]
struct H {
    ops: Vec<Op>,
    t: u64,
}

fn m(seq: u64, from: &str, id: &str) -> (u64, String, String) {
    (seq, from.into(), id.into())
}

impl H {
    fn op(&mut self, process: usize, kind: Type, value: Value, is_final: bool) -> usize {
        self.t += 10;
        let index = self.ops.len();
        self.ops.push(Op { index, process, kind, time: self.t, node: 0, value, error: None, is_final });
        index
    }
    fn send(&mut self, p: usize, from: &str, id: &str, outcome: Type, seq: Option<u64>) {
        let to = if from == "a" { "b" } else { "a" };
        let v = |seq| Value::Send { conv: "a~b".into(), from: from.into(), to: to.into(), id: id.into(), seq };
        self.op(p, Type::Invoke, v(None), false);
        self.op(p, outcome, v(seq), false);
    }
    fn read(&mut self, p: usize, msgs: Vec<(u64, String, String)>, is_final: bool) {
        let v = |msgs| Value::Read { conv: "a~b".into(), user: "a".into(), msgs };
        self.op(p, Type::Invoke, v(None), is_final);
        self.op(p, Type::Ok, v(Some(msgs)), is_final);
    }
    fn recent(&mut self, p: usize, user: &str, seq: u64) {
        let v = |rows| Value::Recent { user: user.into(), rows };
        self.op(p, Type::Invoke, v(None), false);
        self.op(p, Type::Ok, v(Some(vec![("a~b".to_string(), seq)])), false);
    }
    fn push(&mut self, user: &str, seq: u64, from: &str, id: &str) {
        let v = Value::Push {
            user: user.into(),
            conv: "a~b".into(),
            seq,
            from: from.into(),
            id: id.into(),
            cursor: format!("{seq}.1"),
        };
        self.op(99, Type::Ok, v, false);
    }
    fn kinds(&self) -> Vec<&'static str> {
        let v = check(&self.ops);
        assert_eq!(v.valid, v.anomalies.is_empty());
        let mut k: Vec<&'static str> = v.anomalies.iter().map(|a| a.kind).collect();
        k.dedup();
        k
    }
}

/// Two acked sends, a read in between, pushes, recent reads, and a final read.
fn clean() -> H {
    let mut h = H::default();
    h.send(1, "a", "x1", Type::Ok, Some(1));
    h.read(2, vec![m(1, "a", "x1")], false);
    h.send(1, "b", "y1", Type::Ok, Some(2));
    h.recent(3, "a", 2);
    h.recent(3, "b", 2);
    h.push("b", 1, "a", "x1");
    h.push("b", 2, "b", "y1");
    h
}

fn finish(mut h: H, msgs: Vec<(u64, String, String)>) -> H {
    h.read(5, msgs, true);
    h
}

#[test]
fn a_clean_history_is_valid() {
    let h = finish(clean(), vec![m(1, "a", "x1"), m(2, "b", "y1")]);
    assert_eq!(h.kinds(), Vec::<&str>::new());
    // An indeterminate send may or may not appear; both are fine.
    let mut h = clean();
    h.send(1, "a", "z1", Type::Info, None);
    let h = finish(h, vec![m(1, "a", "x1"), m(2, "b", "y1"), m(3, "a", "z1")]);
    assert_eq!(h.kinds(), Vec::<&str>::new());
}

#[test]
fn lost_write() {
    let h = finish(clean(), vec![m(1, "a", "x1")]);
    assert!(h.kinds().contains(&"lost-write"), "{:?}", h.kinds());
}

#[test]
fn duplicate_message() {
    let h = finish(clean(), vec![m(1, "a", "x1"), m(2, "b", "y1"), m(3, "b", "y1")]);
    assert!(h.kinds().contains(&"duplicate"), "{:?}", h.kinds());
}

#[test]
fn incompatible_orders() {
    let mut h = clean();
    h.read(2, vec![m(1, "a", "x1"), m(2, "a", "other")], false);
    let h = finish(h, vec![m(1, "a", "x1"), m(2, "b", "y1")]);
    assert!(h.kinds().contains(&"incompatible-order"), "{:?}", h.kinds());
}

#[test]
fn gap_in_seq() {
    let h = finish(clean(), vec![m(1, "a", "x1"), m(3, "b", "y1")]);
    assert!(h.kinds().contains(&"gap"), "{:?}", h.kinds());
}

#[test]
fn stale_read() {
    let mut h = clean();
    h.read(2, vec![m(1, "a", "x1")], false); // invoked after y1's ack, misses it
    let h = finish(h, vec![m(1, "a", "x1"), m(2, "b", "y1")]);
    assert_eq!(h.kinds(), vec!["stale-read"]);
}

#[test]
fn definitely_failed_send_appears() {
    let mut h = clean();
    h.send(1, "a", "f1", Type::Fail, None);
    let h = finish(h, vec![m(1, "a", "x1"), m(2, "b", "y1"), m(3, "a", "f1")]);
    assert_eq!(h.kinds(), vec!["failed-write-appeared"]);
}

#[test]
fn retries_of_one_id_must_share_a_seq() {
    let mut h = clean();
    h.send(1, "a", "r1", Type::Info, None);
    h.send(1, "a", "r1", Type::Ok, Some(3));
    h.send(1, "a", "r1", Type::Ok, Some(4));
    let h = finish(h, vec![m(1, "a", "x1"), m(2, "b", "y1"), m(3, "a", "r1")]);
    assert!(h.kinds().contains(&"retry-divergence"), "{:?}", h.kinds());
}

#[test]
fn ack_names_a_different_seq_than_stored() {
    let h = finish(clean(), vec![m(1, "b", "y1"), m(2, "a", "x1")]);
    let k = h.kinds();
    assert!(k.contains(&"seq-mismatch"), "{k:?}");
}

#[test]
fn push_stream_anomalies() {
    let final_msgs = vec![m(1, "a", "x1"), m(2, "b", "y1"), m(3, "a", "x2")];
    let mut h = clean();
    h.send(1, "a", "x2", Type::Ok, Some(3));
    h.push("b", 2, "b", "y1"); // duplicate of the second push
    let k = finish(h, final_msgs.clone()).kinds();
    assert!(k.contains(&"push-duplicate"), "{k:?}");

    let mut h = clean();
    h.send(1, "a", "x2", Type::Ok, Some(3));
    h.push("a", 1, "a", "x1");
    h.push("a", 3, "a", "x2"); // skipped 2
    let k = finish(h, final_msgs.clone()).kinds();
    assert_eq!(k, vec!["push-gap"]);

    let mut h = clean();
    h.send(1, "a", "x2", Type::Ok, Some(3));
    h.push("a", 2, "b", "y1");
    h.push("a", 1, "a", "x1");
    let k = finish(h, final_msgs.clone()).kinds();
    assert_eq!(k, vec!["push-reorder"]);

    let mut h = clean();
    h.send(1, "a", "x2", Type::Ok, Some(3));
    h.push("b", 3, "a", "not-x2");
    let k = finish(h, final_msgs).kinds();
    assert_eq!(k, vec!["push-content"]);
}

#[test]
fn recent_list_stale_and_regressing() {
    let mut h = clean();
    h.recent(3, "b", 1); // after the ack of seq 2, and back from 2
    let k = finish(h, vec![m(1, "a", "x1"), m(2, "b", "y1")]).kinds();
    assert_eq!(k, vec!["recent-stale", "recent-regression"]);
}

#[test]
fn every_anomaly_names_its_operations() {
    let h = finish(clean(), vec![m(1, "a", "x1")]);
    let v = check(&h.ops);
    assert!(!v.valid);
    for a in &v.anomalies {
        assert!(!a.ops.is_empty() && a.ops.iter().all(|i| *i < h.ops.len()), "{a:?}");
        assert!(!a.message.is_empty());
    }
}
