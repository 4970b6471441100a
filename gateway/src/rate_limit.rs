//! Rate limits: one keyed token bucket (GCRA, `governor`) per client address, applied before
//! authentication, and one per principal (tenant + user or API key), applied after it. A
//! refused request is a 429 envelope with `Retry-After` and counts in
//! `nura_http_rate_limited_total{scope}`.
//!
//! Memory is bounded: idle keys (whose bucket is full again) are pruned at most every few
//! seconds, and at once when the map grows past [`PRUNE_ABOVE_KEYS`].

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use nura_http::ApiError;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often idle keys are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Above this many tracked keys, prune on the next request regardless of time.
const PRUNE_ABOVE_KEYS: usize = 100_000;

/// One limit: a sustained rate and a burst. `per_sec = 0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub per_sec: u32,
    /// Requests allowed at once above the sustained rate (at least 1).
    pub burst: u32,
}

/// A keyed limiter with pruning; `None` inside when the limit is off.
pub(crate) struct Limiter<K: Hash + Eq + Clone> {
    inner: Option<DefaultKeyedRateLimiter<K>>,
    scope: &'static str,
    last_prune: Mutex<Instant>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub(crate) fn new(limit: RateLimit, scope: &'static str) -> Self {
        let inner = NonZeroU32::new(limit.per_sec).map(|rate| {
            let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            inner,
            scope,
            last_prune: Mutex::new(Instant::now()),
        }
    }

    /// Ok, or the 429 to answer.
    pub(crate) fn check(&self, key: &K) -> Result<(), ApiError> {
        let Some(limiter) = &self.inner else {
            return Ok(());
        };
        self.prune(limiter);
        limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            metrics::counter!("nura_http_rate_limited_total", "scope" => self.scope).increment(1);
            // Whole seconds, rounded up, never 0: a client told to retry "now" would spin.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests; retry later",
            )
            .with_details(serde_json::json!({"scope": self.scope}))
            .with_retry_after(secs.max(1))
        })
    }

    fn prune(&self, limiter: &DefaultKeyedRateLimiter<K>) {
        let Ok(mut last) = self.last_prune.try_lock() else {
            return; // another request is pruning
        };
        if last.elapsed() >= PRUNE_EVERY || limiter.len() > PRUNE_ABOVE_KEYS {
            limiter.retain_recent();
            limiter.shrink_to_fit();
            *last = Instant::now();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |l| l.len())
    }
}

/// The per-address limiter and whether `X-Forwarded-For` may name the client.
pub(crate) struct AddressLimit {
    pub(crate) limiter: Limiter<IpAddr>,
    pub(crate) trust_forwarded_for: bool,
}

/// Middleware: the per-address limit.
pub(crate) async fn limit_by_address(
    State(limit): State<Arc<AddressLimit>>,
    req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip());
    let client = client_address(peer, req.headers(), limit.trust_forwarded_for);
    match limit.limiter.check(&client) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The key of a client: its address — the one the trusted proxy appended last to
/// `X-Forwarded-For` when a proxy is trusted, the TCP peer otherwise (a client can write any
/// `X-Forwarded-For` it likes). IPv6 clients are keyed by their /64, which one host can rotate
/// through freely. Without connection info (in-process tests) everyone shares one key, which is
/// never a 500.
pub(crate) fn client_address(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trust_forwarded_for: bool,
) -> IpAddr {
    let forwarded = trust_forwarded_for
        .then(|| {
            headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|s| s.trim().parse::<IpAddr>().ok())
                .next_back()
        })
        .flatten();
    let ip = forwarded
        .or(peer)
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_retry_after_of_at_least_one_second() {
        let l = Limiter::<u8>::new(
            RateLimit {
                per_sec: 1,
                burst: 3,
            },
            "test",
        );
        for _ in 0..3 {
            assert!(l.check(&1).is_ok());
        }
        let e = l.check(&1).expect_err("over the burst");
        assert_eq!(e.status, axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert!(e.retry_after.is_some_and(|s| s >= 1));
        assert!(l.check(&2).is_ok(), "other keys have their own bucket");
    }

    #[test]
    fn idle_keys_are_pruned_so_memory_stays_bounded() {
        let l = Limiter::<u32>::new(
            RateLimit {
                per_sec: 1000,
                burst: 1,
            },
            "test",
        );
        for k in 0..1000 {
            assert!(l.check(&k).is_ok());
        }
        assert_eq!(l.len(), 1000);
        // Every bucket refills within a few milliseconds; pretend the last prune is long past.
        std::thread::sleep(Duration::from_millis(20));
        *l.last_prune.lock().unwrap() = Instant::now() - PRUNE_EVERY;
        assert!(l.check(&5000).is_ok());
        assert!(l.len() <= 1, "{} keys left", l.len());
    }

    #[test]
    fn a_zero_rate_turns_the_limit_off() {
        let l = Limiter::<u8>::new(
            RateLimit {
                per_sec: 0,
                burst: 0,
            },
            "test",
        );
        for _ in 0..10_000 {
            assert!(l.check(&1).is_ok());
        }
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn forwarded_for_is_ignored_unless_a_proxy_is_trusted_and_ipv6_is_keyed_by_its_64() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 5.6.7.8".parse().unwrap());
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(client_address(Some(peer), &h, false), peer);
        assert_eq!(
            client_address(Some(peer), &h, true),
            "5.6.7.8".parse::<IpAddr>().unwrap()
        );
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(
            client_address(Some(a), &HeaderMap::new(), false),
            client_address(Some(b), &HeaderMap::new(), false)
        );
        assert_eq!(
            client_address(None, &HeaderMap::new(), false),
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        );
    }
}
