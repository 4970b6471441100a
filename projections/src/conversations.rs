//! The `conversations` projector: `read.conversations` and `read.messages`.
//!
//! Every statement is idempotent by construction, independently of the checkpoint: inserts are
//! `ON CONFLICT DO NOTHING` and updates are guarded by `version < $event_version`, so replaying an
//! event (a redelivery, a stale owner, a dead-letter retry) changes nothing.
//!
//! Two forms of the same rules: [`Projection::apply`] (one event, used by the fold, dead-letter
//! retries and the runtime's careful path) and [`Projection::apply_batch`] (a whole batch in one
//! statement, the runtime's fast path). `tests/batch.rs` holds them to the same rows.

use crate::projection::{ApplyError, Gate, Gated, Projection};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use nura_domain::DomainEvent;
use nura_domain::conversation::ConversationEvent;
use nura_store::RecordedEvent;
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use std::sync::LazyLock;
use uuid::Uuid;

/// The projector's name (checkpoints, consumers `conversations_p<N>`, dead letters).
pub const NAME: &str = "conversations";

const STREAM_PREFIX: &str = "conversation-";

/// The conversations projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conversations;

impl Projection for Conversations {
    fn reads_stream(&self, stream_id: &str) -> bool {
        stream_id.starts_with(STREAM_PREFIX)
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        event: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(apply(conn, event))
    }

    fn apply_batch<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [RecordedEvent],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            apply_batch(conn, events, None).await?;
            Ok(())
        })
    }

    fn apply_batch_gated<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [RecordedEvent],
        gate: &'a Gate,
    ) -> BoxFuture<'a, Result<Gated, ApplyError>> {
        Box::pin(async move {
            Ok(match apply_batch(conn, events, Some(gate)).await? {
                true => Gated::Applied,
                false => Gated::Refused,
            })
        })
    }
}

/// The conversation an event belongs to and the event itself; `None` for other streams
/// (partitions carry every context; this projector only reads conversation streams).
fn decode(event: &RecordedEvent) -> Result<Option<(Uuid, ConversationEvent)>, ApplyError> {
    let Some(id) = event.stream_id.strip_prefix(STREAM_PREFIX) else {
        return Ok(None);
    };
    let conversation_id = Uuid::parse_str(id)
        .map_err(|e| ApplyError::Undecodable(format!("stream id {}: {e}", event.stream_id)))?;
    let decoded = ConversationEvent::from_stored(&event.event_type, &event.payload)
        .map_err(|e| ApplyError::Undecodable(e.to_string()))?;
    if let ConversationEvent::ConversationStarted {
        conversation_id: payload_id,
        ..
    } = &decoded
        && *payload_id != conversation_id
    {
        return Err(ApplyError::Undecodable(format!(
            "payload conversation_id {payload_id} does not match stream {}",
            event.stream_id
        )));
    }
    Ok(Some((conversation_id, decoded)))
}

async fn apply(conn: &mut PgConnection, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some((conversation_id, decoded)) = decode(event)? else {
        return Ok(());
    };
    match decoded {
        ConversationEvent::ConversationStarted {
            tenant_id,
            title,
            started_by,
            at,
            ..
        } => {
            sqlx::query(
                "INSERT INTO read.conversations (conversation_id, tenant_id, stream_id, title, status, \
                   message_count, created_by, created_at, updated_at, version) \
                 VALUES ($1, $2, $3, $4, 'active', 0, $5, $6, $6, $7) \
                 ON CONFLICT (conversation_id) DO NOTHING",
            )
            .bind(conversation_id)
            .bind(&tenant_id)
            .bind(&event.stream_id)
            .bind(&title)
            .bind(&started_by)
            .bind(at)
            .bind(event.stream_version)
            .execute(&mut *conn)
            .await?;
        }
        ConversationEvent::MessagePosted {
            message_id,
            author,
            text,
            at,
        } => {
            sqlx::query(
                "INSERT INTO read.messages (message_id, conversation_id, tenant_id, author, text, \
                   posted_at, stream_version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            )
            .bind(message_id)
            .bind(conversation_id)
            .bind(&event.metadata.tenant_id)
            .bind(&author)
            .bind(&text)
            .bind(at)
            .bind(event.stream_version)
            .execute(&mut *conn)
            .await?;
            let updated = sqlx::query(
                "UPDATE read.conversations SET message_count = message_count + 1, \
                   last_message_at = $2, updated_at = $2, version = $3 \
                 WHERE conversation_id = $1 AND version < $3",
            )
            .bind(conversation_id)
            .bind(at)
            .bind(event.stream_version)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            ensure_present(conn, conversation_id, updated).await?;
        }
        ConversationEvent::ConversationArchived { at, .. } => {
            let updated = sqlx::query(
                "UPDATE read.conversations SET status = 'archived', archived_at = $2, \
                   updated_at = $2, version = $3 \
                 WHERE conversation_id = $1 AND version < $3",
            )
            .bind(conversation_id)
            .bind(at)
            .bind(event.stream_version)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            ensure_present(conn, conversation_id, updated).await?;
        }
    }
    Ok(())
}

/// The batch form of [`apply`]: one statement whatever the batch size, instead of one to three
/// round trips per event.
///
/// One by one, an event changes its conversation row only if its version is above the row's, and
/// the row's version is then the last applied one. Because a stream's versions rise in commit
/// order, that is the same as "above the row's version before the batch", which one set-based
/// update can evaluate. A conversation started within the batch is inserted already folded (its
/// start and every later change of the batch), so its row is written once instead of inserted and
/// then updated; if the row existed (a redelivery), the insert does nothing and the set-based
/// update applies the changes above its version, as one by one would. A batch where that
/// reasoning does not hold (versions of a stream not rising, a change before its stream's start,
/// a second start) is refused, and the runtime applies it one by one.
///
/// With a `gate` the same statement also moves the checkpoint, and writes nothing unless the
/// gate passes, which it does only if every conversation the batch changes without starting it
/// exists (else the one-by-one path must decide); returns whether it passed. Without one it
/// always returns true.
async fn apply_batch(
    conn: &mut PgConnection,
    events: &[RecordedEvent],
    gate: Option<&Gate>,
) -> Result<bool, ApplyError> {
    let mut starts = Starts::default();
    let mut messages = Messages::default();
    let mut changes = Changes::default();
    // Per conversation: the last version seen in this batch, whether it was changed yet, and the
    // index of its folded row in `starts` if it started within the batch.
    let mut seen: HashMap<Uuid, (i64, bool, Option<usize>)> = HashMap::new();
    for event in events {
        let Some((conversation_id, decoded)) = decode(event)? else {
            continue;
        };
        let version = event.stream_version;
        let (last, changed, started) =
            seen.entry(conversation_id)
                .or_insert((i64::MIN, false, None));
        if version <= *last {
            return Err(ApplyError::Inconsistent(format!(
                "versions of {} do not rise within the batch; applying one by one",
                event.stream_id
            )));
        }
        *last = version;
        match decoded {
            ConversationEvent::ConversationStarted {
                tenant_id,
                title,
                started_by,
                at,
                ..
            } => {
                if *changed || started.is_some() {
                    return Err(ApplyError::Inconsistent(format!(
                        "{} changes or starts before its start within the batch; applying one by one",
                        event.stream_id
                    )));
                }
                *started = Some(starts.conversation_id.len());
                starts.conversation_id.push(conversation_id);
                starts.tenant_id.push(tenant_id);
                starts.stream_id.push(event.stream_id.clone());
                starts.title.push(title);
                starts.started_by.push(started_by);
                starts.at.push(at);
                starts.status.push("active");
                starts.message_count.push(0);
                starts.last_message_at.push(None);
                starts.archived_at.push(None);
                starts.updated_at.push(at);
                starts.version.push(version);
            }
            ConversationEvent::MessagePosted {
                message_id,
                author,
                text,
                at,
            } => {
                *changed = true;
                if let Some(i) = *started {
                    starts.message_count[i] += 1;
                    starts.last_message_at[i] = Some(at);
                    starts.updated_at[i] = at;
                    starts.version[i] = version;
                }
                messages.message_id.push(message_id);
                messages.conversation_id.push(conversation_id);
                messages.tenant_id.push(event.metadata.tenant_id.clone());
                messages.author.push(author);
                messages.text.push(text);
                messages.at.push(at);
                messages.version.push(version);
                changes.push(conversation_id, version, at, false);
            }
            ConversationEvent::ConversationArchived { at, .. } => {
                *changed = true;
                if let Some(i) = *started {
                    starts.status[i] = "archived";
                    starts.archived_at[i] = Some(at);
                    starts.updated_at[i] = at;
                    starts.version[i] = version;
                }
                changes.push(conversation_id, version, at, true);
            }
        }
    }
    if gate.is_none() && starts.conversation_id.is_empty() && changes.conversation_id.is_empty() {
        return Ok(true);
    }
    // Conversations changed but not started within the batch: their rows must already exist.
    let must_exist: Vec<Uuid> = seen
        .iter()
        .filter(|(_, (_, changed, started))| *changed && started.is_none())
        .map(|(id, _)| *id)
        .collect();
    // One round trip: insert the folded new conversations and the messages; apply, per
    // conversation, only the changes above the row's version (the guard of the one-by-one
    // updates), the highest version setting `updated_at` and the last message
    // `last_message_at`; and return a changed conversation that does not exist, if any. Such a
    // change would be lost (see `ensure_present`): the whole batch is then refused and the
    // one-by-one path retries or dead-letters the event (a gated statement writes nothing then).
    // Every part reads the snapshot taken before the statement, so the update never sees a row
    // the same statement inserted: a conversation inserted here is already folded, one that
    // existed gets its changes.
    // Built once from constants (no input reaches the text).
    let row = Gate::bind(gate, sqlx::query(sqlx::AssertSqlSafe(BATCH.as_str())))
        .bind(&starts.conversation_id)
        .bind(&starts.tenant_id)
        .bind(&starts.stream_id)
        .bind(&starts.title)
        .bind(&starts.status)
        .bind(&starts.message_count)
        .bind(&starts.last_message_at)
        .bind(&starts.started_by)
        .bind(&starts.at)
        .bind(&starts.updated_at)
        .bind(&starts.archived_at)
        .bind(&starts.version)
        .bind(&messages.message_id)
        .bind(&messages.conversation_id)
        .bind(&messages.tenant_id)
        .bind(&messages.author)
        .bind(&messages.text)
        .bind(&messages.at)
        .bind(&messages.version)
        .bind(&changes.conversation_id)
        .bind(&changes.version)
        .bind(&changes.at)
        .bind(&changes.archive)
        .bind(&must_exist)
        .fetch_one(&mut *conn)
        .await?;
    let (passed, missing): (bool, Option<Uuid>) = (row.try_get(0)?, row.try_get(1)?);
    match (gate, missing) {
        (None, Some(id)) => Err(ApplyError::Inconsistent(format!(
            "conversation {id} was never started in the read model"
        ))),
        _ => Ok(passed),
    }
}

/// [`apply_batch`]'s statement: the gate's parameters first (`$1`–`$8`), then the batch's.
///
/// Every read of `read.conversations` is a per-row subquery on its key, and the `UPDATE` finds
/// its rows by the `ctid` those lookups returned. A join would let Postgres pick a hash join over
/// a scan of the whole table, which it does while the table is small; the plan is then kept for
/// the connection's life, so every batch would read the whole read model once it has grown.
/// The `ctid` is safe because no one can have changed these rows since the statement's snapshot:
/// every writer of a partition's rows holds its checkpoint row first. Without a gate the
/// runtime's transaction locked it before this statement; with one, the gate's `UPDATE` locks
/// it, and if another writer committed after the snapshot the gate fails and nothing is written.
static BATCH: LazyLock<String> = LazyLock::new(|| {
    let open = Gate::open(1);
    format!(
        "WITH missing AS ( \
           SELECT t.id FROM unnest($32::uuid[]) AS t(id) \
           WHERE (SELECT true FROM read.conversations c WHERE c.conversation_id = t.id) IS NULL \
           LIMIT 1 \
         ), {gate}, started AS ( \
           INSERT INTO read.conversations (conversation_id, tenant_id, stream_id, title, status, \
             message_count, last_message_at, created_by, created_at, updated_at, archived_at, version) \
           SELECT * FROM unnest($9::uuid[], $10::text[], $11::text[], $12::text[], $13::text[], \
             $14::bigint[], $15::timestamptz[], $16::text[], $17::timestamptz[], $18::timestamptz[], \
             $19::timestamptz[], $20::bigint[]) \
           WHERE {open} \
           ON CONFLICT (conversation_id) DO NOTHING \
         ), inserted AS ( \
           INSERT INTO read.messages (message_id, conversation_id, tenant_id, author, text, \
             posted_at, stream_version) \
           SELECT * FROM unnest($21::uuid[], $22::uuid[], $23::text[], $24::text[], $25::text[], \
             $26::timestamptz[], $27::bigint[]) \
           WHERE {open} \
           ON CONFLICT DO NOTHING \
         ), ev AS ( \
           SELECT * FROM unnest($28::uuid[], $29::bigint[], $30::timestamptz[], $31::bool[]) \
             AS t(id, version, at, archive) \
         ), applied AS ( \
           SELECT ev.id, \
             (SELECT c.ctid FROM read.conversations c WHERE c.conversation_id = ev.id) AS tid, \
             count(*) FILTER (WHERE NOT ev.archive) AS messages, \
             (array_agg(ev.at ORDER BY ev.version DESC) FILTER (WHERE NOT ev.archive))[1] AS last_message_at, \
             (array_agg(ev.at ORDER BY ev.version DESC) FILTER (WHERE ev.archive))[1] AS archived_at, \
             (array_agg(ev.at ORDER BY ev.version DESC))[1] AS updated_at, \
             max(ev.version) AS version \
           FROM ev \
           WHERE ev.version > (SELECT c.version FROM read.conversations c WHERE c.conversation_id = ev.id) \
           GROUP BY ev.id \
         ), updated AS ( \
           UPDATE read.conversations c SET \
             message_count = c.message_count + a.messages, \
             last_message_at = coalesce(a.last_message_at, c.last_message_at), \
             status = CASE WHEN a.archived_at IS NULL THEN c.status ELSE 'archived' END, \
             archived_at = coalesce(a.archived_at, c.archived_at), \
             updated_at = a.updated_at, \
             version = a.version \
           FROM applied a WHERE c.ctid = a.tid AND c.conversation_id = a.id AND {open} \
         ) \
         SELECT EXISTS (SELECT 1 FROM gate), (SELECT id FROM missing)",
        gate = Gate::cte(1, "NOT EXISTS (SELECT 1 FROM missing)"),
    )
});

/// Conversations started within a batch, folded with the batch's later changes (the row that
/// applying them one by one to no row would leave), as columns for `unnest`.
#[derive(Default)]
struct Starts {
    conversation_id: Vec<Uuid>,
    tenant_id: Vec<String>,
    stream_id: Vec<String>,
    title: Vec<String>,
    started_by: Vec<String>,
    at: Vec<DateTime<Utc>>,
    status: Vec<&'static str>,
    message_count: Vec<i64>,
    last_message_at: Vec<Option<DateTime<Utc>>>,
    archived_at: Vec<Option<DateTime<Utc>>>,
    updated_at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
}

/// `MessagePosted` events of a batch, as columns for `unnest`.
#[derive(Default)]
struct Messages {
    message_id: Vec<Uuid>,
    conversation_id: Vec<Uuid>,
    tenant_id: Vec<String>,
    author: Vec<String>,
    text: Vec<String>,
    at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
}

/// Every change to a conversation row in a batch (a message or an archive), as columns.
#[derive(Default)]
struct Changes {
    conversation_id: Vec<Uuid>,
    version: Vec<i64>,
    at: Vec<DateTime<Utc>>,
    archive: Vec<bool>,
}

impl Changes {
    fn push(&mut self, conversation_id: Uuid, version: i64, at: DateTime<Utc>, archive: bool) {
        self.conversation_id.push(conversation_id);
        self.version.push(version);
        self.at.push(at);
        self.archive.push(archive);
    }
}

/// An update that touched nothing is fine when the event was already applied (the row's version
/// is ahead), but a missing row means the stream's start was never applied: applying later
/// events would silently lose them, so it is an error (and, if it persists, a dead letter).
async fn ensure_present(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    updated: u64,
) -> Result<(), ApplyError> {
    if updated > 0 {
        return Ok(());
    }
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM read.conversations WHERE conversation_id = $1)",
    )
    .bind(conversation_id)
    .fetch_one(&mut *conn)
    .await?;
    if exists {
        Ok(())
    } else {
        Err(ApplyError::Inconsistent(format!(
            "conversation {conversation_id} was never started in the read model"
        )))
    }
}

/// The conversations read model as canonical JSON text (`(conversations, messages)`, ordered by
/// id), for comparing an incremental run with a fold or a rebuild byte for byte.
pub async fn dump(pool: &sqlx::PgPool) -> Result<(String, String), sqlx::Error> {
    let conversations: String = sqlx::query_scalar(
        "SELECT coalesce(json_agg(c ORDER BY c.conversation_id)::text, '[]') FROM read.conversations c",
    )
    .fetch_one(pool)
    .await?;
    let messages: String = sqlx::query_scalar(
        "SELECT coalesce(json_agg(m ORDER BY m.message_id)::text, '[]') FROM read.messages m",
    )
    .fetch_one(pool)
    .await?;
    Ok((conversations, messages))
}
