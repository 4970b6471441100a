//! Ownership and checkpoints: one owner per partition, a stale owner never commits a wrong state,
//! and `has_passed` tells readers when their write is visible.

mod common;

use common::*;
use nura_projections::Projection;
use nura_projections::conversations::{self, Conversations};
use nura_store::{CommitToken, Position};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_owner_that_commits_after_the_new_owner_applies_nothing_twice() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let counts = append_traffic(&env.store, 4, 60, "acme").await;
        Publisher::new(&env).publish_new(&env.store).await;
        let partition = partition_heads(&env.store)
            .await
            .into_keys()
            .min()
            .expect("a partition");

        // The "new owner" takes the checkpoint lock first and applies the whole partition.
        let mut newer = env.db.pool.begin().await.expect("begin");
        sqlx::query("INSERT INTO read.checkpoints (projector, partition) VALUES ($1, $2)")
            .bind(conversations::NAME)
            .bind(partition)
            .execute(&mut *newer)
            .await
            .expect("checkpoint row");
        // The stale owner fetches its batch now and blocks on the checkpoint row.
        let mut stale = env
            .workers(&test_config())
            .into_iter()
            .find(|w| w.partition() == partition)
            .expect("worker");
        let stale_step = tokio::spawn(async move { stale.process_batch().await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !stale_step.is_finished(),
            "the stale owner waits for the checkpoint lock"
        );
        let events: Vec<_> = env
            .store
            .read_partition(
                partition,
                Position::ZERO,
                Position {
                    tx: i64::MAX,
                    pos: i64::MAX,
                },
                i64::MAX,
            )
            .await
            .expect("partition");
        for e in &events {
            Conversations.apply(&mut newer, e).await.expect("apply");
        }
        let head = events.last().expect("events").position();
        sqlx::query(
            "UPDATE read.checkpoints SET transaction_id = $3, global_position = $4 \
             WHERE projector = $1 AND partition = $2",
        )
        .bind(conversations::NAME)
        .bind(partition)
        .bind(head.tx)
        .bind(head.pos)
        .execute(&mut *newer)
        .await
        .expect("checkpoint");
        newer.commit().await.expect("commit");

        let outcome = stale_step.await.expect("join").expect("stale step");
        assert!(outcome.fetched > 0);
        assert_eq!(
            outcome.applied, 0,
            "everything was at or below the new checkpoint"
        );
        assert_eq!(outcome.skipped, outcome.fetched);

        // The other partitions catch up normally and the whole model equals the fold.
        let running = spawn_workers(env.workers(&test_config()));
        wait_caught_up(
            &env.store,
            &partition_heads(&env.store).await,
            Duration::from_secs(30),
        )
        .await;
        running.stop().await;
        assert_equals_fold(&env.store, &counts).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_partition_has_exactly_one_owner_among_running_instances() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let tokens: Vec<CancellationToken> = (0..3).map(|_| CancellationToken::new()).collect();
        let tasks: Vec<_> = tokens
            .iter()
            .map(|t| {
                tokio::spawn(nura_projections::run_projection(
                    env.store.clone(),
                    env.js.clone(),
                    env.topology.clone(),
                    test_config(),
                    Arc::new(Conversations),
                    t.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let owners: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&env.db.pool)
        .await
        .expect("locks");
        assert_eq!(owners, i64::from(env.store.partitions()));
        for t in &tokens {
            t.cancel();
        }
        for task in tasks {
            task.await.expect("join").expect("instance");
        }
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn has_passed_is_true_only_once_the_checkpoint_reaches_the_commit_token() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let id = Uuid::now_v7();
        let new = new_event(&started(id, "acme", 0));
        let appended = env
            .store
            .append(
                &nura_domain::conversation::stream_id(id),
                nura_store::ExpectedVersion::Exact(0),
                &[new],
                &meta("acme"),
                None,
            )
            .await
            .expect("append");
        let token = appended.commit;
        let pool = &env.db.pool;
        assert!(
            !nura_projections::has_passed(pool, conversations::NAME, token)
                .await
                .expect("q")
        );
        Publisher::new(&env).publish_new(&env.store).await;
        let running = spawn_workers(env.workers(&test_config()));
        tokio::time::timeout(Duration::from_secs(20), async {
            while !nura_projections::has_passed(pool, conversations::NAME, token)
                .await
                .expect("q")
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("token passed");
        running.stop().await;
        let later = CommitToken {
            position: Position {
                tx: token.position.tx + 1,
                pos: token.position.pos + 1,
            },
            ..token
        };
        assert!(
            !nura_projections::has_passed(pool, conversations::NAME, later)
                .await
                .expect("q")
        );
        assert!(
            !nura_projections::has_passed(pool, "other-projector", token)
                .await
                .expect("q")
        );
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}
