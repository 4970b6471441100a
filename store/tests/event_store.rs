//! Event store tests against a real Postgres (TESTPLAN ES1, ES2, ES3 for the log reader).

use nura_store::{
    Appended, CommandRecord, EventStore, ExpectedVersion, Metadata, NewEvent, Position, StoreError,
};
use nura_testkit::TestDb;
use sqlx::{Connection, Executor};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use uuid::Uuid;

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Counted".into(),
        schema_version: 1,
        payload: serde_json::json!({ "n": n }),
    }
}

fn meta(command_id: &str) -> Metadata {
    Metadata {
        tenant_id: "acme".into(),
        actor: "alice".into(),
        command_id: command_id.into(),
        correlation_id: "req-1".into(),
        causation_id: None,
    }
}

fn cmd(id: &str, body: &str) -> CommandRecord {
    CommandRecord {
        command_id: id.into(),
        request_hash: body.as_bytes().to_vec(),
    }
}

async fn store() -> (TestDb, EventStore) {
    let db = TestDb::new().await;
    let store = EventStore::connect(db.pool_with(24).await).await.unwrap();
    (db, store)
}

async fn grouped_store() -> (TestDb, EventStore) {
    let db = TestDb::new().await;
    let store = EventStore::connect_with_group_commit(db.pool_with(24).await, 4, 64)
        .await
        .unwrap();
    (db, store)
}

/// ES1: 64 tasks × N read-then-append on 10 streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_shared_streams_never_fork_a_stream() {
    let (_db, store) = store().await;
    es1(store).await;
}

/// ES1 again with group commit: many commands share a transaction, each keeps its own outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_group_commit_concurrent_writers_never_fork_a_stream() {
    let (_db, store) = grouped_store().await;
    es1(store).await;
}

async fn es1(store: EventStore) {
    let per_task: u64 = std::env::var("NURA_ES1_APPENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let accepted = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let store = store.clone();
        let (accepted, conflicts) = (accepted.clone(), conflicts.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_task {
                let stream = format!("counter-{}", (t + i) % 10);
                let version = store.stream_version(&stream).await.unwrap();
                match store
                    .append(
                        &stream,
                        ExpectedVersion::Exact(version),
                        &[event(i)],
                        &meta("c"),
                        None,
                    )
                    .await
                {
                    Ok(a) => {
                        assert_eq!(a.first_version, version + 1);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(StoreError::Conflict { .. }) => {
                        conflicts.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("unexpected error (a deadlock?): {e}"),
                }
            }
        }));
    }
    tokio::time::timeout(
        Duration::from_secs(300),
        futures::future::try_join_all(tasks),
    )
    .await
    .expect("ES1 finished in time")
    .unwrap();

    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT stream_id, stream_version FROM es.events ORDER BY 1, 2")
            .fetch_all(store.pool())
            .await
            .unwrap();
    let mut per_stream: HashMap<String, Vec<i64>> = HashMap::new();
    for (s, v) in &rows {
        per_stream.entry(s.clone()).or_default().push(*v);
    }
    for (s, versions) in &per_stream {
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        assert_eq!(versions, &expected, "stream {s} has gaps or duplicates");
    }
    let accepted = accepted.load(Ordering::Relaxed);
    let conflicts = conflicts.load(Ordering::Relaxed);
    println!(
        "ES1 verdict: attempted={} accepted={accepted} conflicts={conflicts} stored={} streams={}",
        64 * per_task,
        rows.len(),
        per_stream.len()
    );
    assert_eq!(
        accepted as usize,
        rows.len(),
        "accepted commands = stored events"
    );
    assert_eq!(
        accepted + conflicts,
        64 * per_task,
        "every loser got a conflict"
    );
    assert!(conflicts > 0, "the test must actually contend");
}

/// ES2: idempotency keys and event ids.
#[tokio::test]
async fn a_repeated_command_is_stored_once_and_returns_its_first_result() {
    let (_db, store) = store().await;
    let e = event(1);
    let first = store
        .append(
            "counter-a",
            ExpectedVersion::Exact(0),
            std::slice::from_ref(&e),
            &meta("k1"),
            Some(&cmd("k1", "body")),
        )
        .await
        .unwrap();
    assert!(!first.replayed);
    for _ in 0..2 {
        // Even with a stale expected version and fresh event ids, a repeat returns the first result.
        let again = store
            .append(
                "counter-a",
                ExpectedVersion::Exact(0),
                &[event(1)],
                &meta("k1"),
                Some(&cmd("k1", "body")),
            )
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(again.commit, first.commit);
        assert_eq!(again.event_ids, first.event_ids);
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM es.events")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(stored, 1, "one copy stored");
}

/// The first result is read back from the events a command wrote: its versions, its commit
/// token and its event ids in order, untouched by later commands on the same stream.
#[tokio::test]
async fn a_repeat_of_a_command_of_several_events_returns_exactly_its_first_result() {
    for (_db, store) in [store().await, grouped_store().await] {
        store
            .append(
                "counter-m",
                ExpectedVersion::Exact(0),
                &[event(0)],
                &meta("m0"),
                None,
            )
            .await
            .unwrap();
        let first = store
            .append(
                "counter-m",
                ExpectedVersion::Exact(1),
                &[event(1), event(2), event(3)],
                &meta("m1"),
                Some(&cmd("m1", "body")),
            )
            .await
            .unwrap();
        assert_eq!((first.first_version, first.last_version), (2, 4));
        store
            .append(
                "counter-m",
                ExpectedVersion::Exact(4),
                &[event(4)],
                &meta("m2"),
                None,
            )
            .await
            .unwrap();
        let again = store
            .append(
                "counter-m",
                ExpectedVersion::Exact(5),
                &[event(9)],
                &meta("m1"),
                Some(&cmd("m1", "body")),
            )
            .await
            .unwrap();
        assert_eq!(
            again,
            Appended {
                replayed: true,
                ..first.clone()
            }
        );
        let (hash, recorded) = store.recorded_command("m1").await.unwrap().unwrap();
        assert_eq!(hash, b"body".to_vec());
        assert_eq!(
            recorded,
            Some(Appended {
                replayed: true,
                ..first
            })
        );
    }
}

/// Records written before migration 0005 carry their result as jsonb and no versions.
#[tokio::test]
async fn a_repeat_of_a_command_recorded_with_a_stored_result_returns_that_result() {
    let (_db, store) = store().await;
    let first = store
        .append(
            "counter-old",
            ExpectedVersion::Exact(0),
            &[event(1)],
            &meta("old"),
            None,
        )
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO es.commands (command_id, request_hash, stream_id, result) VALUES ($1, $2, $3, $4)",
    )
    .bind("old")
    .bind(b"body".to_vec())
    .bind("counter-old")
    .bind(sqlx::types::Json(&first))
    .execute(store.pool())
    .await
    .unwrap();
    let again = store
        .append(
            "counter-old",
            ExpectedVersion::Exact(1),
            &[event(2)],
            &meta("old"),
            Some(&cmd("old", "body")),
        )
        .await
        .unwrap();
    assert_eq!(
        again,
        Appended {
            replayed: true,
            ..first
        }
    );
    assert_eq!(store.stream_version("counter-old").await.unwrap(), 1);
}

#[tokio::test]
async fn the_same_command_id_with_a_different_body_is_rejected() {
    let (_db, store) = store().await;
    store
        .append(
            "counter-a",
            ExpectedVersion::Exact(0),
            &[event(1)],
            &meta("k"),
            Some(&cmd("k", "one")),
        )
        .await
        .unwrap();
    let err = store
        .append(
            "counter-a",
            ExpectedVersion::Exact(1),
            &[event(2)],
            &meta("k"),
            Some(&cmd("k", "two")),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::IdempotencyMismatch(_)), "{err:?}");
    assert_eq!(store.stream_version("counter-a").await.unwrap(), 1);
}

#[tokio::test]
async fn reusing_event_ids_is_a_conflict_at_a_stale_version_and_a_duplicate_at_the_current_one() {
    let (_db, store) = store().await;
    let e = event(1);
    store
        .append(
            "counter-a",
            ExpectedVersion::Exact(0),
            std::slice::from_ref(&e),
            &meta("a"),
            None,
        )
        .await
        .unwrap();
    store
        .append(
            "counter-a",
            ExpectedVersion::Exact(1),
            &[event(2)],
            &meta("b"),
            None,
        )
        .await
        .unwrap();
    let stale = store
        .append(
            "counter-a",
            ExpectedVersion::Exact(1),
            std::slice::from_ref(&e),
            &meta("c"),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(stale, StoreError::Conflict { .. }), "{stale:?}");
    let current = store
        .append(
            "counter-a",
            ExpectedVersion::Exact(2),
            std::slice::from_ref(&e),
            &meta("d"),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(current, StoreError::DuplicateEvent), "{current:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM es.events")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(stored, 2);
}

#[tokio::test]
async fn an_expected_version_ahead_of_the_stream_is_a_conflict_not_a_gap() {
    let (_db, store) = store().await;
    let err = store
        .append(
            "counter-a",
            ExpectedVersion::Exact(5),
            &[event(1)],
            &meta("a"),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }));
    assert_eq!(store.stream_version("counter-a").await.unwrap(), 0);
}

#[tokio::test]
async fn zero_events_are_never_appended() {
    let (_db, store) = store().await;
    let err = store
        .append("counter-a", ExpectedVersion::Any, &[], &meta("a"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoEvents));
}

#[tokio::test]
async fn a_stream_is_read_from_a_version_with_its_metadata_envelope() {
    let (_db, store) = store().await;
    let m = Metadata {
        causation_id: Some(Uuid::now_v7()),
        ..meta("k")
    };
    store
        .append(
            "counter-a",
            ExpectedVersion::Any,
            &[event(1), event(2), event(3)],
            &m,
            None,
        )
        .await
        .unwrap();
    let events = store.read_stream("counter-a", 1, 100).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(events[0].metadata, m);
    assert_eq!(events[0].payload, serde_json::json!({"n": 2}));
    assert_eq!(
        events[0].partition,
        nura_store::partition_of("counter-a", store.partitions())
    );
}

/// ES3 for the log reader: an open transaction that already took a position holds readers back;
/// after it commits its event is delivered, after a rollback readers move on; nothing skipped.
#[tokio::test]
async fn the_log_reader_never_skips_a_late_commit() {
    let (db, store) = store().await;
    for (late_outcome, label) in [(true, "commit"), (false, "rollback")] {
        let before = read_everything(&store).await;
        // Take a position in a transaction and keep it open.
        let mut open = sqlx::PgConnection::connect(&db.url).await.unwrap();
        open.execute("BEGIN").await.unwrap();
        sqlx::query(
            "INSERT INTO es.events (event_id, stream_id, stream_version, partition, event_type, payload, metadata) \
             VALUES ($1, 'late-1', $2, 0, 'Late', '{}', '{\"tenant_id\": \"acme\"}')",
        )
        .bind(Uuid::now_v7())
        .bind(if late_outcome { 1i64 } else { 2 })
        .execute(&mut open)
        .await
        .unwrap();
        // Later commits, with higher positions, in other transactions.
        for i in 0..5 {
            store
                .append(
                    &format!("after-{label}-{i}"),
                    ExpectedVersion::Any,
                    &[event(i)],
                    &meta("x"),
                    None,
                )
                .await
                .unwrap();
        }
        let during = read_everything(&store).await;
        assert_eq!(
            during.len(),
            before.len(),
            "readers stop before the open transaction ({label})"
        );
        if late_outcome {
            open.execute("COMMIT").await.unwrap();
        } else {
            open.execute("ROLLBACK").await.unwrap();
        }
        let after = read_everything(&store).await;
        let expected = before.len() + 5 + usize::from(late_outcome);
        assert_eq!(
            after.len(),
            expected,
            "after the {label} everything is delivered, once"
        );
        let mut sorted = after.clone();
        sorted.sort();
        assert_eq!(sorted, after, "commit order");
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM es.events")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(stored as usize, after.len(), "0 skipped");
        // A reader that checkpointed during the hold resumes and still gets the late event.
        let resumed = store
            .read_all(*during.last().unwrap_or(&Position::ZERO), 1000)
            .await
            .unwrap();
        assert_eq!(
            resumed.len(),
            after.len() - during.len(),
            "a checkpointed reader gets the late commit ({label})"
        );
    }
}

#[tokio::test]
async fn counts_between_two_positions_take_exactly_the_events_after_the_first_up_to_the_second() {
    let (_db, store) = store().await;
    for i in 0..9 {
        store
            .append(
                &format!("counted-{}", i % 3),
                ExpectedVersion::Any,
                &[event(i), event(i + 100)],
                &meta("c"),
                None,
            )
            .await
            .unwrap();
    }
    let log = read_everything(&store).await;
    assert_eq!(log.len(), 18);
    assert_eq!(store.count_until(log[17]).await.unwrap(), 18);
    assert_eq!(
        store.count_between(Position::ZERO, log[4]).await.unwrap(),
        5
    );
    assert_eq!(store.count_between(log[4], log[4]).await.unwrap(), 0);
    assert_eq!(store.count_between(log[4], log[11]).await.unwrap(), 7);
    assert_eq!(
        store.count_between(log[4], log[11]).await.unwrap()
            + store.count_between(log[11], log[17]).await.unwrap(),
        store.count_between(log[4], log[17]).await.unwrap(),
        "consecutive ranges add up"
    );
}

async fn read_everything(store: &EventStore) -> Vec<Position> {
    let mut cursor = Position::ZERO;
    let mut out = Vec::new();
    loop {
        let batch = store.read_all(cursor, 3).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        cursor = batch.last().unwrap().position();
        out.extend(batch.iter().map(|e| e.position()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_repeats_of_one_command_store_it_once() {
    let (_db, store) = store().await;
    concurrent_repeats(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_group_commit_concurrent_repeats_of_one_command_store_it_once() {
    let (_db, store) = grouped_store().await;
    concurrent_repeats(store).await;
}

/// In one batch: fresh commands succeed, a stale one conflicts, a repeat replays and a reused
/// key with another body is refused — each gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_group_commit_one_commands_refusal_never_fails_another() {
    let (_db, store) = grouped_store().await;
    let first = store
        .append(
            "counter-r",
            ExpectedVersion::Exact(0),
            &[event(0)],
            &meta("r"),
            Some(&cmd("r", "body")),
        )
        .await
        .unwrap();
    store
        .append(
            "counter-s",
            ExpectedVersion::Exact(0),
            &[event(0)],
            &meta("s"),
            None,
        )
        .await
        .unwrap();
    for _round in 0..20 {
        let mut calls = Vec::new();
        for i in 0..40u64 {
            let store = store.clone();
            calls.push(tokio::spawn(async move {
                match i % 4 {
                    0 => store
                        .append(
                            &format!("fresh-{}", Uuid::now_v7()),
                            ExpectedVersion::Exact(0),
                            &[event(i), event(i)],
                            &meta("f"),
                            None,
                        )
                        .await
                        .map(|a| ("fresh", a.last_version)),
                    1 => store
                        .append(
                            "counter-s",
                            ExpectedVersion::Exact(0),
                            &[event(i)],
                            &meta("s"),
                            None,
                        )
                        .await
                        .map(|_| ("stale", 0)),
                    2 => store
                        .append(
                            "counter-r",
                            ExpectedVersion::Exact(0),
                            &[event(i)],
                            &meta("r"),
                            Some(&cmd("r", "body")),
                        )
                        .await
                        .map(|a| ("repeat", a.last_version)),
                    _ => store
                        .append(
                            &format!("other-{}", Uuid::now_v7()),
                            ExpectedVersion::Exact(0),
                            &[event(i)],
                            &meta("r"),
                            Some(&cmd("r", "other")),
                        )
                        .await
                        .map(|_| ("mismatch", 0)),
                }
            }));
        }
        for (i, c) in calls.into_iter().enumerate() {
            let r = c.await.unwrap();
            match i % 4 {
                0 => assert_eq!(r.unwrap(), ("fresh", 2)),
                1 => assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}"),
                2 => assert_eq!(r.unwrap(), ("repeat", first.last_version)),
                _ => assert!(
                    matches!(r, Err(StoreError::IdempotencyMismatch(_))),
                    "{r:?}"
                ),
            }
        }
    }
    assert_eq!(store.stream_version("counter-r").await.unwrap(), 1);
    assert_eq!(store.stream_version("counter-s").await.unwrap(), 1);
    let fresh: i64 =
        sqlx::query_scalar("SELECT count(*) FROM es.events WHERE stream_id LIKE 'fresh-%'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(fresh, 20 * 10 * 2);
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT stream_id FROM es.events GROUP BY stream_id HAVING max(stream_version) <> count(*)) g",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(gaps, 0);
}

/// Within one transaction, a stream's events take positions in version order, so a log reader
/// never sees version 2 before version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_group_commit_positions_follow_versions_within_a_stream() {
    let (_db, store) = grouped_store().await;
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let events: Vec<_> = (0..5).map(event).collect();
                store
                    .append(
                        &format!("multi-{i}"),
                        ExpectedVersion::Exact(0),
                        &events,
                        &meta("m"),
                        None,
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT stream_id, stream_version, \
           row_number() OVER (PARTITION BY stream_id ORDER BY transaction_id, global_position) AS rn FROM es.events) x \
         WHERE stream_version <> rn",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(bad, 0);
}

async fn concurrent_repeats(store: EventStore) {
    let attempts = (0..16).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .append(
                    "counter-a",
                    ExpectedVersion::Exact(0),
                    &[event(1)],
                    &meta("same"),
                    Some(&cmd("same", "body")),
                )
                .await
        })
    });
    let results = futures::future::try_join_all(attempts).await.unwrap();
    let ok: Vec<_> = results
        .into_iter()
        .map(|r| r.expect("every repeat succeeds"))
        .collect();
    assert_eq!(
        ok.iter().filter(|a| !a.replayed).count(),
        1,
        "exactly one writes"
    );
    assert!(
        ok.iter().all(|a| a.commit == ok[0].commit),
        "all see the first result"
    );
    assert_eq!(store.stream_version("counter-a").await.unwrap(), 1);
}

/// Every command of a group-committed batch records its own result: a repeat of each returns
/// exactly what the first call returned (stream, versions, commit token, event ids in order),
/// and the commit token names the stream's last event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_group_commit_each_command_records_its_own_result() {
    let (_db, store) = grouped_store().await;
    let calls = (0..48u64).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let stream = format!("result-{i}-{}", Uuid::now_v7());
            let events: Vec<NewEvent> = (0..=(i % 3)).map(event).collect();
            let id = format!("cmd-{i}");
            let first = store
                .append(
                    &stream,
                    ExpectedVersion::Exact(0),
                    &events,
                    &meta(&id),
                    Some(&cmd(&id, "body")),
                )
                .await
                .unwrap();
            (stream, events, id, first)
        })
    });
    let firsts: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (stream, events, id, first) in firsts {
        assert_eq!(first.stream_id, stream);
        assert_eq!(
            (first.first_version, first.last_version),
            (1, events.len() as i64)
        );
        assert_eq!(
            first.event_ids,
            events.iter().map(|e| e.event_id).collect::<Vec<_>>()
        );
        let last = store.read_stream(&stream, 0, 10).await.unwrap();
        assert_eq!(
            last.last().map(|e| e.commit_token()),
            Some(first.commit),
            "commit token of {stream}"
        );
        let again = store
            .append(
                &stream,
                ExpectedVersion::Exact(0),
                &events,
                &meta(&id),
                Some(&cmd(&id, "body")),
            )
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(
            (
                again.stream_id,
                again.first_version,
                again.last_version,
                again.commit,
                again.event_ids
            ),
            (
                first.stream_id,
                first.first_version,
                first.last_version,
                first.commit,
                first.event_ids
            )
        );
    }
}

/// `appended()` wakes a log reader of the same process after each committed append, through a
/// clone of the store or the group-commit path, but not after a repeat that wrote nothing.
#[tokio::test]
async fn appended_changes_after_each_committed_append_in_this_process() {
    for (_db, store) in [store().await, grouped_store().await] {
        let mut appended = store.clone().appended();
        assert!(!appended.has_changed().unwrap(), "nothing appended yet");
        let e = event(1);
        store
            .append(
                "counter-w",
                ExpectedVersion::Exact(0),
                std::slice::from_ref(&e),
                &meta("w1"),
                Some(&cmd("w1", "body")),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), appended.changed())
            .await
            .expect("woken after the append")
            .unwrap();
        let again = store
            .append(
                "counter-w",
                ExpectedVersion::Exact(0),
                &[event(1)],
                &meta("w1"),
                Some(&cmd("w1", "body")),
            )
            .await
            .unwrap();
        assert!(again.replayed);
        assert!(
            !appended.has_changed().unwrap(),
            "a repeat wrote nothing and wakes nobody"
        );
    }
}

/// Appends reach other processes' log readers as a notification on `NOTIFY_CHANNEL` that
/// names the store they came from (the same for its clones, different for another store), sent
/// from a connection of the notifier's own, not one of the pool's.
#[tokio::test]
async fn an_append_notifies_other_processes_with_the_origin_of_its_store() {
    for (db, store) in [store().await, grouped_store().await] {
        let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
            .await
            .unwrap();
        listener.listen(nura_store::NOTIFY_CHANNEL).await.unwrap();
        let other = EventStore::connect(db.pool.clone()).await.unwrap();
        assert_eq!(
            store.clone().notification_origin(),
            store.notification_origin()
        );
        assert_ne!(other.notification_origin(), store.notification_origin());
        for (who, s) in [("store", &store), ("other", &other)] {
            s.append(
                &format!("counter-n-{who}"),
                ExpectedVersion::Exact(0),
                &[event(1)],
                &meta(&format!("n-{who}")),
                None,
            )
            .await
            .unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
                .await
                .expect("notified after the append")
                .unwrap();
            assert_eq!(n.payload(), s.notification_origin(), "{who}");
        }
        let notifiers: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(nura_store::NOTIFIER_APPLICATION_NAME)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(notifiers, 2, "one notifying connection per store");
    }
}

/// How many of the database's sessions (other than this one) last ran the append statement, by
/// whether they are a group-commit lane's own connection.
async fn sessions_that_appended(db: &TestDb) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE application_name = $1),
                count(*) FILTER (WHERE application_name <> $1)
         FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND query LIKE 'WITH cur AS%'",
    )
    .bind(nura_store::LANE_APPLICATION_NAME)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// With group commit, one-at-a-time appends run on their lane's own connection, never on
/// whichever pool connection idled longest: after a burst has grown the pool, those would all be
/// different backends, each with cold caches, behind a health-check round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_group_commit_appends_one_at_a_time_stay_on_the_lanes_own_connection() {
    let db = TestDb::new().await;
    let pool = db.pool_with(24).await;
    let store = EventStore::connect_with_group_commit(pool.clone(), 1, 64)
        .await
        .unwrap();
    // A burst that holds 16 pool connections at once.
    futures::future::join_all((0..16).map(|_| sqlx::query("SELECT pg_sleep(0.2)").execute(&pool)))
        .await
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    assert!(pool.size() >= 16, "the burst grew the pool");
    for i in 0..40u64 {
        let id = format!("one-{i}");
        store
            .append(
                &format!("one-{i}-{}", Uuid::now_v7()),
                ExpectedVersion::Exact(0),
                &[event(i)],
                &meta(&id),
                Some(&cmd(&id, "body")),
            )
            .await
            .unwrap();
    }
    assert_eq!(
        sessions_that_appended(&db).await,
        (1, 0),
        "(lane connections, pool connections) that ran the append statement"
    );
}

/// A lane's own connection that the server ended while it idled costs no append: the append goes
/// through the pool once, written once, and the lane opens a new connection afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_group_commit_a_lane_connection_ended_by_the_server_costs_no_append() {
    let db = TestDb::new().await;
    let store = EventStore::connect_with_group_commit(db.pool_with(8).await, 1, 64)
        .await
        .unwrap();
    let append = |i: u64, stream: String| {
        let store = store.clone();
        async move {
            let id = format!("cut-{i}");
            store
                .append(
                    &stream,
                    ExpectedVersion::Any,
                    &[event(i)],
                    &meta(&id),
                    Some(&cmd(&id, "body")),
                )
                .await
        }
    };
    let stream = format!("cut-{}", Uuid::now_v7());
    append(0, stream.clone()).await.unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = $1",
    )
    .bind(nura_store::LANE_APPLICATION_NAME)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(ended, vec![true], "the lane's one connection was ended");
    // Wait until the server has closed it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sessions_that_appended(&db).await != (0, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the session never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = append(1, stream.clone())
        .await
        .expect("append after the cut");
    assert_eq!((second.first_version, second.replayed), (2, false));
    let third = append(2, stream.clone()).await.unwrap();
    assert_eq!(third.last_version, 3);
    let versions: Vec<i64> = store
        .read_stream(&stream, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3], "each append written once");
    assert_eq!(
        sessions_that_appended(&db).await.0,
        1,
        "the lane opened a connection of its own again"
    );
}

/// The group-commit statement looks each command id up through `es.commands`' key. Postgres may
/// otherwise plan the lookup as a hash of the whole table (it did, while the table had no
/// statistics), which costs every batch a scan of every command ever recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_finds_repeats_by_key_never_by_scanning_every_command() {
    let db = TestDb::new().await;
    let pool = db.pool_with(24).await;
    let store = EventStore::connect_with_group_commit(pool.clone(), 4, 64)
        .await
        .unwrap();
    let scans = || async {
        sqlx::query_as::<_, (i64, i64, i64)>(
            "SELECT seq_scan, coalesce(idx_scan, 0), n_tup_ins FROM pg_stat_user_tables \
             WHERE schemaname = 'es' AND relname = 'commands'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let (seq_before, idx_before, ins_before) = scans().await;
    let n = 400i64;
    let calls = (0..n).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let id = format!("scan-{i}");
            store
                .append(
                    &format!("scan-{i}-{}", Uuid::now_v7()),
                    ExpectedVersion::Exact(0),
                    &[event(i as u64)],
                    &meta(&id),
                    Some(&cmd(&id, "body")),
                )
                .await
                .unwrap()
        })
    });
    for appended in futures::future::join_all(calls).await {
        assert!(!appended.unwrap().replayed);
    }
    // A backend reports its table statistics when it exits: close the store's connections and
    // wait until the inserts show.
    drop(store);
    pool.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (seq_after, idx_after, _) = loop {
        let now = scans().await;
        if now.2 >= ins_before + n {
            break now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "statistics never showed the {n} inserts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(seq_after, seq_before, "sequential scans of es.commands");
    // A command alone in its batch takes the single-command path, which looks nothing up; the
    // rest are looked up by key, so the test cannot pass by never looking at all.
    assert!(
        idx_after - idx_before >= n / 2,
        "batched command ids are looked up by key ({} lookups for {n} commands)",
        idx_after - idx_before
    );
}

/// With plans made while `es.events` is empty and kept for the connection's life (as `nura serve`
/// keeps them), appends and lookups by event id still reach the table by key: once it has grown,
/// a scan per call would read the whole log.
#[tokio::test]
async fn appends_and_lookups_by_id_reach_the_log_by_key_with_plans_made_on_an_empty_table() {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use std::str::FromStr;
    let db = TestDb::new().await;
    let options = PgConnectOptions::from_str(&db.url)
        .unwrap()
        .options([("plan_cache_mode", "force_generic_plan")]);
    // One connection: every statement below is planned once, on the empty table.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    let store = EventStore::connect(pool.clone()).await.unwrap();
    assert!(
        store
            .events_by_id(&[Uuid::now_v7()])
            .await
            .unwrap()
            .is_empty()
    );
    let n = 200u64;
    let mut ids = vec![];
    for i in 0..n {
        let e = event(i);
        ids.push(e.event_id);
        let id = format!("plan-{i}");
        store
            .append(
                &format!("plan-{}", i % 20),
                ExpectedVersion::Any,
                &[e],
                &meta(&id),
                Some(&cmd(&id, "body")),
            )
            .await
            .unwrap();
    }
    let wanted = [ids[7], ids[150], ids[3]];
    let found: Vec<Uuid> = store
        .events_by_id(&wanted)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(found, vec![ids[3], ids[7], ids[150]], "in commit order");
    // Statistics are reported when the backend exits.
    drop(store);
    pool.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let read = loop {
        let (inserted, read): (i64, i64) = sqlx::query_as(
            "SELECT n_tup_ins, seq_tup_read FROM pg_stat_user_tables \
             WHERE schemaname = 'es' AND relname = 'events'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if inserted >= n as i64 {
            break read;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "statistics never showed the {n} inserts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(read, 0, "rows of es.events read by sequential scans");
}
