//! End to end through the real binary: `nura serve` on a fresh database, its own JetStream stream
//! and a free port; commands over HTTP, reads that wait for the projection with `?after=`, the
//! audit history with metadata from the token, and 4xx envelopes for bad input.

mod common;

use common::Serve;
use nura_testkit::TestDb;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// The server and the secret its tokens are signed with.
struct Server {
    serve: Serve,
    secret: String,
}

async fn serve(db: &TestDb) -> Server {
    let secret =
        uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
    let serve = Serve::start(
        db,
        &[
            ("JWT_SECRET", secret.clone()),
            ("READ_YOUR_WRITES_TIMEOUT_MS", "20000".into()),
            ("DATABASE_MAX_CONNECTIONS", "32".into()),
            // Debug logs from our crates, so the check that no token reaches the logs means
            // something.
            (
                "RUST_LOG",
                "debug,hyper=info,hyper_util=info,h2=info,async_nats=info,sqlx=warn".into(),
            ),
        ],
    )
    .await;
    Server { serve, secret }
}

async fn token(server: &Server, tenant: &str, user: &str, role: &str) -> String {
    common::token(&server.secret, tenant, user, role).await
}

struct Reply {
    status: StatusCode,
    request_id: String,
    body: Value,
}

async fn call(
    client: &reqwest::Client,
    server: &Server,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let mut req = client.request(method, format!("{}{path}", server.serve.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("request");
    let status = res.status();
    let request_id = res
        .headers()
        .get("x-request-id")
        .expect("every response has a request id")
        .to_str()
        .expect("ascii")
        .to_owned();
    let body = res.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        request_id,
        body,
    }
}

#[track_caller]
fn assert_client_error(r: &Reply, status: StatusCode) {
    assert_eq!(r.status, status, "{}", r.body);
    assert!(r.body["error"]["code"].is_string(), "{}", r.body);
    assert_eq!(r.body["error"]["request_id"], r.request_id.as_str());
}

#[tokio::test]
async fn a_conversation_round_trips_through_the_real_binary() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let db = TestDb::new().await;
        let server = serve(&db).await;
        let client = reqwest::Client::new();
        let alice = token(&server, "acme", "alice", "member").await;
        let post = reqwest::Method::POST;
        let get = reqwest::Method::GET;

        let mut request_ids = vec![];
        let r = call(
            &client,
            &server,
            post.clone(),
            "/v1/conversations",
            Some(&alice),
            Some(json!({"title": "Launch"})),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        request_ids.push(r.request_id.clone());
        let id = r.body["conversation_id"].as_str().expect("id").to_owned();
        for text in ["one", "two", "three"] {
            let r = call(
                &client,
                &server,
                post.clone(),
                &format!("/v1/conversations/{id}/messages"),
                Some(&alice),
                Some(json!({"text": text})),
            )
            .await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
            request_ids.push(r.request_id.clone());
        }
        let r = call(
            &client,
            &server,
            post.clone(),
            &format!("/v1/conversations/{id}/archive"),
            Some(&alice),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        request_ids.push(r.request_id.clone());
        let commit = r.body["commit"].as_str().expect("commit").to_owned();

        // Read-your-writes: the projection has caught up with the archive when this answers.
        let r = call(
            &client,
            &server,
            get.clone(),
            &format!("/v1/conversations/{id}?after={commit}"),
            Some(&alice),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["status"], "archived");
        assert_eq!(r.body["message_count"], 3);
        assert_eq!(r.body["version"], 5);
        let texts: Vec<_> = r.body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["text"].clone())
            .collect();
        assert_eq!(texts, [json!("one"), json!("two"), json!("three")]);

        // The audit history: five events whose metadata came from the token and the request ids.
        let r = call(
            &client,
            &server,
            get.clone(),
            &format!("/v1/streams/conversation-{id}/events"),
            Some(&alice),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let events = r.body["events"].as_array().expect("events");
        assert_eq!(events.len(), 5);
        for (e, rid) in events.iter().zip(&request_ids) {
            assert_eq!(e["metadata"]["tenant_id"], "acme");
            assert_eq!(e["metadata"]["actor"], "alice");
            assert_eq!(e["metadata"]["correlation_id"], rid.as_str());
        }
        assert_eq!(events[4]["commit"], commit.as_str());

        // Bad input: 4xx envelopes, never 5xx.
        let bad = [
            (
                post.clone(),
                "/v1/conversations".to_owned(),
                Some(json!({"title": "x", "tenant_id": "evil"})),
                StatusCode::BAD_REQUEST,
            ),
            (
                post.clone(),
                "/v1/conversations".to_owned(),
                Some(json!({"title": ""})),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                post.clone(),
                format!("/v1/conversations/{id}/messages"),
                Some(json!({"text": "late"})),
                StatusCode::CONFLICT,
            ),
            (
                post.clone(),
                "/v1/conversations/nope/messages".to_owned(),
                Some(json!({"text": "x"})),
                StatusCode::NOT_FOUND,
            ),
            (
                get.clone(),
                "/v1/conversations?status=weird".to_owned(),
                None,
                StatusCode::BAD_REQUEST,
            ),
            (
                get.clone(),
                "/v1/conversations?after=garbage".to_owned(),
                None,
                StatusCode::BAD_REQUEST,
            ),
            (
                get.clone(),
                "/v1/nothing-here".to_owned(),
                None,
                StatusCode::NOT_FOUND,
            ),
        ];
        for (method, path, body, status) in bad {
            let r = call(&client, &server, method, &path, Some(&alice), body).await;
            assert_client_error(&r, status);
        }
        let r = call(
            &client,
            &server,
            get.clone(),
            "/v1/conversations",
            None,
            None,
        )
        .await;
        assert_client_error(&r, StatusCode::UNAUTHORIZED);

        // Another tenant sees nothing.
        let mallory = token(&server, "evil", "mallory", "admin").await;
        for (method, path) in [
            (get.clone(), format!("/v1/conversations/{id}")),
            (get.clone(), format!("/v1/streams/conversation-{id}/events")),
            (post.clone(), format!("/v1/conversations/{id}/archive")),
        ] {
            let r = call(&client, &server, method, &path, Some(&mallory), None).await;
            assert_client_error(&r, StatusCode::NOT_FOUND);
            assert!(!r.body.to_string().contains("Launch"));
        }
        // The commands went through group commit (as GROUP_COMMIT_LANES defaults), not the
        // one-by-one append path.
        let metrics = client
            .get(format!("{}/metrics", server.serve.base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        let grouped: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("nura_store_group_commit_size_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no group commits in /metrics:\n{metrics}"));
        assert!(grouped >= 5.0, "{grouped} group commits for 5 commands");

        // S6: neither the tokens nor the signing secret ever reach the logs.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let logs = server.serve.logs();
        assert!(!logs.is_empty(), "the server logged nothing");
        for (what, secret) in [
            ("alice's token", &alice),
            ("mallory's token", &mallory),
            ("the JWT secret", &server.secret),
        ] {
            assert!(
                !logs.contains(secret.as_str()),
                "{what} appears in the logs"
            );
            // A token's signature alone is as sensitive as the token.
            if let Some(sig) = secret.rsplit('.').next().filter(|s| s.len() > 20) {
                assert!(
                    !logs.contains(sig),
                    "{what}'s signature appears in the logs"
                );
            }
        }
        println!(
            "verdict: commands=5 stored={} read_model_messages={} log_bytes={} secrets_in_logs=0",
            events.len(),
            texts.len(),
            logs.len()
        );
    })
    .await
    .expect("e2e test timed out");
}

/// Rows read by sequential scans of the tables that grow with use, as the statistics show them
/// (building an index on an empty table counts as a scan, but reads no row).
async fn scans_of_growing_tables(db: &TestDb) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT schemaname || '.' || relname, seq_tup_read FROM pg_stat_user_tables \
         WHERE (schemaname, relname) IN (('es', 'commands'), ('read', 'conversations'), \
           ('read', 'messages')) \
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("table statistics")
}

/// The server plans each statement once per connection, while its tables are still empty, and
/// keeps that plan. Every statement that commands, projectors and reads run against the tables
/// that grow with use must reach them by key whatever the plan: a sequential scan there would
/// read the whole table on every command, batch or read once the table has grown.
#[tokio::test]
async fn the_server_reaches_growing_tables_by_key_with_plans_made_on_empty_ones() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let db = TestDb::new().await;
        let before = scans_of_growing_tables(&db).await;
        let server = serve(&db).await;
        let client = reqwest::Client::new();
        let alice = token(&server, "acme", "alice", "member").await;
        let (post, get) = (reqwest::Method::POST, reqwest::Method::GET);
        let mut ids = vec![];
        for round in 0..3 {
            for _ in 0..4 {
                let r = call(
                    &client,
                    &server,
                    post.clone(),
                    "/v1/conversations",
                    Some(&alice),
                    Some(json!({"title": format!("round {round}")})),
                )
                .await;
                assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
                ids.push(r.body["conversation_id"].as_str().expect("id").to_owned());
            }
            for id in &ids {
                let r = call(
                    &client,
                    &server,
                    post.clone(),
                    &format!("/v1/conversations/{id}/messages"),
                    Some(&alice),
                    Some(json!({"text": "hello"})),
                )
                .await;
                assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
                let commit = r.body["commit"].as_str().expect("commit").to_owned();
                let r = call(
                    &client,
                    &server,
                    get.clone(),
                    &format!("/v1/conversations/{id}?after={commit}"),
                    Some(&alice),
                    None,
                )
                .await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            }
            let r = call(
                &client,
                &server,
                get.clone(),
                "/v1/conversations?limit=5",
                Some(&alice),
                None,
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        }
        // A backend reports its statistics when idle or when it exits: stop the server, then
        // wait until the statistics show every message row it wrote.
        let messages: i64 = (1..=3).map(|round| 4 * round).sum();
        drop(server);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let written: i64 = sqlx::query_scalar(
                "SELECT n_tup_ins FROM pg_stat_user_tables \
                 WHERE schemaname = 'read' AND relname = 'messages'",
            )
            .fetch_one(&db.pool)
            .await
            .expect("statistics");
            if written >= messages {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "statistics show {written} of {messages} message rows"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(scans_of_growing_tables(&db).await, before);
    })
    .await
    .expect("test timed out");
}
