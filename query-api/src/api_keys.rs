//! The API-key read routes (admin only, tenant-scoped): `GET /v1/api-keys` and
//! `GET /v1/api-keys/{id}`. They never return a key's secret or its hash. `last_used_at` is
//! operational metadata the gateway records on authentication (at most once a minute per key),
//! not an event.

use crate::routes::{
    AfterParam, ListParams, Listing, QueryState, db_error, keyset_page, query_error, status_filter,
};
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use chrono::{DateTime, Utc};
use nura_http::{ApiError, ApiJson, Principal, Role};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// The projector whose checkpoints the API-key reads wait on for `?after=`.
pub const API_KEYS_PROJECTOR: &str = "api_keys";

/// Only admins manage keys.
const KEY_ADMINS: &[Role] = &[Role::Admin];

/// `GET /v1/api-keys` and `GET /v1/api-keys/{id}`, with their state applied. Admin only;
/// confined to the caller's tenant.
pub(crate) fn router(state: QueryState) -> Router {
    Router::new()
        .route("/v1/api-keys", get(list_keys))
        .route("/v1/api-keys/{id}", get(get_key))
        .with_state(state)
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
    State(s): State<QueryState>,
    principal: Principal,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<ApiJson<Value>, ApiError> {
    principal.require_any(KEY_ADMINS)?;
    let Query(p) = params.map_err(query_error)?;
    s.catch_up(API_KEYS_PROJECTOR, p.after.as_deref(), &headers)
        .await?;
    let status = status_filter(p.status.as_deref(), &["active", "revoked"])?;
    let page = keyset_page::<KeyView>(
        s.store.pool(),
        Listing {
            columns: KEY_COLUMNS,
            table: "read.api_keys",
            id_column: "key_id",
        },
        &principal.tenant_id,
        status,
        &p,
        |r| r.key_id,
    )
    .await?;
    Ok(ApiJson(page))
}

async fn get_key(
    State(s): State<QueryState>,
    principal: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<Query<AfterParam>, QueryRejection>,
) -> Result<ApiJson<KeyView>, ApiError> {
    principal.require_any(KEY_ADMINS)?;
    let Query(p) = params.map_err(query_error)?;
    s.catch_up(API_KEYS_PROJECTOR, p.after.as_deref(), &headers)
        .await?;
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
