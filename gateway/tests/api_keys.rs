//! API keys end to end: `authenticate` against real Postgres, and requests through the whole
//! app with `X-Api-Key` / `Authorization: Bearer nura_…`. The projector is another crate's
//! runtime; here the `api_keys` projection is folded into `read.api_keys` (as the projector would).

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use nura_commands::api_keys::ApiKeyHandler;
use nura_commands::{CommandMeta, IdempotencyKey};
use nura_domain::conversation::Actor;
use nura_gateway::api_keys::authenticate;
use nura_gateway::{GatewayConfig, app, issue_token};
use nura_http::Role;
use nura_projections::Projection;
use nura_projections::api_keys::ApiKeys;
use nura_store::EventStore;
use nura_testkit::TestDb;
use secrecy::SecretString;
use serde_json::{Value, json};
use std::time::Duration;
use tower::ServiceExt;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(60);
const SECRET: &str = "test-secret-that-is-long-enough-0123456789";

fn meta(tenant: &str) -> CommandMeta {
    CommandMeta {
        actor: Actor {
            tenant_id: tenant.into(),
            user_id: "alice".into(),
        },
        correlation_id: "req".into(),
        idempotency_key: None::<IdempotencyKey>,
        expected_version: None,
        causation_id: None,
    }
}

/// Issues a key through the command handler and projects it; returns (key id, plaintext).
async fn issue(store: &EventStore, tenant: &str, roles: &[&str]) -> (Uuid, String) {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    let issued = ApiKeyHandler::new(store.clone())
        .issue(&meta(tenant), "ci", &roles)
        .await
        .expect("issue");
    project(store).await;
    (
        issued.committed.key_id,
        issued.plaintext.expect("first issue shows the key"),
    )
}

/// Applies every API-key event of this database through the real projection, in stream order,
/// and moves the `api_keys` checkpoints past them (as the projector runtime would). Not
/// `read_all`/`fold`: those stop at the oldest transaction open anywhere on the shared server,
/// and other tests hold some open on purpose.
async fn project(store: &EventStore) {
    let streams: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT stream_id FROM es.events WHERE stream_id LIKE 'apikey-%'",
    )
    .fetch_all(store.pool())
    .await
    .expect("streams");
    let mut conn = store.pool().acquire().await.expect("connection");
    for s in streams {
        for e in store.read_stream(&s, 0, 1000).await.expect("read stream") {
            ApiKeys.apply(&mut conn, &e).await.expect("apply");
            sqlx::query(
                "INSERT INTO read.checkpoints (projector, partition, transaction_id, global_position) \
                 VALUES ('api_keys', $1, $2, $3) ON CONFLICT (projector, partition) DO UPDATE \
                 SET transaction_id = greatest(read.checkpoints.transaction_id, $2), \
                     global_position = greatest(read.checkpoints.global_position, $3)",
            )
            .bind(e.partition)
            .bind(e.transaction_id)
            .bind(e.global_position)
            .execute(&mut *conn)
            .await
            .expect("checkpoint");
        }
    }
}

async fn last_used(pool: &sqlx::PgPool, key_id: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT last_used_at FROM read.api_keys WHERE key_id = $1")
        .bind(key_id)
        .fetch_one(pool)
        .await
        .expect("select")
}

#[tokio::test]
async fn a_valid_key_authenticates_as_its_tenant_and_roles_and_records_its_use_once_a_minute() {
    tokio::time::timeout(LIMIT, async {
        let db = TestDb::new().await;
        let store = EventStore::connect(db.pool.clone()).await.expect("store");
        let (id, key) = issue(&store, "acme", &["service", "viewer"]).await;
        assert_eq!(last_used(&db.pool, id).await, None);
        let p = authenticate(&db.pool, &key)
            .await
            .expect("db")
            .expect("valid");
        assert_eq!(p.tenant_id, "acme");
        assert_eq!(p.user_id, format!("apikey:{id}"));
        assert_eq!(p.roles, [Role::Service, Role::Viewer]);
        let first = last_used(&db.pool, id).await.expect("use recorded");
        authenticate(&db.pool, &key)
            .await
            .expect("db")
            .expect("valid");
        assert_eq!(
            last_used(&db.pool, id).await,
            Some(first),
            "throttled to once a minute"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn wrong_malformed_unknown_foreign_and_revoked_keys_are_refused() {
    tokio::time::timeout(LIMIT, async {
        let db = TestDb::new().await;
        let store = EventStore::connect(db.pool.clone()).await.expect("store");
        let (a, key_a) = issue(&store, "acme", &["service"]).await;
        let (b, key_b) = issue(&store, "evil", &["service"]).await;
        let secret_a = &key_a[key_a.len() - 43..];
        let secret_b = &key_b[key_b.len() - 43..];

        // The right id with another secret of the same length (and alphabet).
        let mut flipped = key_a.clone();
        let last = if key_a.ends_with('A') { "B" } else { "A" };
        flipped.replace_range(key_a.len() - 1.., last);
        // Another tenant's key id with this key's secret, and an unknown id.
        let foreign = format!("nura_{}_{secret_a}", b.simple());
        let swapped = format!("nura_{}_{secret_b}", a.simple());
        let unknown = format!("nura_{}_{secret_a}", Uuid::now_v7().simple());
        for bad in [&flipped, &foreign, &swapped, &unknown] {
            assert_eq!(
                authenticate(&db.pool, bad).await.expect("db"),
                None,
                "{bad}"
            );
        }
        assert!(
            last_used(&db.pool, a).await.is_none(),
            "failures record no use"
        );

        // Revoked: refused once the projection has applied the revocation.
        ApiKeyHandler::new(store.clone())
            .revoke(&meta("acme"), a)
            .await
            .expect("revoke");
        assert!(
            authenticate(&db.pool, &key_a).await.expect("db").is_some(),
            "not yet projected"
        );
        project(&store).await;
        assert_eq!(authenticate(&db.pool, &key_a).await.expect("db"), None);
        assert!(authenticate(&db.pool, &key_b).await.expect("db").is_some());

        // Malformed keys are refused without a database round trip: a closed pool proves it.
        let malformed = [
            String::new(),
            "nura_".into(),
            format!("{key_b}x"),
            key_b[..key_b.len() - 1].to_string(),
            key_b.replacen("nura_", "NURA_", 1),
            format!("nura_{}_{}", b, secret_b),
            "nura_' OR 1=1 --".into(),
            "x".repeat(10_000),
        ];
        db.pool.close().await;
        for bad in &malformed {
            assert_eq!(
                authenticate(&db.pool, bad).await.expect("no db needed"),
                None,
                "{bad}"
            );
        }
        assert!(
            authenticate(&db.pool, &key_b).await.is_err(),
            "a well-formed key needs the db"
        );
    })
    .await
    .expect("test timed out");
}

struct Env {
    _db: TestDb,
    store: EventStore,
    app: Router,
}

async fn env() -> Env {
    nura_testkit::init_tracing();
    let db = TestDb::new().await;
    let store = EventStore::connect(db.pool.clone()).await.expect("store");
    let nats = nura_testkit::nats_client().await;
    let config = GatewayConfig::with_secret(SecretString::from(SECRET));
    let app = app(store.clone(), nats, config, None, vec![]);
    Env {
        _db: db,
        store,
        app,
    }
}

fn jwt(tenant: &str, roles: &[Role]) -> String {
    issue_token(
        &SecretString::from(SECRET),
        "nura",
        "nura-api",
        tenant,
        "alice",
        roles,
        Duration::from_secs(600),
    )
    .expect("token")
}

enum Cred<'a> {
    Jwt(&'a str),
    Header(&'a str),
    Bearer(&'a str),
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    cred: Cred<'_>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    req = match cred {
        Cred::Jwt(t) | Cred::Bearer(t) => req.header(header::AUTHORIZATION, format!("Bearer {t}")),
        Cred::Header(k) => req.header("x-api-key", k),
    };
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    let res = app.clone().oneshot(req).await.expect("infallible");
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_key_issued_over_http_works_in_either_header_until_it_is_revoked() {
    tokio::time::timeout(LIMIT, async {
        let env = env().await;
        let admin = jwt("acme", &[Role::Admin]);
        let (s, issued) = call(
            &env.app,
            "POST",
            "/v1/api-keys",
            Cred::Jwt(&admin),
            Some(json!({"name": "integration", "roles": ["service"]})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{issued}");
        let key = issued["api_key"].as_str().expect("key").to_owned();
        let id = issued["key_id"].as_str().expect("id").to_owned();
        project(&env.store).await;

        // Both headers; the key acts as a service of its tenant, recorded as the actor.
        let (s, started) = call(
            &env.app,
            "POST",
            "/v1/conversations",
            Cred::Header(&key),
            Some(json!({"title": "from a key"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{started}");
        let (s, _) = call(
            &env.app,
            "GET",
            "/v1/conversations",
            Cred::Bearer(&key),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let cid = Uuid::parse_str(started["conversation_id"].as_str().expect("id")).expect("uuid");
        let events = env
            .store
            .read_stream(&nura_domain::conversation::stream_id(cid), 0, 10)
            .await
            .expect("stream");
        assert_eq!(events[0].metadata.tenant_id, "acme");
        assert_eq!(events[0].metadata.actor, format!("apikey:{id}"));

        // A key is never an admin: it cannot manage keys.
        let (s, _) = call(&env.app, "GET", "/v1/api-keys", Cred::Header(&key), None).await;
        assert_eq!(s, StatusCode::FORBIDDEN);

        // Admin reads: last use visible, never a hash or the secret; another tenant sees 404.
        let (s, one) = call(
            &env.app,
            "GET",
            &format!("/v1/api-keys/{id}"),
            Cred::Jwt(&admin),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{one}");
        assert!(one["last_used_at"].is_string());
        assert_eq!(one["status"], "active");
        let (s, list) = call(&env.app, "GET", "/v1/api-keys", Cred::Jwt(&admin), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
        let text = format!("{one}{list}");
        assert!(!text.contains("secret_hash") && !text.contains(&key[key.len() - 43..]));
        let other = jwt("evil", &[Role::Admin]);
        let (s, body) = call(
            &env.app,
            "GET",
            &format!("/v1/api-keys/{id}"),
            Cred::Jwt(&other),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(!body.to_string().contains("integration"));
        let (s, list) = call(&env.app, "GET", "/v1/api-keys", Cred::Jwt(&other), None).await;
        assert_eq!(
            (s, list["items"].as_array().map(Vec::len)),
            (StatusCode::OK, Some(0))
        );
        let (s, _) = call(
            &env.app,
            "POST",
            &format!("/v1/api-keys/{id}/revoke"),
            Cred::Jwt(&other),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // Revoked, and once the projection applied it, refused with the envelope.
        let (s, revoked) = call(
            &env.app,
            "POST",
            &format!("/v1/api-keys/{id}/revoke"),
            Cred::Jwt(&admin),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        project(&env.store).await;
        let after = revoked["commit"].as_str().expect("commit");
        let (s, one) = call(
            &env.app,
            "GET",
            &format!("/v1/api-keys/{id}?after={after}"),
            Cred::Jwt(&admin),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{one}");
        assert_eq!(one["status"], "revoked");
        assert_eq!(one["revoked_by"], "alice");
        // Filters from an allow-list, clamped pages, opaque cursors.
        let (s, list) = call(
            &env.app,
            "GET",
            "/v1/api-keys?status=revoked&limit=100000",
            Cred::Jwt(&admin),
            None,
        )
        .await;
        assert_eq!(
            (s, list["items"].as_array().map(Vec::len)),
            (StatusCode::OK, Some(1))
        );
        let (s, list) = call(
            &env.app,
            "GET",
            "/v1/api-keys?status=active",
            Cred::Jwt(&admin),
            None,
        )
        .await;
        assert_eq!(
            (s, list["items"].as_array().map(Vec::len)),
            (StatusCode::OK, Some(0))
        );
        for bad in [
            "status=secret_hash",
            "status=active'--",
            "cursor=zzz",
            "limit=ten",
        ] {
            let (s, body) = call(
                &env.app,
                "GET",
                &format!("/v1/api-keys?{bad}"),
                Cred::Jwt(&admin),
                None,
            )
            .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
        }
        for cred in [Cred::Header(&key), Cred::Bearer(&key)] {
            let (s, body) = call(&env.app, "GET", "/v1/conversations", cred, None).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
            assert_eq!(body["error"]["code"], "unauthorized");
        }
    })
    .await
    .expect("test timed out");
}
