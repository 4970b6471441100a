//! What a projection is, and the fold: replaying the log from the start into empty tables.

use futures::future::BoxFuture;
use nura_store::{EventStore, Position, RecordedEvent, StoreError};
use sqlx::PgConnection;
use std::sync::Arc;

/// Why one event could not be applied to a read model. The runtime retries it with backoff and,
/// after the configured attempts, records it as a dead letter.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The stored event cannot be read by this version of the domain.
    #[error("undecodable event: {0}")]
    Undecodable(String),
    /// The read model is not in the state the event needs (e.g. a message for a conversation
    /// that was never started): applying would make it wrong.
    #[error("inconsistent read model: {0}")]
    Inconsistent(String),
    /// Postgres refused a statement (a constraint, a trigger, a lost connection).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A read model built from events. `apply` runs inside the runtime's transaction (and a
/// savepoint), must be idempotent by construction — applying an event twice leaves the same rows —
/// and must ignore events it has no interest in.
pub trait Projection: Send + Sync + 'static {
    /// The projector's name: the key of its checkpoints, consumers, locks and dead letters.
    fn name(&self) -> &'static str;

    /// Whether events of `stream_id` can change this projection's rows (`apply` ignores the
    /// others). A batch made only of streams it does not read moves the checkpoint with one
    /// statement, without a transaction. Default: every stream.
    fn reads_stream(&self, _stream_id: &str) -> bool {
        true
    }

    /// Applies one event to the read model through `conn` (already inside a transaction).
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        event: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ApplyError>>;

    /// Applies `events` (in commit order) through `conn` and must leave exactly the rows that
    /// applying them one by one with [`Projection::apply`] leaves. This is the runtime's fast
    /// path: a projection overrides it to write a whole batch with a few set-based statements.
    /// An error means only "this batch cannot be applied as a whole": the runtime rolls the
    /// transaction back and applies the events one by one, which decides which one (if any) is
    /// poison. So an override may also refuse a batch it cannot prove equivalent. The default
    /// applies one by one.
    fn apply_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            for event in events {
                self.apply(conn, event).await?;
            }
            Ok(())
        })
    }
}

/// The projection registered under `name` (the dead-letter retry path finds it this way).
pub fn projection_named(name: &str) -> Option<Arc<dyn Projection>> {
    match name {
        crate::conversations::NAME => Some(Arc::new(crate::conversations::Conversations)),
        crate::api_keys::NAME => Some(Arc::new(crate::api_keys::ApiKeys)),
        _ => None,
    }
}

/// Why a fold failed.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// Reading the log failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the target failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// An event could not be applied; a fold has no dead letters, so it stops.
    #[error("event {event_id} at {position}: {source}")]
    Apply {
        /// The event that failed.
        event_id: uuid::Uuid,
        /// Its position.
        position: Position,
        /// Why.
        source: ApplyError,
    },
}

/// Replays the whole log of `store` in commit order through `projection` into `target` (which
/// should hold empty read-model tables), one transaction per page. Returns the number of events
/// read. This is the reference every incremental run is compared with.
pub async fn fold(
    store: &EventStore,
    target: &sqlx::PgPool,
    projection: &dyn Projection,
) -> Result<u64, FoldError> {
    let mut after = Position::ZERO;
    let mut total = 0u64;
    loop {
        let page = store.read_all(after, 1000).await?;
        let Some(last) = page.last() else {
            return Ok(total);
        };
        after = last.position();
        let mut tx = target.begin().await?;
        for event in &page {
            projection
                .apply(&mut tx, event)
                .await
                .map_err(|source| FoldError::Apply {
                    event_id: event.event_id,
                    position: event.position(),
                    source,
                })?;
        }
        tx.commit().await?;
        total += page.len() as u64;
    }
}
