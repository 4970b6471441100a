//! The relay against real Postgres and NATS (DESIGN.md invariants 1, 3 and 4; TESTPLAN ES3, R3).
//! Each test has its own database and its own stream and subject prefix on the shared NATS.

mod common;

use async_nats::jetstream::{self, stream};
use common::*;
use nura_nats::Topology;
use nura_nats::relay::{Relay, RelayConfig};
use nura_store::{EventStore, Metadata, Position, partition_of};
use nura_testkit::{PgProcess, TestDb, init_tracing, nats_client, unique_name};
use sqlx::Connection;
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TEST_TIMEOUT: Duration = Duration::from_secs(90);

struct Env {
    db: TestDb,
    store: EventStore,
    js: jetstream::Context,
    topology: Topology,
}

async fn env() -> Env {
    init_tracing();
    let db = TestDb::new().await;
    let store = EventStore::connect(db.pool.clone()).await.expect("store");
    let js = jetstream::new(nats_client().await);
    let topology = Topology::named(&unique_name("EV"), &unique_name("t"));
    Env {
        db,
        store,
        js,
        topology,
    }
}

impl Env {
    fn relay(&self, batch_size: i64) -> Relay {
        Relay::new(
            self.store.clone(),
            self.js.clone(),
            self.topology.clone(),
            RelayConfig {
                batch_size,
                max_in_flight: 16,
                poll_interval: Duration::from_millis(100),
                reconcile_interval: Duration::from_secs(3600),
                ..Default::default()
            },
        )
    }

    async fn stream_messages(&self) -> u64 {
        match self.js.get_stream(&self.topology.stream).await {
            Ok(mut s) => s.info().await.expect("info").state.messages,
            Err(_) => 0,
        }
    }

    /// Waits until the stream holds `count` messages.
    async fn wait_for_messages(&self, count: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n = self.stream_messages().await;
            if n >= count {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "stream holds {n} messages, expected {count}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn cleanup(&self) {
        let _ = self.js.delete_stream(&self.topology.stream).await;
    }
}

/// Calls `publish_batch` until `total` events went out in all. Other tests' open transactions on
/// the shared Postgres may hold `read_all` back for a moment, so a batch of 0 is not the end.
async fn drain(relay: &mut Relay, total: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut published = 0;
    while published < total {
        published += relay.publish_batch().await.expect("publish batch");
        assert!(
            tokio::time::Instant::now() < deadline,
            "published {published} of {total}"
        );
        if published < total {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    published
}

/// Checks every message's headers and the `Nura-Prev` chain of each partition.
fn assert_headers_and_chains(topology: &Topology, seen: &[Seen]) {
    let mut last: HashMap<i32, Position> = HashMap::new();
    for s in seen {
        let e = &s.delivered.event;
        assert_eq!(s.event_id, e.event_id.to_string());
        if let Some(id) = &s.msg_id {
            assert_eq!(id, &s.event_id, "Nats-Msg-Id is the event id");
        }
        assert_eq!(s.subject, topology.subject(e));
        assert_eq!(
            s.headers
                .get(nura_nats::headers::COMMIT)
                .map(|v| v.as_str()),
            Some(e.commit_token().to_string().as_str())
        );
        assert_eq!(
            s.headers
                .get(nura_nats::headers::STREAM_ID)
                .map(|v| v.as_str()),
            Some(e.stream_id.as_str())
        );
        assert_eq!(
            s.delivered.prev,
            last.get(&e.partition).copied(),
            "prev link of {} in partition {}",
            e.event_id,
            e.partition
        );
        last.insert(e.partition, e.position());
    }
}

#[tokio::test]
async fn every_event_is_published_once_in_commit_order_with_its_headers_and_prev_chain() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let ids = append_spread(&env.store, 12, 10).await;
        let mut relay = env.relay(25);
        let published = drain(&mut relay, ids.len()).await;
        assert_eq!(published, ids.len());
        assert_eq!(relay.publish_batch().await.expect("idle batch"), 0);

        let seen = read_stream(&env.js, &env.topology.stream).await;
        let stored = stored_ids(&env.store).await;
        let v = compare(&stored, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.lost, v.duplicated, v.unknown), (0, 0, 0));
        let in_stream: Vec<String> = seen.iter().map(|s| s.event_id.clone()).collect();
        let in_pg: Vec<String> = stored.iter().map(Uuid::to_string).collect();
        assert_eq!(in_stream, in_pg, "stream order is commit order");
        assert!(seen.iter().all(|s| s.msg_id.is_some()));
        assert_headers_and_chains(&env.topology, &seen);

        let last = seen.last().expect("messages").delivered.event.position();
        assert_eq!(cursor(&env.store, "relay").await, Some((last.tx, last.pos)));
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_cursor_does_not_move_when_jetstream_refuses_part_of_a_batch() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        // A stream that refuses everything after 5 messages: some acks of the batch fail.
        let mut config = env.topology.stream_config();
        config.max_messages = 5;
        config.discard = stream::DiscardPolicy::New;
        env.js.create_stream(config.clone()).await.expect("create");
        let stream_id = new_stream_id();
        let ids = append_n(&env.store, &stream_id, 10).await;

        let mut relay = env.relay(100);
        let mut failed = false;
        // Events published by batches that JetStream took whole.
        let mut published = 0usize;
        for _ in 0..50 {
            match relay.publish_batch().await {
                Err(_) => {
                    failed = true;
                    break;
                }
                // Another test's open transaction held the read back (wholly or after some of
                // the ten events): what was read fits, so it is published; try again.
                Ok(n) if published + n <= 5 => {
                    published += n;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(n) => panic!("published {} into a stream that takes 5", published + n),
            }
        }
        assert!(failed, "publishing into a full stream fails");
        // The cursor is where the last batch taken whole ended, never inside the refused one.
        let expected = match published {
            0 => None,
            k => Some(
                sqlx::query_as::<_, (i64, i64)>(
                    "SELECT transaction_id::text::bigint, global_position FROM es.events \
                     WHERE event_id = $1",
                )
                .bind(ids[k - 1])
                .fetch_one(env.store.pool())
                .await
                .expect("position of the last event published"),
            ),
        };
        assert_eq!(
            cursor(&env.store, "relay").await,
            expected,
            "cursor at the end of the last batch JetStream took whole ({published} events)"
        );
        assert_eq!(env.stream_messages().await, 5);

        config.max_messages = -1;
        env.js.update_stream(config).await.expect("lift the limit");
        drain(&mut relay, ids.len()).await;
        let seen = read_stream(&env.js, &env.topology.stream).await;
        let v = compare(&stored_ids(&env.store).await, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.delivered, v.lost, v.duplicated), (10, 0, 0));
        let last = seen[9].delivered.event.position();
        assert_eq!(cursor(&env.store, "relay").await, Some((last.tx, last.pos)));
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_raw_encoding_decodes_into_the_same_event_with_the_same_headers() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let ids = append_spread(&env.store, 3, 2).await;
        // Metadata as an older writer may have stored it: a missing field and an unknown one.
        sqlx::query(
            "UPDATE es.events SET metadata = metadata - 'correlation_id' || '{\"extra\": [1, 2]}' \
             WHERE event_id = $1",
        )
        .bind(ids[0])
        .execute(env.store.pool())
        .await
        .expect("odd metadata");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (parsed, page) = loop {
            let parsed = env.store.read_all(Position::ZERO, 100).await.expect("read");
            let page = env
                .store
                .read_all_raw(Position::ZERO, 100)
                .await
                .expect("raw");
            if parsed.len() == ids.len() && page.len() == ids.len() {
                break (parsed, page);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "events not readable"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let raw = page.events().expect("raw events");
        let prev = Some(Position { tx: 1, pos: 2 });
        for (p, r) in parsed.iter().zip(&raw) {
            assert_eq!(r.event_id, p.event_id);
            assert_eq!(r.position(), p.position());
            assert_eq!(r.recorded_at, p.recorded_at);
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(r.payload).expect("payload is JSON"),
                p.payload
            );
            assert_eq!(r.tenant_id, p.metadata.tenant_id);
            assert_eq!(env.topology.raw_subject(r), env.topology.subject(p));
            let (h, body) = nura_nats::encode_raw(r, prev);
            let (want_h, want_body) = nura_nats::encode(p, prev);
            assert_eq!(
                nura_nats::decode(Some(&h), &body).expect("raw body decodes"),
                nura_nats::decode(Some(&want_h), &want_body).expect("body decodes"),
            );
            let names = |h: &async_nats::HeaderMap| {
                let mut v: Vec<(String, String)> = h
                    .iter()
                    .flat_map(|(k, vs)| {
                        let k: &str = k.as_ref();
                        vs.iter()
                            .map(move |v| (k.to_owned(), v.as_str().to_owned()))
                    })
                    .collect();
                v.sort();
                v
            };
            assert_eq!(names(&h), names(&want_h));
        }
        assert_eq!(parsed[0].metadata.correlation_id, "");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_backlog_is_published_in_commit_order_across_pipelined_batches() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let ids = append_spread(&env.store, 12, 10).await;
        // Batches smaller than the window: acks of several batches are in flight at once.
        let mut relay = env.relay(7);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut published = 0;
        while published < ids.len() {
            published += relay.publish_backlog().await.expect("publish backlog");
            assert!(
                tokio::time::Instant::now() < deadline,
                "published {published}"
            );
        }
        assert_eq!(published, ids.len());
        assert_eq!(relay.publish_backlog().await.expect("idle"), 0);

        let seen = read_stream(&env.js, &env.topology.stream).await;
        let stored = stored_ids(&env.store).await;
        let v = compare(&stored, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.lost, v.duplicated, v.unknown), (0, 0, 0));
        let in_stream: Vec<String> = seen.iter().map(|s| s.event_id.clone()).collect();
        let in_pg: Vec<String> = stored.iter().map(Uuid::to_string).collect();
        assert_eq!(in_stream, in_pg, "stream order is commit order");
        assert_headers_and_chains(&env.topology, &seen);
        let last = seen.last().expect("messages").delivered.event.position();
        assert_eq!(cursor(&env.store, "relay").await, Some((last.tx, last.pos)));
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_failure_while_later_batches_are_in_flight_stores_only_wholly_acked_batches() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        // The stream takes 35 messages: batches of 10 with 16 acks in flight means batch 4 fails
        // while batch 5 is already read (and maybe published) and batches 1-3 are acked.
        let mut config = env.topology.stream_config();
        config.max_messages = 35;
        config.discard = stream::DiscardPolicy::New;
        env.js.create_stream(config.clone()).await.expect("create");
        let stream_id = new_stream_id();
        let ids = append_n(&env.store, &stream_id, 100).await;

        let mut relay = env.relay(10);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut published = 0;
        loop {
            match relay.publish_backlog().await {
                Err(_) => break,
                // Another test's open transaction held a read back: carry on from there.
                Ok(n) => published += n,
            }
            assert!(published <= 35, "published {published} into a stream that takes 35");
            assert!(tokio::time::Instant::now() < deadline, "never failed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(env.stream_messages().await, 35);
        // The cursor is at a batch end, every event up to it is in the stream, and at most one
        // batch of what the stream took is not covered yet (it was not wholly acked).
        let stored = stored_ids(&env.store).await;
        let (tx, pos) = cursor(&env.store, "relay").await.expect("cursor stored");
        let at: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM es.events WHERE (transaction_id, global_position) <= ($1::text::xid8, $2)",
        )
        .bind(tx.to_string())
        .bind(pos)
        .fetch_one(env.store.pool())
        .await
        .expect("count");
        assert!((26..=35).contains(&at), "cursor after {at} events");
        let seen = read_stream(&env.js, &env.topology.stream).await;
        let in_stream: Vec<String> = seen.iter().map(|s| s.event_id.clone()).collect();
        for id in &stored[..at as usize] {
            assert!(in_stream.contains(&id.to_string()), "{id} below the cursor is in the stream");
        }

        // Once the stream takes more, the retry resumes after the cursor: nothing lost, and the
        // events the stream took past the cursor are de-duplicated, not stored twice.
        config.max_messages = -1;
        env.js.update_stream(config).await.expect("lift the limit");
        let mut published = 0;
        while published < ids.len() - at as usize {
            published += relay.publish_backlog().await.expect("publish backlog");
            assert!(tokio::time::Instant::now() < deadline, "published {published}");
        }
        let seen = read_stream(&env.js, &env.topology.stream).await;
        let v = compare(&stored, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.delivered, v.lost, v.duplicated), (100, 0, 0));
        assert_headers_and_chains(&env.topology, &seen);
        let last = seen[99].delivered.event.position();
        assert_eq!(cursor(&env.store, "relay").await, Some((last.tx, last.pos)));
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_stands_by_while_the_first_holds_the_lock_and_takes_over_when_it_stops() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let first = CancellationToken::new();
        let first_task = tokio::spawn(env.relay(50).run(first.clone()));
        let mut ids = append_spread(&env.store, 5, 4).await;
        env.wait_for_messages(ids.len() as u64).await;

        let mut probe = env.relay(50);
        assert!(!probe.try_acquire_leadership().await.expect("probe"));
        let second = CancellationToken::new();
        let second_task = tokio::spawn(env.relay(50).run(second.clone()));
        ids.extend(append_spread(&env.store, 5, 4).await);
        env.wait_for_messages(ids.len() as u64).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!probe.try_acquire_leadership().await.expect("probe"));

        first.cancel();
        first_task
            .await
            .expect("join")
            .expect("first relay ends cleanly");
        ids.extend(append_spread(&env.store, 5, 4).await);
        // The second relay takes the lock within about a second and publishes the rest.
        env.wait_for_messages(ids.len() as u64).await;
        assert!(!probe.try_acquire_leadership().await.expect("probe"));
        second.cancel();
        second_task
            .await
            .expect("join")
            .expect("second relay ends cleanly");

        let seen = read_stream(&env.js, &env.topology.stream).await;
        let v = compare(&stored_ids(&env.store).await, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.stored, v.lost, v.duplicated, v.unknown), (60, 0, 0, 0));
        assert_headers_and_chains(&env.topology, &seen);
        // Once nobody runs, the lock is free again.
        assert!(probe.try_acquire_leadership().await.expect("probe"));
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lock_connection_dies_stops_publishing_until_it_holds_the_lock_again() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let token = CancellationToken::new();
        let task = tokio::spawn(env.relay(50).run(token.clone()));
        let mut ids = append_spread(&env.store, 3, 3).await;
        env.wait_for_messages(ids.len() as u64).await;

        // Someone else queues for the lock first, so it gets the lock the moment the leader's
        // connection dies (Postgres grants waiters before a later try-lock; a usurper polling
        // with try-lock could lose that race to the old leader's immediate retry).
        let mut usurper = sqlx::PgConnection::connect(&env.db.url)
            .await
            .expect("usurper");
        let key = Relay::lock_key("relay");
        let waiting = tokio::spawn(async move {
            sqlx::query("SELECT pg_advisory_lock($1)")
                .bind(key)
                .execute(&mut usurper)
                .await
                .expect("usurper lock");
            usurper
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let queued: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&env.db.pool)
            .await
            .expect("locks");
            if queued == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "usurper never queued"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'nura-relay:relay'",
        )
        .fetch_all(&env.db.pool)
        .await
        .expect("terminate");
        assert_eq!(killed, vec![true], "one lock connection");
        let usurper = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("lock never freed")
            .expect("join");
        // Let the old leader notice; then events appended now must not be published by it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = env.stream_messages().await;
        ids.extend(append_spread(&env.store, 3, 2).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            env.stream_messages().await,
            before,
            "a relay without the lock publishes nothing"
        );

        drop(usurper);
        env.wait_for_messages(ids.len() as u64).await;
        token.cancel();
        task.await.expect("join").expect("relay ends cleanly");
        let seen = read_stream(&env.js, &env.topology.stream).await;
        let v = compare(&stored_ids(&env.store).await, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.lost, v.unknown), (0, 0));
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

/// Starts a transaction that inserts one event and stays open: it holds a position below every
/// later commit.
async fn open_transaction_with_event(env: &Env) -> (sqlx::PgConnection, Uuid) {
    let mut conn = sqlx::PgConnection::connect(&env.db.url)
        .await
        .expect("raw connection");
    let stream_id = new_stream_id();
    let event_id = Uuid::now_v7();
    sqlx::query("BEGIN")
        .execute(&mut conn)
        .await
        .expect("begin");
    sqlx::query(
        "INSERT INTO es.events (event_id, stream_id, stream_version, partition, event_type, payload, metadata) \
         VALUES ($1, $2, 1, $3, 'MessagePosted', '{}', $4)",
    )
    .bind(event_id)
    .bind(&stream_id)
    .bind(partition_of(&stream_id, env.store.partitions()))
    .bind(sqlx::types::Json(Metadata::default()))
    .execute(&mut conn)
    .await
    .expect("insert in open transaction");
    (conn, event_id)
}

#[tokio::test]
async fn an_open_transaction_holds_the_relay_back_and_its_event_is_published_once_it_commits() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let mut relay = env.relay(100);
        let early = append_spread(&env.store, 2, 2).await;
        drain(&mut relay, early.len()).await;

        let (mut held, held_id) = open_transaction_with_event(&env).await;
        let later = append_spread(&env.store, 3, 2).await;
        for _ in 0..5 {
            assert_eq!(relay.publish_batch().await.expect("batch"), 0, "blocked");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(env.stream_messages().await, early.len() as u64);

        sqlx::query("COMMIT")
            .execute(&mut held)
            .await
            .expect("commit");
        drain(&mut relay, later.len() + 1).await;
        let seen = read_stream(&env.js, &env.topology.stream).await;
        let stored = stored_ids(&env.store).await;
        let v = compare(&stored, &seen);
        println!("verdict: {v:?}");
        assert_eq!(
            (v.stored, v.lost, v.duplicated),
            (early.len() + later.len() + 1, 0, 0)
        );
        assert_eq!(
            seen[early.len()].event_id,
            held_id.to_string(),
            "the late commit comes before the commits it held back"
        );
        assert_headers_and_chains(&env.topology, &seen);
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn an_open_transaction_that_rolls_back_lets_the_relay_move_on_without_skipping() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let mut relay = env.relay(100);
        let (mut held, held_id) = open_transaction_with_event(&env).await;
        let later = append_spread(&env.store, 2, 3).await;
        assert_eq!(relay.publish_batch().await.expect("batch"), 0, "blocked");

        sqlx::query("ROLLBACK")
            .execute(&mut held)
            .await
            .expect("rollback");
        drain(&mut relay, later.len()).await;
        let seen = read_stream(&env.js, &env.topology.stream).await;
        let v = compare(&stored_ids(&env.store).await, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.stored, v.lost, v.duplicated), (later.len(), 0, 0));
        assert!(seen.iter().all(|s| s.event_id != held_id.to_string()));
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_deleted_stream_is_recreated_and_refilled_from_postgres() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let mut relay = env.relay(40);
        let mut ids = append_spread(&env.store, 6, 5).await;
        drain(&mut relay, ids.len()).await;

        env.js
            .delete_stream(&env.topology.stream)
            .await
            .expect("delete");
        ids.extend(append_spread(&env.store, 2, 2).await);
        // The first batch finds no stream: it is recreated and the cursor goes back to zero.
        assert_eq!(relay.publish_batch().await.expect("batch"), 0);
        assert_eq!(cursor(&env.store, "relay").await, Some((0, 0)));
        drain(&mut relay, ids.len()).await;

        let seen = read_stream(&env.js, &env.topology.stream).await;
        let stored = stored_ids(&env.store).await;
        let v = compare(&stored, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.stored, v.lost, v.duplicated), (34, 0, 0));
        assert_headers_and_chains(&env.topology, &seen);
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn reconcile_republishes_exactly_the_messages_deleted_from_the_middle_of_the_stream() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let mut relay = env.relay(100);
        let ids = append_spread(&env.store, 5, 10).await;
        drain(&mut relay, ids.len()).await;
        let clean = relay.reconcile().await.expect("reconcile");
        assert_eq!(
            (clean.missing, clean.republished, clean.rewound),
            (0, 0, false)
        );

        let before = read_stream(&env.js, &env.topology.stream).await;
        let stream = env
            .js
            .get_stream(&env.topology.stream)
            .await
            .expect("stream");
        let mut deleted = Vec::new();
        for seq in [10, 11, 30, 50] {
            assert!(stream.delete_message(seq).await.expect("delete message"));
            deleted.push(before[seq as usize - 1].event_id.clone());
        }
        let report = relay.reconcile().await.expect("reconcile");
        println!("reconcile: {report:?}");
        assert_eq!(report.stream_messages, 46);
        assert_eq!(report.stored_events, 50);
        assert_eq!(
            (report.missing, report.republished, report.rewound),
            (4, 4, false)
        );

        let after = read_stream(&env.js, &env.topology.stream).await;
        let v = compare(&stored_ids(&env.store).await, &after);
        println!("verdict: {v:?}");
        assert_eq!((v.delivered, v.lost, v.duplicated), (50, 0, 0));
        // The republished messages carry the same envelope and prev link as the originals.
        let republished: Vec<&Seen> = after.iter().filter(|s| s.seq > 50).collect();
        assert_eq!(republished.len(), 4);
        for s in republished {
            assert!(deleted.contains(&s.event_id));
            let original = before
                .iter()
                .find(|b| b.event_id == s.event_id)
                .expect("original");
            assert_eq!(s.delivered, original.delivered);
        }
        let again = relay.reconcile().await.expect("reconcile");
        assert_eq!((again.missing, again.republished), (0, 0));
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

/// Reconciliation compares the stream with the number of events up to the cursor. Everything up
/// to a cursor is final, so after its first count in a leadership term it counts only what the
/// cursor passed since: a row forged below the counted cursor (it cannot happen for real) is
/// seen by a new term's full count and not by the incremental one.
#[tokio::test]
async fn reconcile_counts_the_log_once_per_leadership_term_then_only_what_the_cursor_passed() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let mut relay = env.relay(100);
        let first = append_spread(&env.store, 4, 5).await;
        drain(&mut relay, first.len()).await;
        let report = relay.reconcile().await.expect("reconcile");
        assert_eq!((report.stored_events, report.stream_messages), (20, 20));

        sqlx::query(
            "INSERT INTO es.events (global_position, transaction_id, event_id, stream_id, \
               stream_version, partition, event_type, payload, metadata) OVERRIDING SYSTEM VALUE \
             VALUES (-1, '1', $1, 'forged-1', 1, 0, 'Forged', '{}', '{}')",
        )
        .bind(Uuid::now_v7())
        .execute(&env.db.pool)
        .await
        .expect("forge");
        let more = append_spread(&env.store, 3, 4).await;
        drain(&mut relay, more.len()).await;
        let report = relay.reconcile().await.expect("reconcile");
        assert_eq!(
            (report.stored_events, report.stream_messages, report.missing),
            (32, 32, 0),
            "counted from the last count on"
        );

        let mut next_term = env.relay(100);
        let report = next_term.reconcile().await.expect("reconcile");
        assert_eq!(report.stored_events, 33, "a new term counts the whole log");
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn reconcile_refills_a_purged_stream() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let mut relay = env.relay(100);
        let ids = append_spread(&env.store, 4, 5).await;
        drain(&mut relay, ids.len()).await;
        let stream = env
            .js
            .get_stream(&env.topology.stream)
            .await
            .expect("stream");
        stream.purge().await.expect("purge");

        // The purged ids are still in the de-duplication window: reconcile must republish them
        // around it rather than rewind into it.
        let report = relay.reconcile().await.expect("reconcile");
        println!("reconcile: {report:?}");
        assert_eq!(
            (
                report.stream_messages,
                report.missing,
                report.republished,
                report.rewound
            ),
            (0, 20, 20, false)
        );
        let again = relay.reconcile().await.expect("reconcile");
        assert_eq!((again.missing, again.republished), (0, 0));
        let seen = read_stream(&env.js, &env.topology.stream).await;
        let v = compare(&stored_ids(&env.store).await, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.lost, v.duplicated, v.unknown), (0, 0, 0));
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_stream_deleted_while_no_relay_ran_is_refilled_from_the_start_by_the_next_relay() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let env = env().await;
        let ids = append_spread(&env.store, 4, 5).await;
        drain(&mut env.relay(100), ids.len()).await;
        env.js
            .delete_stream(&env.topology.stream)
            .await
            .expect("delete");

        // A new relay resumes from the stored cursor, but the stream it finds is gone.
        let mut next = env.relay(100);
        assert_eq!(next.publish_batch().await.expect("batch"), 0);
        assert_eq!(cursor(&env.store, "relay").await, Some((0, 0)));
        drain(&mut next, ids.len()).await;
        let seen = read_stream(&env.js, &env.topology.stream).await;
        let v = compare(&stored_ids(&env.store).await, &seen);
        println!("verdict: {v:?}");
        assert_eq!((v.stored, v.lost, v.duplicated), (20, 0, 0));
        assert_headers_and_chains(&env.topology, &seen);
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_wakes_on_append_notifications_without_waiting_for_the_poll() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // A private Postgres: on the shared one, other tests' open transactions can hold the
        // log back exactly when a notification arrives, and then only the poll would help.
        let pg = PgProcess::start();
        let mut env = env().await;
        env.db = TestDb::on(&pg.url()).await;
        env.store = EventStore::connect(env.db.pool.clone())
            .await
            .expect("store");
        let relay = Relay::new(
            env.store.clone(),
            env.js.clone(),
            env.topology.clone(),
            RelayConfig {
                poll_interval: Duration::from_secs(3600),
                reconcile_interval: Duration::from_secs(3600),
                ..Default::default()
            },
        );
        let token = CancellationToken::new();
        let task = tokio::spawn(relay.run(token.clone()));
        let first = append_spread(&env.store, 1, 1).await;
        env.wait_for_messages(first.len() as u64).await;
        // Idle now; only a notification can wake it before the (hour-long) poll.
        for round in 1..=3u64 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            append_spread(&env.store, 2, 1).await;
            env.wait_for_messages(1 + 2 * round).await;
        }
        token.cancel();
        task.await.expect("join").expect("relay ends cleanly");
        env.cleanup().await;
    })
    .await
    .expect("test timed out");
}
