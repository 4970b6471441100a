//! Projectors: the runtime that turns the JetStream fan-out into exact Postgres read models, the
//! read models themselves, and their dead letters (DESIGN.md invariant 5).
//!
//! * [`run`] runs the `conversations` and `api_keys` projectors over every partition as one
//!   [`GROUP`]: one durable pull consumer per partition whose batches both projections apply
//!   (concurrently, each with its own checkpoint and dead letters), so each event is delivered
//!   once, not once per projection; one owner per partition (advisory lock); per batch and
//!   projection one commit that updates the rows and the partition's checkpoint together; acks
//!   after every projection committed (a nak from either wins). [`run_projection`] runs one
//!   projection with consumers of its own.
//! * A batch that continues the checkpoint's chain is one autocommit statement ([`Gate`],
//!   [`Projection::apply_batch_gated`]); any other goes through a transaction that locks the
//!   checkpoint and applies it with a few set-based statements ([`Projection::apply_batch`]); only
//!   a batch that fails there is redone event by event. A batch of events the projection does not
//!   read moves the checkpoint in memory, written at most every 100 ms. While a full batch (a
//!   backlog) is applied the next one is fetched; after a partial one the worker fetches only
//!   once it is done, so that fetch takes everything that arrived meanwhile.
//! * [`PartitionWorker::process_batch`] is that loop's single step, for tests and tools.
//! * Exactness does not depend on JetStream: events at or below the checkpoint are skipped, and a
//!   break in the `Nura-Prev` chain is filled from Postgres ([`nura_store::EventStore::read_partition`]).
//! * When its partition goes idle, a worker that started, failed or took the partition over
//!   compares each checkpoint with the partition's last message in the stream and applies what
//!   is missing from Postgres: a message acked without its commit surviving (a cumulative ack
//!   over a message another owner held, a restored read-model database) never waits for the
//!   partition's next event.
//! * A poison event goes to `read.dead_letters` after `max_attempts`; later events of its stream
//!   are parked behind it; [`admin_router`] lists and retries them.
//!
//! Limits: ordering is per partition, so one slow partition does not hold the others back but a
//! poison event holds back nothing except its own stream once it is dead-lettered; while its
//! attempts last (with backoff) it holds back its partition for every projection of the group. Read models are only as fresh as the
//! relay; [`has_passed`] is how readers wait for their own writes.

pub mod api_keys;
pub mod conversations;
mod dead_letters;
mod projection;
mod runtime;

pub use dead_letters::{DeadLetter, RetryError, RetryOutcome, admin_router, retry_dead_letter};
pub use projection::{ApplyError, FoldError, Gate, Gated, Projection, fold, projection_named};
pub use runtime::{
    BatchOutcome, GROUP, PartitionWorker, ProjectorConfig, WorkerError, run, run_projection,
};

use nura_store::CommitToken;

/// Read-your-writes: true once `projector`'s checkpoint for `token.partition` is at or beyond
/// `token.position`, i.e. the read model already reflects the event behind the token. False when
/// the projector has never checkpointed that partition.
pub async fn has_passed(
    pool: &sqlx::PgPool,
    projector: &str,
    token: CommitToken,
) -> Result<bool, sqlx::Error> {
    let passed: Option<bool> = sqlx::query_scalar(
        "SELECT (transaction_id, global_position) >= ($3, $4) FROM read.checkpoints \
         WHERE projector = $1 AND partition = $2",
    )
    .bind(projector)
    .bind(token.partition)
    .bind(token.position.tx)
    .bind(token.position.pos)
    .fetch_optional(pool)
    .await?;
    Ok(passed.unwrap_or(false))
}
