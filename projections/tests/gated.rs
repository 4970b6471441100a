//! The gated path: a batch that continues the checkpoint's chain is written with its checkpoint
//! move in one autocommit statement, and that statement writes nothing at all unless the
//! checkpoint is exactly where the batch starts, none of its streams has an open dead letter and
//! every conversation it changes without starting exists. The runtime takes this path for clean
//! traffic and still ends equal to the fold.

mod common;

use common::*;
use nura_projections::conversations::{self, Conversations};
use nura_projections::{Gate, Gated, Projection};
use nura_store::{Position, RecordedEvent};
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

const PARTITION: i32 = 0;

async fn checkpoint(env: &Env) -> Option<Position> {
    sqlx::query_as::<_, (i64, i64)>(
        "SELECT transaction_id, global_position FROM read.checkpoints \
         WHERE projector = $1 AND partition = $2",
    )
    .bind(conversations::NAME)
    .bind(PARTITION)
    .fetch_optional(&env.db.pool)
    .await
    .expect("checkpoint")
    .map(|(tx, pos)| Position { tx, pos })
}

/// The partition's checkpoint row, at zero.
async fn checkpoint_row(env: &Env) {
    sqlx::query("INSERT INTO read.checkpoints (projector, partition) VALUES ($1, $2)")
        .bind(conversations::NAME)
        .bind(PARTITION)
        .execute(&env.db.pool)
        .await
        .expect("checkpoint row");
}

async fn row_counts(env: &Env) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM read.conversations), (SELECT count(*) FROM read.messages)",
    )
    .fetch_one(&env.db.pool)
    .await
    .expect("counts")
}

fn gate(events: &[RecordedEvent], from: Position) -> Gate {
    let mut streams: Vec<String> = events.iter().map(|e| e.stream_id.clone()).collect();
    streams.dedup();
    Gate {
        projector: conversations::NAME,
        partition: PARTITION,
        from,
        to: events.last().expect("events").position(),
        streams,
    }
}

async fn gated(env: &Env, events: &[RecordedEvent], gate: &Gate) -> Gated {
    let mut conn = env.db.pool.acquire().await.expect("conn");
    Conversations
        .apply_batch_gated(&mut conn, events, gate)
        .await
        .expect("the gated statement runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_batch_writes_rows_and_checkpoint_together_or_nothing() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        append(
            &env.store,
            a,
            "acme",
            &[started(a, "acme", 1), posted("a1", 2)],
        )
        .await;
        append(&env.store, b, "acme", &[started(b, "acme", 3)]).await;
        append(&env.store, a, "acme", &[posted("a2", 4), archived(5)]).await;
        let events = log(&env).await;
        assert_eq!(events.len(), 5);
        checkpoint_row(&env).await;

        // The checkpoint is not where the batch's chain starts (a redelivery, another owner).
        let elsewhere = Position { tx: 1, pos: 1 };
        assert_eq!(
            gated(&env, &events, &gate(&events, elsewhere)).await,
            Gated::Refused
        );
        assert_eq!(row_counts(&env).await, (0, 0), "nothing written");
        assert_eq!(checkpoint(&env).await, Some(Position::ZERO));

        // One of the batch's streams has an open dead letter: its events must be parked.
        let dead: i64 = sqlx::query_scalar(
            "INSERT INTO read.dead_letters (projector, event_id, stream_id, tenant_id, partition, \
               transaction_id, global_position, event_type, error, attempts) \
             VALUES ($1, $2, $3, 'acme', $4, 1, 1, 'X', 'test', 5) RETURNING id",
        )
        .bind(conversations::NAME)
        .bind(Uuid::now_v7())
        .bind(&events[2].stream_id)
        .bind(PARTITION)
        .fetch_one(&env.db.pool)
        .await
        .expect("dead letter");
        assert_eq!(
            gated(&env, &events, &gate(&events, Position::ZERO)).await,
            Gated::Refused
        );
        assert_eq!(row_counts(&env).await, (0, 0), "nothing written");
        sqlx::query("UPDATE read.dead_letters SET status = 'resolved' WHERE id = $1")
            .bind(dead)
            .execute(&env.db.pool)
            .await
            .expect("resolve");

        // A message to a conversation whose row does not exist (its start left out).
        let orphan = [events[1].clone()];
        assert_eq!(
            gated(&env, &orphan, &gate(&orphan, Position::ZERO)).await,
            Gated::Refused
        );
        assert_eq!(row_counts(&env).await, (0, 0), "nothing written");
        assert_eq!(checkpoint(&env).await, Some(Position::ZERO));

        // The clean batch: rows and checkpoint, equal to the fold.
        assert_eq!(
            gated(&env, &events, &gate(&events, Position::ZERO)).await,
            Gated::Applied
        );
        assert_eq!(checkpoint(&env).await, Some(events[4].position()));
        assert_read_model_is_the_fold(&env).await;
        // The same batch again is a redelivery: the checkpoint moved, so the gate refuses.
        assert_eq!(
            gated(&env, &events, &gate(&events, Position::ZERO)).await,
            Gated::Refused
        );
        assert_eq!(checkpoint(&env).await, Some(events[4].position()));
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_batch_racing_another_owner_waits_for_its_commit_and_writes_nothing() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let a = Uuid::now_v7();
        append(&env.store, a, "acme", &[started(a, "acme", 1)]).await;
        let events = log(&env).await;
        checkpoint_row(&env).await;
        // Another owner's transaction holds the checkpoint and moves it (as a batch does).
        let mut other = env.db.pool.begin().await.expect("begin");
        sqlx::query(
            "UPDATE read.checkpoints SET transaction_id = 7, global_position = 7 \
             WHERE projector = $1 AND partition = $2",
        )
        .bind(conversations::NAME)
        .bind(PARTITION)
        .execute(&mut *other)
        .await
        .expect("move");
        let racing = {
            let (env_pool, events) = (env.db.pool.clone(), events.clone());
            tokio::spawn(async move {
                let mut conn = env_pool.acquire().await.expect("conn");
                let g = gate(&events, Position::ZERO);
                Conversations
                    .apply_batch_gated(&mut conn, &events, &g)
                    .await
                    .expect("runs")
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!racing.is_finished(), "the gate waits for the row lock");
        other.commit().await.expect("commit");
        assert_eq!(racing.await.expect("task"), Gated::Refused);
        assert_eq!(row_counts(&env).await, (0, 0), "nothing written");
        assert_eq!(checkpoint(&env).await, Some(Position { tx: 7, pos: 7 }));
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clean_traffic_goes_through_the_gated_path_and_equals_the_fold() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let config = test_config();
        let running = spawn_workers(env.workers(&config));
        let mut publisher = Publisher::new(&env);
        let mut counts: HashMap<Uuid, i64> = HashMap::new();
        for _ in 0..4 {
            for (id, n) in append_traffic(&env.store, 8, 40, "acme").await {
                *counts.entry(id).or_default() += n;
            }
            publisher.publish_new(&env.store).await;
        }
        let heads = partition_heads(&env.store).await;
        wait_caught_up(&env.store, &heads, Duration::from_secs(60)).await;
        let (_, sum) = running.stop().await;
        assert!(sum.gated > 0, "no batch took the gated path: {sum:?}");
        assert_equals_fold(&env.store, &counts).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

/// Every conversation the gated statement reads or changes is found through its key. A plan
/// made while `read.conversations` is small (a new deployment, a new connection) is kept for the
/// connection's life; had it joined through a scan of the table, every later batch would read the
/// whole read model. The statement's plan is fixed on the empty table here, on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gated_statement_finds_conversations_by_key_even_with_a_plan_made_on_an_empty_table() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let ids: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
        for (i, id) in ids.iter().enumerate() {
            append(&env.store, *id, "acme", &[started(*id, "acme", i as i64)]).await;
        }
        for id in &ids {
            append(&env.store, *id, "acme", &[posted("hello", 9), archived(10)]).await;
        }
        let events = log(&env).await;
        let (starts, changes) = events.split_at(ids.len());
        checkpoint_row(&env).await;

        let mut conn = env.db.pool.acquire().await.expect("conn");
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *conn)
            .await
            .expect("set");
        // Planned now, while the table is empty; the same plan serves the next batch.
        assert_eq!(
            Conversations
                .apply_batch_gated(&mut conn, starts, &gate(starts, Position::ZERO))
                .await
                .expect("starts"),
            Gated::Applied
        );
        // This connection's pending statistics, before and after the batch: in one transaction,
        // as the backend reports them only when idle outside one.
        let scans = async |conn: &mut sqlx::PgConnection| -> (i64, i64) {
            sqlx::query_as(
                "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables \
                 WHERE schemaname = 'read' AND relname = 'conversations'",
            )
            .fetch_one(conn)
            .await
            .expect("statistics of this connection")
        };
        sqlx::query("BEGIN")
            .execute(&mut *conn)
            .await
            .expect("begin");
        let before = scans(&mut conn).await;
        let from = starts.last().expect("starts").position();
        assert_eq!(
            Conversations
                .apply_batch_gated(&mut conn, changes, &gate(changes, from))
                .await
                .expect("changes"),
            Gated::Applied
        );
        let after = scans(&mut conn).await;
        sqlx::query("COMMIT")
            .execute(&mut *conn)
            .await
            .expect("commit");
        drop(conn);
        let (seq, idx) = (after.0 - before.0, after.1 - before.1);
        assert_eq!(
            seq, 0,
            "sequential scans of read.conversations in one batch"
        );
        assert!(idx > 0, "the batch looked conversations up by key");
        assert_read_model_is_the_fold(&env).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}
