//! The event envelope, commit tokens and append inputs/outputs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// A place in the log's commit order: the writing transaction's id, then the global position.
/// `Position::ZERO` is before every event.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Position {
    /// `transaction_id` (xid8) of the writing transaction.
    pub tx: i64,
    /// `global_position` of the event.
    pub pos: i64,
}

impl Position {
    /// Before the first event.
    pub const ZERO: Position = Position { tx: 0, pos: 0 };
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.tx, self.pos)
    }
}

impl FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tx, pos) = s.split_once('.').ok_or("expected <tx>.<pos>")?;
        Ok(Position {
            tx: tx.parse().map_err(|_| "bad transaction id")?,
            pos: pos.parse().map_err(|_| "bad position")?,
        })
    }
}

/// What a command response hands back for read-your-writes: the position of the command's last
/// event and the partition its stream lives in. Rendered as `<tx>.<pos>.<partition>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommitToken {
    /// Where the event sits in commit order.
    pub position: Position,
    /// The stream's partition; a projection has passed the token once its checkpoint for this
    /// partition is at or beyond `position`.
    pub partition: i32,
}

impl fmt::Display for CommitToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.position, self.partition)
    }
}

impl FromStr for CommitToken {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 64 {
            return Err("commit token too long".into());
        }
        let (position, partition) = s
            .rsplit_once('.')
            .ok_or("expected <tx>.<pos>.<partition>")?;
        let token = CommitToken {
            position: position.parse()?,
            partition: partition.parse().map_err(|_| "bad partition")?,
        };
        if token.position.tx < 0 || token.position.pos < 0 || token.partition < 0 {
            return Err("negative numbers in commit token".into());
        }
        Ok(token)
    }
}

impl Serialize for CommitToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CommitToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The partition of a stream: FNV-1a of the stream id modulo the partition count. Stable across
/// processes and versions — it is stored with every event.
pub fn partition_of(stream_id: &str, partitions: i32) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in stream_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % partitions.max(1) as u32) as i32
}

/// The metadata envelope stored with every event. Tenant and actor always come from the
/// credential, never from a request body. Missing fields decode as empty so that one odd row
/// can never stall a log reader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Metadata {
    /// The tenant that owns the stream.
    pub tenant_id: String,
    /// Who issued the command (a user id, an API key id or a worker name).
    pub actor: String,
    /// The command's idempotency key.
    pub command_id: String,
    /// The request id of the HTTP request (or the triggering event's correlation id).
    pub correlation_id: String,
    /// The event that caused this command, for commands issued by workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique forever; chosen by the caller (UUIDv7) so a retried append is recognisable.
    pub event_id: Uuid,
    /// The event's type name.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: i32,
    /// The payload.
    pub payload: serde_json::Value,
}

/// The version a command expects its stream to be at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append after whatever is there (no concurrency check).
    Any,
    /// The stream must be exactly at this version (`0` = it must not exist yet).
    Exact(i64),
}

/// The idempotency record of a command: its id and a hash of what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    /// The idempotency key (unique per tenant; the caller scopes it).
    pub command_id: String,
    /// A hash of the request; the same id with another hash is refused.
    pub request_hash: Vec<u8>,
}

/// The outcome of an append (or of the first append, for a repeated command).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// The stream written.
    pub stream_id: String,
    /// Version of the first event written.
    pub first_version: i64,
    /// Version of the last event written: the stream's version after the command.
    pub last_version: i64,
    /// The commit token of the last event, for read-your-writes.
    pub commit: CommitToken,
    /// Ids of the events written, in order.
    pub event_ids: Vec<Uuid>,
    /// True when this is the stored result of an earlier identical command.
    #[serde(skip)]
    pub replayed: bool,
}

/// An event as stored, with its full envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub event_id: Uuid,
    pub stream_id: String,
    pub stream_version: i64,
    pub global_position: i64,
    pub transaction_id: i64,
    pub partition: i32,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: serde_json::Value,
    pub metadata: Metadata,
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// The event's place in commit order.
    pub fn position(&self) -> Position {
        Position {
            tx: self.transaction_id,
            pos: self.global_position,
        }
    }

    /// The commit token of this event.
    pub fn commit_token(&self) -> CommitToken {
        CommitToken {
            position: self.position(),
            partition: self.partition,
        }
    }
}

/// An event of a [`crate::RawPage`], borrowing its text from the row Postgres sent: for readers
/// that pass events on rather than interpret them (the relay). `payload` and `metadata` are the
/// JSON text Postgres rendered for the stored `jsonb` (its own spacing and key order), never
/// parsed here; everything else holds the same values as the [`RecordedEvent`] that
/// [`crate::EventStore::read_all`] returns for the same row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'r> {
    pub event_id: Uuid,
    pub stream_id: &'r str,
    pub stream_version: i64,
    pub global_position: i64,
    pub transaction_id: i64,
    pub partition: i32,
    pub event_type: &'r str,
    pub schema_version: i32,
    /// `payload` as JSON text.
    pub payload: &'r str,
    /// `metadata` as JSON text.
    pub metadata: &'r str,
    pub recorded_at: DateTime<Utc>,
    /// `metadata.tenant_id` as text (empty when absent), so headers need not parse `metadata`.
    pub tenant_id: &'r str,
}

impl RawEvent<'_> {
    /// The event's place in commit order.
    pub fn position(&self) -> Position {
        Position {
            tx: self.transaction_id,
            pos: self.global_position,
        }
    }

    /// The commit token of this event.
    pub fn commit_token(&self) -> CommitToken {
        CommitToken {
            position: self.position(),
            partition: self.partition,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_by_transaction_before_position() {
        let late_commit = Position { tx: 10, pos: 1 };
        let early = Position { tx: 9, pos: 5 };
        assert!(early < late_commit);
    }

    #[test]
    fn commit_tokens_round_trip_and_reject_garbage() {
        let t = CommitToken {
            position: Position { tx: 7, pos: 42 },
            partition: 3,
        };
        assert_eq!(t.to_string().parse::<CommitToken>().unwrap(), t);
        for bad in ["", "1.2", "a.b.c", "1.2.x", "-1.2.3", "1.2.3.4.5"] {
            assert!(bad.parse::<CommitToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(
            partition_of("conversation-a", 8),
            partition_of("conversation-a", 8)
        );
        let mut seen = [0; 8];
        for i in 0..1000 {
            seen[partition_of(&format!("s-{i}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
