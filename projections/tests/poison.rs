//! P3: a poison event becomes exactly one dead letter after its attempts, parks its own stream
//! only, shows in the metric and the admin list, and a retry applies it once it can be applied.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use nura_http::{Principal, Role};
use nura_projections::admin_router;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use tower::ServiceExt;
use uuid::Uuid;

async fn call(env: &Env, method: &str, uri: &str, who: Option<Principal>) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .expect("request");
    if let Some(p) = who {
        req.extensions_mut().insert(p);
    }
    let res = admin_router(env.store.clone())
        .oneshot(req)
        .await
        .expect("response");
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn principal(tenant: &str, role: Role) -> Principal {
    Principal {
        tenant_id: tenant.into(),
        user_id: "op".into(),
        roles: vec![role],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_is_dead_lettered_once_parks_only_its_stream_and_retry_applies_it() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder");
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        set_poison_trigger(&env, true).await;
        let poisoned = Uuid::now_v7();
        append(&env.store, poisoned, "acme", &[started(poisoned, "acme", 0), posted("hi", 1)]).await;
        append(&env.store, poisoned, "acme", &[posted("poison", 2)]).await;
        let mut counts: HashMap<Uuid, i64> = append_traffic(&env.store, 20, 200, "acme").await;
        append(&env.store, poisoned, "acme", &[posted("after", 3)]).await;
        append(&env.store, poisoned, "acme", &[archived(4)]).await;
        counts.insert(poisoned, 3);
        let mut publisher = Publisher::new(&env);
        let sent = publisher.publish_new(&env.store).await.len();
        let heads = partition_heads(&env.store).await;

        let config = test_config();
        let running = spawn_workers(env.workers(&config));
        wait_caught_up(&env.store, &heads, Duration::from_secs(30)).await;
        let (_, outcome) = running.stop().await;

        let rows: Vec<(i64, String, i32, String)> = sqlx::query_as(
            "SELECT id, error, attempts, status FROM read.dead_letters ORDER BY transaction_id, global_position",
        )
        .fetch_all(&env.db.pool)
        .await
        .expect("dead letters");
        println!(
            "verdict P3: sent={sent} applied={} dead_lettered={} parked={} nacked={} rows={rows:?}",
            outcome.applied, outcome.dead_lettered, outcome.parked, outcome.nacked
        );
        assert_eq!(outcome.dead_lettered, 1, "exactly one dead letter");
        assert_eq!(rows.len(), 3, "the poison event and the two events parked behind it");
        let (first, error, attempts, _) = &rows[0];
        assert!(error.contains("poison message refused"), "{error}");
        assert_eq!(*attempts, config.max_attempts as i32);
        assert!(outcome.nacked >= 2, "retried with backoff before giving up");
        for (_, error, attempts, status) in &rows[1..] {
            assert_eq!(error, &format!("parked behind dead letter {first}"));
            assert_eq!(*attempts, 0);
            assert_eq!(status, "open");
        }
        assert!(
            metrics.render().contains("nura_projector_dead_letters_total"),
            "the dead-letter metric is exported"
        );
        // The poisoned stream stopped before the poison; every other stream is complete.
        let (count, status): (i64, String) = sqlx::query_as(
            "SELECT message_count, status FROM read.conversations WHERE conversation_id = $1",
        )
        .bind(poisoned)
        .fetch_one(&env.db.pool)
        .await
        .expect("poisoned row");
        assert_eq!((count, status.as_str()), (1, "active"));
        let others: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT conversation_id, message_count FROM read.conversations WHERE conversation_id <> $1",
        )
        .bind(poisoned)
        .fetch_all(&env.db.pool)
        .await
        .expect("others");
        assert_eq!(others.len(), 20);
        for (id, n) in others {
            assert_eq!(Some(&n), counts.get(&id));
        }

        // The admin API: admins of the tenant see the open dead letters; others do not.
        let (s, body) = call(&env, "GET", "/v1/dead-letters?status=open&limit=2", Some(principal("acme", Role::Admin))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["items"].as_array().map(Vec::len), Some(2));
        let next = body["next_after"].as_i64().expect("a next page");
        let (_, page2) = call(&env, "GET", &format!("/v1/dead-letters?status=open&after={next}"), Some(principal("acme", Role::Admin))).await;
        assert_eq!(page2["items"].as_array().map(Vec::len), Some(1));
        let (s, body) = call(&env, "GET", "/v1/dead-letters", Some(principal("other", Role::Admin))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["items"].as_array().map(Vec::len), Some(0));
        let (s, _) = call(&env, "GET", "/v1/dead-letters", Some(principal("acme", Role::Member))).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _) = call(&env, "GET", "/v1/dead-letters", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = call(&env, "GET", "/v1/dead-letters?status=bogus", Some(principal("acme", Role::Admin))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let retry = format!("/v1/dead-letters/{first}/retry");
        let (s, _) = call(&env, "POST", &retry, Some(principal("other", Role::Admin))).await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // Still poisonous: 409 with the envelope, nothing resolved.
        let (s, body) = call(&env, "POST", &retry, Some(principal("acme", Role::Admin))).await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(body["error"]["code"], "still_failing");

        set_poison_trigger(&env, false).await;
        let (s, body) = call(&env, "POST", &retry, Some(principal("acme", Role::Admin))).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["resolved"].as_array().map(Vec::len), Some(3));
        let open: i64 = sqlx::query_scalar("SELECT count(*) FROM read.dead_letters WHERE status = 'open'")
            .fetch_one(&env.db.pool)
            .await
            .expect("open");
        assert_eq!(open, 0);
        assert_equals_fold(&env.store, &counts).await;

        // The stream is no longer parked: its next event is applied normally.
        append(&env.store, poisoned, "acme", &[posted("late", 5)]).await;
        publisher.publish_new(&env.store).await;
        let heads = partition_heads(&env.store).await;
        let running = spawn_workers(env.workers(&config));
        wait_caught_up(&env.store, &heads, Duration::from_secs(30)).await;
        let (_, outcome) = running.stop().await;
        assert_eq!((outcome.applied, outcome.parked), (1, 0));
        let count: i64 = sqlx::query_scalar("SELECT message_count FROM read.conversations WHERE conversation_id = $1")
            .bind(poisoned)
            .fetch_one(&env.db.pool)
            .await
            .expect("count");
        // The domain refuses messages to archived conversations; the read model follows the log.
        assert_eq!(count, 4);
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_event_becomes_a_dead_letter_instead_of_being_skipped() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let id = Uuid::now_v7();
        append(&env.store, id, "acme", &[started(id, "acme", 0)]).await;
        env.store
            .append(
                &nura_domain::conversation::stream_id(id),
                nura_store::ExpectedVersion::Any,
                &[nura_store::NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: "MessagePosted".into(),
                    schema_version: 1,
                    payload: serde_json::json!({"garbage": true}),
                }],
                &meta("acme"),
                None,
            )
            .await
            .expect("append");
        let mut publisher = Publisher::new(&env);
        publisher.publish_new(&env.store).await;
        let heads = partition_heads(&env.store).await;
        let running = spawn_workers(env.workers(&test_config()));
        wait_caught_up(&env.store, &heads, Duration::from_secs(30)).await;
        let (_, outcome) = running.stop().await;
        assert_eq!((outcome.applied, outcome.dead_lettered), (1, 1));
        let error: String = sqlx::query_scalar("SELECT error FROM read.dead_letters")
            .fetch_one(&env.db.pool)
            .await
            .expect("dead letter");
        assert!(error.contains("undecodable"), "{error}");
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}
