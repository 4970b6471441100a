//! The `api_keys` projector: `read.api_keys`, what the gateway authenticates API keys against
//! and what admins list.
//!
//! Idempotent like the conversations projector: the insert is `ON CONFLICT DO NOTHING` and the
//! revocation is guarded by `version < $event_version`. A key's revocation takes effect for
//! authentication when this projector applies `ApiKeyRevoked` (normally milliseconds after the
//! command). `last_used_at` is written by the gateway, not by events, and is never touched here.

use crate::projection::{ApplyError, Projection};
use futures::future::BoxFuture;
use nura_domain::DomainEvent;
use nura_domain::api_key::ApiKeyEvent;
use nura_store::RecordedEvent;
use sqlx::PgConnection;
use uuid::Uuid;

/// The projector's name (checkpoints, consumers `api_keys_p<N>`, dead letters).
pub const NAME: &str = "api_keys";

const STREAM_PREFIX: &str = "apikey-";

/// The API-keys projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiKeys;

impl Projection for ApiKeys {
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
}

async fn apply(conn: &mut PgConnection, event: &RecordedEvent) -> Result<(), ApplyError> {
    let Some(id) = event.stream_id.strip_prefix(STREAM_PREFIX) else {
        return Ok(());
    };
    let key_id = Uuid::parse_str(id)
        .map_err(|e| ApplyError::Undecodable(format!("stream id {}: {e}", event.stream_id)))?;
    let decoded = ApiKeyEvent::from_stored(&event.event_type, &event.payload)
        .map_err(|e| ApplyError::Undecodable(e.to_string()))?;
    match decoded {
        ApiKeyEvent::ApiKeyIssued {
            key_id: payload_id,
            tenant_id,
            name,
            roles,
            secret_hash,
            issued_by,
            at,
        } => {
            if payload_id != key_id {
                return Err(ApplyError::Undecodable(format!(
                    "payload key_id {payload_id} does not match stream {}",
                    event.stream_id
                )));
            }
            sqlx::query(
                "INSERT INTO read.api_keys (key_id, tenant_id, name, roles, secret_hash, status, \
                   issued_by, issued_at, version) \
                 VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8) \
                 ON CONFLICT (key_id) DO NOTHING",
            )
            .bind(key_id)
            .bind(&tenant_id)
            .bind(&name)
            .bind(&roles)
            .bind(&secret_hash)
            .bind(&issued_by)
            .bind(at)
            .bind(event.stream_version)
            .execute(&mut *conn)
            .await?;
        }
        ApiKeyEvent::ApiKeyRevoked { revoked_by, at } => {
            let updated = sqlx::query(
                "UPDATE read.api_keys SET status = 'revoked', revoked_by = $2, revoked_at = $3, \
                   version = $4 \
                 WHERE key_id = $1 AND version < $4",
            )
            .bind(key_id)
            .bind(&revoked_by)
            .bind(at)
            .bind(event.stream_version)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if updated == 0 {
                let exists: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM read.api_keys WHERE key_id = $1)",
                )
                .bind(key_id)
                .fetch_one(&mut *conn)
                .await?;
                if !exists {
                    // Revoking a key the read model never saw would leave it usable if the issue
                    // arrived later: an error, so the runtime retries and finally dead-letters.
                    return Err(ApplyError::Inconsistent(format!(
                        "api key {key_id} was never issued in the read model"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// `read.api_keys` as canonical JSON text (ordered by key id, without `last_used_at`, which is
/// not derived from events), for comparing an incremental run with a fold.
pub async fn dump(pool: &sqlx::PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(json_agg(to_jsonb(k) - 'last_used_at' ORDER BY k.key_id)::text, '[]') \
         FROM read.api_keys k",
    )
    .fetch_one(pool)
    .await
}
