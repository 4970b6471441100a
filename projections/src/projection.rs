//! What a projection is, and the fold: replaying the log from the start into empty tables.

use futures::future::BoxFuture;
use nura_store::{EventStore, Position, RecordedEvent, StoreError};
use sqlx::PgConnection;
use sqlx::postgres::{PgArguments, Postgres};
use sqlx::query::Query;
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

    /// The runtime's fastest path: [`Projection::apply_batch`]'s rows and the checkpoint move
    /// described by `gate` in **one autocommit statement**, written only if the gate passes (see
    /// [`Gate`]); nothing at all is written otherwise. `conn` is not in a transaction. The
    /// runtime falls back to its transaction (checkpoint lock, dead letters, holes, one by one)
    /// when this returns anything but [`Gated::Applied`], including an error. Default:
    /// [`Gated::Unsupported`].
    fn apply_batch_gated<'a>(
        &'a self,
        _conn: &'a mut PgConnection,
        _events: &'a [RecordedEvent],
        _gate: &'a Gate,
    ) -> BoxFuture<'a, Result<Gated, ApplyError>> {
        Box::pin(async { Ok(Gated::Unsupported) })
    }
}

/// What [`Projection::apply_batch_gated`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gated {
    /// The rows were written and the checkpoint moved, committed together.
    Applied,
    /// The gate did not pass; nothing was written.
    Refused,
    /// The projection has no gated form.
    Unsupported,
}

/// The condition under which a batch may skip the runtime's transaction: the partition's
/// checkpoint is exactly `from` (where the batch's `Nura-Prev` chain starts: no redelivery, no
/// hole, no other owner's progress), none of the batch's `streams` has an open dead letter (its
/// events would be parked), and the projection's own condition holds. The statement then moves
/// the checkpoint to `to` (the batch's last event) with the rows.
///
/// Why one statement is as safe as the transaction: the gate is a conditional `UPDATE` of the
/// checkpoint row, so it takes the same row lock every writer of the partition's rows takes
/// first; if another writer moved the checkpoint meanwhile, Postgres re-evaluates the condition
/// on the new row and the gate fails. Every other writer of these rows (another owner's batch,
/// a dead-letter retry) either moves the checkpoint or only touches streams with open dead
/// letters, which the gate refuses.
#[derive(Debug, Clone)]
pub struct Gate {
    /// The projector whose checkpoint moves.
    pub projector: &'static str,
    /// Its partition.
    pub partition: i32,
    /// The checkpoint the batch continues.
    pub from: Position,
    /// The batch's last event.
    pub to: Position,
    /// Every stream with an event in the batch.
    pub streams: Vec<String>,
}

impl Gate {
    /// Parameters [`Gate::cte`] uses.
    pub const PARAMS: usize = 8;

    /// The `gate` CTE, its parameters numbered from `$first` (bound by [`Gate::bind`]), adding
    /// the projection's own SQL `condition` (e.g. `NOT EXISTS (SELECT 1 FROM missing)`). It
    /// returns one row when the gate passed. When the statement runs without a gate
    /// (`$first+7` false: inside the runtime's transaction, which moves the checkpoint itself),
    /// it matches nothing, and [`Gate::open`] lets every write through.
    pub fn cte(first: usize, condition: &str) -> String {
        let p: Vec<String> = (first..first + Self::PARAMS)
            .map(|i| format!("${i}"))
            .collect();
        format!(
            "gate AS ( \
               UPDATE read.checkpoints SET transaction_id = {to_tx}, global_position = {to_pos}, \
                 updated_at = now() \
               WHERE {gated}::bool AND projector = {projector}::text AND partition = {partition}::int \
                 AND transaction_id = {from_tx}::bigint AND global_position = {from_pos}::bigint \
                 AND NOT EXISTS (SELECT 1 FROM read.dead_letters d \
                   WHERE d.projector = {projector}::text AND d.partition = {partition}::int \
                     AND d.status = 'open' AND d.stream_id = ANY({streams}::text[])) \
                 AND ({condition}) \
               RETURNING 1 )",
            projector = p[0],
            partition = p[1],
            from_tx = p[2],
            from_pos = p[3],
            to_tx = p[4],
            to_pos = p[5],
            streams = p[6],
            gated = p[7],
        )
    }

    /// The condition that guards each write of a statement with [`Gate::cte`] at `$first`:
    /// true without a gate, else only if the gate passed.
    pub fn open(first: usize) -> String {
        format!(
            "(NOT ${}::bool OR EXISTS (SELECT 1 FROM gate))",
            first + Self::PARAMS - 1
        )
    }

    /// Binds [`Gate::cte`]'s parameters, in order, for `gate` (or for no gate).
    pub fn bind<'q>(
        gate: Option<&'q Gate>,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        let (projector, partition, from, to, streams): (&str, i32, Position, Position, &[String]) =
            match gate {
                Some(g) => (g.projector, g.partition, g.from, g.to, &g.streams),
                None => ("", 0, Position::ZERO, Position::ZERO, &[]),
            };
        query
            .bind(projector)
            .bind(partition)
            .bind(from.tx)
            .bind(from.pos)
            .bind(to.tx)
            .bind(to.pos)
            .bind(streams)
            .bind(gate.is_some())
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
