//! The layers every request passes through, outermost first.

use crate::GatewayConfig;
use crate::rate_limit::{AddressLimit, Limiter, limit_by_address};
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::Response;
use nura_http::REQUEST_ID_HEADER;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// Longest client-supplied request id kept; longer or non-printable ones are replaced.
const MAX_REQUEST_ID: usize = 128;

/// Wraps every route (and the fallback) of `router` in the edge layers.
pub(crate) fn layers(router: Router, config: &GatewayConfig) -> Router {
    let outer = ServiceBuilder::new()
        .layer(from_fn(drop_unusable_request_id))
        .layer(SetRequestIdLayer::x_request_id(UuidV7))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(security_header(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(security_header(header::X_FRAME_OPTIONS, "DENY"))
        .layer(security_header(header::REFERRER_POLICY, "no-referrer"))
        .layer(security_header(header::CACHE_CONTROL, "no-store"))
        .layer(security_header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ))
        .layer(security_header(
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=63072000",
        ));
    let inner = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(from_fn(track_metrics))
        .layer(from_fn(nura_http::envelope_errors))
        // Before authentication: an anonymous flood is refused without verifying anything.
        .layer(from_fn_with_state(
            Arc::new(AddressLimit {
                limiter: Limiter::new(config.rate_limit_per_address, "address"),
                trust_forwarded_for: config.trust_forwarded_for,
            }),
            limit_by_address,
        ))
        // The timeout sits outside the concurrency limit, and the limit waits for its slot
        // inside the request future (not in `poll_ready`, where tower's limit waits and no timer
        // runs yet), so time spent queueing counts: a saturated gateway answers 504 instead of
        // holding requests forever.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            config.request_timeout,
        ))
        .layer(from_fn_with_state(
            Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
            limit_concurrency,
        ))
        .layer(CatchPanicLayer::new())
        .layer(RequestBodyLimitLayer::new(config.body_limit_bytes));
    let router = router.layer(inner);
    // Between the two: outside everything that may refuse a request, so browsers can read 401s
    // and 429s, and preflights are answered without authentication.
    let router = match cors(config) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router.layer(outer)
}

/// The CORS layer, or none when no origin is allowed. Entries that are not valid header values
/// are skipped with a warning.
fn cors(config: &GatewayConfig) -> Option<CorsLayer> {
    let c = &config.cors;
    if c.allowed_origins.is_empty() {
        return None;
    }
    let origins = if c.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(c.allowed_origins.iter().filter_map(|o| {
            let v = HeaderValue::from_str(o.trim_end_matches('/')).ok();
            if v.is_none() {
                tracing::warn!(origin = %o, "CORS origin ignored: not a header value");
            }
            v
        }))
    };
    let methods: Vec<Method> = c
        .allowed_methods
        .iter()
        .filter_map(|m| m.trim().to_ascii_uppercase().parse().ok())
        .collect();
    let headers: Vec<HeaderName> = c
        .allowed_headers
        .iter()
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    let exposed = [
        "x-request-id",
        "etag",
        "location",
        "retry-after",
        "idempotent-replayed",
        "www-authenticate",
    ]
    .map(HeaderName::from_static);
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods(methods)
            .allow_headers(headers)
            .expose_headers(exposed)
            .max_age(c.max_age),
    )
}

fn security_header(name: HeaderName, value: &'static str) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value))
}

/// One global limit on requests in flight, shared by every route.
async fn limit_concurrency(
    State(slots): State<Arc<Semaphore>>,
    req: Request,
    next: Next,
) -> Response {
    // The semaphore is never closed, so acquiring only fails if it were; serve regardless then.
    let _slot = slots.acquire_owned().await.ok();
    next.run(req).await
}

/// Request ids are UUIDv7: unique and sortable by time in the logs.
#[derive(Clone, Copy)]
struct UuidV7;

impl MakeRequestId for UuidV7 {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&uuid::Uuid::now_v7().to_string())
            .ok()
            .map(RequestId::new)
    }
}

/// A client may pass its own request id (it becomes the events' correlation id), but only a
/// short printable one; anything else is replaced by a fresh id.
async fn drop_unusable_request_id(mut req: Request, next: Next) -> Response {
    let usable = req.headers().get(REQUEST_ID_HEADER).is_none_or(|v| {
        v.to_str().is_ok_and(|s| {
            !s.is_empty() && s.len() <= MAX_REQUEST_ID && s.bytes().all(|b| b.is_ascii_graphic())
        })
    });
    if !usable {
        req.headers_mut().remove(REQUEST_ID_HEADER);
    }
    next.run(req).await
}

/// The span of one request: method, matched route and request id — never headers or bodies,
/// which may hold tokens.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let request_id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    tracing::info_span!("request", method = %req.method(), route, request_id)
}

/// Counts requests and records latency by method, matched route (not the raw path, which would
/// explode label cardinality) and status.
async fn track_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    // Only known methods become labels: an arbitrary method token would grow the label set.
    let method: &'static str = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!(
        "nura_http_requests_total",
        "method" => method,
        "route" => route.clone(),
        "status" => status,
    )
    .increment(1);
    metrics::histogram!(
        "nura_http_request_duration_seconds",
        "method" => method,
        "route" => route,
    )
    .record(started.elapsed().as_secs_f64());
    res
}
