//! Per-user send rate: a token bucket per user on each node, so one user sending thousands a
//! second cannot make every other user wait. A refused send gets `429 rate_limited` with the
//! time until the next token (nothing was written). Buckets that have refilled are dropped
//! every so often, so memory follows the number of users active in the last seconds.

//!
//! The same buckets, keyed by user or by client address, bound failed logins
//! (`api::accounts`): a login is refused while either bucket is empty, and only a failed
//! one takes a token.

use crate::chat::UserId;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets keyed by `K`.
pub struct PerKey<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets<K>>,
}

/// Buckets per user.
pub type PerUser = PerKey<UserId>;

struct Buckets<K> {
    map: HashMap<K, Bucket>,
    swept: Instant,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl<K: Hash + Eq + Clone> PerKey<K> {
    /// `rate` tokens a second, at most `burst` saved; `rate == 0` turns the limit off.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self::with_rate(f64::from(rate), burst)
    }

    /// `per_minute` tokens a minute, at most `burst` saved; 0 turns the limit off.
    pub fn per_minute(per_minute: u32, burst: u32) -> Self {
        Self::with_rate(f64::from(per_minute) / 60.0, burst)
    }

    fn with_rate(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(Buckets { map: HashMap::new(), swept: Instant::now() }),
        }
    }

    /// Takes one token for `key`; `Err(wait)` when none is left, with the time until one is.
    pub fn take(&self, key: &K) -> Result<(), Duration> {
        self.take_at(key, Instant::now(), true)
    }

    /// Whether `key` has a token, without taking it.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.take_at(key, Instant::now(), false)
    }

    fn take_at(&self, user: &K, now: Instant, consume: bool) -> Result<(), Duration> {
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
            if consume {
                bucket.tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).map.len()
    }
}

/// Failed logins, bounded per user id and per client address.
pub struct LoginFailures {
    pub per_user: PerKey<UserId>,
    pub per_ip: PerKey<std::net::IpAddr>,
}

impl LoginFailures {
    pub fn new(per_user_per_minute: u32, per_ip_per_minute: u32) -> Self {
        Self {
            per_user: PerKey::per_minute(per_user_per_minute, per_user_per_minute),
            per_ip: PerKey::per_minute(per_ip_per_minute, per_ip_per_minute),
        }
    }

    /// `Err(wait)` while either the user's or the address's failures are used up.
    pub fn check(&self, user: &UserId, ip: Option<std::net::IpAddr>) -> Result<(), Duration> {
        self.per_user.check(user)?;
        match ip {
            Some(ip) => self.per_ip.check(&ip),
            None => Ok(()),
        }
    }

    /// Counts a failed login against both.
    pub fn failed(&self, user: &UserId, ip: Option<std::net::IpAddr>) {
        let _ = self.per_user.take(user);
        if let Some(ip) = ip {
            let _ = self.per_ip.take(&ip);
        }
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
            assert!(l.take_at(&a, t0, true).is_ok());
        }
        let wait = l.take_at(&a, t0, true).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100), "{wait:?}");
        // Another user is not affected.
        assert!(l.take_at(&b, t0, true).is_ok());
        // 100 ms later one more token is there, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.take_at(&a, t1, true).is_ok());
        assert!(l.take_at(&a, t1, true).is_err());
        // Idle buckets are dropped once full again.
        let later = t0 + Duration::from_secs(60);
        assert!(l.take_at(&b, later, true).is_ok());
        assert_eq!(l.tracked(), 1);
        assert!(PerUser::new(0, 0).take(&a).is_ok());
        // `check` looks without taking.
        let ip = PerKey::<std::net::IpAddr>::per_minute(60, 1);
        let addr: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        assert!(ip.check(&addr).is_ok() && ip.check(&addr).is_ok());
        assert!(ip.take(&addr).is_ok());
        assert!(ip.check(&addr).is_err());
    }
}
