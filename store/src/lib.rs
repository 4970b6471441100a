//! The event store: the log of record (DESIGN.md invariants 2 and 3).
//!
//! * [`EventStore::append`] writes a command's events in one transaction with optimistic
//!   concurrency (`UNIQUE (stream_id, stream_version)`), unique event ids and an idempotent
//!   command id (a repeat returns the first result; the same id with another body is refused).
//! * [`EventStore::read_all`] reads the whole log in commit order — by
//!   `(transaction_id, global_position)` and never past the oldest open transaction — so a
//!   reader that checkpoints the pair never skips a late commit.
//!
//! The store knows no aggregate: events are a type name, a JSON payload and a metadata envelope.
//! Limits: one Postgres database; the partition count is fixed in `es.settings`.

mod board;
mod event;
mod group;
mod postgres;

pub use board::{CheckpointBoard, Checkpoints};
pub use event::{
    Appended, CommandRecord, CommitToken, ExpectedVersion, Metadata, NewEvent, Position, RawEvent,
    RecordedEvent, partition_of,
};
pub use group::LANE_APPLICATION_NAME;
pub use postgres::{EventStore, NOTIFIER_APPLICATION_NAME, NOTIFY_CHANNEL, RawPage, StoreError};

/// The migrations for the `es` and `read` schemas, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
