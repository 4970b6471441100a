//! Projections that share one consumer per partition (how `run` runs `conversations` and
//! `api_keys`): each event is delivered once for both, a nak from one brings the batch back
//! without the other applying it twice, and a new shared consumer takes over from the
//! projections' own consumers where they left off.

mod common;

use async_nats::jetstream::consumer::DeliverPolicy;
use common::*;
use nura_projections::api_keys::{self, ApiKeys};
use nura_projections::{GROUP, PartitionWorker, conversations};
use nura_testkit::TestDb;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Issues `n` API keys in `tenant` and revokes every third one.
async fn key_traffic(env: &Env, n: usize, tenant: &str) {
    for i in 0..n {
        let k = Uuid::now_v7();
        append_key(&env.store, k, tenant, &issued(k, tenant)).await;
        if i % 3 == 0 {
            append_key(&env.store, k, tenant, &revoked()).await;
        }
    }
}

/// Asserts that `read.api_keys` equals a replay of every key stream into empty tables.
async fn assert_api_keys_are_the_replay(env: &Env) {
    let clean = TestDb::new().await;
    apply_all(&env.store, &clean.pool).await.expect("replay");
    assert_eq!(
        api_keys::dump(env.store.pool()).await.expect("dump"),
        api_keys::dump(&clean.pool).await.expect("dump"),
        "read.api_keys differs from the replay"
    );
}

/// Waits until both projections of the group reached every partition's head.
async fn wait_group_caught_up(env: &Env) {
    let heads = partition_heads(&env.store).await;
    for projector in [conversations::NAME, api_keys::NAME] {
        wait_projector_caught_up(&env.store, projector, &heads, Duration::from_secs(60)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_consumer_delivers_each_event_once_and_both_read_models_equal_their_replays() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut counts = append_traffic(&env.store, 30, 900, "acme").await;
        key_traffic(&env, 12, "acme").await;
        counts.extend(append_traffic(&env.store, 10, 200, "acme").await);
        let total = total_events(&env.store).await as usize;
        Publisher::new(&env).publish_new(&env.store).await;

        let running = spawn_workers(env.group_workers(&test_config()));
        wait_group_caught_up(&env).await;
        let (_, outcome) = running.stop().await;
        println!(
            "verdict group: stored={total} delivered={} applied={} (two projections) skipped={}",
            outcome.fetched, outcome.applied, outcome.skipped
        );
        assert_eq!(outcome.fetched, total, "each event delivered once for both");
        assert_eq!(
            outcome.applied,
            2 * total,
            "each projection applied each event once"
        );
        assert_eq!(outcome.skipped, 0);

        let mut stream = env.topology.ensure_stream(&env.js).await.expect("stream");
        let consumers = stream.info().await.expect("info").state.consumer_count;
        assert_eq!(
            consumers,
            env.store.partitions() as usize,
            "one consumer per partition"
        );
        for p in 0..env.store.partitions() {
            assert!(stream.consumer_info(format!("{GROUP}_p{p}")).await.is_ok());
        }
        assert_equals_fold(&env.store, &counts).await;
        assert_api_keys_are_the_replay(&env).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_event_of_one_projection_is_retried_and_dead_lettered_while_the_other_applies_its_batch_once()
 {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        set_poison_trigger(&env, true).await;
        let poisoned = Uuid::now_v7();
        append(&env.store, poisoned, "acme", &[started(poisoned, "acme", 0)]).await;
        append(&env.store, poisoned, "acme", &[posted("poison", 1)]).await;
        key_traffic(&env, 24, "acme").await;
        let counts = append_traffic(&env.store, 10, 120, "acme").await;
        Publisher::new(&env).publish_new(&env.store).await;

        let config = test_config();
        let running = spawn_workers(env.group_workers(&config));
        wait_group_caught_up(&env).await;
        let (_, outcome) = running.stop().await;
        println!(
            "verdict group poison: applied={} skipped={} nacked={} dead_lettered={}",
            outcome.applied, outcome.skipped, outcome.nacked, outcome.dead_lettered
        );
        let dead: Vec<(String, i32)> =
            sqlx::query_as("SELECT projector, attempts FROM read.dead_letters ORDER BY id")
                .fetch_all(&env.db.pool)
                .await
                .expect("dead letters");
        // Only a delivery per attempt counts one: had the other projection's ack won, the
        // failing event would have come back fewer times (or never).
        assert_eq!(
            dead,
            vec![(conversations::NAME.to_string(), config.max_attempts as i32)],
            "one dead letter, of the failing projection, after all its attempts"
        );
        assert!(outcome.nacked > 0, "the failing projection's naks won");
        assert!(
            outcome.skipped > 0,
            "the redelivered batch was skipped by the projection that had committed it"
        );
        assert_api_keys_are_the_replay(&env).await;
        set_poison_trigger(&env, false).await;
        // Every other conversation is complete.
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT conversation_id, message_count FROM read.conversations WHERE conversation_id <> $1",
        )
        .bind(poisoned)
        .fetch_all(&env.db.pool)
        .await
        .expect("counts");
        assert_eq!(rows.into_iter().collect::<HashMap<_, _>>(), counts);
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_shared_consumer_starts_after_what_the_projections_own_consumers_acknowledged() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let mut publisher = Publisher::new(&env);
        let mut counts = append_traffic(&env.store, 20, 400, "acme").await;
        key_traffic(&env, 9, "acme").await;
        publisher.publish_new(&env.store).await;

        // Before projections shared consumers: each ran on consumers of its own.
        let config = test_config();
        let mut own = env.workers(&config);
        own.extend((0..env.store.partitions()).map(|p| {
            PartitionWorker::new(
                env.store.clone(),
                env.js.clone(),
                env.topology.clone(),
                config.clone(),
                Arc::new(ApiKeys),
                p,
            )
        }));
        let running = spawn_workers(own);
        wait_group_caught_up(&env).await;
        running.stop().await;
        let stream = env.topology.ensure_stream(&env.js).await.expect("stream");
        // The last acks travel after the commits: wait until both consumers have them.
        let mut floors = HashMap::new();
        for p in 0..env.store.partitions() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let floor = loop {
                let mut floor = u64::MAX;
                let mut settled = true;
                for projector in [conversations::NAME, api_keys::NAME] {
                    let info = stream
                        .consumer_info(format!("{projector}_p{p}"))
                        .await
                        .expect("own consumer");
                    settled &= info.num_ack_pending == 0 && info.num_pending == 0;
                    floor = floor.min(info.ack_floor.stream_sequence);
                }
                if settled {
                    break floor;
                }
                assert!(tokio::time::Instant::now() < deadline, "acks never settled");
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            floors.insert(p, floor);
        }

        counts.extend(append_traffic(&env.store, 10, 150, "acme").await);
        key_traffic(&env, 3, "acme").await;
        let later = publisher.publish_new(&env.store).await.len();

        let running = spawn_workers(env.group_workers(&config));
        wait_group_caught_up(&env).await;
        let (_, outcome) = running.stop().await;
        println!(
            "verdict group takeover: later={later} delivered={} skipped={}",
            outcome.fetched, outcome.skipped
        );
        for (p, floor) in floors {
            let info = stream
                .consumer_info(format!("{GROUP}_p{p}"))
                .await
                .expect("shared consumer");
            // A partition that had no messages yet has nothing to start after.
            let expected = if floor == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: floor + 1,
                }
            };
            assert_eq!(info.config.deliver_policy, expected, "partition {p}");
        }
        assert_eq!(outcome.fetched, later, "only what came after was delivered");
        assert_equals_fold(&env.store, &counts).await;
        assert_api_keys_are_the_replay(&env).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}
