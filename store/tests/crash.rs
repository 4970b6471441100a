//! ES5: Postgres stopped in immediate mode (no checkpoint; recovery from WAL on start) and
//! restarted while commands keep arriving, on a private server. Every acknowledged command is
//! present after the restart; a command that failed or timed out is wholly present or wholly
//! absent (all its events and its idempotency record, or none of them). Runs through both append
//! paths: the single statement and group commit.

use nura_store::{CommandRecord, EventStore, ExpectedVersion, Metadata, NewEvent};
use nura_testkit::{PgProcess, TestDb};
use sqlx::postgres::PgPoolOptions;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use uuid::Uuid;

/// One command as the writer saw it.
struct Sent {
    stream: String,
    command_id: String,
    event_ids: Vec<Uuid>,
    /// `Some(restarted)` when acknowledged (and whether the restart had happened by then).
    acked: Option<bool>,
}

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "Counted".into(),
            schema_version: 1,
            payload: serde_json::json!({ "n": i }),
        })
        .collect()
}

fn meta(command_id: &str) -> Metadata {
    Metadata {
        tenant_id: "acme".into(),
        actor: "alice".into(),
        command_id: command_id.into(),
        correlation_id: "es5".into(),
        causation_id: None,
    }
}

async fn writer(store: EventStore, stop: Arc<AtomicBool>, restarted: Arc<AtomicBool>) -> Vec<Sent> {
    let mut sent = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let stream = format!("es5-{}", Uuid::now_v7());
        let command_id = Uuid::now_v7().to_string();
        let new = events(1 + i % 3);
        let outcome = tokio::time::timeout(
            Duration::from_secs(3),
            store.append(
                &stream,
                ExpectedVersion::Exact(0),
                &new,
                &meta(&command_id),
                Some(&CommandRecord {
                    command_id: command_id.clone(),
                    request_hash: vec![7; 32],
                }),
            ),
        )
        .await;
        let acked = matches!(outcome, Ok(Ok(_))).then(|| restarted.load(Ordering::Relaxed));
        if acked.is_none() {
            // The server is down: don't spin.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent.push(Sent {
            stream,
            command_id,
            event_ids: new.iter().map(|e| e.event_id).collect(),
            acked,
        });
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_commands_survive_an_immediate_stop_and_failed_ones_are_all_or_nothing() {
    let mut pg = PgProcess::start();
    let db = TestDb::on(&pg.url()).await;
    // Fail fast while the server is down instead of queueing behind a dead pool.
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&db.url)
        .await
        .expect("pool");
    let plain = EventStore::connect(pool.clone()).await.expect("store");
    let grouped = EventStore::connect_with_group_commit(pool.clone(), 2, 64)
        .await
        .expect("store");
    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let store = if w % 2 == 0 {
                plain.clone()
            } else {
                grouped.clone()
            };
            tokio::spawn(writer(store, stop.clone(), restarted.clone()))
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::block_in_place(|| pg.stop_immediate());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| pg.restart());
    restarted.store(true, Ordering::Relaxed);
    // Long enough for the pool to reconnect and the writers to get acknowledgements again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for w in writers {
        sent.extend(w.await.expect("writer"));
    }

    let acked_before = sent.iter().filter(|s| s.acked == Some(false)).count();
    let acked_after = sent.iter().filter(|s| s.acked == Some(true)).count();
    let failed = sent.iter().filter(|s| s.acked.is_none()).count();
    assert!(
        acked_before > 0 && acked_after > 0 && failed > 0,
        "the load must straddle the stop: {acked_before} acknowledged before, {acked_after} after, {failed} failed"
    );

    let check = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.url)
        .await
        .expect("pool after restart");
    let (mut present, mut absent) = (0, 0);
    for s in &sent {
        let stored: Vec<Uuid> = sqlx::query_scalar(
            "SELECT event_id FROM es.events WHERE stream_id = $1 ORDER BY stream_version",
        )
        .bind(&s.stream)
        .fetch_all(&check)
        .await
        .expect("events");
        let recorded: Option<String> =
            sqlx::query_scalar("SELECT stream_id FROM es.commands WHERE command_id = $1")
                .bind(&s.command_id)
                .fetch_optional(&check)
                .await
                .expect("command");
        if s.acked.is_some() {
            assert_eq!(
                stored, s.event_ids,
                "acknowledged command {} lost",
                s.command_id
            );
            assert_eq!(recorded.as_deref(), Some(s.stream.as_str()));
        } else if stored.is_empty() {
            assert_eq!(
                recorded, None,
                "a record without events for {}",
                s.command_id
            );
            absent += 1;
        } else {
            assert_eq!(stored, s.event_ids, "a partial command {}", s.command_id);
            assert_eq!(recorded.as_deref(), Some(s.stream.as_str()));
            present += 1;
        }
    }
    eprintln!(
        "ES5: {acked_before} acknowledged before the stop, {acked_after} after the restart, \
         {failed} failed or timed out ({present} of them stored whole, {absent} absent)"
    );
    drop((plain, grouped));
    pool.close().await;
    check.close().await;
}
