//! `/openapi.json` and `/docs`: open, complete (every route the app serves, with its roles) and
//! true (every documented route is served).

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use nura_gateway::openapi::OPERATIONS;
use nura_gateway::{GatewayConfig, ROUTE_ROLES, app};
use nura_store::EventStore;
use nura_testkit::TestDb;
use secrecy::SecretString;
use serde_json::Value;
use std::time::Duration;
use tower::ServiceExt;

const LIMIT: Duration = Duration::from_secs(60);

fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("install the metrics recorder")
        })
        .clone()
}

async fn served() -> (TestDb, Router) {
    let db = TestDb::new().await;
    let store = EventStore::connect(db.pool.clone()).await.expect("store");
    let nats = nura_testkit::nats_client().await;
    let config = GatewayConfig::with_secret(SecretString::from(
        "test-secret-that-is-long-enough-0123456789",
    ));
    let extra = vec![nura_projections::admin_router(store.clone())];
    let app = app(store, nats, config, Some(metrics_handle()), extra);
    (db, app)
}

async fn get(app: &Router, method: &str, path: &str) -> (StatusCode, Option<String>, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .expect("request");
    let res = app.clone().oneshot(req).await.expect("infallible");
    let status = res.status();
    let ctype = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = axum::body::to_bytes(res.into_body(), 4 << 20)
        .await
        .expect("body");
    (status, ctype, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn the_document_is_open_and_lists_every_route_with_its_roles_and_both_credentials() {
    tokio::time::timeout(LIMIT, async {
        let (_db, app) = served().await;
        let (status, ctype, body) = get(&app, "GET", "/openapi.json").await;
        assert_eq!(status, StatusCode::OK);
        assert!(ctype.is_some_and(|c| c.starts_with("application/json")));
        let doc: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(doc["openapi"], "3.1.0");
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["apiKey"]["name"], "X-Api-Key");
        assert!(doc["components"]["schemas"]["Error"]["properties"]["error"].is_object());
        for rule in ROUTE_ROLES {
            let op = &doc["paths"][rule.path][rule.method.as_str().to_ascii_lowercase()];
            assert!(
                op.is_object(),
                "{} {} is not documented",
                rule.method,
                rule.path
            );
            let roles: Vec<String> = rule
                .roles
                .iter()
                .map(|r| {
                    serde_json::to_value(r)
                        .expect("role")
                        .as_str()
                        .expect("str")
                        .to_owned()
                })
                .collect();
            assert_eq!(
                op["x-required-roles"],
                serde_json::json!(roles),
                "{}",
                rule.path
            );
            assert_eq!(
                op["responses"]["401"]["$ref"],
                "#/components/responses/E401"
            );
            assert!(op["security"].as_array().is_some_and(|s| s.len() == 2));
        }
        let issue = &doc["paths"]["/v1/api-keys"]["post"];
        assert_eq!(
            issue["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/IssueApiKey"
        );
        assert_eq!(
            doc["components"]["schemas"]["IssueApiKey"]["additionalProperties"],
            false
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn every_documented_route_is_served_and_protected_routes_demand_a_credential() {
    tokio::time::timeout(LIMIT, async {
        let (_db, app) = served().await;
        for op in OPERATIONS {
            let path = op
                .path
                .replace("{id}", "01900000-0000-7000-8000-000000000001")
                .replace(
                    "{stream_id}",
                    "conversation-01900000-0000-7000-8000-000000000001",
                );
            let (status, _, body) = get(&app, op.method.as_str(), &path).await;
            assert!(
                !body.contains("route not found"),
                "{} {} is documented but not served",
                op.method,
                op.path
            );
            if op.authenticated {
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{} {}",
                    op.method,
                    op.path
                );
                assert!(body.contains("\"request_id\""), "enveloped: {body}");
            } else {
                assert!(
                    status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                    "{} {} → {status}",
                    op.method,
                    op.path
                );
            }
        }
        // The check can tell: an undocumented path is the route-not-found envelope.
        let (status, _, body) = get(&app, "GET", "/v1/not-a-route").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("route not found"), "{body}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_docs_page_is_self_contained_html_listing_every_route() {
    tokio::time::timeout(LIMIT, async {
        let (_db, app) = served().await;
        let (status, ctype, body) = get(&app, "GET", "/docs").await;
        assert_eq!(status, StatusCode::OK);
        assert!(ctype.is_some_and(|c| c.starts_with("text/html")));
        for op in OPERATIONS {
            assert!(body.contains(op.path), "{} missing from /docs", op.path);
        }
        assert!(!body.contains("<script"));
        assert!(!body.contains("http://") && !body.contains("https://"));
    })
    .await
    .expect("test timed out");
}
