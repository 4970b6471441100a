//! API-key commands through their routes, on a real, fresh Postgres database.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use nura_commands::CommandHandler;
use nura_commands::api_keys::{hash_secret, parse_key};
use nura_http::{Principal, Role};
use nura_store::EventStore;
use nura_testkit::TestDb;
use serde_json::{Value, json};
use std::time::Duration;
use tower::ServiceExt;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(30);

fn principal(tenant: &str, user: &str, roles: &[Role]) -> Principal {
    Principal {
        tenant_id: tenant.into(),
        user_id: user.into(),
        roles: roles.to_vec(),
    }
}

/// The command router as the gateway would serve it, for one authenticated caller.
fn app(store: &EventStore, who: Principal) -> Router {
    nura_commands::router(CommandHandler::new(store.clone())).layer(axum::Extension(who))
}

async fn post(
    app: &Router,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut req = Request::post(path).header("x-request-id", "req-7");
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    let res = app.clone().oneshot(req).await.expect("infallible");
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, json)
}

async fn events_text(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar(
        "SELECT coalesce(string_agg(payload::text || metadata::text, ' '), '') FROM es.events",
    )
    .fetch_one(pool)
    .await
    .expect("events")
}

async fn env() -> (TestDb, EventStore) {
    let db = TestDb::new().await;
    let store = EventStore::connect(db.pool.clone()).await.expect("store");
    (db, store)
}

#[tokio::test]
async fn an_issued_key_is_shown_once_and_only_its_hash_is_stored() {
    tokio::time::timeout(LIMIT, async {
        let (db, store) = env().await;
        let admin = app(&store, principal("acme", "alice", &[Role::Admin]));
        let (status, headers, body) = post(
            &admin,
            "/v1/api-keys",
            Some(json!({"name": "  ci bot ", "roles": ["service", "viewer", "service"]})),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        let plaintext = body["api_key"].as_str().expect("the key is shown");
        let (key_id, secret) = parse_key(plaintext).expect("well-formed key");
        assert_eq!(body["key_id"], json!(key_id));
        assert_eq!(body["name"], "ci bot");
        assert_eq!(body["roles"], json!(["service", "viewer"]));
        assert_eq!(headers[header::LOCATION], format!("/v1/api-keys/{key_id}"));

        let stored = events_text(&db.pool).await;
        assert!(!stored.contains(secret), "the secret reached the event log");
        assert!(!stored.contains(plaintext));
        // Whole rows: whatever columns the idempotency record has now or gains later.
        let (records, rows): (i64, String) = sqlx::query_as(
            "SELECT count(*), coalesce(string_agg(c::text, ' '), '') FROM es.commands c",
        )
        .fetch_one(&db.pool)
        .await
        .expect("commands");
        assert_eq!(records, 1, "the issue command left its idempotency record");
        assert!(
            !rows.contains(secret),
            "the secret reached the idempotency table"
        );

        let events = store
            .read_stream(&nura_domain::api_key::stream_id(key_id), 0, 10)
            .await
            .expect("stream");
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.event_type, "ApiKeyIssued");
        assert_eq!(e.payload["secret_hash"], hash_secret(secret));
        assert_eq!(e.payload["tenant_id"], "acme");
        assert_eq!(e.payload["issued_by"], "alice");
        assert_eq!(e.metadata.tenant_id, "acme");
        assert_eq!(e.metadata.actor, "alice");
        assert_eq!(e.metadata.correlation_id, "req-7");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_repeated_issue_returns_the_first_key_id_without_any_secret() {
    tokio::time::timeout(LIMIT, async {
        let (db, store) = env().await;
        let admin = app(&store, principal("acme", "alice", &[Role::Admin]));
        let body = json!({"name": "ci", "roles": ["service"]});
        let (s1, _, first) = post(&admin, "/v1/api-keys", Some(body.clone()), Some("k-1")).await;
        let (s2, h2, again) = post(&admin, "/v1/api-keys", Some(body), Some("k-1")).await;
        assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
        assert!(first["api_key"].is_string());
        assert_eq!(again["key_id"], first["key_id"]);
        assert_eq!(again["api_key"], Value::Null);
        assert!(again["note"].is_string());
        assert_eq!(h2["idempotent-replayed"], "true");
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM es.events")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(n, 1);
        // The same key with another body is refused.
        let (s3, _, e) = post(
            &admin,
            "/v1/api-keys",
            Some(json!({"name": "other", "roles": ["service"]})),
            Some("k-1"),
        )
        .await;
        assert_eq!(s3, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e["error"]["code"], "idempotency_key_reused");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_key_is_revoked_once_and_revoking_again_changes_nothing() {
    tokio::time::timeout(LIMIT, async {
        let (_db, store) = env().await;
        let admin = app(&store, principal("acme", "alice", &[Role::Admin]));
        let (_, _, issued) = post(
            &admin,
            "/v1/api-keys",
            Some(json!({"name": "ci", "roles": ["member"]})),
            None,
        )
        .await;
        let id = issued["key_id"].as_str().expect("id").to_owned();
        let path = format!("/v1/api-keys/{id}/revoke");
        let (s1, _, r1) = post(&admin, &path, None, None).await;
        assert_eq!(s1, StatusCode::OK, "{r1}");
        assert_eq!(r1["version"], 2);
        let (s2, _, r2) = post(&admin, &path, Some(json!({})), None).await;
        assert_eq!(s2, StatusCode::OK);
        assert_eq!(r2["version"], 2, "no second event");
        let key_id = Uuid::parse_str(&id).expect("uuid");
        let events = store
            .read_stream(&nura_domain::api_key::stream_id(key_id), 0, 10)
            .await
            .expect("stream");
        assert_eq!(events[1].event_type, "ApiKeyRevoked");
        assert_eq!(events[1].payload["revoked_by"], "alice");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn another_tenants_key_or_an_unknown_id_is_a_404() {
    tokio::time::timeout(LIMIT, async {
        let (_db, store) = env().await;
        let acme = app(&store, principal("acme", "alice", &[Role::Admin]));
        let evil = app(&store, principal("evil", "mallory", &[Role::Admin]));
        let (_, _, issued) = post(
            &acme,
            "/v1/api-keys",
            Some(json!({"name": "ci", "roles": ["member"]})),
            None,
        )
        .await;
        let id = issued["key_id"].as_str().expect("id");
        for path in [
            format!("/v1/api-keys/{id}/revoke"),
            format!("/v1/api-keys/{}/revoke", Uuid::now_v7()),
            "/v1/api-keys/not-a-uuid/revoke".to_owned(),
        ] {
            let (status, _, body) = post(&evil, &path, None, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(body["error"]["message"], "api key not found");
            assert!(!body.to_string().contains("acme"));
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn only_an_admin_may_issue_or_revoke_keys() {
    tokio::time::timeout(LIMIT, async {
        let (db, store) = env().await;
        for roles in [
            &[Role::Member][..],
            &[Role::Service],
            &[Role::Viewer, Role::Member],
        ] {
            let app = app(&store, principal("acme", "bob", roles));
            let (s, _, body) = post(
                &app,
                "/v1/api-keys",
                Some(json!({"name": "x", "roles": ["service"]})),
                None,
            )
            .await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
            // 403 comes before the body is looked at.
            let (s, _, _) = post(&app, "/v1/api-keys", Some(json!({"bogus": 1})), None).await;
            assert_eq!(s, StatusCode::FORBIDDEN);
            let path = format!("/v1/api-keys/{}/revoke", Uuid::now_v7());
            let (s, _, _) = post(&app, &path, None, None).await;
            assert_eq!(s, StatusCode::FORBIDDEN);
        }
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM es.events")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(n, 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_key_cannot_be_granted_admin_and_the_body_cannot_choose_tenant_or_actor() {
    tokio::time::timeout(LIMIT, async {
        let (db, store) = env().await;
        let admin = app(&store, principal("acme", "alice", &[Role::Admin]));
        let (s, _, body) = post(
            &admin,
            "/v1/api-keys",
            Some(json!({"name": "root", "roles": ["admin"]})),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["error"]["code"], "role_not_grantable");
        for extra in [
            "tenant_id",
            "actor",
            "key_id",
            "secret_hash",
            "version",
            "event_id",
        ] {
            let mut b = json!({"name": "ci", "roles": ["service"]});
            b[extra] = json!("evil");
            let (s, _, body) = post(&admin, "/v1/api-keys", Some(b), None).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{extra}: {body}");
        }
        for bad in [
            json!({"name": " ", "roles": ["service"]}),
            json!({"name": "x", "roles": []}),
        ] {
            let (s, _, _) = post(&admin, "/v1/api-keys", Some(bad), None).await;
            assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        }
        let path = format!("/v1/api-keys/{}/revoke", Uuid::now_v7());
        let (s, _, _) = post(&admin, &path, Some(json!({"tenant_id": "evil"})), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM es.events")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(n, 0);
    })
    .await
    .expect("test timed out");
}

/// `If-Match` holds for key commands as for conversations: a revoke against another version is
/// a 409 and writes nothing; against the current one it goes through.
#[tokio::test]
async fn a_revoke_with_a_stale_if_match_is_a_conflict_and_writes_nothing() {
    tokio::time::timeout(LIMIT, async {
        let (_db, store) = env().await;
        let admin = app(&store, principal("acme", "alice", &[Role::Admin]));
        let (_, _, issued) = post(
            &admin,
            "/v1/api-keys",
            Some(json!({"name": "ci", "roles": ["member"]})),
            None,
        )
        .await;
        let id = issued["key_id"].as_str().expect("id").to_owned();
        let revoke = |version: &str| {
            Request::post(format!("/v1/api-keys/{id}/revoke"))
                .header("if-match", version)
                .body(Body::empty())
                .expect("request")
        };
        let res = admin
            .clone()
            .oneshot(revoke("5"))
            .await
            .expect("infallible");
        assert_eq!(res.status(), StatusCode::CONFLICT);
        let key_id = Uuid::parse_str(&id).expect("uuid");
        let stream = nura_domain::api_key::stream_id(key_id);
        assert_eq!(store.stream_version(&stream).await.expect("version"), 1);
        let res = admin
            .clone()
            .oneshot(revoke("1"))
            .await
            .expect("infallible");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(store.stream_version(&stream).await.expect("version"), 2);
    })
    .await
    .expect("test timed out");
}
