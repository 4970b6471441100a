//! TESTPLAN R1: the real `nura relay` binary is killed with SIGKILL every ~2 s while writers
//! append events; it is restarted each time. At the end, the event ids in JetStream equal the
//! event ids in Postgres: none lost, none duplicated (every republished batch falls inside the
//! stream's de-duplication window).
//!
//! `NURA_TEST_EVENTS` sets how many events are written (default 20000; the plan's full run is
//! 100000).

use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use futures::StreamExt;
use nura_nats::{Topology, headers};
use nura_store::{EventStore, ExpectedVersion, Metadata, NewEvent};
use nura_testkit::{TestDb, init_tracing, nats_url, unique_name};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

const WRITERS: usize = 4;

fn events_to_write() -> u64 {
    std::env::var("NURA_TEST_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

/// One `nura relay` process; its log goes to a file so a failure can show it.
struct RelayProcess {
    db_url: String,
    topology: Topology,
    log: PathBuf,
    child: Option<Child>,
}

impl RelayProcess {
    fn start(db_url: &str, topology: &Topology) -> RelayProcess {
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("nura_relay_r1")));
        let mut p = RelayProcess {
            db_url: db_url.to_owned(),
            topology: topology.clone(),
            log,
            child: None,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("relay log file");
        let child = Command::new(env!("CARGO_BIN_EXE_nura"))
            .arg("relay")
            .env("DATABASE_URL", &self.db_url)
            .env("NATS_URL", nats_url())
            .env("NURA_STREAM", &self.topology.stream)
            .env("NURA_SUBJECT_PREFIX", &self.topology.subject_prefix)
            .env("DATABASE_MAX_CONNECTIONS", "4")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start `nura relay`");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // std's kill is SIGKILL on Unix: no clean-up, no cursor flush, no lock release.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Appends `count` events over fresh streams, 1 to 3 events per command.
async fn write(store: EventStore, count: u64, sent: Arc<AtomicU64>, acked: Arc<AtomicU64>) {
    let streams: Vec<String> = (0..25)
        .map(|_| format!("conversation-{}", Uuid::now_v7()))
        .collect();
    let mut written = 0u64;
    let mut i = 0usize;
    while written < count {
        let n = (1 + i % 3).min((count - written) as usize);
        let events: Vec<NewEvent> = (0..n)
            .map(|k| NewEvent {
                event_id: Uuid::now_v7(),
                event_type: "MessagePosted".into(),
                schema_version: 1,
                payload: serde_json::json!({ "i": i, "k": k }),
            })
            .collect();
        let metadata = Metadata {
            tenant_id: "tenant-r1".into(),
            actor: "r1".into(),
            command_id: Uuid::now_v7().to_string(),
            correlation_id: "r1".into(),
            causation_id: None,
        };
        sent.fetch_add(n as u64, Ordering::Relaxed);
        store
            .append(
                &streams[i % streams.len()],
                ExpectedVersion::Any,
                &events,
                &metadata,
                None,
            )
            .await
            .expect("append (needs only Postgres)");
        acked.fetch_add(n as u64, Ordering::Relaxed);
        written += n as u64;
        i += 1;
    }
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message's event id (`Nura-Event-Id`), in stream order; checks `Nats-Msg-Id` matches.
async fn event_ids_in_stream(js: &jetstream::Context, name: &str) -> Vec<String> {
    let mut stream = js.get_stream(name).await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    if last == 0 {
        return out;
    }
    let consumer = stream
        .create_consumer(OrderedConfig {
            headers_only: true,
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("messages");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream read stalled")
            .expect("stream ended")
            .expect("message");
        let info = msg.info().expect("jetstream message");
        let (seq, pending) = (info.stream_sequence, info.pending);
        let h = msg.headers.as_ref().expect("headers");
        let id = h
            .get(headers::EVENT_ID)
            .expect("Nura-Event-Id")
            .as_str()
            .to_owned();
        if let Some(msg_id) = h.get(headers::MSG_ID) {
            assert_eq!(msg_id.as_str(), id, "Nats-Msg-Id is the event id");
        }
        out.push(id);
        if seq >= last || pending == 0 {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_every_two_seconds_loses_and_duplicates_nothing() {
    init_tracing();
    let total = events_to_write();
    let budget = Duration::from_secs(60 + total / 200);
    tokio::time::timeout(budget, async {
        let db = TestDb::new().await;
        let store = EventStore::connect(db.pool.clone()).await.expect("store");
        let js = jetstream::new(
            async_nats::connect(nats_url())
                .await
                .expect("NATS is required (NATS_URL)"),
        );
        let topology = Topology::named(&unique_name("EV"), &unique_name("t"));
        let mut relay = RelayProcess::start(&db.url, &topology);

        let sent = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..WRITERS as u64)
            .map(|w| {
                let share = total / WRITERS as u64 + u64::from(w < total % WRITERS as u64);
                tokio::spawn(write(store.clone(), share, sent.clone(), acked.clone()))
            })
            .collect();

        // Kill and restart the relay every ~2 s (jittered) while the writers run.
        let started = Instant::now();
        let mut kills = 0u32;
        let mut k = 0u64;
        while writers.iter().any(|w| !w.is_finished()) {
            let pause = 1500 + (k * 7919 % 1000);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            relay.kill9();
            kills += 1;
            relay.spawn();
            k += 1;
        }
        for w in writers {
            w.await.expect("writer");
        }
        let write_secs = started.elapsed().as_secs_f64();
        // One more kill right at the end, then let the last relay drain the backlog.
        relay.kill9();
        kills += 1;
        relay.spawn();

        let stored: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM es.events")
            .fetch_all(&db.pool)
            .await
            .expect("stored ids");
        let deadline = Instant::now() + Duration::from_secs(60);
        while stream_messages(&js, &topology.stream).await < stored.len() as u64 {
            assert!(
                Instant::now() < deadline,
                "backlog not drained: {} of {}; relay log:\n{}",
                stream_messages(&js, &topology.stream).await,
                stored.len(),
                relay.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        relay.kill9();

        let seen = event_ids_in_stream(&js, &topology.stream).await;
        let stored_set: HashSet<String> = stored.iter().map(Uuid::to_string).collect();
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for id in &seen {
            *counts.entry(id.as_str()).or_default() += 1;
        }
        let lost = stored_set
            .iter()
            .filter(|id| !counts.contains_key(id.as_str()))
            .count();
        let duplicated: u64 = counts.values().map(|c| c - 1).sum();
        let unknown = counts.keys().filter(|id| !stored_set.contains(**id)).count();
        println!(
            "R1 verdict: sent {}, acknowledged {}, stored {}, delivered {}, distinct {}, lost {lost}, duplicated {duplicated}, unknown {unknown}, relay kills {kills}, writing took {write_secs:.1}s",
            sent.load(Ordering::Relaxed),
            acked.load(Ordering::Relaxed),
            stored.len(),
            seen.len(),
            counts.len(),
        );
        assert_eq!(stored.len() as u64, total);
        assert_eq!(acked.load(Ordering::Relaxed), total);
        assert_eq!((lost, duplicated, unknown), (0, 0, 0), "relay log:\n{}", relay.log_tail());
        assert!(kills >= 2, "the relay was killed at least twice");
        let _ = js.delete_stream(&topology.stream).await;
    })
    .await
    .expect("R1 timed out");
}
