//! `wait_for` against a real database: it waits for the checkpoint of the token's partition and
//! gives up with 504 after its bound.

use axum::http::StatusCode;
use nura_query_api::{PROJECTOR, wait_for};
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

#[tokio::test]
async fn a_read_waits_until_the_checkpoint_of_its_partition_passes_the_token() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let db = TestDb::new().await;
        let token = CommitToken {
            position: Position { tx: 1000, pos: 50 },
            partition: 3,
        };
        // Behind in this partition, ahead in another: not enough.
        checkpoint(&db, 3, 1000, 49).await;
        checkpoint(&db, 4, 5000, 900).await;
        let started = Instant::now();
        let err = wait_for(&db.pool, PROJECTOR, token, Duration::from_millis(300))
            .await
            .expect_err("must time out");
        assert_eq!(err.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(err.code, "not_caught_up");
        assert_eq!(err.retry_after, Some(1));
        assert!(started.elapsed() >= Duration::from_millis(250));

        // A later transaction with a lower position is past the token (commit order).
        let pool = db.pool.clone();
        let waiter = tokio::spawn(async move {
            wait_for(&pool, PROJECTOR, token, Duration::from_secs(10)).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        checkpoint(&db, 3, 1001, 7).await;
        waiter.await.expect("join").expect("caught up");
    })
    .await
    .expect("test timed out");
}
