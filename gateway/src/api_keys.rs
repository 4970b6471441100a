//! API-key authentication: a presented `nura_<key id>_<secret>` → the key's [`Principal`].
//!
//! Keys are checked against `read.api_keys` (the `api_keys` projection), so an issued key works
//! and a revoked key stops working once the projector has applied the event — normally within
//! milliseconds of the command. The secret's sha256 is compared in constant time. On success the
//! key's `last_used_at` is refreshed, at most once a minute per key: operational metadata, not an
//! event (it is not in the log and a rebuild of the read model starts it empty).

use chrono::{DateTime, Utc};
use nura_commands::api_keys::{parse_key, secret_matches};
use nura_http::{Principal, Role};
use uuid::Uuid;

/// `last_used_at` is written at most this often per key, so a busy key costs one UPDATE a minute.
const LAST_USED_EVERY_SECS: i64 = 60;

/// The prefix of the actor id recorded for requests made with a key: `apikey:<key id>`.
pub const ACTOR_PREFIX: &str = "apikey:";

/// What authentication needs of a `read.api_keys` row.
#[derive(sqlx::FromRow)]
struct KeyRow {
    tenant_id: String,
    roles: Vec<String>,
    secret_hash: String,
    status: String,
    last_used_at: Option<DateTime<Utc>>,
}

/// The principal of a valid, unrevoked API key (tenant, key id as user, its roles), or None.
/// Compares the stored hash in constant time; records last use (throttled, at most once per
/// minute per key). A malformed key is `None` without touching the database.
pub async fn authenticate(
    pool: &sqlx::PgPool,
    presented: &str,
) -> Result<Option<Principal>, sqlx::Error> {
    let Some((key_id, secret)) = parse_key(presented) else {
        return Ok(None);
    };
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT tenant_id, roles, secret_hash, status, last_used_at FROM read.api_keys \
         WHERE key_id = $1",
    )
    .bind(key_id)
    .fetch_optional(pool)
    .await?;
    let Some(KeyRow {
        tenant_id,
        roles,
        secret_hash,
        status,
        last_used_at,
    }) = row
    else {
        return Ok(None);
    };
    if !secret_matches(secret, &secret_hash) || status != "active" {
        return Ok(None);
    }
    let roles: Vec<Role> = roles
        .iter()
        .filter_map(|r| Role::parse(r))
        // A key never carries admin (the domain refuses it); refuse it here too, should a row
        // ever say otherwise.
        .filter(|r| *r != Role::Admin)
        .collect();
    if roles.is_empty() {
        return Ok(None);
    }
    let stale = last_used_at.is_none_or(|t| (Utc::now() - t).num_seconds() >= LAST_USED_EVERY_SECS);
    if stale {
        record_use(pool, key_id).await;
    }
    Ok(Some(Principal {
        tenant_id,
        user_id: format!("{ACTOR_PREFIX}{key_id}"),
        roles,
    }))
}

/// Refreshes `last_used_at` unless another request just did. A failure is logged and ignored:
/// the request is authenticated either way.
async fn record_use(pool: &sqlx::PgPool, key_id: Uuid) {
    let updated = sqlx::query(
        "UPDATE read.api_keys SET last_used_at = now() WHERE key_id = $1 \
           AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => $2))",
    )
    .bind(key_id)
    .bind(LAST_USED_EVERY_SECS as f64)
    .execute(pool)
    .await;
    if let Err(e) = updated {
        tracing::warn!(key_id = %key_id, error = %e, "could not record an api key's last use");
    }
}
