//! `ReadYourWrites::wait_for` against a real database: it waits for the checkpoint of the
//! token's partition, wakes at once on a checkpoint posted in the process, learns of checkpoints
//! committed elsewhere from `read.checkpoints`, and gives up with 504 after its bound.

use axum::http::StatusCode;
use nura_query_api::{PROJECTOR, ReadYourWrites};
use nura_store::{CheckpointBoard, CommitToken, Position};
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

/// A request waiting up to 10 s for `TOKEN`.
fn spawn_wait(ryw: &ReadYourWrites) -> tokio::task::JoinHandle<Result<(), nura_http::ApiError>> {
    let ryw = ryw.clone();
    tokio::spawn(async move {
        ryw.wait_for(PROJECTOR, TOKEN, Duration::from_secs(10))
            .await
    })
}

#[tokio::test]
async fn a_read_waits_until_the_checkpoint_of_its_partition_passes_the_token() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let db = TestDb::new().await;
        let ryw = ReadYourWrites::start(db.pool.clone(), CheckpointBoard::default());
        // Behind in this partition, ahead in another: not enough.
        checkpoint(&db, 3, 1000, 49).await;
        checkpoint(&db, 4, 5000, 900).await;
        let started = Instant::now();
        let err = ryw
            .wait_for(PROJECTOR, TOKEN, Duration::from_millis(300))
            .await
            .expect_err("must time out");
        assert_eq!(err.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(err.code, "not_caught_up");
        assert_eq!(err.retry_after, Some(1));
        assert!(started.elapsed() >= Duration::from_millis(250));
        // Another projector's checkpoint does not count.
        sqlx::query(
            "INSERT INTO read.checkpoints (projector, partition, transaction_id, global_position) \
             VALUES ('api_keys', 3, 9000, 1)",
        )
        .execute(&db.pool)
        .await
        .expect("other projector");
        let err = ryw
            .wait_for(PROJECTOR, TOKEN, Duration::from_millis(100))
            .await
            .expect_err("another projector's checkpoint");
        assert_eq!(err.code, "not_caught_up");

        // Committed by a projector of another process: the poll of the table finds it. A later
        // transaction with a lower position is past the token (commit order).
        let waiter = spawn_wait(&ryw);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        checkpoint(&db, 3, 1001, 7).await;
        waiter.await.expect("join").expect("caught up");
        // Once seen, a later read of the same token does not wait.
        ryw.wait_for(PROJECTOR, TOKEN, Duration::ZERO)
            .await
            .expect("already passed");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_checkpoint_posted_in_the_process_wakes_the_waiter_without_the_table() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let db = TestDb::new().await;
        let board = CheckpointBoard::default();
        let ryw = ReadYourWrites::start(db.pool.clone(), board.clone());
        let waiter = spawn_wait(&ryw);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished());
        // The table never shows it: only the post can end the wait.
        board.post(PROJECTOR, 3, Position { tx: 1000, pos: 50 });
        waiter.await.expect("join").expect("caught up");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM read.checkpoints")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(rows, 0);
    })
    .await
    .expect("test timed out");
}
