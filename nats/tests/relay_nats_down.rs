//! TESTPLAN R2: NATS is down for a while under load, then the stream is deleted. Appends keep
//! succeeding (they need only Postgres), the backlog drains once NATS is back, and a deleted
//! stream is rebuilt from Postgres: event ids in JetStream = event ids in Postgres.
//!
//! `NURA_R2_DOWN_SECS` sets the outage (default 10; the plan's full run uses 60).

mod common;

use async_nats::jetstream;
use common::*;
use nura_nats::Topology;
use nura_nats::relay::{Relay, RelayConfig};
use nura_store::EventStore;
use nura_testkit::{NatsProcess, TestDb, init_tracing, unique_name};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn down_secs() -> u64 {
    std::env::var("NURA_R2_DOWN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> Option<u64> {
    let mut s = js.get_stream(name).await.ok()?;
    Some(s.info().await.ok()?.state.messages)
}

async fn stored_count(store: &EventStore) -> u64 {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM es.events")
        .fetch_one(store.pool())
        .await
        .expect("count");
    n as u64
}

/// Waits until the stream holds at least as many messages as Postgres has events.
async fn wait_drained(js: &jetstream::Context, store: &EventStore, name: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let stored = stored_count(store).await;
        let inside = stream_messages(js, name).await.unwrap_or(0);
        if inside >= stored {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog not drained: stream {inside} of {stored}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_survive_a_nats_outage_and_a_deleted_stream_is_rebuilt_from_postgres() {
    init_tracing();
    let down = Duration::from_secs(down_secs());
    tokio::time::timeout(down + Duration::from_secs(150), async {
        let mut nats = NatsProcess::start();
        let db = TestDb::new().await;
        let store = EventStore::connect(db.pool.clone()).await.expect("store");
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(nats.url())
            .await
            .expect("connect to private NATS");
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client);
        let topology = Topology::named(&unique_name("EV"), &unique_name("t"));
        let relay = Relay::new(
            store.clone(),
            js.clone(),
            topology.clone(),
            RelayConfig {
                poll_interval: Duration::from_millis(100),
                reconcile_interval: Duration::from_secs(2),
                ..Default::default()
            },
        );
        let shutdown = CancellationToken::new();
        let relay_task = tokio::spawn(relay.run(shutdown.clone()));

        // The writer: appends one event at a time on 20 streams until told to stop.
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let writer = {
            let (store, stop, sent, acknowledged) =
                (store.clone(), stop.clone(), sent.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let streams: Vec<String> = (0..20).map(|_| new_stream_id()).collect();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    sent.fetch_add(1, Ordering::Relaxed);
                    append_n(&store, &streams[i % streams.len()], 1).await;
                    acknowledged.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    // ~500 appends/s at most: enough load, bounded size on slow machines.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };

        tokio::time::sleep(Duration::from_secs(2)).await;
        wait_drained(&js, &store, &topology.stream, Duration::from_secs(20)).await;
        nats.kill9();
        let acked_at_kill = acknowledged.load(Ordering::Relaxed);
        tokio::time::sleep(down.min(Duration::from_secs(3))).await;
        let cursor_during = cursor(&store, "relay").await;
        tokio::time::sleep(down.saturating_sub(Duration::from_secs(3))).await;
        let acked_while_down = acknowledged.load(Ordering::Relaxed) - acked_at_kill;
        assert!(acked_while_down > 0, "appends keep succeeding while NATS is down");
        assert_eq!(
            cursor(&store, "relay").await,
            cursor_during,
            "the cursor does not move while nothing can be acked"
        );

        nats.restart();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        writer.await.expect("writer");
        wait_drained(&js, &store, &topology.stream, Duration::from_secs(60)).await;
        let seen = read_stream(&js, &topology.stream).await;
        let v = compare(&stored_ids(&store).await, &seen);
        println!(
            "R2 outage: down {}s, sent {}, acknowledged {}, acknowledged while down {}, stored {}, delivered {}, lost {}, duplicated {}",
            down.as_secs(),
            sent.load(Ordering::Relaxed),
            acknowledged.load(Ordering::Relaxed),
            acked_while_down,
            v.stored,
            v.delivered,
            v.lost,
            v.duplicated
        );
        assert_eq!((v.lost, v.unknown), (0, 0));
        assert_eq!(v.stored as u64, acknowledged.load(Ordering::Relaxed));

        // Now the stream disappears; the relay notices (reconciliation, or the next publish)
        // and rebuilds it from Postgres.
        js.delete_stream(&topology.stream).await.expect("delete stream");
        let more = append_spread(&store, 5, 4).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        wait_drained(&js, &store, &topology.stream, Duration::from_secs(60)).await;
        let seen = read_stream(&js, &topology.stream).await;
        let v = compare(&stored_ids(&store).await, &seen);
        println!(
            "R2 rebuilt: sent {}, acknowledged {}, stored {}, delivered {}, lost {}, duplicated {}",
            sent.load(Ordering::Relaxed) + more.len() as u64,
            acknowledged.load(Ordering::Relaxed) + more.len() as u64,
            v.stored,
            v.delivered,
            v.lost,
            v.duplicated
        );
        assert_eq!((v.lost, v.duplicated, v.unknown), (0, 0, 0));

        shutdown.cancel();
        relay_task.await.expect("join").expect("relay ends cleanly");
    })
    .await
    .expect("test timed out");
}
