//! `Checkpoints::wait_for` against a real database: it waits for the checkpoint of the token's
//! partition, wakes on the checkpoint trigger's notification, survives the loss of its listener,
//! and gives up with 504 after its bound.

use axum::http::StatusCode;
use nura_query_api::{Checkpoints, PROJECTOR};
use nura_store::{CommitToken, Position};
use nura_testkit::TestDb;
use std::time::{Duration, Instant};

async fn checkpoint(db: &TestDb, partition: i32, tx: i64, pos: i64) {
    sqlx::query(
        "INSERT INTO read.checkpoints (projector, partition, transaction_id, global_position) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (projector, partition) DO UPDATE \
         SET transaction_id = $3, global_position = $4",
    )
    .bind(PROJECTOR)
    .bind(partition)
    .bind(tx)
    .bind(pos)
    .execute(&db.pool)
    .await
    .expect("checkpoint");
}

const TOKEN: CommitToken = CommitToken {
    position: Position { tx: 1000, pos: 50 },
    partition: 3,
};

#[tokio::test]
async fn a_read_waits_until_the_checkpoint_of_its_partition_passes_the_token() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let db = TestDb::new().await;
        let checkpoints = Checkpoints::start(db.pool.clone());
        // Behind in this partition, ahead in another: not enough.
        checkpoint(&db, 3, 1000, 49).await;
        checkpoint(&db, 4, 5000, 900).await;
        let started = Instant::now();
        let err = checkpoints
            .wait_for(PROJECTOR, TOKEN, Duration::from_millis(300))
            .await
            .expect_err("must time out");
        assert_eq!(err.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(err.code, "not_caught_up");
        assert_eq!(err.retry_after, Some(1));
        assert!(started.elapsed() >= Duration::from_millis(250));
        // Another projector past the token does not count either.
        let other = checkpoints.clone();
        let err = other
            .wait_for("api_keys", TOKEN, Duration::from_millis(100))
            .await
            .expect_err("another projector's checkpoint");
        assert_eq!(err.code, "not_caught_up");

        // A later transaction with a lower position is past the token (commit order). While the
        // listener is up nobody polls: only the trigger's notification can wake the waiter
        // before the listener's 30 s reload, well after this wait's 10 s bound.
        let waiter = tokio::spawn({
            let checkpoints = checkpoints.clone();
            async move {
                checkpoints
                    .wait_for(PROJECTOR, TOKEN, Duration::from_secs(10))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished());
        checkpoint(&db, 3, 1001, 7).await;
        waiter.await.expect("join").expect("caught up");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_checkpoint_moved_while_the_listener_was_down_is_still_seen() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let db = TestDb::new().await;
        let checkpoints = Checkpoints::start(db.pool.clone());
        checkpoint(&db, 3, 1000, 49).await;
        checkpoints
            .wait_for(PROJECTOR, TOKEN, Duration::from_millis(200))
            .await
            .expect_err("behind");
        let waiter = tokio::spawn({
            let checkpoints = checkpoints.clone();
            async move {
                checkpoints
                    .wait_for(PROJECTOR, TOKEN, Duration::from_secs(10))
                    .await
            }
        });
        // Kill the listener's connection, then move the checkpoint at once: its notification
        // goes to nobody. The waiter must still see it (fallback poll, then the reload).
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("terminate listener");
        assert_eq!(killed, 1, "one listener connection");
        checkpoint(&db, 3, 1000, 50).await;
        waiter.await.expect("join").expect("caught up");
        // The listener comes back, and a later move is still seen.
        let later = CommitToken {
            position: Position { tx: 2000, pos: 1 },
            partition: 3,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let listening: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
            )
            .fetch_one(&db.pool)
            .await
            .expect("activity");
            if listening == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the listener did not reconnect");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let waiter = tokio::spawn({
            let checkpoints = checkpoints.clone();
            async move {
                checkpoints
                    .wait_for(PROJECTOR, later, Duration::from_secs(10))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        checkpoint(&db, 3, 2000, 1).await;
        waiter
            .await
            .expect("join")
            .expect("caught up after reconnect");
    })
    .await
    .expect("test timed out");
}
