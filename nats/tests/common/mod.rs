//! Shared helpers of the relay tests: appending events and reading a whole stream back.
#![allow(dead_code)]

use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
use futures::StreamExt;
use nura_nats::{Delivered, decode, headers};
use nura_store::{EventStore, ExpectedVersion, Metadata, NewEvent};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

/// A stream id of the conversation aggregate.
pub fn new_stream_id() -> String {
    format!("conversation-{}", Uuid::now_v7())
}

/// Appends `count` events (one per append) to `stream_id`; returns their ids in order.
pub async fn append_n(store: &EventStore, stream_id: &str, count: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let event = NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "MessagePosted".into(),
            schema_version: 1,
            payload: serde_json::json!({ "n": i }),
        };
        let metadata = Metadata {
            tenant_id: "tenant-a".into(),
            actor: "tester".into(),
            command_id: Uuid::now_v7().to_string(),
            correlation_id: "test".into(),
            causation_id: None,
        };
        store
            .append(
                stream_id,
                ExpectedVersion::Any,
                std::slice::from_ref(&event),
                &metadata,
                None,
            )
            .await
            .expect("append");
        ids.push(event.event_id);
    }
    ids
}

/// Appends `per_stream` events to each of `streams` new streams, interleaved round-robin so
/// partitions mix in commit order; returns every id.
pub async fn append_spread(store: &EventStore, streams: usize, per_stream: usize) -> Vec<Uuid> {
    let ids: Vec<String> = (0..streams).map(|_| new_stream_id()).collect();
    let mut out = Vec::new();
    for _ in 0..per_stream {
        for s in &ids {
            out.extend(append_n(store, s, 1).await);
        }
    }
    out
}

/// One message read back from the stream.
pub struct Seen {
    pub seq: u64,
    pub msg_id: Option<String>,
    pub event_id: String,
    pub subject: String,
    pub delivered: Delivered,
    pub headers: async_nats::HeaderMap,
}

/// Reads every message of the stream (with an ordered consumer), in stream order.
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<Seen> {
    let mut s = js.get_stream(stream).await.expect("stream exists");
    let last = s.info().await.expect("stream info").state.last_sequence;
    let mut out = Vec::new();
    if last == 0 {
        return out;
    }
    let consumer = s
        .create_consumer(OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("messages");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream read stalled")
            .expect("stream ended")
            .expect("message");
        let seq = msg.info().expect("jetstream message").stream_sequence;
        let h = msg.headers.clone().expect("headers");
        let delivered = decode(Some(&h), &msg.payload).expect("decodes");
        out.push(Seen {
            seq,
            msg_id: h.get(headers::MSG_ID).map(|v| v.as_str().to_owned()),
            event_id: h
                .get(headers::EVENT_ID)
                .expect("event id header")
                .as_str()
                .to_owned(),
            subject: msg.subject.to_string(),
            delivered,
            headers: h,
        });
        if seq >= last {
            return out;
        }
    }
}

/// Every event id stored in Postgres, in commit order.
pub async fn stored_ids(store: &EventStore) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM es.events ORDER BY transaction_id, global_position")
        .fetch_all(store.pool())
        .await
        .expect("read stored ids")
}

/// Counts of a comparison between the stream and Postgres.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub stored: usize,
    pub delivered: usize,
    pub distinct: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub unknown: usize,
}

/// Compares event ids in the stream with those in Postgres.
pub fn compare(stored: &[Uuid], seen: &[Seen]) -> Verdict {
    let stored_set: HashSet<String> = stored.iter().map(Uuid::to_string).collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for s in seen {
        *counts.entry(s.event_id.as_str()).or_default() += 1;
    }
    Verdict {
        stored: stored.len(),
        delivered: seen.len(),
        distinct: counts.len(),
        lost: stored_set
            .iter()
            .filter(|id| !counts.contains_key(id.as_str()))
            .count(),
        duplicated: counts.values().map(|c| c - 1).sum(),
        unknown: counts.keys().filter(|k| !stored_set.contains(**k)).count(),
    }
}

/// The relay's stored cursor, if any.
pub async fn cursor(store: &EventStore, name: &str) -> Option<(i64, i64)> {
    sqlx::query_as("SELECT transaction_id, global_position FROM es.cursors WHERE name = $1")
        .bind(name)
        .fetch_optional(store.pool())
        .await
        .expect("read cursor")
}
