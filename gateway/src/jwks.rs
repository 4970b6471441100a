//! A cached JSON Web Key Set.
//!
//! Lookups are served from memory. The set is re-read (from its URL or file) when a token names
//! an unknown `kid` or the cached set is older than its maximum age, but never more than once per
//! refresh interval, whatever the traffic: a flood of tokens with made-up key ids costs at most
//! one fetch per interval. A key removed from the set (retired) is refused once the set has been
//! re-read. A failed fetch keeps the previous keys (an identity provider outage does not log
//! everybody out) and also waits an interval before the next try.

use crate::keys::{JwksSource, VerifyingKey};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// A zero interval would mean a fetch per request with an unknown `kid`.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Cached {
    keys: HashMap<String, Arc<VerifyingKey>>,
    /// When the current keys were read successfully.
    fetched_at: Option<Instant>,
    /// When a fetch was last tried (successful or not).
    attempted_at: Option<Instant>,
}

/// A JWKS with its cache; cheap to share behind an `Arc`.
pub(crate) struct Jwks {
    source: JwksSource,
    refresh_interval: Duration,
    max_age: Duration,
    http: reqwest::Client,
    cached: RwLock<Cached>,
    /// One fetch at a time; waiters then find the fresh set.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

impl Jwks {
    /// `refresh_interval` is at least [`MIN_REFRESH_INTERVAL`]; `max_age` at least the interval.
    pub(crate) fn new(source: JwksSource, refresh_interval: Duration, max_age: Duration) -> Self {
        let refresh_interval = refresh_interval.max(MIN_REFRESH_INTERVAL);
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            // Building a client without TLS or proxies only fails if the OS refuses resources;
            // the default client behaves the same, minus the timeout.
            .unwrap_or_default();
        Self {
            source,
            refresh_interval,
            max_age: max_age.max(refresh_interval),
            http,
            cached: RwLock::new(Cached::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The key with id `kid`, re-reading the set first if it is unknown or the set is stale and
    /// the refresh interval allows it.
    pub(crate) async fn key(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        let (hit, stale) = self.lookup(kid);
        if hit.is_some() && !stale {
            return hit;
        }
        if !self.may_refresh() {
            return hit;
        }
        let _one = self.fetching.lock().await;
        // Someone else may have refreshed while this task waited.
        if self.may_refresh() {
            self.refresh().await;
        }
        self.lookup(kid).0
    }

    fn lookup(&self, kid: &str) -> (Option<Arc<VerifyingKey>>, bool) {
        let c = self.cached.read().unwrap_or_else(|p| p.into_inner());
        let stale = c.fetched_at.is_none_or(|t| t.elapsed() >= self.max_age);
        (c.keys.get(kid).cloned(), stale)
    }

    fn may_refresh(&self) -> bool {
        let c = self.cached.read().unwrap_or_else(|p| p.into_inner());
        c.attempted_at
            .is_none_or(|t| t.elapsed() >= self.refresh_interval)
    }

    async fn refresh(&self) {
        let started = Instant::now();
        let result = self.fetch().await;
        let mut c = self.cached.write().unwrap_or_else(|p| p.into_inner());
        c.attempted_at = Some(started);
        match result {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "JWKS refreshed");
                metrics::counter!("nura_jwks_refresh_total", "result" => "ok").increment(1);
                c.keys = keys;
                c.fetched_at = Some(started);
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed; keeping the previous keys");
                metrics::counter!("nura_jwks_refresh_total", "result" => "error").increment(1);
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<VerifyingKey>>, String> {
        let body = match &self.source {
            JwksSource::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| format!("read {}: {e}", path.display()))?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err("the JWKS file is too large".into());
                }
                bytes
            }
            JwksSource::Url(url) => self.download(url).await?,
        };
        let raw: RawSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = HashMap::new();
        for value in raw.keys {
            let parsed = serde_json::from_value(value)
                .map_err(|e| e.to_string())
                .and_then(|jwk| VerifyingKey::from_jwk(&jwk).map_err(|e| e.to_string()));
            match parsed {
                Ok(key) => {
                    if let Some(kid) = key.kid().map(str::to_owned) {
                        keys.insert(kid, Arc::new(key));
                    }
                }
                Err(reason) => tracing::debug!(%reason, "JWKS entry skipped"),
            }
        }
        Ok(keys)
    }

    async fn download(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut res = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("fetch the JWKS: {e}"))?;
        if !res.status().is_success() {
            return Err(format!("the JWKS URL answered {}", res.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = res
            .chunk()
            .await
            .map_err(|e| format!("read the JWKS: {e}"))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err("the JWKS document is too large".into());
            }
        }
        Ok(body)
    }
}
