//! Per-user send rate: a token bucket per user on each node, so one user sending thousands a
//! second cannot make every other user wait. A refused send gets `429 rate_limited` with the
//! time until the next token (nothing was written). Buckets that have refilled are dropped
//! every so often, so memory follows the number of users active in the last seconds.

use crate::chat::UserId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct PerUser {
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    map: HashMap<UserId, Bucket>,
    swept: Instant,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl PerUser {
    /// `rate` tokens a second, at most `burst` saved; `rate == 0` turns the limit off.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(Buckets { map: HashMap::new(), swept: Instant::now() }),
        }
    }

    /// Takes one token for `user`; `Err(wait)` when none is left, with the time until one is.
    pub fn take(&self, user: &UserId) -> Result<(), Duration> {
        self.take_at(user, Instant::now())
    }

    fn take_at(&self, user: &UserId, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(b.swept) > SWEEP_EVERY {
            let (rate, burst) = (self.rate, self.burst);
            b.map.retain(|_, k| k.tokens + now.saturating_duration_since(k.at).as_secs_f64() * rate < burst);
            b.swept = now;
        }
        let bucket = b.map.entry(user.clone()).or_insert(Bucket { tokens: self.burst, at: now });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let l = PerUser::new(10, 5);
        let (a, b) = (UserId::parse("a").unwrap(), UserId::parse("b").unwrap());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.take_at(&a, t0).is_ok());
        }
        let wait = l.take_at(&a, t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100), "{wait:?}");
        // Another user is not affected.
        assert!(l.take_at(&b, t0).is_ok());
        // 100 ms later one more token is there, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.take_at(&a, t1).is_ok());
        assert!(l.take_at(&a, t1).is_err());
        // Idle buckets are dropped once full again.
        let later = t0 + Duration::from_secs(60);
        assert!(l.take_at(&b, later).is_ok());
        assert_eq!(l.tracked(), 1);
        assert!(PerUser::new(0, 0).take(&a).is_ok());
    }
}
