//! P1: the real `nura projector` process is killed with SIGKILL every ~2 s while events over
//! 1,000 conversations are written and published; after the last restart the read model equals
//! the fold, every counter is exact, nothing is lost and nothing is applied twice.
//!
//! Size: `NURA_TEST_EVENTS` (default 20,000). The test publishes to JetStream itself (standing in
//! for the relay) so a failure here points at the projector alone.

use nura_domain::DomainEvent;
use nura_domain::conversation::{ConversationEvent, stream_id};
use nura_nats::Topology;
use nura_projections::conversations::{self, Conversations};
use nura_store::{EventStore, ExpectedVersion, Metadata, NewEvent, Position};
use nura_testkit::{TestDb, nats_client, unique_name};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

const STREAMS: usize = 1000;
const WRITERS: usize = 8;
const KILL_EVERY: Duration = Duration::from_secs(2);

fn events() -> usize {
    std::env::var("NURA_TEST_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

struct Projector {
    child: Child,
    log: std::path::PathBuf,
}

impl Projector {
    fn spawn(db_url: &str, topology: &Topology, log: &std::path::Path) -> Projector {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("projector log file");
        let child = Command::new(env!("CARGO_BIN_EXE_nura"))
            .arg("projector")
            .env("DATABASE_URL", db_url)
            .env("DATABASE_MAX_CONNECTIONS", "16")
            .env("NATS_URL", nura_testkit::nats_url())
            .env("NURA_STREAM", &topology.stream)
            .env("NURA_SUBJECT_PREFIX", &topology.subject_prefix)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn nura projector");
        Projector {
            child,
            log: log.to_owned(),
        }
    }

    /// SIGKILL: no shutdown path runs, in-flight batches are lost mid-transaction.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Projector {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn stored(e: &ConversationEvent) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: e.event_type().into(),
        schema_version: 1,
        payload: e.to_payload(),
    }
}

/// One writer: starts its share of conversations, then posts messages (1–3 per command) round
/// robin until it wrote `budget` events. Returns MessagePosted counts per conversation.
async fn write(store: EventStore, w: usize, budget: usize) -> HashMap<Uuid, i64> {
    let ids: Vec<Uuid> = (0..STREAMS / WRITERS).map(|_| Uuid::now_v7()).collect();
    let meta = Metadata {
        tenant_id: "acme".into(),
        actor: format!("writer-{w}"),
        ..Default::default()
    };
    let mut counts = HashMap::new();
    let mut written = 0;
    for id in &ids {
        let e = ConversationEvent::ConversationStarted {
            conversation_id: *id,
            tenant_id: "acme".into(),
            title: format!("w{w} {id}"),
            started_by: "alice".into(),
            at: chrono::Utc::now(),
        };
        store
            .append(
                &stream_id(*id),
                ExpectedVersion::Exact(0),
                &[stored(&e)],
                &meta,
                None,
            )
            .await
            .expect("start");
        counts.insert(*id, 0i64);
        written += 1;
    }
    let mut round = 0usize;
    while written < budget {
        for (i, id) in ids.iter().enumerate() {
            if written >= budget {
                break;
            }
            let k = (1 + (round + i) % 3).min(budget - written);
            let batch: Vec<NewEvent> = (0..k)
                .map(|j| {
                    stored(&ConversationEvent::MessagePosted {
                        message_id: Uuid::now_v7(),
                        author: "alice".into(),
                        text: format!("r{round} m{j}"),
                        at: chrono::Utc::now(),
                    })
                })
                .collect();
            store
                .append(&stream_id(*id), ExpectedVersion::Any, &batch, &meta, None)
                .await
                .expect("post");
            *counts.get_mut(id).expect("known id") += k as i64;
            written += k;
        }
        round += 1;
    }
    counts
}

/// Stands in for the relay: tails the log in commit order and publishes with the partition
/// chain, until `done` is set and everything stored is published. Returns (sent, acknowledged).
async fn publish(
    store: EventStore,
    js: async_nats::jetstream::Context,
    topology: Topology,
    done: Arc<AtomicBool>,
) -> (usize, usize) {
    let mut after = Position::ZERO;
    let mut prev: HashMap<i32, Position> = HashMap::new();
    let (mut sent, mut acked) = (0, 0);
    loop {
        let page = store.read_all(after, 500).await.expect("read_all");
        if page.is_empty() {
            if done.load(Ordering::SeqCst) {
                let total = store
                    .count_until(Position {
                        tx: i64::MAX,
                        pos: i64::MAX,
                    })
                    .await
                    .expect("count");
                if sent as i64 >= total {
                    return (sent, acked);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let mut acks = Vec::with_capacity(page.len());
        for e in &page {
            let p = prev.insert(e.partition, e.position());
            let (headers, body) = nura_nats::encode(e, p);
            acks.push(
                js.publish_with_headers(topology.subject(e), headers, body)
                    .await
                    .expect("publish"),
            );
            sent += 1;
            after = e.position();
        }
        for a in acks {
            a.await.expect("puback");
            acked += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_every_two_seconds_leaves_read_models_exact() {
    nura_testkit::init_tracing();
    let n = events().max(STREAMS);
    let db = TestDb::new().await;
    let store = EventStore::connect(db.pool_with(16).await)
        .await
        .expect("store");
    let js = async_nats::jetstream::new(nats_client().await);
    let topology = Topology::named(&unique_name("P1"), &unique_name("p1"));
    topology.ensure_stream(&js).await.expect("stream");
    let log = std::env::temp_dir().join(format!("{}.log", unique_name("nura_p1_projector")));

    let outcome = tokio::time::timeout(Duration::from_secs(300), async {
        let kills = Arc::new(AtomicUsize::new(0));
        let stop_killing = Arc::new(AtomicBool::new(false));
        let killer = {
            let (url, topology, log) = (db.url.clone(), topology.clone(), log.clone());
            let (kills, stop) = (kills.clone(), stop_killing.clone());
            tokio::task::spawn_blocking(move || {
                let mut p = Projector::spawn(&url, &topology, &log);
                while !stop.load(Ordering::SeqCst) {
                    // Kill at uneven moments so kills land in every phase of a batch.
                    let jitter = Duration::from_millis(u64::from(Uuid::new_v4().as_u128() as u16 % 500));
                    std::thread::sleep(KILL_EVERY - Duration::from_millis(250) + jitter);
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    p.kill9();
                    kills.fetch_add(1, Ordering::SeqCst);
                    p = Projector::spawn(&url, &topology, &log);
                }
                p
            })
        };

        let done = Arc::new(AtomicBool::new(false));
        let publisher = tokio::spawn(publish(store.clone(), js.clone(), topology.clone(), done.clone()));
        let started = Instant::now();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let budget = n / WRITERS + usize::from(w < n % WRITERS);
                tokio::spawn(write(store.clone(), w, budget))
            })
            .collect();
        let mut posted: HashMap<Uuid, i64> = HashMap::new();
        for w in writers {
            posted.extend(w.await.expect("writer"));
        }
        done.store(true, Ordering::SeqCst);
        let (sent, acked) = publisher.await.expect("publisher");
        let written_in = started.elapsed();
        // Keep killing a little longer so kills also land while the backlog drains.
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop_killing.store(true, Ordering::SeqCst);
        let last = killer.await.expect("killer");

        // The last instance drains what is left (including batches whose acks died with a
        // killed instance: they come back after ack_wait, and are skipped).
        let heads: Vec<(i32, i64, i64)> = sqlx::query_as(
            "SELECT DISTINCT ON (partition) partition, transaction_id::text::bigint, global_position \
             FROM es.events ORDER BY partition, transaction_id DESC, global_position DESC",
        )
        .fetch_all(&db.pool)
        .await
        .expect("heads");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut all = true;
            for (p, tx, pos) in &heads {
                let token = nura_store::CommitToken { position: Position { tx: *tx, pos: *pos }, partition: *p };
                all &= nura_projections::has_passed(&db.pool, conversations::NAME, token)
                    .await
                    .expect("has_passed");
            }
            if all {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "projector did not catch up; its log:\n{}",
                last.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop(last);
        (posted, sent, acked, kills.load(Ordering::SeqCst), written_in)
    })
    .await;
    let (posted, sent, acked, kills, written_in) = outcome.expect("P1 timed out");

    let stored_events: i64 = sqlx::query_scalar("SELECT count(*) FROM es.events")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    let stored_messages: i64 = posted.values().sum();
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT conversation_id, message_count FROM read.conversations")
            .fetch_all(&db.pool)
            .await
            .expect("read model");
    let messages_in_read_model: i64 = sqlx::query_scalar("SELECT count(*) FROM read.messages")
        .fetch_one(&db.pool)
        .await
        .expect("messages");
    let counted: HashMap<Uuid, i64> = rows.into_iter().collect();
    let mut lost = 0i64;
    let mut duplicated = 0i64;
    for (id, n) in &posted {
        match counted.get(id) {
            None => lost += 1 + n,
            Some(c) if c < n => lost += n - c,
            Some(c) => duplicated += c - n,
        }
    }
    println!(
        "verdict P1: sent={sent} acknowledged={acked} stored={stored_events} conversations={} \
         messages={messages_in_read_model}/{stored_messages} kills={kills} written_in={written_in:?} \
         lost={lost} duplicated={duplicated}",
        counted.len()
    );
    assert_eq!(sent as i64, stored_events);
    assert_eq!(acked, sent);
    assert!(
        kills >= 2,
        "the projector was killed during the run ({kills} kills)"
    );
    assert_eq!(counted.len(), posted.len(), "every conversation projected");
    assert_eq!((lost, duplicated), (0, 0));
    assert_eq!(messages_in_read_model, stored_messages);

    let clean = TestDb::new().await;
    nura_projections::fold(&store, &clean.pool, &Conversations)
        .await
        .expect("fold");
    let expected = conversations::dump(&clean.pool).await.expect("dump");
    let actual = conversations::dump(&db.pool).await.expect("dump");
    assert!(
        expected.0 == actual.0,
        "read.conversations differs from the fold"
    );
    assert!(
        expected.1 == actual.1,
        "read.messages differs from the fold"
    );
    let _ = js.delete_stream(&topology.stream).await;
    let _ = std::fs::remove_file(&log);
}
