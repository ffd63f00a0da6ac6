//! Rate limits: a token bucket per caller identity, a penalty box for bad credentials, and the
//! coalescing of repeated refusals into a bounded number of audit entries.
//!
//! Buckets come from `governor` (keyed GCRA). The penalty box is for *failed* authentications
//! only: a daemon checks the presented credential first, and a valid one is never refused by a
//! penalty, whoever earned it. Failures are counted against two offenders, the source address and
//! the fingerprint of the presented token, so one flood can neither lock out the other callers
//! behind the same address nor escape its penalty by changing address. Once penalised, an
//! offender's failed attempts are answered with a retry-after hint instead of UNAUTHENTICATED.

use std::collections::HashMap;
use std::hash::Hash;
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
/// Default bad-credential budget per source address and per presented token: 10 failures per
/// minute.
pub const DEFAULT_BAD_AUTH_QUOTA: Quota = Quota {
    requests: 10,
    per: Duration::from_secs(60),
};
/// Default interval over which repeated refusals of one source become one audit entry.
pub const DEFAULT_REFUSAL_INTERVAL: Duration = Duration::from_secs(10);
/// Most offenders kept in the penalty box; beyond this, expired entries are swept.
const MAX_PENALTIES: usize = 10_000;
/// Most sources with an open refusal window; refusals of further sources share one window.
const MAX_WINDOWS: usize = 10_000;
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

/// A failed authentication that is over the bad-credential budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Penalised {
    pub retry_after: Duration,
    /// This failure put an offender in the box (worth one log line; the later ones are not).
    pub fresh: bool,
}

/// Who a failed authentication is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Offender {
    Source(IpAddr),
    /// The fingerprint of a presented, well-formed token.
    Token(String),
}

pub struct RateLimits {
    identity: DefaultKeyedRateLimiter<String>,
    bad_auth: DefaultKeyedRateLimiter<Offender>,
    penalty: Mutex<HashMap<Offender, Instant>>,
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

    /// Records a failed authentication from `source` presenting the token whose fingerprint is
    /// `token` (either may be unknown). Fails when the source or the token is in the penalty box,
    /// already or from this failure on; the penalty lasts until its budget refills.
    ///
    /// Only failures reach this: a caller whose credential is valid is never asked, so a flood
    /// of bad tokens cannot lock out the good callers at the same address.
    pub fn record_auth_failure(
        &self,
        source: Option<IpAddr>,
        token: Option<&str>,
    ) -> Result<(), Penalised> {
        self.sweep();
        let offenders: Vec<Offender> = source
            .map(Offender::Source)
            .into_iter()
            .chain(token.map(|t| Offender::Token(t.to_owned())))
            .collect();
        let Ok(mut penalty) = self.penalty.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        // Already penalised: answered at once, without spending more of any budget.
        let serving = offenders
            .iter()
            .filter_map(|o| penalty.get(o).filter(|until| **until > now))
            .max();
        if let Some(until) = serving {
            return Err(Penalised {
                retry_after: *until - now,
                fresh: false,
            });
        }
        let mut wait = None;
        for o in offenders {
            if let Err(not_until) = self.bad_auth.check_key(&o) {
                let w = not_until.wait_time_from(self.clock.now());
                if penalty.len() >= MAX_PENALTIES {
                    penalty.retain(|_, until| *until > now);
                }
                if penalty.len() < MAX_PENALTIES {
                    penalty.insert(o, now + w);
                }
                wait = wait.max(Some(w));
            }
        }
        match wait {
            Some(retry_after) => Err(Penalised {
                retry_after,
                fresh: true,
            }),
            None => Ok(()),
        }
    }

    /// Keyed limiters keep state per key; drop what has fully refilled now and then.
    fn sweep(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.identity.retain_recent();
            self.bad_auth.retain_recent();
            if let Ok(mut penalty) = self.penalty.lock() {
                let now = Instant::now();
                penalty.retain(|_, until| *until > now);
            }
        }
    }
}

/// Repeated refusals of one source, coalesced: the first refusal of a quiet source is recorded at
/// once, the ones after it within `interval` are only counted, and each interval that counted
/// any ends in one summary carrying the count. A flood therefore costs O(1) audit entries per
/// source per interval, not one per call, and cannot crowd real events out of the audit backlog.
pub struct Coalescer<K> {
    interval: Duration,
    state: Mutex<Windows<K>>,
}

/// One source's refusals since its window opened.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Window {
    opened: Instant,
    /// Refusals counted (not yet recorded) in this window.
    count: u64,
    /// Actor and reason of the refusal that opened the window, for its summary.
    actor: String,
    reason: String,
}

struct Windows<K> {
    open: HashMap<K, Window>,
    /// Sources beyond `MAX_WINDOWS` share this one window (reported with no source).
    overflow: Option<Window>,
}

/// What a closed window reports: `count` refusals of `source` over `over`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary<K> {
    /// `None` for the shared window of sources beyond the tracking limit.
    pub source: Option<K>,
    pub count: u64,
    pub over: Duration,
    pub actor: String,
    pub reason: String,
}

// === impl Coalescer ===

impl<K: Hash + Eq + Clone> Coalescer<K> {
    pub fn new(interval: Duration) -> Coalescer<K> {
        Coalescer {
            interval: interval.max(Duration::from_millis(1)),
            state: Mutex::new(Windows {
                open: HashMap::new(),
                overflow: None,
            }),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Notes one refusal of `source` at `now`. True: record this one now (it opens a window);
    /// false: it is counted, and reported in the window's summary.
    pub fn note(&self, source: K, now: Instant, actor: &str, reason: &str) -> bool {
        let Ok(mut w) = self.state.lock() else {
            return true;
        };
        let w = &mut *w;
        let fresh = || Window {
            opened: now,
            count: 0,
            actor: actor.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(window) = w.open.get_mut(&source) {
            window.count += 1;
            return false;
        }
        if w.open.len() < MAX_WINDOWS {
            w.open.insert(source, fresh());
            return true;
        }
        match &mut w.overflow {
            Some(window) => {
                window.count += 1;
                false
            }
            None => {
                w.overflow = Some(fresh());
                true
            }
        }
    }

    /// Closes every window older than the interval at `now`: one summary per window that counted
    /// refusals (which then starts a new window, so a steady flood yields one entry per
    /// interval), and quiet windows are forgotten.
    pub fn due(&self, now: Instant) -> Vec<Summary<K>> {
        self.close(
            |opened| now.saturating_duration_since(opened) >= self.interval,
            now,
        )
    }

    /// Closes every window, due or not: at shutdown, so no count is lost.
    pub fn drain(&self) -> Vec<Summary<K>> {
        self.close(|_| true, Instant::now())
    }

    fn close(&self, is_due: impl Fn(Instant) -> bool, now: Instant) -> Vec<Summary<K>> {
        let mut out = Vec::new();
        let Ok(mut w) = self.state.lock() else {
            return out;
        };
        let w = &mut *w;
        let mut summarise = |source: Option<K>, window: &mut Window| {
            out.push(Summary {
                source,
                count: window.count,
                over: now.saturating_duration_since(window.opened),
                actor: window.actor.clone(),
                reason: window.reason.clone(),
            });
            window.count = 0;
            window.opened = now;
        };
        w.open.retain(|source, window| {
            if !is_due(window.opened) {
                return true;
            }
            if window.count == 0 {
                return false;
            }
            summarise(Some(source.clone()), window);
            true
        });
        if let Some(window) = &mut w.overflow
            && is_due(window.opened)
        {
            if window.count == 0 {
                w.overflow = None;
            } else {
                summarise(None, window);
            }
        }
        out
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

    fn bad_auth(requests: u32) -> RateLimits {
        RateLimits::new(
            DEFAULT_IDENTITY_QUOTA,
            Quota {
                requests,
                per: Duration::from_secs(60),
            },
        )
    }

    #[test]
    fn repeated_bad_tokens_put_the_source_in_the_penalty_box() {
        let rl = bad_auth(2);
        let peer: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        // A different (made-up) token each time: only the source's budget runs out.
        assert!(rl.record_auth_failure(Some(peer), Some("aaaaa1")).is_ok());
        assert!(rl.record_auth_failure(Some(peer), Some("aaaaa2")).is_ok());
        let first = rl
            .record_auth_failure(Some(peer), Some("aaaaa3"))
            .unwrap_err();
        assert!(first.fresh && first.retry_after > Duration::ZERO);
        let again = rl.record_auth_failure(Some(peer), None).unwrap_err();
        assert!(!again.fresh, "already penalised: not news");
        assert!(
            rl.record_auth_failure(Some(other), Some("bbbbb1")).is_ok(),
            "another source has its own budget"
        );
    }

    #[test]
    fn one_bad_token_is_penalised_from_every_source() {
        let rl = bad_auth(2);
        let sources: Vec<IpAddr> = (1..=3)
            .map(|i| format!("10.0.1.{i}").parse().unwrap())
            .collect();
        assert!(
            rl.record_auth_failure(Some(sources[0]), Some("dead01"))
                .is_ok()
        );
        assert!(
            rl.record_auth_failure(Some(sources[1]), Some("dead01"))
                .is_ok()
        );
        assert!(
            rl.record_auth_failure(Some(sources[2]), Some("dead01"))
                .is_err(),
            "the third try of one token is over its budget, whatever the address"
        );
        assert!(
            rl.record_auth_failure(Some(sources[2]), Some("beef02"))
                .is_ok(),
            "the address itself has failed once only"
        );
    }

    #[test]
    fn coalescer_records_the_first_refusal_and_counts_the_rest() {
        let c = Coalescer::<u8>::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(c.note(1, t0, "anonymous", "no token"));
        for _ in 0..999 {
            assert!(!c.note(1, t0, "anonymous", "no token"));
        }
        assert!(c.note(2, t0, "abc123", "invalid"), "another source");
        assert!(c.due(t0 + Duration::from_secs(9)).is_empty());
        let mut due = c.due(t0 + Duration::from_secs(10));
        assert_eq!(due.len(), 1, "the quiet source is forgotten: {due:?}");
        let s = due.remove(0);
        assert_eq!(
            (s.source, s.count, s.actor.as_str()),
            (Some(1), 999, "anonymous")
        );
        // The flood goes on: counted in the next window, one summary per interval.
        assert!(!c.note(1, t0 + Duration::from_secs(11), "anonymous", "no token"));
        let due = c.due(t0 + Duration::from_secs(20));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 1);
        assert!(c.due(t0 + Duration::from_secs(30)).is_empty());
        // Forgotten: the next refusal is news again.
        assert!(c.note(1, t0 + Duration::from_secs(31), "anonymous", "no token"));
        assert!(c.drain().is_empty(), "nothing counted beyond the first");
    }
}
