//! The HTTP edge: authentication, roles, rate limits, request ids, the error envelope, limits and
//! metrics around the command and query routers.
//!
//! [`app`] builds the whole application as one `axum::Router` so tests drive it with
//! `tower::ServiceExt::oneshot` and the binary serves it. Every `/v1` route sits behind
//! authentication (bearer JWTs — HS256 for development, RS256/EdDSA public keys or a JWKS for
//! production, algorithm, issuer and audience pinned — or API keys), a per-principal rate limit
//! and the role table in [`ROUTE_ROLES`]; every request passes a per-address rate limit, body
//! size and time limits; every response carries `x-request-id` and security headers; every
//! 4xx/5xx is the envelope `{"error": {code, message, details, request_id}}`.
//!
//! Limits: JWKS over plain HTTP or from a file only (no TLS client built in); rate-limit state is
//! per process (several gateways each allow the configured rate); the concurrency limit makes
//! excess requests wait (up to the request timeout) rather than shed them at once.

pub mod api_keys;
mod auth;
mod edge;
mod jwks;
mod keys;
pub mod openapi;
mod rate_limit;
mod roles;

pub use auth::{API_KEY_HEADER, MAX_LEEWAY, issue_token};
pub use keys::{JwksSource, KeyError, VerifyingKey};
pub use rate_limit::RateLimit;
pub use roles::{ROUTE_ROLES, RouteRole};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use nura_commands::CommandHandler;
use nura_http::ApiError;
use nura_query_api::QueryConfig;
use nura_store::{CheckpointBoard, EventStore};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Settings of the HTTP edge. `Debug` redacts the secret.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The HS256 key development tokens (those without a `kid`) are signed with; empty turns
    /// HS256 off.
    pub jwt_secret: SecretString,
    /// The required `iss` claim (`nura`).
    pub jwt_issuer: String,
    /// The required `aud` claim (`nura-api`).
    pub jwt_audience: String,
    /// Public keys (RS256, EdDSA) for tokens whose header names their `kid`.
    pub jwt_public_keys: Vec<VerifyingKey>,
    /// A JSON Web Key Set consulted for `kid`s not in `jwt_public_keys`.
    pub jwks: Option<JwksSource>,
    /// Least time between two reads of the JWKS (an unknown `kid` triggers one at most this
    /// often); at least 1 s.
    pub jwks_refresh_interval: Duration,
    /// The JWKS is re-read when older than this (so retired keys stop working); at least the
    /// refresh interval.
    pub jwks_max_age: Duration,
    /// Clock skew tolerated on `exp` and `nbf`; clamped to [`MAX_LEEWAY`].
    pub jwt_leeway: Duration,
    /// Requests per principal (tenant + user or API key), after authentication.
    pub rate_limit_per_principal: RateLimit,
    /// Requests per client address (IPv6: per /64), before authentication.
    pub rate_limit_per_address: RateLimit,
    /// Take the client address from the last `X-Forwarded-For` entry (only behind a proxy that
    /// sets it); otherwise the TCP peer address.
    pub trust_forwarded_for: bool,
    /// Cross-origin access; no origins means no CORS headers at all.
    pub cors: CorsConfig,
    /// Role rules for routes of `extra` routers that are not in [`ROUTE_ROLES`].
    pub extra_route_roles: Vec<RouteRole>,
    /// How long a query waits for read-your-writes before answering 504.
    pub read_your_writes_timeout: Duration,
    /// Where this process's projector workers post their checkpoints (read-your-writes waiters
    /// watch it; see [`nura_query_api::ReadYourWrites`]).
    pub checkpoint_board: CheckpointBoard,
    /// Largest request body accepted (413 beyond).
    pub body_limit_bytes: usize,
    /// Longest a request may take (504 beyond).
    pub request_timeout: Duration,
    /// Requests served at once across the whole app; more wait for a slot.
    pub max_concurrent_requests: usize,
}

/// Cross-origin resource sharing. Credentials (cookies) are never allowed: Nura's credentials
/// travel in headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`), or `*` for any.
    pub allowed_origins: Vec<String>,
    /// Methods browsers may use cross-origin.
    pub allowed_methods: Vec<String>,
    /// Request headers browsers may send cross-origin.
    pub allowed_headers: Vec<String>,
    /// How long browsers may cache a preflight answer.
    pub max_age: Duration,
}

impl Default for CorsConfig {
    /// No origins; `GET, POST`; the headers Nura reads; 10 minutes.
    fn default() -> Self {
        Self {
            allowed_origins: vec![],
            allowed_methods: vec!["GET".into(), "POST".into()],
            allowed_headers: [
                "authorization",
                "content-type",
                "idempotency-key",
                "if-match",
                "nura-after",
                "x-api-key",
                "x-request-id",
            ]
            .map(String::from)
            .to_vec(),
            max_age: Duration::from_secs(600),
        }
    }
}

/// Default sustained requests per second per principal.
pub const DEFAULT_PER_PRINCIPAL: RateLimit = RateLimit {
    per_sec: 100,
    burst: 200,
};
/// Default sustained requests per second per client address.
pub const DEFAULT_PER_ADDRESS: RateLimit = RateLimit {
    per_sec: 200,
    burst: 400,
};

impl GatewayConfig {
    /// The documented defaults around a secret: issuer `nura`, audience `nura-api`, no public
    /// keys or JWKS (refresh at most every 60 s, re-read after 300 s when set), 30 s leeway,
    /// [`DEFAULT_PER_PRINCIPAL`] and [`DEFAULT_PER_ADDRESS`] rate limits, no trusted proxy, no
    /// CORS, 5 s read-your-writes, 256 KiB bodies, 30 s requests, 1024 concurrent requests.
    pub fn with_secret(jwt_secret: SecretString) -> Self {
        Self {
            jwt_secret,
            jwt_issuer: "nura".into(),
            jwt_audience: "nura-api".into(),
            jwt_public_keys: vec![],
            jwks: None,
            jwks_refresh_interval: Duration::from_secs(60),
            jwks_max_age: Duration::from_secs(300),
            jwt_leeway: MAX_LEEWAY,
            rate_limit_per_principal: DEFAULT_PER_PRINCIPAL,
            rate_limit_per_address: DEFAULT_PER_ADDRESS,
            trust_forwarded_for: false,
            cors: CorsConfig::default(),
            extra_route_roles: vec![],
            read_your_writes_timeout: Duration::from_secs(5),
            checkpoint_board: CheckpointBoard::default(),
            body_limit_bytes: 256 * 1024,
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 1024,
        }
    }
}

#[derive(Clone)]
struct Health {
    store: EventStore,
    nats: async_nats::Client,
}

/// Shorter HS256 secrets are accepted (for tests) but warned about.
const MIN_SECRET_BYTES: usize = 32;

/// How long a readiness probe waits for each dependency.
const READY_PROBE: Duration = Duration::from_secs(2);

/// The whole HTTP app: /healthz, /readyz (Postgres and NATS reachable), /metrics (if a handle is
/// given), and every /v1 route behind authentication and the role table. `extra` routers (e.g.
/// dead-letter admin routes) are merged behind authentication too; they carry their own state,
/// and their routes need a row in [`ROUTE_ROLES`] or `config.extra_route_roles` (any other route
/// is refused with 403).
pub fn app(
    store: EventStore,
    nats: async_nats::Client,
    config: GatewayConfig,
    metrics: Option<PrometheusHandle>,
    extra: Vec<Router>,
) -> Router {
    let secret = config.jwt_secret.expose_secret().as_bytes();
    if !secret.is_empty() && secret.len() < MIN_SECRET_BYTES {
        tracing::warn!(
            min_bytes = MIN_SECRET_BYTES,
            "the JWT secret is short: HS256 tokens signed with it can be brute-forced"
        );
    }
    if secret.is_empty() && config.jwt_public_keys.is_empty() && config.jwks.is_none() {
        tracing::warn!("no JWT key is configured: only API keys can authenticate");
    }
    let authenticator = Arc::new(auth::Authenticator::new(
        auth::AuthSettings {
            hs256: (!secret.is_empty()).then(|| VerifyingKey::hs256(secret)),
            keys: config.jwt_public_keys.clone(),
            jwks: config.jwks.clone().map(|source| {
                jwks::Jwks::new(source, config.jwks_refresh_interval, config.jwks_max_age)
            }),
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            leeway: config.jwt_leeway,
            per_principal: rate_limit::Limiter::new(config.rate_limit_per_principal, "principal"),
            routes: config.extra_route_roles.clone(),
        },
        store.pool().clone(),
    ));
    let query_config = QueryConfig {
        read_your_writes_timeout: config.read_your_writes_timeout,
        checkpoint_board: config.checkpoint_board.clone(),
    };
    let mut v1 = nura_commands::router(CommandHandler::new(store.clone()))
        .merge(nura_query_api::router(store.clone(), query_config));
    for router in extra {
        v1 = v1.merge(router);
    }
    let v1 = v1.layer(axum::middleware::from_fn_with_state(
        authenticator,
        auth::authenticate,
    ));

    let mut open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Health { store, nats });
    if let Some(handle) = metrics {
        open = open.route(
            "/metrics",
            get(move || {
                let body = handle.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }),
        );
    }

    edge::layers(
        open.merge(openapi::router())
            .merge(v1)
            .fallback(|| async { ApiError::not_found("route") }),
        &config,
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// Ready when Postgres answers a query and JetStream answers an account query, each within
/// [`READY_PROBE`].
async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    let pg = tokio::time::timeout(
        READY_PROBE,
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(h.store.pool()),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    // A round trip to the JetStream API: `flush` alone only hands bytes to a socket, which a
    // just-killed server's socket may still accept, and the client notices a dead server late.
    let nats = h.nats.connection_state() == async_nats::connection::State::Connected
        && tokio::time::timeout(
            READY_PROBE,
            h.nats.request("$JS.API.INFO", Vec::new().into()),
        )
        .await
        .is_ok_and(|r| r.is_ok());
    let body = json!({"postgres": pg, "nats": nats});
    if pg && nats {
        (StatusCode::OK, axum::Json(body)).into_response()
    } else {
        ApiError::unavailable("a dependency is not reachable")
            .with_details(body)
            .into_response()
    }
}
