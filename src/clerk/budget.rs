//! What this replica may spend at Clerk's Backend API, shared by every path that calls it
//! through one [`ClerkApi`](crate::clerk::api::ClerkApi) (one budget per Clerk API base URL):
//! identity queries, opaque machine-token verification and the M2M token source.
//!
//! Clerk limits Backend API calls per instance (1 000 per 10 s). Two things keep one replica
//! from spending that for everyone:
//!
//! * **Clerk's `Retry-After`** ([`RetryAfterGate`]): after a 429 on any path, no path sends a
//!   request before it has passed — Clerk's limit is per instance, so one path's 429 speaks
//!   for all. The client checks it before every request and starts it on every 429, whatever
//!   the path (the M2M token source spends nothing else of the budget).
//! * **A replica-wide token bucket** ([`ClerkBudget`], default 20 calls/s, burst 40). Part of it
//!   (default half) is *reserved*: calls for strangers — sources that have not yet presented a
//!   valid token, such as a flood of random `ak_…` strings from many addresses — may only
//!   spend the unreserved part of its burst **and of its rate**, so identity queries and
//!   callers already seen with valid tokens are still served while strangers are refused
//!   (`RESOURCE_EXHAUSTED` / `RATE_LIMITED`), and a stranger flood never costs Clerk more than
//!   the unreserved rate.
//!
//! Sources are counted per IPv4 address and per IPv6 `/64` ([`source_key`]): a client owning
//! a `/64` (every IPv6 host usually does) is one source, not 2^64.

use std::{
    net::{IpAddr, Ipv6Addr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// Longest `Retry-After` honoured from Clerk; a larger one is clamped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Settings of a [`ClerkBudget`].
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    /// Backend API calls per second this replica may make, refilled continuously
    /// (default 20; `0` = no replica-wide limit, only Clerk's own 429s).
    pub calls_per_sec: f64,
    /// Calls that may be made at once after a quiet period (default 40).
    pub burst: u32,
    /// Share of the bucket that calls for strangers cannot spend (default 0.5): identity
    /// queries and sources seen with a valid token keep it for themselves.
    pub reserved_share: f64,
    /// How long a source stays "seen with a valid token" after its last one (default 10 min).
    pub known_ttl: Duration,
    /// Most known sources remembered (default 100 000).
    pub max_known: u64,
    /// Backend API calls per second one identity-query caller (a user, a machine, an mTLS
    /// peer) may cause, refilled continuously (default 5; `0` = no per-caller limit). Only
    /// cache misses count: answers from the caches are free.
    pub caller_calls_per_sec: f64,
    /// Backend API calls one identity-query caller may cause at once (default 20).
    pub caller_burst: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            calls_per_sec: 20.0,
            burst: 40,
            reserved_share: 0.5,
            known_ttl: Duration::from_secs(600),
            max_known: 100_000,
            caller_calls_per_sec: 5.0,
            caller_burst: 20,
        }
    }
}

/// Who a Backend API call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spender {
    /// An identity query (its caller is authenticated) or a source already seen with a valid
    /// token: may spend the whole bucket.
    Known,
    /// A source never seen with a valid token: may spend only the unreserved part.
    Stranger,
}

/// Counters of a [`ClerkBudget`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BudgetStats {
    /// Calls refused because the bucket was empty (for known spenders) or down to the
    /// reserve (for strangers).
    pub refused_known: u64,
    /// Calls for strangers refused.
    pub refused_strangers: u64,
    /// Calls refused because Clerk's `Retry-After` had not passed.
    pub suspended: u64,
    /// Identity-query calls refused because their caller had spent its own budget.
    pub refused_callers: u64,
}

/// Clerk's `Retry-After`, shared by every path of one replica: after a 429, no request leaves
/// before it has passed.
#[derive(Debug, Default)]
pub struct RetryAfterGate(Mutex<Option<Instant>>);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Inner {
    config: BudgetConfig,
    gate: RetryAfterGate,
    bucket: Mutex<Bucket>,
    /// The strangers' own share: the unreserved part of the burst and of the rate.
    strangers: Mutex<Bucket>,
    known: moka::sync::Cache<IpAddr, ()>,
    /// Per-caller buckets of identity queries, by caller (`user_…`, `mch_…`, `spiffe://…`).
    callers: moka::sync::Cache<String, Arc<Mutex<Bucket>>>,
    refused_known: AtomicU64,
    refused_callers: AtomicU64,
    refused_strangers: AtomicU64,
    suspended: AtomicU64,
}

/// The replica's Backend API budget (see the module docs). Cheap to clone; clones share it.
#[derive(Debug, Clone)]
pub struct ClerkBudget {
    inner: Arc<Inner>,
}

/// The key a source is counted under: an IPv4 address (IPv4-mapped IPv6 folded to it), or an
/// IPv6 address's `/64`.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

// === impl RetryAfterGate ===

impl RetryAfterGate {
    /// How long the current suspension still lasts; `None` when requests may leave.
    pub fn remaining(&self) -> Option<Duration> {
        let until = (*self.0.lock().expect("retry-after lock"))?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// Suspends requests for `wait` from now (clamped to [`MAX_RETRY_AFTER`]; never
    /// shortening a longer suspension).
    pub fn suspend(&self, wait: Duration) {
        let until = Instant::now() + wait.min(MAX_RETRY_AFTER);
        let mut s = self.0.lock().expect("retry-after lock");
        if s.is_none_or(|old| old < until) {
            *s = Some(until);
        }
    }
}

/// Parses a `Retry-After` header: whole seconds or an IMF-fixdate (the one parser,
/// `retry::parse_retry_after`); anything else (negative, fractional, garbage) is
/// `None`. Clamped to [`MAX_RETRY_AFTER`].
pub fn retry_after_header(value: &http::HeaderValue) -> Option<Duration> {
    crate::retry::parse_retry_after(value.to_str().ok()?, std::time::SystemTime::now())
        .map(|d| d.min(MAX_RETRY_AFTER))
}

// === impl ClerkBudget ===

impl Default for ClerkBudget {
    fn default() -> Self {
        Self::new(BudgetConfig::default())
    }
}

impl ClerkBudget {
    /// A budget with these settings.
    pub fn new(config: BudgetConfig) -> Self {
        let known = moka::sync::Cache::builder()
            .max_capacity(config.max_known)
            .time_to_live(config.known_ttl)
            .build();
        // A bucket idle long enough to have refilled is the same as a new one: forget it.
        let refill = if config.caller_calls_per_sec > 0.0 {
            Duration::from_secs_f64(
                (f64::from(config.caller_burst) / config.caller_calls_per_sec).clamp(1.0, 3600.0),
            )
        } else {
            Duration::from_secs(1)
        };
        let callers = moka::sync::Cache::builder()
            .max_capacity(config.max_known)
            .time_to_idle(refill)
            .build();
        Self {
            inner: Arc::new(Inner {
                bucket: Mutex::new(Bucket {
                    tokens: f64::from(config.burst),
                    at: Instant::now(),
                }),
                strangers: Mutex::new(Bucket {
                    tokens: f64::from(config.burst) * (1.0 - config.reserved_share.clamp(0.0, 1.0)),
                    at: Instant::now(),
                }),
                config,
                gate: RetryAfterGate::default(),
                known,
                callers,
                refused_known: AtomicU64::new(0),
                refused_callers: AtomicU64::new(0),
                refused_strangers: AtomicU64::new(0),
                suspended: AtomicU64::new(0),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &BudgetConfig {
        &self.inner.config
    }

    /// Clerk's `Retry-After`, shared by every path.
    pub fn gate(&self) -> &RetryAfterGate {
        &self.inner.gate
    }

    /// Counters.
    pub fn stats(&self) -> BudgetStats {
        let i = &self.inner;
        BudgetStats {
            refused_known: i.refused_known.load(Ordering::Relaxed),
            refused_strangers: i.refused_strangers.load(Ordering::Relaxed),
            suspended: i.suspended.load(Ordering::Relaxed),
            refused_callers: i.refused_callers.load(Ordering::Relaxed),
        }
    }

    /// Takes one Backend API call from `caller`'s own identity-query budget (the replica-wide
    /// bucket is charged separately, by the Backend API client), or says how long to wait.
    /// `caller` is who asks — a user id, a machine id, a SPIFFE ID — so that one caller
    /// cannot spend the replica's budget for everyone.
    pub fn try_spend_for_caller(&self, caller: &str) -> Result<(), Duration> {
        let i = &self.inner;
        let cfg = &i.config;
        if cfg.caller_calls_per_sec <= 0.0 {
            return Ok(());
        }
        let burst = f64::from(cfg.caller_burst.max(1));
        let bucket = i.callers.get_with_by_ref(caller, || {
            Arc::new(Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }))
        });
        let mut b = bucket.lock().expect("budget lock");
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * cfg.caller_calls_per_sec)
            .min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - b.tokens;
        drop(b);
        i.refused_callers.fetch_add(1, Ordering::Relaxed);
        Err(
            Duration::from_secs_f64((missing / cfg.caller_calls_per_sec).min(60.0))
                .max(Duration::from_millis(1)),
        )
    }

    /// Records that `source` presented a valid token (any type): its later cache misses may
    /// spend the reserve.
    pub fn mark_known(&self, source: IpAddr) {
        let key = source_key(source);
        if !self.inner.known.contains_key(&key) {
            self.inner.known.insert(key, ());
        }
    }

    /// Whether `source` presented a valid token recently.
    pub fn is_known(&self, source: IpAddr) -> bool {
        self.inner.known.contains_key(&source_key(source))
    }

    /// The spender class of a machine-token cache miss from `source` (`None`: no address,
    /// a stranger).
    pub fn spender_for(&self, source: Option<IpAddr>) -> Spender {
        match source {
            Some(s) if self.is_known(s) => Spender::Known,
            _ => Spender::Stranger,
        }
    }

    /// Takes one call from the budget, or says how long to wait: Clerk's `Retry-After` first,
    /// then the bucket (a stranger may not go below the reserve).
    pub fn try_spend(&self, who: Spender) -> Result<(), Duration> {
        let i = &self.inner;
        if let Some(left) = i.gate.remaining() {
            i.suspended.fetch_add(1, Ordering::Relaxed);
            return Err(left);
        }
        let cfg = &i.config;
        if cfg.calls_per_sec <= 0.0 {
            return Ok(());
        }
        let reserved = cfg.reserved_share.clamp(0.0, 1.0);
        let now = Instant::now();
        let wait = |missing: f64, rate: f64| {
            Duration::from_secs_f64((missing / rate.max(f64::MIN_POSITIVE)).min(60.0))
                .max(Duration::from_millis(1))
        };
        // Strangers draw from their own share first (the unreserved part of the rate and of
        // the burst) and then from the bucket, never below the reserve: whatever they do,
        // known spenders keep the reserved part of both.
        let (floor, mut share) = match who {
            Spender::Known => (0.0, None),
            Spender::Stranger => {
                let rate = cfg.calls_per_sec * (1.0 - reserved);
                let burst = f64::from(cfg.burst) * (1.0 - reserved);
                let mut sb = i.strangers.lock().expect("budget lock");
                let refill = now.duration_since(sb.at).as_secs_f64() * rate;
                sb.tokens = (sb.tokens + refill).min(burst);
                sb.at = now;
                if sb.tokens < 1.0 {
                    let missing = 1.0 - sb.tokens;
                    drop(sb);
                    i.refused_strangers.fetch_add(1, Ordering::Relaxed);
                    return Err(wait(missing, rate));
                }
                (f64::from(cfg.burst) * reserved, Some(sb))
            }
        };
        let mut b = i.bucket.lock().expect("budget lock");
        let refill = now.duration_since(b.at).as_secs_f64() * cfg.calls_per_sec;
        b.tokens = (b.tokens + refill).min(f64::from(cfg.burst));
        b.at = now;
        if b.tokens - 1.0 >= floor {
            b.tokens -= 1.0;
            if let Some(sb) = share.as_mut() {
                sb.tokens -= 1.0;
            }
            return Ok(());
        }
        let missing = floor + 1.0 - b.tokens;
        drop(b);
        drop(share);
        match who {
            Spender::Known => i.refused_known.fetch_add(1, Ordering::Relaxed),
            Spender::Stranger => i.refused_strangers.fetch_add(1, Ordering::Relaxed),
        };
        Err(wait(missing, cfg.calls_per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        let k = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(k("203.0.113.7"), k("203.0.113.7"));
        assert_ne!(k("203.0.113.7"), k("203.0.113.8"));
        // IPv4-mapped IPv6 is the IPv4 address.
        assert_eq!(k("::ffff:203.0.113.7"), k("203.0.113.7"));
        // Any address of one /64 is the same source …
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_eq!(
            k("2001:db8:1:2:abcd::9"),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        // … and another /64 is another source.
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }

    #[test]
    fn strangers_cannot_spend_the_reserve() {
        let b = ClerkBudget::new(BudgetConfig {
            calls_per_sec: 0.001,
            burst: 10,
            reserved_share: 0.5,
            ..BudgetConfig::default()
        });
        let strangers = (0..100)
            .filter(|_| b.try_spend(Spender::Stranger).is_ok())
            .count();
        assert_eq!(strangers, 5, "only the unreserved half");
        let known = (0..100)
            .filter(|_| b.try_spend(Spender::Known).is_ok())
            .count();
        assert_eq!(known, 5, "the reserve is left for known spenders");
        let wait = b.try_spend(Spender::Known).unwrap_err();
        assert!(wait > Duration::ZERO);
        let s = b.stats();
        assert_eq!((s.refused_strangers, s.refused_known), (95, 96));
    }

    #[test]
    fn each_caller_has_its_own_identity_budget() {
        let b = ClerkBudget::new(BudgetConfig {
            caller_calls_per_sec: 0.001,
            caller_burst: 3,
            ..BudgetConfig::default()
        });
        let spent = |who: &str| {
            (0..10)
                .filter(|_| b.try_spend_for_caller(who).is_ok())
                .count()
        };
        assert_eq!(spent("user_a"), 3);
        // Another caller is not held back by the first one's flood.
        assert_eq!(spent("user_b"), 3);
        assert!(b.try_spend_for_caller("user_a").unwrap_err() > Duration::ZERO);
        assert_eq!(b.stats().refused_callers, 7 + 7 + 1);
        let off = ClerkBudget::new(BudgetConfig {
            caller_calls_per_sec: 0.0,
            ..BudgetConfig::default()
        });
        assert!((0..100).all(|_| off.try_spend_for_caller("user_a").is_ok()));
    }

    #[test]
    fn zero_rate_means_no_replica_wide_limit() {
        let b = ClerkBudget::new(BudgetConfig {
            calls_per_sec: 0.0,
            burst: 1,
            ..BudgetConfig::default()
        });
        assert!((0..1000).all(|_| b.try_spend(Spender::Stranger).is_ok()));
    }

    #[test]
    fn retry_after_holds_back_every_spender() {
        let b = ClerkBudget::default();
        b.gate().suspend(Duration::from_secs(5));
        for who in [Spender::Known, Spender::Stranger] {
            let wait = b.try_spend(who).unwrap_err();
            assert!(wait > Duration::from_secs(4) && wait <= Duration::from_secs(5));
        }
        assert_eq!(b.stats().suspended, 2);
        // Clamped: a year-long Retry-After is a minute.
        b.gate().suspend(Duration::from_secs(365 * 86_400));
        assert!(b.gate().remaining().unwrap() <= MAX_RETRY_AFTER);
    }

    #[test]
    fn known_sources_are_remembered_by_their_key() {
        let b = ClerkBudget::default();
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(b.spender_for(Some(ip)), Spender::Stranger);
        b.mark_known(ip);
        assert_eq!(
            b.spender_for(Some("2001:db8::ffff".parse().unwrap())),
            Spender::Known
        );
        assert_eq!(b.spender_for(None), Spender::Stranger);
    }

    #[test]
    fn retry_after_values() {
        let p = |s: &str| retry_after_header(&http::HeaderValue::from_str(s).unwrap());
        assert_eq!(p("3"), Some(Duration::from_secs(3)));
        assert_eq!(p(" 0 "), Some(Duration::ZERO));
        assert_eq!(p("99999999999"), Some(MAX_RETRY_AFTER));
        for bad in [
            "-1",
            "1.5",
            "soon",
            "",
            "1e3",
            "Sunday, 06-Nov-94 08:49:37 GMT",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
        // A date in the past: no wait; far in the future: clamped.
        assert_eq!(p("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        assert_eq!(p("Fri, 01 Jan 2100 00:00:00 GMT"), Some(MAX_RETRY_AFTER));
    }

    /// The reserve is a share of the rate too, not only a level of the bucket: Clerk's limit is
    /// per instance and shared with every replica, so a stranger flood must never cost Clerk
    /// more than the unreserved rate, even while known traffic is idle. (An upper bound only:
    /// a slow machine makes fewer attempts, never more calls.)
    #[test]
    fn strangers_get_at_most_the_unreserved_share_of_the_rate() {
        let b = ClerkBudget::new(BudgetConfig {
            calls_per_sec: 200.0,
            burst: 10,
            reserved_share: 0.5,
            ..BudgetConfig::default()
        });
        let started = std::time::Instant::now();
        let mut spent = 0u32;
        while started.elapsed() < std::time::Duration::from_millis(500) {
            if b.try_spend(Spender::Stranger).is_ok() {
                spent += 1;
            }
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
        // Unreserved share of 0.5 s at 200/s, plus the unreserved half of the burst, plus slack.
        assert!(
            spent <= 50 + 5 + 10,
            "strangers made {spent} calls in 0.5 s at 200/s with half reserved"
        );
    }
}
