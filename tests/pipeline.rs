//! ES4: many writers through the whole pipeline (event store → relay → JetStream → projector),
//! three runs; 0 events missing or duplicated in JetStream and in the read models.

use futures::StreamExt;
use nura_domain::DomainEvent;
use nura_domain::conversation::{ConversationEvent, stream_id};
use nura_nats::Topology;
use nura_store::{EventStore, ExpectedVersion, Metadata, NewEvent};
use nura_testkit::{TestDb, nats_client, unique_name};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_appended_event_reaches_jetstream_and_the_read_models_exactly_once() {
    nura_testkit::init_tracing();
    let writers = 16;
    let per_writer = env_usize("NURA_ES4_APPENDS", 1500);
    for run in 1..=3 {
        one_run(run, writers, per_writer).await;
    }
}

async fn one_run(run: usize, writers: usize, per_writer: usize) {
    let db = TestDb::new().await;
    let store = EventStore::connect(db.pool_with(16).await).await.unwrap();
    let client = nats_client().await;
    let js = async_nats::jetstream::new(client);
    let topology = Topology::named(&unique_name("ES4"), &unique_name("es4"));
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(
        nura_nats::relay::Relay::new(
            store.clone(),
            js.clone(),
            topology.clone(),
            Default::default(),
        )
        .run(shutdown.clone()),
    );
    let projector = tokio::spawn(nura_projections::run(
        store.clone(),
        js.clone(),
        topology.clone(),
        Default::default(),
        shutdown.clone(),
    ));

    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let id = Uuid::now_v7();
                let e = ConversationEvent::ConversationStarted {
                    conversation_id: id,
                    tenant_id: "acme".into(),
                    title: format!("w{w} #{i}"),
                    started_by: "alice".into(),
                    at: chrono::Utc::now(),
                };
                let new = NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: e.event_type().into(),
                    schema_version: 1,
                    payload: e.to_payload(),
                };
                let meta = Metadata {
                    tenant_id: "acme".into(),
                    actor: "alice".into(),
                    ..Default::default()
                };
                store
                    .append(
                        &stream_id(id),
                        ExpectedVersion::Exact(0),
                        &[new],
                        &meta,
                        None,
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sent = writers * per_writer;

    // Wait until the read model has every conversation (bounded).
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut projected = 0i64;
    while Instant::now() < deadline {
        projected = sqlx::query_scalar("SELECT count(*) FROM read.conversations")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if projected as usize >= sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    relay.await.unwrap().unwrap();
    projector.await.unwrap().unwrap();

    let stored: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM es.events")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let in_stream = read_message_ids(&js, &topology).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for id in &in_stream {
        *counts.entry(id.clone()).or_default() += 1;
    }
    let missing_js = stored
        .iter()
        .filter(|id| !counts.contains_key(&id.to_string()))
        .count();
    let dup_js = counts.values().filter(|&&n| n > 1).count();
    let dup_read: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT stream_id FROM read.conversations GROUP BY stream_id HAVING count(*) > 1) d",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    println!(
        "ES4 run {run} verdict: sent={sent} acknowledged={sent} stored={} delivered_js={} projected={projected} lost_js={missing_js} duplicated_js={dup_js} duplicated_read={dup_read}",
        stored.len(),
        in_stream.len()
    );
    assert_eq!(stored.len(), sent);
    assert_eq!(missing_js, 0, "events missing in JetStream");
    assert_eq!(dup_js, 0, "events duplicated in JetStream");
    assert_eq!(
        projected as usize, sent,
        "read model has every conversation"
    );
    assert_eq!(dup_read, 0);
    js.delete_stream(&topology.stream).await.ok();
}

async fn read_message_ids(js: &async_nats::jetstream::Context, topology: &Topology) -> Vec<String> {
    let stream = js.get_stream(&topology.stream).await.unwrap();
    let total = stream.get_info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut ids = Vec::with_capacity(total);
    while ids.len() < total {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream read in time")
            .unwrap()
            .unwrap();
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        ids.push(id);
    }
    ids
}
