//! Security through the real binary. S6: the logs of `nura serve` at debug level never contain a
//! bearer token, the JWT secret, an API key or a message's text — not on success, not on
//! rejection. And the production key settings (`JWT_PUBLIC_KEYS`, `JWT_JWKS_FILE`, no
//! `JWT_SECRET`) reach the gateway, while a server with no way to verify tokens refuses to start.

mod common;

use common::{BIN, Serve};
use nura_testkit::{TestDb, unique_name};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio::process::Command;

async fn serve(db: &TestDb, secret: &str) -> Serve {
    serve_with(db, &[("JWT_SECRET", secret.to_owned())]).await
}

async fn serve_with(db: &TestDb, settings: &[(&str, String)]) -> Serve {
    let mut all = vec![
        ("NURA_STREAM", unique_name("S6")),
        ("NURA_SUBJECT_PREFIX", unique_name("s6")),
        // Everything, every crate, at debug.
        ("RUST_LOG", "debug".to_owned()),
    ];
    all.extend(settings.iter().cloned());
    Serve::start(db, &all).await
}

async fn token(secret: &str, role: &str) -> String {
    common::token(secret, "acme", "alice", role).await
}

async fn send(
    client: &reqwest::Client,
    server: &Serve,
    method: reqwest::Method,
    path: &str,
    auth: (&str, &str),
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = client
        .request(method, format!("{}{path}", server.base))
        .header(auth.0, auth.1);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("request");
    let status = res.status();
    let body = res.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn debug_logs_of_a_real_server_hold_no_token_secret_api_key_or_message_text() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let db = TestDb::new().await;
        let secret = format!("s6-secret-{}", uuid::Uuid::new_v4().simple());
        let server = serve(&db, &secret).await;
        let client = reqwest::Client::new();
        let member = token(&secret, "member").await;
        let admin = token(&secret, "admin").await;
        let bearer = |t: &str| ("authorization", format!("Bearer {t}"));
        let text = format!("s6 canary message {}", uuid::Uuid::new_v4().simple());
        let title = format!("s6 canary title {}", uuid::Uuid::new_v4().simple());

        let (b_member, b_admin) = (bearer(&member), bearer(&admin));
        let (s, body) = send(
            &client,
            &server,
            reqwest::Method::POST,
            "/v1/conversations",
            (b_member.0, &b_member.1),
            Some(json!({"title": title})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let id = body["conversation_id"].as_str().expect("id").to_owned();
        let (s, body) = send(
            &client,
            &server,
            reqwest::Method::POST,
            &format!("/v1/conversations/{id}/messages"),
            (b_member.0, &b_member.1),
            Some(json!({"text": text})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");

        // An API key: issued by an admin, then used once the projection knows it.
        let (s, body) = send(
            &client,
            &server,
            reqwest::Method::POST,
            "/v1/api-keys",
            (b_admin.0, &b_admin.1),
            Some(json!({"name": "s6", "roles": ["service"]})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        let api_key = body["api_key"].as_str().expect("api key").to_owned();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (s, body) = send(
                &client,
                &server,
                reqwest::Method::GET,
                &format!("/v1/conversations/{id}"),
                ("x-api-key", &api_key),
                None,
            )
            .await;
            if s == StatusCode::OK && body["messages"].to_string().contains(&text) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the API key never worked: {s} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (s, _) = send(
            &client,
            &server,
            reqwest::Method::GET,
            "/v1/conversations",
            ("authorization", &format!("Bearer {api_key}")),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);

        // Rejected credentials must not be logged either.
        let forged = format!("{member}x");
        let wrong_key = format!("{}{}", &api_key[..api_key.len() - 4], "AAAA");
        for (h, v) in [
            ("authorization", format!("Bearer {forged}")),
            ("x-api-key", wrong_key.clone()),
        ] {
            let (s, _) = send(
                &client,
                &server,
                reqwest::Method::GET,
                "/v1/conversations",
                (h, &v),
                None,
            )
            .await;
            assert_eq!(s, StatusCode::UNAUTHORIZED);
        }
        // Give the relay and projector time to log whatever they log about these events.
        tokio::time::sleep(Duration::from_millis(500)).await;

        let logs = server.logs();
        assert!(logs.contains("DEBUG"), "debug logging was on");
        // `nura_<32 hex>_<43 base64url>`; the secret itself may contain `_`.
        let key_secret = &api_key[api_key.len().saturating_sub(43)..];
        let jwt_signature = member.rsplit('.').next().expect("signature");
        for (what, needle) in [
            ("member token", member.as_str()),
            ("member token signature", jwt_signature),
            ("admin token", admin.as_str()),
            ("forged token", forged.as_str()),
            ("JWT secret", secret.as_str()),
            ("API key", api_key.as_str()),
            ("API key secret", key_secret),
            ("wrong API key", wrong_key.as_str()),
            ("message text", text.as_str()),
            ("conversation title", title.as_str()),
        ] {
            assert!(
                !logs.contains(needle),
                "the {what} reached the logs:\n{}",
                logs.lines()
                    .filter(|l| l.contains(needle))
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        drop(server);
        db.pool.close().await;
    })
    .await
    .expect("test timed out");
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway/tests/fixtures");

fn signed(alg: jsonwebtoken::Algorithm, kid: &str, private_pem: &str) -> String {
    let pem = std::fs::read(format!("{FIXTURES}/{private_pem}")).expect("fixture");
    let key = match alg {
        jsonwebtoken::Algorithm::EdDSA => jsonwebtoken::EncodingKey::from_ed_pem(&pem),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
    }
    .expect("private key");
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.to_owned());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({"iss": "https://idp.test/", "aud": "nura-api", "sub": "alice",
        "tenant": "acme", "roles": ["viewer"], "exp": now + 600});
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

#[tokio::test]
async fn serve_takes_public_keys_and_a_jwks_file_from_its_settings_and_refuses_to_start_without_keys()
 {
    tokio::time::timeout(Duration::from_secs(120), async {
        // No secret, no keys: refuses to start, and says why.
        let out = Command::new(BIN)
            .arg("serve")
            .env_remove("JWT_SECRET")
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .output()
            .await
            .expect("run nura serve");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no way to verify tokens"), "{err}");
        // A key file that is not a public key: refuses to start.
        let out = Command::new(BIN)
            .arg("serve")
            .env_remove("JWT_SECRET")
            .env(
                "JWT_PUBLIC_KEYS",
                format!("k={FIXTURES}/rsa_public.jwk.json"),
            )
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .output()
            .await
            .expect("run nura serve");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not an RSA or Ed25519 public key"), "{err}");

        let db = TestDb::new().await;
        let dir = std::env::temp_dir().join(unique_name("jwks"));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut ed: Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{FIXTURES}/ed25519_public.jwk.json"))
                .expect("fixture"),
        )
        .expect("jwk");
        ed["kid"] = json!("ed-jwks");
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, json!({"keys": [ed]}).to_string()).expect("write");
        let server = serve_with(
            &db,
            &[
                (
                    "JWT_PUBLIC_KEYS",
                    format!("rsa-pem={FIXTURES}/rsa_public.pem"),
                ),
                ("JWT_JWKS_FILE", jwks.display().to_string()),
                ("JWT_ISSUER", "https://idp.test/".into()),
            ],
        )
        .await;
        let client = reqwest::Client::new();
        let get = |token: String| {
            let client = client.clone();
            let url = format!("{}/v1/conversations", server.base);
            async move {
                client
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("request")
                    .status()
            }
        };
        let rs = signed(jsonwebtoken::Algorithm::RS256, "rsa-pem", "rsa_private.pem");
        assert_eq!(get(rs).await, StatusCode::OK);
        let ed = signed(
            jsonwebtoken::Algorithm::EdDSA,
            "ed-jwks",
            "ed25519_private.pem",
        );
        assert_eq!(get(ed).await, StatusCode::OK);
        // Another RSA key under the configured kid, and HS256 (no secret configured): 401.
        let other = signed(
            jsonwebtoken::Algorithm::RS256,
            "rsa-pem",
            "rsa2_private.pem",
        );
        assert_eq!(get(other).await, StatusCode::UNAUTHORIZED);
        let hs = token("any-secret-at-all-0123456789abcdef", "viewer").await;
        assert_eq!(get(hs).await, StatusCode::UNAUTHORIZED);
        drop(server);
        db.pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("test timed out");
}
