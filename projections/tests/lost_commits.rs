//! Projector commits lost after their messages were acked: a cumulative ack over a message
//! another owner held, a read-model database restored from a backup, or a server running with
//! `synchronous_commit = off` that crashed. JetStream counts those messages as acked and will not
//! deliver them again; with no later event on the partition to reveal the gap through its
//! `Nura-Prev` link, the worker that takes the partition finds its checkpoint behind the
//! stream's last message and refills the events from Postgres.

mod common;

use common::*;
use std::time::Duration;

/// Undoes every projector commit of `partitions`, as a restore from an older backup would: the
/// read-model rows of their streams and every projection's checkpoint of them are gone, while
/// JetStream keeps their messages acked.
async fn undo_commits(env: &Env, partitions: &[i32]) {
    let streams = "SELECT DISTINCT stream_id FROM es.events WHERE partition = ANY($1)";
    for sql in [
        format!(
            "DELETE FROM read.messages WHERE conversation_id IN \
             (SELECT conversation_id FROM read.conversations WHERE stream_id IN ({streams}))"
        ),
        format!("DELETE FROM read.conversations WHERE stream_id IN ({streams})"),
        "DELETE FROM read.checkpoints WHERE partition = ANY($1)".to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(partitions)
            .execute(&env.db.pool)
            .await
            .expect("undo commits");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commits_lost_after_their_messages_were_acked_are_refilled_without_a_later_event() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let counts = append_traffic(&env.store, 12, 150, "acme").await;
        let mut publisher = Publisher::new(&env);
        publisher.publish_new(&env.store).await;
        let heads = partition_heads(&env.store).await;
        let config = test_config();
        let running = spawn_workers(env.group_workers(&config));
        wait_caught_up(&env.store, &heads, Duration::from_secs(30)).await;
        let (_, first) = running.stop().await;
        assert_eq!(first.fetched, 150, "{first:?}");
        assert_equals_fold(&env.store, &counts).await;

        // Every commit of two partitions is undone; their messages stay acked.
        let mut lost: Vec<i32> = heads.keys().copied().collect();
        lost.sort_unstable();
        lost.truncate(2);
        let in_lost: i64 =
            sqlx::query_scalar("SELECT count(*) FROM es.events WHERE partition = ANY($1)")
                .bind(&lost)
                .fetch_one(&env.db.pool)
                .await
                .expect("count");
        assert!(in_lost > 0);
        undo_commits(&env, &lost).await;
        assert!(!caught_up(&env.store, &heads).await);

        // Nothing is appended or published again: new owners catch up from Postgres alone.
        let running = spawn_workers(env.group_workers(&config));
        wait_caught_up(&env.store, &heads, Duration::from_secs(30)).await;
        wait_projector_caught_up(
            &env.store,
            nura_projections::api_keys::NAME,
            &heads,
            Duration::from_secs(30),
        )
        .await;
        let (_, second) = running.stop().await;
        assert_eq!(
            second.fetched, 0,
            "no message was delivered again: {second:?}"
        );
        // Both projections of the group applied each event of the lost partitions once.
        assert_eq!(second.applied as i64, 2 * in_lost, "{second:?}");
        assert_equals_fold(&env.store, &counts).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

/// An event that keeps failing inside such a gap is retried at each idle step, counting as
/// deliveries, and dead-lettered after its attempts like a delivered one: never retried forever,
/// never skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_event_in_a_refilled_gap_is_dead_lettered_after_its_attempts() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let poisoned = uuid::Uuid::now_v7();
        append(
            &env.store,
            poisoned,
            "acme",
            &[started(poisoned, "acme", 0), posted("hi", 1)],
        )
        .await;
        append(&env.store, poisoned, "acme", &[posted("poison", 2)]).await;
        append_traffic(&env.store, 6, 40, "acme").await;
        let mut publisher = Publisher::new(&env);
        publisher.publish_new(&env.store).await;
        let heads = partition_heads(&env.store).await;
        let config = test_config();
        let running = spawn_workers(env.workers(&config));
        wait_caught_up(&env.store, &heads, Duration::from_secs(30)).await;
        running.stop().await;

        // The poisoned stream's partition loses every commit; then its poison event fails.
        let partition: i32 =
            sqlx::query_scalar("SELECT DISTINCT partition FROM es.events WHERE stream_id = $1")
                .bind(format!("conversation-{poisoned}"))
                .fetch_one(&env.db.pool)
                .await
                .expect("partition");
        undo_commits(&env, &[partition]).await;
        set_poison_trigger(&env, true).await;

        let running = spawn_workers(env.workers(&config));
        wait_caught_up(&env.store, &heads, Duration::from_secs(30)).await;
        let (_, outcome) = running.stop().await;
        assert_eq!(outcome.fetched, 0, "{outcome:?}");
        assert_eq!(outcome.dead_lettered, 1, "{outcome:?}");
        let rows: Vec<(i32, String)> =
            sqlx::query_as("SELECT attempts, status FROM read.dead_letters WHERE stream_id = $1")
                .bind(format!("conversation-{poisoned}"))
                .fetch_all(&env.db.pool)
                .await
                .expect("dead letters");
        assert_eq!(rows, [(config.max_attempts as i32, "open".to_owned())]);
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}
