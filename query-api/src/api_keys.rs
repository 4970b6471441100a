//! The API-key read routes (admin only, tenant-scoped): `GET /v1/api-keys` and
//! `GET /v1/api-keys/{id}`. They never return a key's secret or its hash. `last_used_at` is
//! operational metadata the gateway records on authentication (at most once a minute per key),
//! not an event.

use crate::QueryConfig;
use crate::consistency::{requested_token, wait_for};
use crate::routes::{db_error, decode_cursor, encode_cursor, int_param, query_error};
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use chrono::{DateTime, Utc};
use nura_http::{ApiError, ApiJson, Principal, Role};
use nura_store::EventStore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

/// The projector whose checkpoints the API-key reads wait on for `?after=`.
pub const API_KEYS_PROJECTOR: &str = "api_keys";

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;
/// Only admins manage keys.
const KEY_ADMINS: &[Role] = &[Role::Admin];

#[derive(Clone)]
struct KeysState {
    store: EventStore,
    config: QueryConfig,
}

/// `GET /v1/api-keys` and `GET /v1/api-keys/{id}`, with their state applied. Admin only;
/// confined to the caller's tenant.
pub fn router(store: EventStore, config: QueryConfig) -> Router {
    Router::new()
        .route("/v1/api-keys", get(list_keys))
        .route("/v1/api-keys/{id}", get(get_key))
        .with_state(KeysState { store, config })
}

#[derive(Debug, Deserialize)]
// Unknown parameters (a `sort`, a misspelt filter) are refused, never silently ignored.
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    after: Option<String>,
}

#[derive(Debug, Deserialize)]
// Unknown parameters (a `sort`, a misspelt filter) are refused, never silently ignored.
#[serde(deny_unknown_fields)]
struct AfterParam {
    after: Option<String>,
}

/// One key as served: never the secret, never its hash.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct KeyView {
    key_id: Uuid,
    name: String,
    roles: Vec<String>,
    status: String,
    issued_by: String,
    issued_at: DateTime<Utc>,
    revoked_by: Option<String>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    version: i64,
}

const KEY_COLUMNS: &str = "key_id, name, roles, status, issued_by, issued_at, revoked_by, \
    revoked_at, last_used_at, version";

async fn list_keys(
    State(s): State<KeysState>,
    principal: Principal,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<ApiJson<Value>, ApiError> {
    principal.require_any(KEY_ADMINS)?;
    let Query(p) = params.map_err(query_error)?;
    s.catch_up(p.after.as_deref(), &headers).await?;
    let status = match p.status.as_deref() {
        None => None,
        Some(st @ ("active" | "revoked")) => Some(st.to_owned()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_status",
                "status must be active or revoked",
            ));
        }
    };
    let limit = int_param(p.limit.as_deref(), "limit", DEFAULT_PAGE)?.clamp(1, MAX_PAGE);
    let cursor = p.cursor.as_deref().map(decode_cursor).transpose()?;
    let sql = format!(
        "SELECT {KEY_COLUMNS} FROM read.api_keys \
         WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2) \
           AND ($3::uuid IS NULL OR key_id < $3) \
         ORDER BY key_id DESC LIMIT $4"
    );
    let mut rows: Vec<KeyView> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&principal.tenant_id)
        .bind(status)
        .bind(cursor)
        .bind(limit + 1)
        .fetch_all(s.store.pool())
        .await
        .map_err(db_error)?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|r| encode_cursor(r.key_id)))
        .flatten();
    Ok(ApiJson(json!({"items": rows, "next_cursor": next_cursor})))
}

async fn get_key(
    State(s): State<KeysState>,
    principal: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<Query<AfterParam>, QueryRejection>,
) -> Result<ApiJson<KeyView>, ApiError> {
    principal.require_any(KEY_ADMINS)?;
    let Query(p) = params.map_err(query_error)?;
    s.catch_up(p.after.as_deref(), &headers).await?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("api key"))?;
    let sql =
        format!("SELECT {KEY_COLUMNS} FROM read.api_keys WHERE key_id = $1 AND tenant_id = $2");
    let key: KeyView = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(&principal.tenant_id)
        .fetch_optional(s.store.pool())
        .await
        .map_err(db_error)?
        // Another tenant's key is indistinguishable from a missing one.
        .ok_or_else(|| ApiError::not_found("api key"))?;
    Ok(ApiJson(key))
}

impl KeysState {
    /// Waits for the `api_keys` projection to pass the request's commit token, if any.
    async fn catch_up(
        &self,
        query_after: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(), ApiError> {
        match requested_token(query_after, headers, self.store.partitions())? {
            Some(token) => {
                wait_for(
                    self.store.pool(),
                    API_KEYS_PROJECTOR,
                    token,
                    self.config.read_your_writes_timeout,
                )
                .await
            }
            None => Ok(()),
        }
    }
}
