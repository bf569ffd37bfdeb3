//! Node-wide admission of client sends: an adaptive concurrency limit (AIMD on latency).
//!
//! A fixed bound on in-flight sends is either too low (it caps throughput when the cluster
//! is fast) or too high (under overload, requests queue behind it until their latency is
//! seconds and the cluster collapses into timeouts and retries). The limit here moves
//! instead: every send that completes within `target` raises it by `1/limit` (about one
//! per round of `limit` sends). Completions are judged in windows (at least
//! [`WINDOW_SENDS`] sends and one `target` long): a window in which more than
//! [`SLOW_SHARE`] of the sends took longer than `target` cuts the limit by a fifth, and a
//! send that hit its deadline cuts it at once (at most once per `target` interval). So the
//! limit aims at a p90 latency of `target`. (It used to cut on any one slow send, which aims
//! at the slowest send of every `target` interval: on a saturated host that held the limit
//! near `sqrt(rate)` whatever the cluster could do, and goodput under overload fell below
//! what the cluster served without it.) Sends past the limit are refused at once with
//! `503 overloaded`, so the work admitted stays at what the cluster finishes in about
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
    /// The current window: when it began, its sends, and how many of them were slow.
    window_start: Instant,
    sends: u32,
    slow: u32,
}

/// A window of completions holds at least this many sends.
pub const WINDOW_SENDS: u32 = 20;
/// A window in which more than this share of the sends was slow cuts the limit.
pub const SLOW_SHARE: f64 = 0.1;

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
            state: Mutex::new(State {
                limit: (initial as f64).clamp(min, max),
                last_cut: Instant::now(),
                window_start: Instant::now(),
                sends: 0,
                slow: 0,
            }),
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

    fn observe(&self, took: Duration, timed_out: bool, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let slow = timed_out || took > self.target;
        if timed_out && now.duration_since(s.last_cut) >= self.target {
            s.limit = (s.limit * 0.8).max(self.min);
            s.last_cut = now;
        } else if !slow {
            s.limit = (s.limit + 1.0 / s.limit).min(self.max);
        }
        s.sends += 1;
        s.slow += slow as u32;
        if s.sends >= WINDOW_SENDS && now.duration_since(s.window_start) >= self.target {
            if f64::from(s.slow) > SLOW_SHARE * f64::from(s.sends) && now.duration_since(s.last_cut) >= self.target {
                s.limit = (s.limit * 0.8).max(self.min);
                s.last_cut = now;
            }
            s.window_start = now;
            s.sends = 0;
            s.slow = 0;
        }
    }
}

impl Permit {
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
    fn fast_sends_raise_the_limit_and_timeouts_cut_it_at_once() {
        let l = Limiter::new(10, 2, 1000, Duration::from_millis(50));
        let t0 = Instant::now();
        for _ in 0..100 {
            l.observe(Duration::from_millis(1), false, t0);
        }
        let raised = l.limit();
        assert!(raised > 10, "limit {raised} after 100 fast sends");
        // A send that hit its deadline cuts by a fifth, at most once per target interval.
        l.observe(Duration::from_millis(500), true, t0 + Duration::from_secs(1));
        l.observe(Duration::from_millis(500), true, t0 + Duration::from_millis(1010));
        let cut = l.limit();
        assert!(cut < raised && cut + 1 >= (raised as f64 * 0.8) as usize, "one cut: {raised} -> {cut}");
        for k in 0..50 {
            l.observe(Duration::from_millis(500), true, t0 + Duration::from_secs(2 + k));
        }
        assert_eq!(l.limit(), 2, "never below the minimum");
    }

    /// Sends `n` completions spread over `span` starting at `at`, every `every`-th one slow
    /// (`every` 0: none); returns the limit afterwards.
    fn window(l: &Limiter, at: Instant, span: Duration, n: u32, every: u32) -> usize {
        for k in 0..n {
            let took = if every > 0 && k % every == 0 { Duration::from_millis(500) } else { Duration::from_millis(5) };
            l.observe(took, false, at + span * k / n);
        }
        l.limit()
    }

    #[test]
    fn a_few_slow_sends_do_not_cut_the_limit_but_a_slow_window_does() {
        let target = Duration::from_millis(100);
        let l = Limiter::new(50, 2, 1000, target);
        let t0 = Instant::now();
        // One send in twenty slow (5 %), over ten windows: the limit keeps growing.
        let mut last = l.limit();
        for w in 0..10 {
            let now = window(&l, t0 + target * w, target, 100, 20);
            assert!(now >= last, "window {w}: limit fell from {last} to {now} with 5 % slow sends");
            last = now;
        }
        assert!(last > 50, "the limit grew: {last}");
        // One in three slow: each window cuts it by about a fifth.
        let before = l.limit();
        let mut after = before;
        for w in 10..13 {
            after = window(&l, t0 + target * w, target, 100, 3);
        }
        assert!((after as f64) < before as f64 * 0.7, "three slow windows: {before} -> {after}");
        // Too few sends for a window: nothing is judged yet, however slow.
        let l = Limiter::new(50, 2, 1000, target);
        let few = window(&l, t0, target * 10, WINDOW_SENDS - 1, 1);
        assert_eq!(few, 50, "{} slow sends are not a window", WINDOW_SENDS - 1);
        assert!(window(&l, t0 + target * 10, target, 1, 1) < 50, "the twentieth completes the window");
    }
}
