//! The query routes. Handlers are thin: authorise, wait for the commit token if any, read, shape.

use crate::QueryConfig;
use crate::consistency::{PROJECTOR, ReadYourWrites, requested_token};
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use nura_http::{ApiError, ApiJson, Principal, Role};
use nura_store::{EventStore, RecordedEvent, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

/// The most messages `GET /v1/conversations/{id}` returns; more sets `messages_truncated`.
pub const MAX_MESSAGES: i64 = 1000;

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;
const DEFAULT_EVENTS: i64 = 100;
const MAX_EVENTS: i64 = 1000;
/// Stream ids are `<aggregate>-<uuid>`; anything much longer is not one of ours.
const MAX_STREAM_ID: usize = 200;
/// Every role may read (admin holds every role).
const READERS: &[Role] = &[Role::Viewer, Role::Member, Role::Service];

/// The state every read route shares.
#[derive(Clone)]
pub(crate) struct QueryState {
    pub store: EventStore,
    pub config: QueryConfig,
    pub read_your_writes: ReadYourWrites,
}

/// The read routes, with their state applied: `GET /v1/conversations`,
/// `GET /v1/conversations/{id}`, `GET /v1/streams/{stream_id}/events`, and the admin-only
/// API-key reads of [`crate::api_keys`]. They need a
/// [`Principal`] in the request extensions; every read is confined to its tenant. Starts the
/// read-your-writes poller (so it needs a Tokio runtime).
pub fn router(store: EventStore, config: QueryConfig) -> Router {
    let state = QueryState {
        read_your_writes: ReadYourWrites::start(
            store.pool().clone(),
            config.checkpoint_board.clone(),
        ),
        store,
        config,
    };
    Router::new()
        .route("/v1/conversations", get(list_conversations))
        .route("/v1/conversations/{id}", get(get_conversation))
        .route("/v1/streams/{stream_id}/events", get(stream_events))
        .with_state(state.clone())
        .merge(crate::api_keys::router(state))
}

/// The parameters of a list route.
#[derive(Debug, Deserialize)]
// Unknown parameters (a `sort`, a misspelt filter) are refused, never silently ignored.
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    pub status: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
    pub after: Option<String>,
}

/// The parameters of a single-item route.
#[derive(Debug, Deserialize)]
// Unknown parameters (a `sort`, a misspelt filter) are refused, never silently ignored.
#[serde(deny_unknown_fields)]
pub(crate) struct AfterParam {
    pub after: Option<String>,
}

#[derive(Debug, Deserialize)]
// Unknown parameters (a `sort`, a misspelt filter) are refused, never silently ignored.
#[serde(deny_unknown_fields)]
struct EventParams {
    after_version: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

/// One conversation row as served.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct ConversationView {
    conversation_id: Uuid,
    stream_id: String,
    title: String,
    status: String,
    message_count: i64,
    last_message_at: Option<DateTime<Utc>>,
    created_by: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    archived_at: Option<DateTime<Utc>>,
    version: i64,
}

#[derive(Debug, Serialize)]
struct MessageView {
    message_id: Uuid,
    author: String,
    text: String,
    posted_at: DateTime<Utc>,
    stream_version: i64,
}

const CONVERSATION_COLUMNS: &str = "conversation_id, stream_id, title, status, message_count, \
    last_message_at, created_by, created_at, updated_at, archived_at, version";

async fn list_conversations(
    State(s): State<QueryState>,
    principal: Principal,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<ApiJson<Value>, ApiError> {
    principal.require_any(READERS)?;
    let Query(p) = params.map_err(query_error)?;
    s.catch_up(PROJECTOR, p.after.as_deref(), &headers).await?;
    let status = status_filter(p.status.as_deref(), &["active", "archived"])?;
    let page = keyset_page::<ConversationView>(
        s.store.pool(),
        Listing {
            columns: CONVERSATION_COLUMNS,
            table: "read.conversations",
            id_column: "conversation_id",
        },
        &principal.tenant_id,
        status,
        &p,
        |r| r.conversation_id,
    )
    .await?;
    Ok(ApiJson(page))
}

async fn get_conversation(
    State(s): State<QueryState>,
    principal: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<Query<AfterParam>, QueryRejection>,
) -> Result<Response, ApiError> {
    principal.require_any(READERS)?;
    let Query(p) = params.map_err(query_error)?;
    s.catch_up(PROJECTOR, p.after.as_deref(), &headers).await?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("conversation"))?;
    // One statement, so the conversation (its count, its version as the ETag) and its messages
    // come from one snapshot: a message committed in between can never be listed beside a count
    // or a version that does not include it. It also saves a round trip per read.
    let sql = format!(
        "SELECT {CONVERSATION_COLUMNS}, m.* FROM read.conversations c CROSS JOIN LATERAL ( \
             SELECT coalesce(array_agg(message_id ORDER BY stream_version), '{{}}') AS m_ids, \
                    coalesce(array_agg(author ORDER BY stream_version), '{{}}') AS m_authors, \
                    coalesce(array_agg(text ORDER BY stream_version), '{{}}') AS m_texts, \
                    coalesce(array_agg(posted_at ORDER BY stream_version), '{{}}') AS m_posted, \
                    coalesce(array_agg(stream_version ORDER BY stream_version), '{{}}') AS m_versions \
             FROM (SELECT message_id, author, text, posted_at, stream_version FROM read.messages \
                   WHERE conversation_id = c.conversation_id AND tenant_id = c.tenant_id \
                   ORDER BY stream_version LIMIT $3) page \
         ) m WHERE c.conversation_id = $1 AND c.tenant_id = $2"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(&principal.tenant_id)
        .bind(MAX_MESSAGES + 1)
        .fetch_optional(s.store.pool())
        .await
        .map_err(db_error)?
        // Another tenant's conversation is indistinguishable from a missing one.
        .ok_or_else(|| ApiError::not_found("conversation"))?;
    let (conversation, mut messages) = conversation_with_messages(&row).map_err(db_error)?;
    let truncated = messages.len() as i64 > MAX_MESSAGES;
    messages.truncate(MAX_MESSAGES as usize);
    let mut body = serde_json::to_value(&conversation).map_err(ApiError::internal)?;
    if let Some(o) = body.as_object_mut() {
        o.insert("messages".into(), json!(messages));
        o.insert("messages_truncated".into(), json!(truncated));
    }
    // The version as an ETag, so a client can send it back as `If-Match` on its next command.
    let etag = HeaderValue::from_str(&format!("\"{}\"", conversation.version))
        .map_err(ApiError::internal)?;
    Ok(([(header::ETAG, etag)], ApiJson(body)).into_response())
}

/// Decodes a row of `get_conversation`'s statement: the conversation's columns and its
/// messages as parallel arrays, in stream order.
fn conversation_with_messages(
    row: &sqlx::postgres::PgRow,
) -> Result<(ConversationView, Vec<MessageView>), sqlx::Error> {
    use sqlx::{FromRow, Row};
    let conversation = ConversationView::from_row(row)?;
    let ids: Vec<Uuid> = row.try_get("m_ids")?;
    let authors: Vec<String> = row.try_get("m_authors")?;
    let texts: Vec<String> = row.try_get("m_texts")?;
    let posted: Vec<DateTime<Utc>> = row.try_get("m_posted")?;
    let versions: Vec<i64> = row.try_get("m_versions")?;
    let messages = ids
        .into_iter()
        .zip(authors)
        .zip(texts)
        .zip(posted)
        .zip(versions)
        .map(
            |((((message_id, author), text), posted_at), stream_version)| MessageView {
                message_id,
                author,
                text,
                posted_at,
                stream_version,
            },
        )
        .collect();
    Ok((conversation, messages))
}

async fn stream_events(
    State(s): State<QueryState>,
    principal: Principal,
    headers: HeaderMap,
    Path(stream_id): Path<String>,
    params: Result<Query<EventParams>, QueryRejection>,
) -> Result<ApiJson<Value>, ApiError> {
    principal.require_any(READERS)?;
    let Query(p) = params.map_err(query_error)?;
    // The event store is the record: a committed token is already readable here, so the token
    // is validated (400 if malformed) but never waited on.
    requested_token(p.after.as_deref(), &headers, s.store.partitions())?;
    let after_version = int_param(p.after_version.as_deref(), "after_version", 0)?.max(0);
    let limit = int_param(p.limit.as_deref(), "limit", DEFAULT_EVENTS)?.clamp(1, MAX_EVENTS);
    if stream_id.len() > MAX_STREAM_ID {
        return Err(ApiError::not_found("stream"));
    }
    // Ownership is decided by the stream's first event, which every later event shares.
    let first = s
        .store
        .read_stream(&stream_id, 0, 1)
        .await
        .map_err(store_error)?;
    match first.first() {
        Some(e) if e.metadata.tenant_id == principal.tenant_id => {}
        _ => return Err(ApiError::not_found("stream")),
    }
    let events = s
        .store
        .read_stream(&stream_id, after_version, limit + 1)
        .await
        .map_err(store_error)?;
    let more = events.len() as i64 > limit;
    let page: Vec<Value> = events.iter().take(limit as usize).map(event_view).collect();
    let next_after_version = more
        .then(|| events.get(limit as usize - 1).map(|e| e.stream_version))
        .flatten();
    Ok(ApiJson(json!({
        "stream_id": stream_id,
        "events": page,
        "next_after_version": next_after_version,
    })))
}

fn event_view(e: &RecordedEvent) -> Value {
    json!({
        "event_id": e.event_id,
        "stream_version": e.stream_version,
        "event_type": e.event_type,
        "schema_version": e.schema_version,
        "payload": e.payload,
        "metadata": e.metadata,
        "recorded_at": e.recorded_at,
        "commit": e.commit_token(),
    })
}

impl QueryState {
    /// Waits for `projector` to pass the request's commit token (`?after=` or the `Nura-After`
    /// header), if it names one.
    pub(crate) async fn catch_up(
        &self,
        projector: &str,
        query_after: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(), ApiError> {
        match requested_token(query_after, headers, self.store.partitions())? {
            Some(token) => {
                self.read_your_writes
                    .wait_for(projector, token, self.config.read_your_writes_timeout)
                    .await
            }
            None => Ok(()),
        }
    }
}

/// A `status` filter from an allow-list (anything else is a 400).
pub(crate) fn status_filter(
    raw: Option<&str>,
    allowed: &[&str],
) -> Result<Option<String>, ApiError> {
    match raw {
        None => Ok(None),
        Some(st) if allowed.contains(&st) => Ok(Some(st.to_owned())),
        Some(_) => Err(ApiError::bad_request(
            "invalid_status",
            format!("status must be {}", allowed.join(" or ")),
        )),
    }
}

/// Where a keyset-paginated list reads from: compile-time names only, never client input.
pub(crate) struct Listing {
    pub columns: &'static str,
    pub table: &'static str,
    /// A UUIDv7 column: pages run newest first, and the cursor is the last id of a page.
    pub id_column: &'static str,
}

/// One page of a tenant's rows, newest first, optionally of one status:
/// `{"items": [...], "next_cursor": ...}` (`next_cursor` is null on the last page).
pub(crate) async fn keyset_page<T>(
    pool: &sqlx::PgPool,
    from: Listing,
    tenant_id: &str,
    status: Option<String>,
    params: &ListParams,
    id_of: fn(&T) -> Uuid,
) -> Result<Value, ApiError>
where
    T: Serialize + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let limit = int_param(params.limit.as_deref(), "limit", DEFAULT_PAGE)?.clamp(1, MAX_PAGE);
    let cursor = params.cursor.as_deref().map(decode_cursor).transpose()?;
    let Listing {
        columns,
        table,
        id_column: id,
    } = from;
    let sql = format!(
        "SELECT {columns} FROM {table} \
         WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2) \
           AND ($3::uuid IS NULL OR {id} < $3) \
         ORDER BY {id} DESC LIMIT $4"
    );
    let mut rows: Vec<T> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(tenant_id)
        .bind(status)
        .bind(cursor)
        .bind(limit + 1)
        .fetch_all(pool)
        .await
        .map_err(db_error)?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = more
        .then(|| rows.last().map(|r| encode_cursor(id_of(r))))
        .flatten();
    Ok(json!({"items": rows, "next_cursor": next_cursor}))
}

pub(crate) fn int_param(raw: Option<&str>, name: &str, default: i64) -> Result<i64, ApiError> {
    match raw {
        None => Ok(default),
        Some(r) => r.trim().parse::<i64>().map_err(|_| {
            ApiError::bad_request("invalid_parameter", format!("{name} must be an integer"))
                .with_details(json!({"parameter": name}))
        }),
    }
}

/// Cursors are the last conversation id of a page, in a form clients treat as opaque.
pub(crate) fn encode_cursor(id: Uuid) -> String {
    format!("c{}", id.simple())
}

pub(crate) fn decode_cursor(raw: &str) -> Result<Uuid, ApiError> {
    raw.strip_prefix('c')
        .filter(|hex| hex.len() == 32)
        .and_then(|hex| Uuid::try_parse(hex).ok())
        .ok_or_else(|| ApiError::bad_request("invalid_cursor", "cursor is not one this API issued"))
}

pub(crate) fn query_error(e: QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", "the query string is malformed")
        .with_details(json!({"reason": e.body_text()}))
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Database(e) => db_error(e),
        other => ApiError::internal(other),
    }
}

/// An unreachable database is a retryable 503; anything else is a logged 500.
pub(crate) fn db_error(e: sqlx::Error) -> ApiError {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::unavailable("the database is unavailable; retry shortly")
        }
        other => ApiError::internal(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)).unwrap(), id);
        for bad in ["", "c", "x1234", "c' OR 1=1 --", &id.to_string()] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }
}
