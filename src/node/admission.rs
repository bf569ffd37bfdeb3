//! Node-wide admission of client sends: an adaptive concurrency limit (AIMD on latency).
//!
//! A fixed bound on in-flight sends is either too low (it caps throughput when the cluster
//! is fast) or too high (under overload, requests queue behind it until their latency is
//! seconds and the cluster collapses into timeouts and retries). The limit here moves
//! instead: every send that completes within `target` raises it by `1/limit` (about one
//! per round of `limit` sends); a send slower than `target` (or failed by a timeout) cuts it
//! by a fifth, at most once per `target` interval. Sends past the limit are refused at once
//! with `503 overloaded`, so the work admitted stays at what the cluster finishes in about
//! `target`, and goodput stays near capacity while latency stays bounded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Limiter {
    inflight: AtomicUsize,
    state: Mutex<State>,
    min: f64,
    max: f64,
    target: Duration,
}

struct State {
    limit: f64,
    last_cut: Instant,
}

/// An admitted send; report how it went with [`Permit::finish`] (dropping it counts as a
/// completion that says nothing about latency).
pub struct Permit {
    limiter: Arc<Limiter>,
    start: Instant,
}

impl Limiter {
    pub fn new(initial: usize, min: usize, max: usize, target: Duration) -> Arc<Self> {
        let (min, max) = (min.max(1) as f64, max.max(min.max(1)) as f64);
        Arc::new(Self {
            inflight: AtomicUsize::new(0),
            state: Mutex::new(State { limit: (initial as f64).clamp(min, max), last_cut: Instant::now() }),
            min,
            max,
            target,
        })
    }

    pub fn limit(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).limit as usize
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// True while `limit` sends or more are in flight: a send arriving now would be refused
    /// (a look, not a reservation; [`Limiter::try_acquire`] decides).
    pub fn is_full(&self) -> bool {
        self.inflight() >= self.limit()
    }

    /// A permit if fewer than `limit` sends are in flight.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit();
        let mut cur = self.inflight.load(Ordering::Acquire);
        loop {
            if cur >= limit {
                return None;
            }
            match self.inflight.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Permit { limiter: self.clone(), start: Instant::now() }),
                Err(now) => cur = now,
            }
        }
    }

    fn observe(&self, took: Duration, slow: bool, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if slow || took > self.target {
            if now.duration_since(s.last_cut) >= self.target {
                s.limit = (s.limit * 0.8).max(self.min);
                s.last_cut = now;
            }
        } else {
            s.limit = (s.limit + 1.0 / s.limit).min(self.max);
        }
    }
}

impl Permit {
    /// Starts the send's clock again: a permit taken on the listener's front runtime
    /// (`api::listener`) is timed from when the node starts on the send, as one taken there
    /// is, so that the limit keeps measuring the node's service time, not the queue in
    /// front of its runtime.
    pub fn start_now(&mut self) {
        self.start = Instant::now();
    }

    /// Reports the send's outcome: `timed_out` for a send that hit its deadline.
    pub fn finish(self, timed_out: bool) {
        let took = self.start.elapsed();
        self.limiter.observe(took, timed_out, Instant::now());
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_and_frees_on_drop() {
        let l = Limiter::new(2, 1, 10, Duration::from_millis(50));
        let a = l.try_acquire().expect("first");
        let _b = l.try_acquire().expect("second");
        assert!(l.try_acquire().is_none(), "the third is refused");
        drop(a);
        assert!(l.try_acquire().is_some(), "a slot came back");
    }

    #[test]
    fn fast_sends_raise_the_limit_and_slow_ones_cut_it() {
        let l = Limiter::new(10, 2, 1000, Duration::from_millis(50));
        let t0 = Instant::now();
        for _ in 0..100 {
            l.observe(Duration::from_millis(1), false, t0);
        }
        let raised = l.limit();
        assert!(raised > 10, "limit {raised} after 100 fast sends");
        // Slow sends cut by a fifth, at most once per target interval.
        l.observe(Duration::from_millis(500), false, t0 + Duration::from_secs(1));
        l.observe(Duration::from_millis(500), false, t0 + Duration::from_millis(1010));
        let cut = l.limit();
        assert!(cut < raised && cut + 1 >= (raised as f64 * 0.8) as usize, "one cut: {raised} -> {cut}");
        for k in 0..50 {
            l.observe(Duration::from_millis(500), true, t0 + Duration::from_secs(2 + k));
        }
        assert_eq!(l.limit(), 2, "never below the minimum");
    }
}
