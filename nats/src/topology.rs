//! Stream and subject layout, and the wire form of an event.

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, HeaderName};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use nura_store::{CommitToken, Position, RawEvent, RecordedEvent};
use std::sync::LazyLock;
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

/// The same names as `HeaderName`s. Looking a header up by one of these builds nothing; a lookup
/// by `&str` validates the name and copies it into a new `HeaderName` first, on every call.
pub mod header_names {
    use super::headers;
    use async_nats::HeaderName;

    pub const MSG_ID: HeaderName = HeaderName::from_static(headers::MSG_ID);
    pub const EVENT_ID: HeaderName = HeaderName::from_static(headers::EVENT_ID);
    pub const EVENT_TYPE: HeaderName = HeaderName::from_static(headers::EVENT_TYPE);
    pub const STREAM_ID: HeaderName = HeaderName::from_static(headers::STREAM_ID);
    pub const STREAM_VERSION: HeaderName = HeaderName::from_static(headers::STREAM_VERSION);
    pub const TENANT_ID: HeaderName = HeaderName::from_static(headers::TENANT_ID);
    pub const COMMIT: HeaderName = HeaderName::from_static(headers::COMMIT);
    pub const PREV: HeaderName = HeaderName::from_static(headers::PREV);
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
    pub fn raw_subject(&self, event: &RawEvent<'_>) -> String {
        self.subject_of(event.stream_id, event.partition, event.event_type)
    }

    fn subject_of(&self, stream_id: &str, partition: i32, event_type: &str) -> String {
        let mut partition_digits = itoa::Buffer::new();
        let parts = [
            self.subject_prefix.as_str(),
            nura_domain::context_of(stream_id),
            nura_domain::aggregate_of(stream_id),
            partition_digits.format(partition),
            event_type,
        ];
        // One allocation of the right size (a subject is built per published event).
        let mut subject = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                subject.push('.');
            }
            subject.push_str(part);
        }
        subject
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
/// same `RecordedEvent`. The body is the JSON object serde writes for a `RecordedEvent` (same
/// fields in the same order, same number and time formats), except that `payload` and
/// `metadata` are copied as the text Postgres sent, unparsed, so only whitespace and key order
/// inside them may differ from [`encode`]'s. It is written directly into one buffer of the
/// right size: this runs once per event the relay publishes.
pub fn encode_raw(event: &RawEvent<'_>, prev: Option<Position>) -> (HeaderMap, Bytes) {
    let h = envelope_headers(
        event.event_id,
        event.event_type,
        event.stream_id,
        event.stream_version,
        event.tenant_id,
        event.commit_token(),
        prev,
    );
    (h, raw_body(event))
}

/// The body of [`encode_raw`].
fn raw_body(event: &RawEvent<'_>) -> Bytes {
    // The field names, punctuation, numbers and time take less than this.
    const FIXED: usize = 320;
    let mut b = Vec::with_capacity(
        FIXED
            + event.stream_id.len()
            + event.event_type.len()
            + event.payload.len()
            + event.metadata.len(),
    );
    b.extend_from_slice(b"{\"event_id\":\"");
    b.extend_from_slice(
        event
            .event_id
            .hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .as_bytes(),
    );
    b.extend_from_slice(b"\",\"stream_id\":");
    json_string(&mut b, event.stream_id);
    b.extend_from_slice(b",\"stream_version\":");
    b.extend_from_slice(itoa::Buffer::new().format(event.stream_version).as_bytes());
    b.extend_from_slice(b",\"global_position\":");
    b.extend_from_slice(itoa::Buffer::new().format(event.global_position).as_bytes());
    b.extend_from_slice(b",\"transaction_id\":");
    b.extend_from_slice(itoa::Buffer::new().format(event.transaction_id).as_bytes());
    b.extend_from_slice(b",\"partition\":");
    b.extend_from_slice(itoa::Buffer::new().format(event.partition).as_bytes());
    b.extend_from_slice(b",\"event_type\":");
    json_string(&mut b, event.event_type);
    b.extend_from_slice(b",\"schema_version\":");
    b.extend_from_slice(itoa::Buffer::new().format(event.schema_version).as_bytes());
    b.extend_from_slice(b",\"payload\":");
    b.extend_from_slice(event.payload.as_bytes());
    b.extend_from_slice(b",\"metadata\":");
    b.extend_from_slice(event.metadata.as_bytes());
    b.extend_from_slice(b",\"recorded_at\":");
    json_time(&mut b, &event.recorded_at);
    b.push(b'}');
    Bytes::from(b)
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it.
fn json_string(b: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(b, s).expect("a string serializes into a Vec");
}

/// Appends a time as serde writes a `DateTime<Utc>` (RFC 3339, `Z`, the fraction in 0, 3, 6 or 9
/// digits, whichever is shortest exact). Years outside 0..=9999 and leap seconds go through
/// serde itself.
fn json_time(b: &mut Vec<u8>, t: &DateTime<Utc>) {
    use chrono::{Datelike, Timelike};
    let year = t.year();
    let nano = t.nanosecond();
    if !(0..=9999).contains(&year) || nano >= 1_000_000_000 {
        serde_json::to_writer(b, t).expect("a time serializes into a Vec");
        return;
    }
    let digits = |b: &mut Vec<u8>, n: u32, width: u32| {
        for i in (0..width).rev() {
            b.push(b'0' + (n / 10u32.pow(i) % 10) as u8);
        }
    };
    b.push(b'"');
    digits(b, year as u32, 4);
    b.push(b'-');
    digits(b, t.month(), 2);
    b.push(b'-');
    digits(b, t.day(), 2);
    b.push(b'T');
    digits(b, t.hour(), 2);
    b.push(b':');
    digits(b, t.minute(), 2);
    b.push(b':');
    digits(b, t.second(), 2);
    if nano != 0 {
        b.push(b'.');
        if nano.is_multiple_of(1_000_000) {
            digits(b, nano / 1_000_000, 3);
        } else if nano.is_multiple_of(1_000) {
            digits(b, nano / 1_000, 6);
        } else {
            digits(b, nano, 9);
        }
    }
    b.extend_from_slice(b"Z\"");
}

/// The header map every event message starts from: each name, with no value yet. A clone has
/// room for all eight headers and copies no name and no value, so filling it in allocates only
/// each value's list and rehashes nothing (a map built from scratch grows and rehashes twice per
/// message, and replacing placeholder values would allocate and free a list per header). Only
/// deserializing builds a name without values.
static TEMPLATE: LazyLock<HeaderMap> = LazyLock::new(|| {
    let names: serde_json::Map<String, serde_json::Value> = NAMES
        .iter()
        .map(|n| (n.to_string(), serde_json::Value::Array(Vec::new())))
        .collect();
    serde_json::from_value(serde_json::Value::Object(names)).expect("header names deserialize")
});

/// The header names, in the order of [`envelope_headers`]'s values.
const NAMES: [HeaderName; 8] = [
    header_names::MSG_ID,
    header_names::EVENT_ID,
    header_names::EVENT_TYPE,
    header_names::STREAM_ID,
    header_names::STREAM_VERSION,
    header_names::TENANT_ID,
    header_names::COMMIT,
    header_names::PREV,
];

/// The headers of an event message. Each value is built as the `String` the header map keeps,
/// so nothing is formatted or copied twice.
fn envelope_headers(
    event_id: uuid::Uuid,
    event_type: &str,
    stream_id: &str,
    stream_version: i64,
    tenant_id: &str,
    commit: CommitToken,
    prev: Option<Position>,
) -> HeaderMap {
    let id = event_id
        .hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned();
    let mut commit_value = String::with_capacity(48);
    push_position(&mut commit_value, commit.position);
    commit_value.push('.');
    commit_value.push_str(itoa::Buffer::new().format(commit.partition));
    let prev_value = prev.map_or_else(String::new, |p| {
        let mut v = String::with_capacity(40);
        push_position(&mut v, p);
        v
    });
    let values = [
        id.clone(),
        id,
        header_value(event_type),
        header_value(stream_id),
        itoa::Buffer::new().format(stream_version).to_owned(),
        header_value(tenant_id),
        commit_value,
        prev_value,
    ];
    let mut h = TEMPLATE.clone();
    for (name, value) in NAMES.into_iter().zip(values) {
        h.append(name, value);
    }
    h
}

/// `s` as a header value: a control character (a line break would end the header, and
/// async-nats panics on one) becomes `?`. The gateway refuses such ids, but the log may hold
/// events written before it did or by other writers, and one such event must not stop the relay.
/// The body keeps the exact text.
fn header_value(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    } else {
        s.to_owned()
    }
}

/// Appends `<tx>.<pos>`, as [`Position`]'s `Display` writes it.
fn push_position(s: &mut String, p: Position) {
    s.push_str(itoa::Buffer::new().format(p.tx));
    s.push('.');
    s.push_str(itoa::Buffer::new().format(p.pos));
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
        .and_then(|h| h.get(header_names::PREV))
        .map(|v| v.as_str())
    {
        None => Err("missing Nura-Prev header".into()),
        Some("") => Ok(None),
        Some(s) => Ok(Some(s.parse::<Position>()?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde::Serialize;
    use serde_json::value::RawValue;

    /// The body as serde writes it for the same fields: what `encode_raw` wrote before it wrote
    /// bodies by hand, and what consumers were built against.
    #[derive(Serialize)]
    struct SerdeBody<'a> {
        event_id: uuid::Uuid,
        stream_id: &'a str,
        stream_version: i64,
        global_position: i64,
        transaction_id: i64,
        partition: i32,
        event_type: &'a str,
        schema_version: i32,
        payload: &'a RawValue,
        metadata: &'a RawValue,
        recorded_at: DateTime<Utc>,
    }

    fn serde_body(e: &RawEvent<'_>) -> Vec<u8> {
        serde_json::to_vec(&SerdeBody {
            event_id: e.event_id,
            stream_id: e.stream_id,
            stream_version: e.stream_version,
            global_position: e.global_position,
            transaction_id: e.transaction_id,
            partition: e.partition,
            event_type: e.event_type,
            schema_version: e.schema_version,
            payload: serde_json::from_str(e.payload).expect("payload"),
            metadata: serde_json::from_str(e.metadata).expect("metadata"),
            recorded_at: e.recorded_at,
        })
        .expect("serializes")
    }

    fn event<'a>(stream_id: &'a str, event_type: &'a str, at: DateTime<Utc>) -> RawEvent<'a> {
        RawEvent {
            event_id: uuid::Uuid::from_u128(0x0193_0000_7000_8000_a1b2_c3d4_e5f6_0718),
            stream_id,
            stream_version: 9_007_199_254_740_993,
            global_position: 0,
            transaction_id: i64::MAX,
            partition: -3,
            event_type,
            schema_version: 12,
            payload: r#"{"at": "2026-11-23T03:22:20.123456+00:00", "text": "h\u00e9llo \"q\"", "n": [1, 2.5e3, null]}"#,
            metadata: r#"{"actor": "bench", "tenant_id": "t-1", "extra": {}}"#,
            recorded_at: at,
            tenant_id: "t-1",
        }
    }

    #[test]
    fn the_raw_body_is_byte_for_byte_what_serde_writes() {
        let at = Utc.with_ymd_and_hms(2026, 11, 23, 3, 22, 20).unwrap();
        let odd_ids = [
            ("conversation-0193", "MessagePosted"),
            ("we\"ird\\stream\u{1}-é✓", "Type\twith \"quotes\""),
            ("", ""),
        ];
        for (stream_id, event_type) in odd_ids {
            let e = event(stream_id, event_type, at);
            assert_eq!(
                String::from_utf8(raw_body(&e).to_vec()).unwrap(),
                String::from_utf8(serde_body(&e)).unwrap()
            );
        }
    }

    #[test]
    fn times_are_written_as_serde_writes_them() {
        let base = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let mut times = vec![
            base,
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            // Outside four-digit years: serde writes a sign.
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            // A leap second.
            chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                .unwrap()
                .and_utc(),
        ];
        for nanos in [
            1,
            999,
            1_000,
            120_000,
            123_456,
            1_000_000,
            100_000_000,
            123_456_789,
            999_999_999,
        ] {
            times.push(base + chrono::Duration::nanoseconds(nanos));
        }
        for t in times {
            let mut ours = Vec::new();
            json_time(&mut ours, &t);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&t).unwrap(),
                "{t:?}"
            );
        }
    }

    #[test]
    fn raw_and_parsed_events_get_the_same_headers_in_the_documented_format() {
        let at = Utc.with_ymd_and_hms(2026, 11, 23, 3, 22, 20).unwrap();
        let raw = event("conversation-0193", "MessagePosted", at);
        let parsed = RecordedEvent {
            event_id: raw.event_id,
            stream_id: raw.stream_id.into(),
            stream_version: raw.stream_version,
            global_position: raw.global_position,
            transaction_id: raw.transaction_id,
            partition: raw.partition,
            event_type: raw.event_type.into(),
            schema_version: raw.schema_version,
            payload: serde_json::from_str(raw.payload).unwrap(),
            metadata: serde_json::from_str(raw.metadata).unwrap(),
            recorded_at: at,
        };
        let all = |h: &HeaderMap| {
            let mut v: Vec<(String, Vec<String>)> = h
                .iter()
                .map(|(k, vs)| {
                    let k: &str = k.as_ref();
                    (
                        k.to_owned(),
                        vs.iter().map(|v| v.as_str().to_owned()).collect(),
                    )
                })
                .collect();
            v.sort();
            v
        };
        for prev in [None, Some(Position { tx: 7, pos: 42 })] {
            let (h, body) = encode_raw(&raw, prev);
            let (want, want_body) = encode(&parsed, prev);
            assert_eq!(all(&h), all(&want));
            assert_eq!(
                decode(Some(&h), &body).unwrap(),
                decode(Some(&want), &want_body).unwrap()
            );
            let one = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
            let id = "01930000-7000-8000-a1b2-c3d4e5f60718".to_owned();
            assert_eq!(one(headers::MSG_ID), Some(id.clone()));
            assert_eq!(one(headers::EVENT_ID), Some(id));
            assert_eq!(one(headers::EVENT_TYPE).as_deref(), Some("MessagePosted"));
            assert_eq!(
                one(headers::STREAM_ID).as_deref(),
                Some("conversation-0193")
            );
            assert_eq!(
                one(headers::STREAM_VERSION).as_deref(),
                Some("9007199254740993")
            );
            assert_eq!(one(headers::TENANT_ID).as_deref(), Some("t-1"));
            assert_eq!(one(headers::COMMIT), Some(format!("{}.0.-3", i64::MAX)));
            assert_eq!(
                one(headers::PREV),
                Some(prev.map(|p| p.to_string()).unwrap_or_default())
            );
            assert_eq!(h.len(), 8);
            for (name, values) in h.iter() {
                assert_eq!(values.len(), 1, "{name}");
            }
        }
    }

    #[test]
    fn a_control_character_in_an_id_never_reaches_a_header_but_stays_in_the_body() {
        let at = Utc.with_ymd_and_hms(2026, 11, 23, 3, 22, 20).unwrap();
        let mut raw = event("conversation-\t0193", "Message\nPosted", at);
        raw.tenant_id = "acme\r\nNura-Tenant-Id: other";
        let (h, body) = encode_raw(&raw, None);
        let one = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            one(headers::TENANT_ID).as_deref(),
            Some("acme??Nura-Tenant-Id: other")
        );
        assert_eq!(one(headers::EVENT_TYPE).as_deref(), Some("Message?Posted"));
        assert_eq!(
            one(headers::STREAM_ID).as_deref(),
            Some("conversation-?0193")
        );
        assert_eq!(h.len(), 8);
        let decoded = decode(Some(&h), &body).unwrap();
        assert_eq!(decoded.event.event_type, "Message\nPosted");
        assert_eq!(decoded.event.stream_id, "conversation-\t0193");
    }

    #[test]
    fn subjects_carry_context_aggregate_partition_and_type() {
        let t = Topology::default();
        let at = Utc.with_ymd_and_hms(2026, 11, 23, 3, 22, 20).unwrap();
        let mut e = event("conversation-0193", "MessagePosted", at);
        e.partition = 5;
        assert_eq!(
            t.raw_subject(&e),
            "events.conversations.conversation.5.MessagePosted"
        );
        e.stream_id = "apikey-x";
        e.partition = 0;
        assert_eq!(t.raw_subject(&e), "events.identity.apikey.0.MessagePosted");
    }
}
