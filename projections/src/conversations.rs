//! The `conversations` projector: `read.conversations` and `read.messages`.
//!
//! Every statement is idempotent by construction, independently of the checkpoint: inserts are
//! `ON CONFLICT DO NOTHING` and updates are guarded by `version < $event_version`, so replaying an
//! event (a redelivery, a stale owner, a dead-letter retry) changes nothing.

use crate::projection::{ApplyError, Projection};
use futures::future::BoxFuture;
use nura_domain::DomainEvent;
use nura_domain::conversation::ConversationEvent;
use nura_store::RecordedEvent;
use sqlx::PgConnection;
use uuid::Uuid;

/// The projector's name (checkpoints, consumers `conversations_p<N>`, dead letters).
pub const NAME: &str = "conversations";

const STREAM_PREFIX: &str = "conversation-";

/// The conversations projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conversations;

impl Projection for Conversations {
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
}

async fn apply(conn: &mut PgConnection, event: &RecordedEvent) -> Result<(), ApplyError> {
    // Partitions carry every context; this projector only reads conversation streams.
    let Some(id) = event.stream_id.strip_prefix(STREAM_PREFIX) else {
        return Ok(());
    };
    let conversation_id = Uuid::parse_str(id)
        .map_err(|e| ApplyError::Undecodable(format!("stream id {}: {e}", event.stream_id)))?;
    let decoded = ConversationEvent::from_stored(&event.event_type, &event.payload)
        .map_err(|e| ApplyError::Undecodable(e.to_string()))?;
    match decoded {
        ConversationEvent::ConversationStarted {
            conversation_id: payload_id,
            tenant_id,
            title,
            started_by,
            at,
        } => {
            if payload_id != conversation_id {
                return Err(ApplyError::Undecodable(format!(
                    "payload conversation_id {payload_id} does not match stream {}",
                    event.stream_id
                )));
            }
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
