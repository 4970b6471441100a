//! Stream and subject layout, and the wire form of an event.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use nura_store::{CommitToken, Position, RawEvent, RecordedEvent};
use std::time::Duration;

/// Header names carried by every event message, so integrations can filter without parsing.
pub mod headers {
    /// JetStream's de-duplication id: always the event id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    pub const EVENT_ID: &str = "Nura-Event-Id";
    pub const EVENT_TYPE: &str = "Nura-Event-Type";
    pub const STREAM_ID: &str = "Nura-Stream-Id";
    pub const STREAM_VERSION: &str = "Nura-Stream-Version";
    pub const TENANT_ID: &str = "Nura-Tenant-Id";
    /// The event's commit token `<tx>.<pos>.<partition>`.
    pub const COMMIT: &str = "Nura-Commit";
    /// The position `<tx>.<pos>` of the previous event in the same partition, empty for the first.
    pub const PREV: &str = "Nura-Prev";
}

/// Where events go: one stream, subjects `<prefix>.<context>.<aggregate>.<partition>.<event_type>`.
/// Tests give each run its own stream name and prefix so they can share one NATS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The JetStream stream name (`EVENTS` in production).
    pub stream: String,
    /// The first subject token (`events` in production).
    pub subject_prefix: String,
    /// Replicas of the stream (1 on one machine, 3 on a cluster).
    pub replicas: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            stream: "EVENTS".into(),
            subject_prefix: "events".into(),
            replicas: 1,
        }
    }
}

impl Topology {
    /// A topology with its own stream name and subject prefix (for tests and side-by-side runs).
    pub fn named(stream: &str, subject_prefix: &str) -> Topology {
        Topology {
            stream: stream.into(),
            subject_prefix: subject_prefix.into(),
            replicas: 1,
        }
    }

    /// The subject an event is published on.
    pub fn subject(&self, event: &RecordedEvent) -> String {
        self.subject_of(&event.stream_id, event.partition, &event.event_type)
    }

    /// The subject a [`RawEvent`] is published on (the same as [`Topology::subject`]).
    pub fn raw_subject(&self, event: &RawEvent) -> String {
        self.subject_of(&event.stream_id, event.partition, &event.event_type)
    }

    fn subject_of(&self, stream_id: &str, partition: i32, event_type: &str) -> String {
        format!(
            "{}.{}.{}.{partition}.{event_type}",
            self.subject_prefix,
            nura_domain::context_of(stream_id),
            nura_domain::aggregate_of(stream_id),
        )
    }

    /// The filter subject of one partition (for a consumer that owns it).
    pub fn partition_filter(&self, partition: i32) -> String {
        format!("{}.*.*.{partition}.>", self.subject_prefix)
    }

    /// The stream configuration: file storage, limits retention, a 2-minute de-duplication
    /// window keyed on `Nats-Msg-Id`.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            duplicate_window: Duration::from_secs(120),
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// Creates the stream if it does not exist (idempotent) and returns it.
    pub async fn ensure_stream(&self, js: &jetstream::Context) -> anyhow::Result<stream::Stream> {
        Ok(js.get_or_create_stream(self.stream_config()).await?)
    }
}

/// Encodes an event for publishing: headers carry the envelope fields, the body is the whole
/// envelope as JSON. `prev` is the position of the previous event in the same partition.
pub fn encode(event: &RecordedEvent, prev: Option<Position>) -> (HeaderMap, Bytes) {
    let h = envelope_headers(
        event.event_id,
        &event.event_type,
        &event.stream_id,
        event.stream_version,
        &event.metadata.tenant_id,
        event.commit_token(),
        prev,
    );
    let body = serde_json::to_vec(event).expect("events serialize");
    (h, Bytes::from(body))
}

/// [`encode`] for a [`RawEvent`]: the same headers, and a body that [`decode`] turns into the
/// same `RecordedEvent`, written without parsing `payload` or `metadata`.
pub fn encode_raw(event: &RawEvent, prev: Option<Position>) -> (HeaderMap, Bytes) {
    let h = envelope_headers(
        event.event_id,
        &event.event_type,
        &event.stream_id,
        event.stream_version,
        &event.tenant_id,
        event.commit_token(),
        prev,
    );
    let body = serde_json::to_vec(event).expect("events serialize");
    (h, Bytes::from(body))
}

fn envelope_headers(
    event_id: uuid::Uuid,
    event_type: &str,
    stream_id: &str,
    stream_version: i64,
    tenant_id: &str,
    commit: CommitToken,
    prev: Option<Position>,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    let id = event_id.to_string();
    h.insert(headers::MSG_ID, id.as_str());
    h.insert(headers::EVENT_ID, id.as_str());
    h.insert(headers::EVENT_TYPE, event_type);
    h.insert(headers::STREAM_ID, stream_id);
    h.insert(headers::STREAM_VERSION, stream_version.to_string().as_str());
    h.insert(headers::TENANT_ID, tenant_id);
    h.insert(headers::COMMIT, commit.to_string().as_str());
    h.insert(
        headers::PREV,
        prev.map(|p| p.to_string()).unwrap_or_default().as_str(),
    );
    h
}

/// An event as received from JetStream, with the previous link of its partition chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    /// The full envelope.
    pub event: RecordedEvent,
    /// The previous event of the same partition (`None` for the partition's first event).
    pub prev: Option<Position>,
}

/// Decodes a message published by [`encode`].
pub fn decode(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<Delivered, String> {
    let event: RecordedEvent =
        serde_json::from_slice(payload).map_err(|e| format!("bad event body: {e}"))?;
    let prev = prev_of(headers)?;
    Ok(Delivered { event, prev })
}

/// The `Nura-Prev` header of a message: the previous event of the same partition, `None` for
/// the partition's first event. An error when the header is missing or malformed.
pub fn prev_of(headers: Option<&HeaderMap>) -> Result<Option<Position>, String> {
    match headers
        .and_then(|h| h.get(headers::PREV))
        .map(|v| v.as_str())
    {
        None => Err("missing Nura-Prev header".into()),
        Some("") => Ok(None),
        Some(s) => Ok(Some(s.parse::<Position>()?)),
    }
}
