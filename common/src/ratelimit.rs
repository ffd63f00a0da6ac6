//! Rate limits: a token bucket per caller identity, and throttling of peers that keep presenting
//! bad tokens.
//!
//! Buckets come from `governor` (keyed GCRA). The bad-token throttle adds a small penalty box so
//! a peer over its failure budget is turned away *before* any token work is done.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, RateLimiter};

/// Default per-identity budget: 100 requests per 10 seconds.
pub const DEFAULT_IDENTITY_QUOTA: Quota = Quota {
    requests: 100,
    per: Duration::from_secs(10),
};
/// Default bad-token budget per peer address: 10 failures per minute.
pub const DEFAULT_BAD_AUTH_QUOTA: Quota = Quota {
    requests: 10,
    per: Duration::from_secs(60),
};
/// Most peers kept in the penalty box; beyond this, expired entries are swept.
const MAX_PENALTIES: usize = 10_000;
/// Checks between sweeps of idle limiter state.
const SWEEP_EVERY: u64 = 4096;

/// `requests` per `per`, refilled evenly (a token bucket of size `requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub requests: u32,
    pub per: Duration,
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.requests,
            humantime::format_duration(self.per)
        )
    }
}

impl FromStr for Quota {
    type Err = String;
    /// Parses `N/DURATION`, e.g. `100/10s`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || format!("bad rate {s:?}: expected N/DURATION, e.g. 100/10s");
        let (n, per) = s.split_once('/').ok_or_else(usage)?;
        let requests: u32 = n.trim().parse().map_err(|_| usage())?;
        let per: Duration = per
            .trim()
            .parse::<humantime::Duration>()
            .map_err(|_| usage())?
            .into();
        if requests == 0 || per.is_zero() {
            return Err(usage());
        }
        Ok(Quota { requests, per })
    }
}

impl Quota {
    fn governor(self) -> governor::Quota {
        let burst = NonZeroU32::new(self.requests).unwrap_or(NonZeroU32::MIN);
        let period = (self.per / self.requests.max(1)).max(Duration::from_nanos(1));
        governor::Quota::with_period(period)
            .unwrap_or_else(|| governor::Quota::per_second(burst))
            .allow_burst(burst)
    }
}

/// How long to wait before trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

pub struct RateLimits {
    identity: DefaultKeyedRateLimiter<String>,
    bad_auth: DefaultKeyedRateLimiter<IpAddr>,
    penalty: Mutex<HashMap<IpAddr, Instant>>,
    clock: DefaultClock,
    checks: AtomicU64,
}

// === impl RateLimits ===

impl RateLimits {
    pub fn new(identity: Quota, bad_auth: Quota) -> RateLimits {
        RateLimits {
            identity: RateLimiter::keyed(identity.governor()),
            bad_auth: RateLimiter::keyed(bad_auth.governor()),
            penalty: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Spends one request of `identity`'s budget.
    pub fn check_identity(&self, identity: &str) -> Result<(), RetryAfter> {
        self.sweep();
        self.identity
            .check_key(&identity.to_owned())
            .map_err(|not_until| RetryAfter(not_until.wait_time_from(self.clock.now())))
    }

    /// Is `peer` in the penalty box for bad tokens?
    pub fn check_peer(&self, peer: IpAddr) -> Result<(), RetryAfter> {
        let Ok(mut penalty) = self.penalty.lock() else {
            return Ok(());
        };
        match penalty.get(&peer) {
            Some(until) if *until > Instant::now() => Err(RetryAfter(*until - Instant::now())),
            Some(_) => {
                penalty.remove(&peer);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Records a failed authentication from `peer`; once over budget the peer is penalised
    /// until its budget refills, and this returns how long that is.
    pub fn record_auth_failure(&self, peer: IpAddr) -> Result<(), RetryAfter> {
        let Err(not_until) = self.bad_auth.check_key(&peer) else {
            return Ok(());
        };
        let wait = not_until.wait_time_from(self.clock.now());
        if let Ok(mut penalty) = self.penalty.lock() {
            if penalty.len() >= MAX_PENALTIES {
                let now = Instant::now();
                penalty.retain(|_, until| *until > now);
            }
            if penalty.len() < MAX_PENALTIES {
                penalty.insert(peer, Instant::now() + wait);
            }
        }
        Err(RetryAfter(wait))
    }

    /// Keyed limiters keep state per key; drop what has fully refilled now and then.
    fn sweep(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.identity.retain_recent();
            self.bad_auth.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quotas() {
        assert_eq!(
            "100/10s".parse(),
            Ok(Quota {
                requests: 100,
                per: Duration::from_secs(10)
            })
        );
        assert_eq!(
            "5 / 1m".parse(),
            Ok(Quota {
                requests: 5,
                per: Duration::from_secs(60)
            })
        );
        for bad in ["", "100", "0/1s", "1/0s", "x/1s", "1/soon", "-1/1s"] {
            assert!(bad.parse::<Quota>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_budget_is_a_bucket_per_identity() {
        let rl = RateLimits::new(
            Quota {
                requests: 3,
                per: Duration::from_secs(60),
            },
            DEFAULT_BAD_AUTH_QUOTA,
        );
        for _ in 0..3 {
            assert!(rl.check_identity("a").is_ok());
        }
        let RetryAfter(wait) = rl.check_identity("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(
            rl.check_identity("b").is_ok(),
            "another identity has its own bucket"
        );
    }

    #[test]
    fn repeated_bad_tokens_put_the_peer_in_the_penalty_box() {
        let rl = RateLimits::new(
            DEFAULT_IDENTITY_QUOTA,
            Quota {
                requests: 2,
                per: Duration::from_secs(60),
            },
        );
        let peer: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        assert!(rl.check_peer(peer).is_ok());
        assert!(rl.record_auth_failure(peer).is_ok());
        assert!(rl.record_auth_failure(peer).is_ok());
        assert!(rl.record_auth_failure(peer).is_err());
        assert!(
            rl.check_peer(peer).is_err(),
            "penalised peer is turned away up front"
        );
        assert!(rl.check_peer(other).is_ok());
    }
}
