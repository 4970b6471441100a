//! Security tests of the HTTP edge (TESTPLAN S1 and S8, plus the role table, rate limits and
//! CORS), driven with `oneshot` on a fresh database and the shared NATS.
//!
//! Public keys are checked-in fixtures (`tests/fixtures/`, generated once with `openssl
//! genpkey`); a JWKS is served by a small axum server on 127.0.0.1:0 that counts its requests and
//! whose key set a test can change mid-way.

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nura_gateway::{
    GatewayConfig, JwksSource, ROUTE_ROLES, RateLimit, VerifyingKey, app, issue_token,
};
use nura_http::Role;
use nura_testkit::TestDb;
use secrecy::SecretString;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower::ServiceExt;

const LIMIT: Duration = Duration::from_secs(60);
const SECRET: &str = "security-test-secret-0123456789abcdef";
const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/rsa_public.pem");
const RSA2_PRIVATE: &[u8] = include_bytes!("fixtures/rsa2_private.pem");
const ED_PRIVATE: &[u8] = include_bytes!("fixtures/ed25519_private.pem");
const ED_PUBLIC: &[u8] = include_bytes!("fixtures/ed25519_public.pem");
const RSA_JWK: &str = include_str!("fixtures/rsa_public.jwk.json");
const RSA2_JWK: &str = include_str!("fixtures/rsa2_public.jwk.json");
const ED_JWK: &str = include_str!("fixtures/ed25519_public.jwk.json");

struct Env {
    db: TestDb,
    app: Router,
}

/// Rate limits off unless a test sets them: many tests here send many requests.
fn config() -> GatewayConfig {
    let mut c = GatewayConfig::with_secret(SecretString::from(SECRET));
    c.body_limit_bytes = 64 * 1024;
    c.rate_limit_per_principal = RateLimit {
        per_sec: 0,
        burst: 0,
    };
    c.rate_limit_per_address = RateLimit {
        per_sec: 0,
        burst: 0,
    };
    c.jwt_public_keys = vec![
        VerifyingKey::from_pem("rsa-1", RSA_PUBLIC).expect("rsa pem"),
        VerifyingKey::from_pem("ed-1", ED_PUBLIC).expect("ed pem"),
    ];
    c
}

async fn env_with(config: GatewayConfig, extra: Vec<Router>) -> Env {
    nura_testkit::init_tracing();
    let db = TestDb::new().await;
    let store = nura_store::EventStore::connect(db.pool.clone())
        .await
        .expect("store");
    let nats = nura_testkit::nats_client().await;
    let app = app(store, nats, config, Some(metrics_handle()), extra);
    Env { db, app }
}

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

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Valid claims for tenant `acme`, with `over` applied (`null` removes a claim).
fn claims(over: Value) -> Value {
    let mut c = json!({"iss": "nura", "aud": "nura-api", "sub": "alice", "tenant": "acme",
        "roles": ["member"], "iat": now(), "exp": now() + 600});
    for (k, v) in over.as_object().expect("object") {
        if v.is_null() {
            c.as_object_mut().expect("object").remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).expect("sign")
}

fn rs256(kid: &str, claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("rsa key");
    sign(Algorithm::RS256, Some(kid), &key, claims)
}

fn rs256_second_key(kid: &str, claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(RSA2_PRIVATE).expect("rsa2 key");
    sign(Algorithm::RS256, Some(kid), &key, claims)
}

fn eddsa(kid: &str, claims: &Value) -> String {
    let key = EncodingKey::from_ed_pem(ED_PRIVATE).expect("ed key");
    sign(Algorithm::EdDSA, Some(kid), &key, claims)
}

fn hs256_token(tenant: &str, user: &str, roles: &[Role]) -> String {
    issue_token(
        &SecretString::from(SECRET),
        "nura",
        "nura-api",
        tenant,
        user,
        roles,
        Duration::from_secs(600),
    )
    .expect("token")
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A JWKS document: each (kid, JWK JSON) with its kid set.
fn jwks_doc(keys: &[(&str, &str)]) -> Value {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(kid, jwk)| {
            let mut v: Value = serde_json::from_str(jwk).expect("jwk json");
            v["kid"] = json!(kid);
            v
        })
        .collect();
    json!({ "keys": keys })
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    raw: String,
}

struct Call {
    method: Method,
    uri: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    peer: Option<SocketAddr>,
}

fn call(method: Method, uri: impl Into<String>) -> Call {
    Call {
        method,
        uri: uri.into(),
        headers: vec![],
        body: None,
        peer: None,
    }
}

impl Call {
    fn bearer(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn json(self, body: &Value) -> Self {
        self.raw_body("application/json", body.to_string().into_bytes())
    }

    fn raw_body(mut self, content_type: &str, body: Vec<u8>) -> Self {
        self.headers
            .push(("content-type".to_owned(), content_type.to_owned()));
        self.body = Some(body);
        self
    }

    fn from(mut self, peer: &str) -> Self {
        self.peer = Some(peer.parse().expect("socket address"));
        self
    }

    async fn send(self, app: &Router) -> Reply {
        let mut req = Request::builder().method(self.method).uri(self.uri);
        for (k, v) in self.headers {
            req = req.header(k, v);
        }
        let mut req = req
            .body(self.body.map_or_else(Body::empty, Body::from))
            .expect("request");
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(ConnectInfo(peer));
        }
        let res = app.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 10 << 20)
            .await
            .expect("body");
        let raw = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            raw,
        }
    }
}

#[track_caller]
fn assert_envelope(r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "body: {}", r.raw);
    assert_eq!(r.body["error"]["code"], code, "body: {}", r.raw);
    let rid = r.headers.get("x-request-id").expect("x-request-id header");
    assert_eq!(
        r.body["error"]["request_id"].as_str(),
        Some(rid.to_str().expect("ascii")),
        "body: {}",
        r.raw
    );
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test timed out");
}

async fn stored_events(env: &Env) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM es.events")
        .fetch_one(&env.db.pool)
        .await
        .expect("count")
}

/// A JWKS server on 127.0.0.1:0: serves `doc`, counts requests.
struct JwksServer {
    url: String,
    doc: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
}

async fn jwks_server(initial: Value) -> JwksServer {
    let doc = Arc::new(Mutex::new(initial));
    let hits = Arc::new(AtomicUsize::new(0));
    let router = Router::new().route(
        "/jwks.json",
        axum::routing::get({
            let doc = doc.clone();
            let hits = hits.clone();
            move || {
                hits.fetch_add(1, Ordering::SeqCst);
                let body = doc.lock().expect("doc").clone();
                async move { axum::Json(body) }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/jwks.json", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    JwksServer { url, doc, hits }
}

#[tokio::test]
async fn s1_forged_expired_and_misaddressed_tokens_are_401_envelopes_and_rs256_and_eddsa_are_accepted()
 {
    bounded(async {
        let env = env_with(config(), vec![]).await;
        let ok = claims(json!({}));
        let alg_none = |kid: Option<&str>| {
            let header = match kid {
                Some(k) => json!({"alg": "none", "typ": "JWT", "kid": k}),
                None => json!({"alg": "none", "typ": "JWT"}),
            };
            format!(
                "{}.{}.",
                b64url(header.to_string().as_bytes()),
                b64url(ok.to_string().as_bytes())
            )
        };
        // The classic confusion: HS256 with the RSA public key (which is public) as the secret.
        let public_as_secret = EncodingKey::from_secret(RSA_PUBLIC);
        let cases: Vec<(&str, String)> = vec![
            ("alg none", alg_none(None)),
            ("alg none with a kid", alg_none(Some("rsa-1"))),
            (
                "HS256 signed with the RSA public key, RSA kid",
                sign(Algorithm::HS256, Some("rsa-1"), &public_as_secret, &ok),
            ),
            (
                "HS256 signed with the RSA public key, no kid",
                sign(Algorithm::HS256, None, &public_as_secret, &ok),
            ),
            ("RS256 under the Ed25519 key's kid", rs256("ed-1", &ok)),
            ("EdDSA under the RSA key's kid", eddsa("rsa-1", &ok)),
            ("signed by another RSA key", rs256_second_key("rsa-1", &ok)),
            ("RS256 without a kid", {
                let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("rsa");
                sign(Algorithm::RS256, None, &key, &ok)
            }),
            ("unknown kid", rs256("nobody", &ok)),
            (
                "expired beyond the leeway",
                rs256("rsa-1", &claims(json!({"exp": now() - 45}))),
            ),
            (
                "not yet valid",
                eddsa("ed-1", &claims(json!({"nbf": now() + 120}))),
            ),
            ("no exp", rs256("rsa-1", &claims(json!({"exp": null})))),
            ("wrong iss", rs256("rsa-1", &claims(json!({"iss": "evil"})))),
            ("no iss", eddsa("ed-1", &claims(json!({"iss": null})))),
            (
                "wrong aud",
                rs256("rsa-1", &claims(json!({"aud": "other"}))),
            ),
            ("no aud", eddsa("ed-1", &claims(json!({"aud": null})))),
            ("no sub", rs256("rsa-1", &claims(json!({"sub": null})))),
            ("garbage", "a.b.c".to_owned()),
            ("huge", "x".repeat(20_000)),
        ];
        for (what, token) in &cases {
            for c in [
                call(Method::GET, "/v1/conversations").bearer(token),
                call(Method::POST, "/v1/conversations")
                    .bearer(token)
                    .json(&json!({"title": "x"})),
            ] {
                let r = c.send(&env.app).await;
                assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.raw);
                assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
                assert!(r.headers.contains_key(header::WWW_AUTHENTICATE), "{what}");
            }
        }
        assert_eq!(
            stored_events(&env).await,
            0,
            "no rejected request may write"
        );

        // The controls: valid RS256, EdDSA and HS256 tokens, and one expired within the leeway.
        for (what, token) in [
            ("RS256", rs256("rsa-1", &ok)),
            ("EdDSA", eddsa("ed-1", &ok)),
            ("HS256", hs256_token("acme", "alice", &[Role::Member])),
            (
                "expired 10 s ago",
                rs256("rsa-1", &claims(json!({"exp": now() - 10}))),
            ),
        ] {
            let r = call(Method::GET, "/v1/conversations")
                .bearer(&token)
                .send(&env.app)
                .await;
            assert_eq!(r.status, StatusCode::OK, "{what}: {}", r.raw);
        }
        let r = call(Method::POST, "/v1/conversations")
            .bearer(&eddsa("ed-1", &ok))
            .json(&json!({"title": "signed with Ed25519"}))
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.raw);
    })
    .await;
}

#[tokio::test]
async fn s1_the_leeway_is_never_more_than_thirty_seconds_and_hs256_can_be_turned_off() {
    bounded(async {
        let mut c = config();
        c.jwt_leeway = Duration::from_secs(3600);
        c.jwt_secret = SecretString::from("");
        let env = env_with(c, vec![]).await;
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&rs256("rsa-1", &claims(json!({"exp": now() - 60}))))
            .send(&env.app)
            .await;
        assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&hs256_token("acme", "alice", &[Role::Member]))
            .send(&env.app)
            .await;
        assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&rs256("rsa-1", &claims(json!({}))))
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    })
    .await;
}

#[tokio::test]
async fn s1_a_jwks_is_fetched_at_most_once_per_interval_and_a_retired_key_is_refused() {
    bounded(async {
        let server = jwks_server(jwks_doc(&[("k1", RSA_JWK), ("e1", ED_JWK)])).await;
        let mut c = config();
        c.jwt_public_keys = vec![];
        c.jwks = Some(JwksSource::Url(server.url.clone()));
        c.jwks_refresh_interval = Duration::from_secs(2);
        c.jwks_max_age = Duration::from_secs(600);
        let env = env_with(c, vec![]).await;
        let ok = claims(json!({}));

        let r = call(Method::GET, "/v1/conversations")
            .bearer(&rs256("k1", &ok))
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&eddsa("e1", &ok))
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
        assert_eq!(
            server.hits.load(Ordering::SeqCst),
            1,
            "one fetch serves both"
        );

        // A flood of made-up key ids, sequential and concurrent, within one interval.
        for i in 0..50 {
            let r = call(Method::GET, "/v1/conversations")
                .bearer(&rs256(&format!("made-up-{i}"), &ok))
                .send(&env.app)
                .await;
            assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        let flood = (0..50).map(|i| {
            call(Method::GET, "/v1/conversations")
                .bearer(&rs256(&format!("concurrent-{i}"), &ok))
                .send(&env.app)
        });
        for r in futures::future::join_all(flood).await {
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(
            server.hits.load(Ordering::SeqCst),
            1,
            "unknown kids within the interval never refetch"
        );

        // Rotation: k1 is retired, k2 (another RSA key) takes its place.
        *server.doc.lock().expect("doc") = jwks_doc(&[("k2", RSA2_JWK)]);
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&rs256_second_key("k2", &ok))
            .send(&env.app)
            .await;
        assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(
            server.hits.load(Ordering::SeqCst),
            1,
            "still within the interval"
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&rs256_second_key("k2", &ok))
            .send(&env.app)
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "the new key after one refetch: {}",
            r.raw
        );
        assert_eq!(server.hits.load(Ordering::SeqCst), 2);
        for token in [rs256("k1", &ok), eddsa("e1", &ok)] {
            let r = call(Method::GET, "/v1/conversations")
                .bearer(&token)
                .send(&env.app)
                .await;
            assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        // A JWKS entry cannot widen its algorithm: HS256 "signed" with k2's public JWK is refused.
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&sign(
                Algorithm::HS256,
                Some("k2"),
                &EncodingKey::from_secret(RSA2_JWK.as_bytes()),
                &ok,
            ))
            .send(&env.app)
            .await;
        assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
    })
    .await;
}

#[tokio::test]
async fn s1_a_jwks_file_is_reread_when_older_than_its_maximum_age() {
    bounded(async {
        let dir = std::env::temp_dir().join(nura_testkit::unique_name("jwks"));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks_doc(&[("e1", ED_JWK)]).to_string()).expect("write");
        let mut c = config();
        c.jwt_public_keys = vec![];
        c.jwks = Some(JwksSource::File(path.clone()));
        c.jwks_refresh_interval = Duration::from_secs(1);
        c.jwks_max_age = Duration::from_secs(1);
        let env = env_with(c, vec![]).await;
        let token = eddsa("e1", &claims(json!({})));
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&token)
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
        // The key is removed without a replacement: no unknown kid will ever trigger a refetch,
        // so only the maximum age retires it.
        std::fs::write(&path, jwks_doc(&[]).to_string()).expect("write");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&token)
            .send(&env.app)
            .await;
        assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

/// A token for tenant `acme` with exactly `roles`.
fn with_roles(roles: &[Role]) -> String {
    hs256_token("acme", "alice", roles)
}

#[tokio::test]
async fn every_v1_route_is_in_the_role_table_and_an_unlisted_route_is_refused_to_everyone() {
    bounded(async {
        async fn leak() -> &'static str {
            "secret data"
        }
        let extra = Router::new().route("/v1/unlisted", axum::routing::get(leak));
        let db_for_admin = TestDb::new().await;
        let admin_store = nura_store::EventStore::connect(db_for_admin.pool.clone())
            .await
            .expect("store");
        let env = env_with(
            config(),
            vec![extra, nura_projections::admin_router(admin_store)],
        )
        .await;
        let all = [Role::Admin, Role::Member, Role::Viewer, Role::Service];
        let id = uuid::Uuid::now_v7();
        for rule in ROUTE_ROLES {
            let uri = rule
                .path
                .replace("{id}", &id.to_string())
                .replace("{stream_id}", &format!("conversation-{id}"));
            let send = |token: Option<String>| {
                let mut c = call(rule.method.clone(), uri.clone());
                if let Some(t) = token {
                    c = c.bearer(&t);
                }
                if rule.method == Method::POST {
                    c = c.json(&json!({}));
                }
                c.send(&env.app)
            };
            let r = send(None).await;
            assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
            for role in all {
                let r = send(Some(with_roles(&[role]))).await;
                let allowed = role == Role::Admin || rule.roles.contains(&role);
                if allowed {
                    assert!(
                        r.status != StatusCode::FORBIDDEN
                            && r.status != StatusCode::UNAUTHORIZED
                            && r.status != StatusCode::METHOD_NOT_ALLOWED
                            && r.body["error"]["message"] != "no such route"
                            && r.body["error"]["message"] != "route not found"
                            && !r.status.is_server_error(),
                        "{} {} as {role:?} is served: {} {}",
                        rule.method,
                        rule.path,
                        r.status,
                        r.raw
                    );
                } else {
                    assert_envelope(&r, StatusCode::FORBIDDEN, "forbidden");
                }
            }
        }
        // Served but missing from the table: refused to every role, admin included.
        for role in all {
            let r = call(Method::GET, "/v1/unlisted")
                .bearer(&with_roles(&[role]))
                .send(&env.app)
                .await;
            assert_envelope(&r, StatusCode::FORBIDDEN, "forbidden");
            assert!(!r.raw.contains("secret data"));
        }
        // A listed path with a method the table does not list.
        let r = call(Method::DELETE, "/v1/conversations")
            .bearer(&with_roles(&[Role::Admin]))
            .send(&env.app)
            .await;
        assert_envelope(&r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        assert_eq!(stored_events(&env).await, 0);
        db_for_admin.pool.close().await;
    })
    .await;
}

#[tokio::test]
async fn s8_hostile_bodies_and_parameters_are_4xx_envelopes_never_5xx_and_execute_nothing() {
    bounded(async {
        let env = env_with(config(), vec![]).await;
        let t = with_roles(&[Role::Member]);
        let admin = with_roles(&[Role::Admin]);
        let r = call(Method::POST, "/v1/conversations")
            .bearer(&t)
            .json(&json!({"title": "seed"}))
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.raw);
        let id = r.body["conversation_id"].as_str().expect("id").to_owned();
        let before = stored_events(&env).await;

        let deep = format!(
            "{{\"title\": {}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let bodies: Vec<(&str, &str, Vec<u8>, StatusCode)> = vec![
            (
                "oversized",
                "application/json",
                format!("{{\"title\": \"{}\"}}", "a".repeat(100 * 1024)).into_bytes(),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                "malformed",
                "application/json",
                b"{\"title\": ".to_vec(),
                StatusCode::BAD_REQUEST,
            ),
            (
                "deep",
                "application/json",
                deep.into_bytes(),
                StatusCode::BAD_REQUEST,
            ),
            (
                "not utf-8",
                "application/json",
                vec![0xff, 0xfe, 0x00, 0x7b],
                StatusCode::BAD_REQUEST,
            ),
            (
                "wrong type",
                "text/plain",
                b"{\"title\": \"x\"}".to_vec(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                "mass assignment",
                "application/json",
                br#"{"title": "x", "tenant_id": "other", "actor": "root"}"#.to_vec(),
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (what, ct, body, status) in bodies {
            for uri in [
                "/v1/conversations".to_owned(),
                format!("/v1/conversations/{id}/messages"),
            ] {
                let r = call(Method::POST, uri.clone())
                    .bearer(&t)
                    .raw_body(ct, body.clone())
                    .send(&env.app)
                    .await;
                assert_eq!(r.status, status, "{what} on {uri}: {}", r.raw);
                assert!(r.body["error"]["code"].is_string(), "{what}: {}", r.raw);
            }
        }

        let sql = [
            "'; DROP TABLE es.events; --",
            "active' OR '1'='1",
            "1; SELECT pg_sleep(10)",
            "1 UNION SELECT secret_hash FROM read.api_keys",
        ];
        let mut uris = vec![];
        for s in sql {
            let q = url_encode(s);
            uris.push((format!("/v1/conversations?status={q}"), &t, true));
            uris.push((format!("/v1/conversations?cursor={q}"), &t, true));
            uris.push((format!("/v1/conversations?limit={q}"), &t, true));
            uris.push((format!("/v1/conversations?after={q}"), &t, true));
            uris.push((
                format!("/v1/streams/conversation-{id}/events?after_version={q}"),
                &t,
                true,
            ));
            uris.push((format!("/v1/dead-letters?status={q}"), &admin, false));
            // Not parameters of the endpoint: refused (allow-list), never interpreted.
            uris.push((format!("/v1/conversations?sort={q}&filter={q}"), &t, true));
        }
        for (uri, token, must_be_400) in uris {
            let r = call(Method::GET, uri.clone())
                .bearer(token)
                .send(&env.app)
                .await;
            assert!(!r.status.is_server_error(), "{uri}: {}", r.raw);
            if must_be_400 {
                assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}: {}", r.raw);
                assert!(r.body["error"]["code"].is_string(), "{uri}: {}", r.raw);
            }
        }

        // Huge limits are clamped (or refused), never honoured.
        for limit in ["1000000", "2147483647", "-5", "0"] {
            let r = call(Method::GET, format!("/v1/conversations?limit={limit}"))
                .bearer(&t)
                .send(&env.app)
                .await;
            assert!(
                r.status == StatusCode::OK || r.status == StatusCode::BAD_REQUEST,
                "limit={limit}: {}",
                r.raw
            );
        }
        let r = call(
            Method::GET,
            "/v1/conversations?limit=99999999999999999999999",
        )
        .bearer(&t)
        .send(&env.app)
        .await;
        assert_envelope(
            &r,
            StatusCode::BAD_REQUEST,
            r.body["error"]["code"].as_str().unwrap_or("?"),
        );

        // Nothing was executed: the log and the read tables are intact, nothing new was written.
        assert_eq!(stored_events(&env).await, before);
        let tables: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname IN ('es', 'read')")
                .fetch_one(&env.db.pool)
                .await
                .expect("tables");
        assert!(tables >= 4, "tables still exist: {tables}");
    })
    .await;
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn s8_one_principal_is_limited_from_any_number_of_addresses_with_429_and_retry_after() {
    bounded(async {
        let mut c = config();
        c.rate_limit_per_principal = RateLimit {
            per_sec: 1,
            burst: 5,
        };
        let env = env_with(c, vec![]).await;
        let alice = with_roles(&[Role::Member]);
        let mut statuses = vec![];
        for i in 0..30 {
            let r = call(Method::GET, "/v1/conversations")
                .bearer(&alice)
                .from(&format!("10.0.{}.{}:40000", i / 250, i % 250 + 1))
                .send(&env.app)
                .await;
            assert!(!r.status.is_server_error(), "{}", r.raw);
            if r.status == StatusCode::TOO_MANY_REQUESTS {
                assert_envelope(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
                let retry: u64 = r.headers[header::RETRY_AFTER]
                    .to_str()
                    .expect("ascii")
                    .parse()
                    .expect("seconds");
                assert!(retry >= 1, "Retry-After {retry}");
                assert_eq!(r.body["error"]["details"]["scope"], "principal");
            }
            statuses.push(r.status);
        }
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert!((5..=6).contains(&ok), "only the burst passes: {statuses:?}");
        // Another principal of the same tenant has its own budget; so has an API-key-like user.
        let bob = hs256_token("acme", "bob", &[Role::Member]);
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&bob)
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
        let metrics = metrics_handle().render();
        assert!(
            metrics.contains("nura_http_rate_limited_total{scope=\"principal\"}"),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn s8_one_address_is_limited_before_authentication_and_forwarded_for_is_not_trusted_by_default()
 {
    bounded(async {
        let mut c = config();
        c.rate_limit_per_address = RateLimit {
            per_sec: 1,
            burst: 3,
        };
        let env = env_with(c.clone(), vec![]).await;
        let mut statuses = vec![];
        for i in 0..10 {
            // Rotating X-Forwarded-For does not help without a trusted proxy.
            let r = call(Method::GET, "/v1/conversations")
                .from("192.0.2.7:5000")
                .header("x-forwarded-for", format!("198.51.100.{i}"))
                .send(&env.app)
                .await;
            statuses.push(r.status);
            if r.status == StatusCode::TOO_MANY_REQUESTS {
                assert_envelope(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
                assert!(r.headers.contains_key(header::RETRY_AFTER));
                assert_eq!(r.body["error"]["details"]["scope"], "address");
            } else {
                assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.raw);
            }
        }
        let limited = statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count();
        assert!(limited >= 6, "{statuses:?}");
        // Another address is not affected; nor are requests without connection info (a fixed
        // key, never a 500).
        let r = call(Method::GET, "/healthz")
            .from("192.0.2.8:5000")
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let r = call(Method::GET, "/healthz").send(&env.app).await;
        assert_eq!(r.status, StatusCode::OK);

        // Behind a trusted proxy, the proxy's last X-Forwarded-For entry is the client.
        c.trust_forwarded_for = true;
        let env = env_with(c, vec![]).await;
        for i in 0..10 {
            let r = call(Method::GET, "/healthz")
                .from("10.1.1.1:443")
                .header("x-forwarded-for", format!("203.0.113.9, 198.51.100.{i}"))
                .send(&env.app)
                .await;
            assert_eq!(r.status, StatusCode::OK, "client {i}: {}", r.raw);
        }
    })
    .await;
}

#[tokio::test]
async fn cors_answers_only_configured_origins_and_is_off_by_default() {
    bounded(async {
        let preflight = |origin: &str| {
            call(Method::OPTIONS, "/v1/conversations")
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization,content-type",
                )
        };
        let env = env_with(config(), vec![]).await;
        let r = preflight("https://app.example.com").send(&env.app).await;
        assert!(!r.headers.contains_key("access-control-allow-origin"));

        let mut c = config();
        c.cors.allowed_origins = vec!["https://app.example.com".into()];
        let env = env_with(c, vec![]).await;
        let r = preflight("https://app.example.com").send(&env.app).await;
        assert!(r.status.is_success(), "{}", r.raw);
        assert_eq!(
            r.headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        let methods = r.headers["access-control-allow-methods"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(methods.contains("POST"), "{methods}");
        assert!(!r.headers.contains_key("access-control-allow-credentials"));
        let r = preflight("https://evil.example.net").send(&env.app).await;
        assert!(!r.headers.contains_key("access-control-allow-origin"));
        // An error for an allowed origin is readable by the page (and still an envelope).
        let r = call(Method::GET, "/v1/conversations")
            .header("origin", "https://app.example.com")
            .send(&env.app)
            .await;
        assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(
            r.headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
    })
    .await;
}

/// An active API key for tenant `acme` with `roles`, written straight into the read model (the
/// issuing command and projection are tested elsewhere).
async fn api_key(env: &Env, roles: &[&str]) -> String {
    let key_id = uuid::Uuid::now_v7();
    let key = nura_commands::api_keys::generate_key(key_id);
    sqlx::query(
        "INSERT INTO read.api_keys (key_id, tenant_id, name, roles, secret_hash, status, \
         issued_by, issued_at, version) VALUES ($1, 'acme', 'test', $2, $3, 'active', 'admin', \
         now(), 1)",
    )
    .bind(key_id)
    .bind(roles.iter().map(|r| r.to_string()).collect::<Vec<_>>())
    .bind(&key.secret_hash)
    .execute(&env.db.pool)
    .await
    .expect("insert key");
    key.plaintext
}

#[tokio::test]
async fn api_keys_authenticate_in_either_header_obey_the_role_table_and_are_rate_limited_per_key() {
    bounded(async {
        let mut c = config();
        c.rate_limit_per_principal = RateLimit {
            per_sec: 1,
            burst: 4,
        };
        let env = env_with(c, vec![]).await;
        let reader = api_key(&env, &["viewer"]).await;
        let other = api_key(&env, &["service"]).await;
        let r = call(Method::GET, "/v1/conversations")
            .header("x-api-key", reader.clone())
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
        let r = call(Method::GET, "/v1/conversations")
            .bearer(&reader)
            .send(&env.app)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
        // A viewer key may not write; no key may manage keys.
        let r = call(Method::POST, "/v1/conversations")
            .header("x-api-key", reader.clone())
            .json(&json!({"title": "x"}))
            .send(&env.app)
            .await;
        assert_envelope(&r, StatusCode::FORBIDDEN, "forbidden");
        // Wrong secret, unknown key, both headers at once: 401.
        let wrong = format!("{}A", &reader[..reader.len() - 1]);
        let wrong = if wrong == reader {
            format!("{}B", &reader[..reader.len() - 1])
        } else {
            wrong
        };
        for c in [
            call(Method::GET, "/v1/conversations").header("x-api-key", wrong),
            call(Method::GET, "/v1/conversations")
                .header("x-api-key", "nura_00000000000000000000000000000000_x"),
            call(Method::GET, "/v1/conversations")
                .header("x-api-key", other.clone())
                .bearer(&with_roles(&[Role::Admin])),
        ] {
            let r = c.send(&env.app).await;
            assert_envelope(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        // The per-principal budget follows the key, whatever address it comes from.
        let mut limited = 0;
        for i in 0..12 {
            let r = call(Method::GET, "/v1/conversations")
                .header("x-api-key", reader.clone())
                .from(&format!("10.9.0.{}:1000", i + 1))
                .send(&env.app)
                .await;
            assert!(!r.status.is_server_error(), "{}", r.raw);
            if r.status == StatusCode::TOO_MANY_REQUESTS {
                assert_envelope(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
                assert!(r.headers.contains_key(header::RETRY_AFTER));
                limited += 1;
            }
        }
        assert!(limited >= 6, "{limited} of 12 limited");
        let r = call(Method::GET, "/v1/conversations")
            .header("x-api-key", other)
            .send(&env.app)
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "another key has its own budget: {}",
            r.raw
        );
    })
    .await;
}
