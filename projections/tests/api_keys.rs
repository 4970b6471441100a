//! The `api_keys` projection: applied by the real runtime (`run` runs it next to
//! `conversations`), idempotent, equal to a from-scratch replay, and strict about a revocation of an unknown key.

mod common;

use common::{
    Env, Publisher, append, append_key, apply_all, issued, partition_heads, revoked, started,
    test_config,
};
use nura_domain::api_key::stream_id;
use nura_projections::api_keys::{self, ApiKeys};
use nura_projections::{ApplyError, Projection, ProjectorConfig, has_passed};
use nura_store::{CommitToken, EventStore, Position};
use nura_testkit::TestDb;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

async fn row(
    pool: &sqlx::PgPool,
    key_id: Uuid,
) -> Option<(String, String, Vec<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT tenant_id, status, roles, revoked_by FROM read.api_keys WHERE key_id = $1",
    )
    .bind(key_id)
    .fetch_optional(pool)
    .await
    .expect("select")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_run_applies_issued_and_revoked_keys_next_to_conversations() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        append_key(&env.store, a, "acme", &issued(a, "acme")).await;
        let issued_b = append_key(&env.store, b, "evil", &issued(b, "evil")).await;
        let last = append_key(&env.store, a, "acme", &revoked()).await;
        let conversation = Uuid::now_v7();
        append(
            &env.store,
            conversation,
            "acme",
            &[started(conversation, "acme", 3)],
        )
        .await;
        Publisher::new(&env).publish_new(&env.store).await;

        let shutdown = CancellationToken::new();
        let running = tokio::spawn(nura_projections::run(
            env.store.clone(),
            env.js.clone(),
            env.topology.clone(),
            test_config(),
            shutdown.clone(),
        ));
        // A commit token names one partition; `a` and `b` may sit in different ones.
        for token in [last, issued_b] {
            while !has_passed(env.store.pool(), api_keys::NAME, token)
                .await
                .expect("checkpoint")
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(
            row(env.store.pool(), a).await,
            Some((
                "acme".into(),
                "revoked".into(),
                vec!["service".into(), "viewer".into()],
                Some("bob".into())
            ))
        );
        assert_eq!(
            row(env.store.pool(), b).await.map(|r| r.1),
            Some("active".into())
        );
        // The same `run` also drives the conversations projector.
        loop {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM read.conversations")
                .fetch_one(env.store.pool())
                .await
                .expect("count");
            if n == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The runtime's rows equal a replay of every key stream into empty tables.
        let clean = TestDb::new().await;
        apply_all(&env.store, &clean.pool).await.expect("apply");
        assert_eq!(
            api_keys::dump(env.store.pool()).await.expect("dump"),
            api_keys::dump(&clean.pool).await.expect("dump")
        );
        shutdown.cancel();
        running.await.expect("join").expect("run");
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test]
async fn applying_the_log_twice_leaves_the_same_rows_and_keeps_last_used_at() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let db = TestDb::new().await;
        let store = EventStore::connect(db.pool.clone()).await.expect("store");
        let a = Uuid::now_v7();
        append_key(&store, a, "acme", &issued(a, "acme")).await;
        apply_all(&store, &db.pool).await.expect("apply");
        sqlx::query("UPDATE read.api_keys SET last_used_at = now() WHERE key_id = $1")
            .bind(a)
            .execute(&db.pool)
            .await
            .expect("touch");
        append_key(&store, a, "acme", &revoked()).await;
        apply_all(&store, &db.pool).await.expect("apply");
        let once = api_keys::dump(&db.pool).await.expect("dump");
        apply_all(&store, &db.pool).await.expect("apply again");
        assert_eq!(api_keys::dump(&db.pool).await.expect("dump"), once);
        assert_eq!(row(&db.pool, a).await.map(|r| r.1), Some("revoked".into()));
        let used: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT last_used_at FROM read.api_keys WHERE key_id = $1")
                .bind(a)
                .fetch_one(&db.pool)
                .await
                .expect("select");
        assert!(used.is_some(), "the projection never clears last_used_at");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_revocation_of_a_key_the_read_model_never_saw_is_an_error_not_a_silent_skip() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let db = TestDb::new().await;
        let store = EventStore::connect(db.pool.clone()).await.expect("store");
        let a = Uuid::now_v7();
        append_key(&store, a, "acme", &revoked()).await;
        let err = apply_all(&store, &db.pool).await.expect_err("must fail");
        assert!(matches!(err, ApplyError::Inconsistent(_)), "{err:?}");
        assert_eq!(
            nura_projections::projection_named("api_keys").map(|p| p.name()),
            Some("api_keys")
        );
        let _: &dyn Projection = &ApiKeys;
    })
    .await
    .expect("test timed out");
}

/// A batch of only other aggregates' events moves the `api_keys` checkpoint without a
/// transaction, but only when it continues the checkpoint's chain: a key event JetStream lost
/// just before such events is still found (filled from Postgres) and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_key_event_behind_conversation_traffic_is_still_applied() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut publisher = Publisher::new(&env);
        // First only conversations: every partition's checkpoint row exists and moved.
        start_conversations(&env, 40).await;
        let first = publisher.publish_new(&env.store).await;
        drain_api_keys(&env, &first).await;

        // Then a key, and conversation traffic after it in every partition; the key's message
        // is lost, so its partition's next batch does not continue the checkpoint's chain.
        let key = Uuid::now_v7();
        append_key(&env.store, key, "acme", &issued(key, "acme")).await;
        start_conversations(&env, 40).await;
        let published = publisher.publish_new(&env.store).await;
        let lost = published
            .iter()
            .position(|(e, _)| e.stream_id == stream_id(key))
            .expect("key event published");
        let stream = env
            .js
            .get_stream(&env.topology.stream)
            .await
            .expect("stream");
        let seq = (first.len() + lost) as u64 + 1;
        assert!(stream.delete_message(seq).await.expect("delete"));
        drain_api_keys(&env, &published).await;
        assert_eq!(
            row(env.store.pool(), key).await.map(|r| r.1),
            Some("active".into()),
            "the lost key event was skipped"
        );
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

/// Batches of conversation events move the `api_keys` checkpoint in memory and write it only
/// now and then. A worker that dies holding such progress leaves the table's checkpoint behind
/// messages it acked: the next worker finds the chain broken, fills the hole from Postgres and
/// still applies the key event that follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_progress_lost_with_its_worker_is_recovered_by_the_next_one() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut publisher = Publisher::new(&env);
        start_conversations(&env, 40).await;
        let first = publisher.publish_new(&env.store).await;
        drain_api_keys(&env, &first).await;

        // A fetch that waits long: an empty step (a fetch that expired with nothing) would write
        // the progress, as the partition looks idle.
        let patient = ProjectorConfig {
            idle_fetch_wait: Duration::from_secs(20),
            ..test_config()
        };
        let mut workers: Vec<_> = (0..env.store.partitions())
            .map(|p| api_keys_worker(&env, p, &patient))
            .collect();
        for round in 0..2 {
            start_conversations(&env, 40).await;
            let published = publisher.publish_new(&env.store).await;
            for w in &mut workers {
                let mut left = published
                    .iter()
                    .filter(|(e, _)| e.partition == w.partition())
                    .count();
                while left > 0 {
                    let o = w.process_batch().await.expect("step");
                    assert!(
                        o.fetched > 0,
                        "round {round}: partition {} went idle",
                        w.partition()
                    );
                    left -= o.fetched;
                }
            }
        }
        let heads = partition_heads(&env.store).await;
        let behind = {
            let mut n = 0;
            for (p, head) in &heads {
                let token = CommitToken {
                    partition: *p,
                    position: *head,
                };
                if !has_passed(env.store.pool(), api_keys::NAME, token)
                    .await
                    .expect("cp")
                {
                    n += 1;
                }
            }
            n
        };
        assert!(behind > 0, "no partition kept its progress in memory");
        drop(workers); // dies without writing it

        let key = Uuid::now_v7();
        append_key(&env.store, key, "acme", &issued(key, "acme")).await;
        start_conversations(&env, 40).await;
        let published = publisher.publish_new(&env.store).await;
        drain_api_keys(&env, &published).await;
        assert_eq!(
            row(env.store.pool(), key).await.map(|r| r.1),
            Some("active".into()),
            "the key event after the lost progress was not applied"
        );
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

fn api_keys_worker(
    env: &Env,
    partition: i32,
    config: &ProjectorConfig,
) -> nura_projections::PartitionWorker {
    nura_projections::PartitionWorker::new(
        env.store.clone(),
        env.js.clone(),
        env.topology.clone(),
        config.clone(),
        std::sync::Arc::new(ApiKeys),
        partition,
    )
}

/// Starts at least `n` conversations, and more until every partition has one: the tests rely on
/// traffic in every partition (40 random streams leave a given one of 8 partitions without any
/// about once in 200 runs).
async fn start_conversations(env: &Env, n: i64) {
    let partitions = env.store.partitions();
    let mut empty: std::collections::BTreeSet<i32> = (0..partitions).collect();
    let mut i = 0;
    while i < n || !empty.is_empty() {
        let c = Uuid::now_v7();
        empty.remove(&nura_store::partition_of(
            &nura_domain::conversation::stream_id(c),
            partitions,
        ));
        append(&env.store, c, "acme", &[started(c, "acme", i)]).await;
        i += 1;
    }
}

/// Runs `api_keys` workers on every partition until its checkpoints pass every event of
/// `published`.
async fn drain_api_keys(env: &Env, published: &[(nura_store::RecordedEvent, Option<Position>)]) {
    let workers = (0..env.store.partitions())
        .map(|p| api_keys_worker(env, p, &test_config()))
        .collect();
    let running = common::spawn_workers(workers);
    for (e, _) in published {
        while !has_passed(env.store.pool(), api_keys::NAME, e.commit_token())
            .await
            .expect("checkpoint")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    running.stop().await;
}
