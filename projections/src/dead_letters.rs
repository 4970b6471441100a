//! Dead letters: poison events recorded after bounded attempts, the streams parked behind them,
//! and the admin routes that list and retry them. Never a silent skip: a dead-lettered event is
//! visible here until a retry applies it.

use crate::projection::projection_named;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use nura_http::{ApiError, ApiJson, Principal, Role};
use nura_store::{EventStore, RecordedEvent};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use uuid::Uuid;

/// One dead letter as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The dead letter's id (the `{id}` of the retry route).
    pub id: i64,
    /// The projector that failed.
    pub projector: String,
    /// The event that failed (or was parked).
    pub event_id: Uuid,
    /// Its stream; later events of this stream are parked until it is resolved.
    pub stream_id: String,
    /// The stream's partition.
    pub partition: i32,
    /// Its position `<tx>.<pos>` in commit order.
    pub position: String,
    /// Its type.
    pub event_type: String,
    /// The last error (or `parked behind dead letter <id>`).
    pub error: String,
    /// Delivery attempts made (0 for a parked event that was never tried).
    pub attempts: i32,
    /// `open` or `resolved`.
    pub status: String,
    /// When it first failed.
    pub first_failed_at: DateTime<Utc>,
    /// When it last failed.
    pub last_failed_at: DateTime<Utc>,
    /// When a retry applied it.
    pub resolved_at: Option<DateTime<Utc>>,
}

/// The streams of one partition that have an open dead letter, with the id of the first one.
pub(crate) async fn open_streams(
    conn: &mut PgConnection,
    projector: &str,
    partition: i32,
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT stream_id, min(id) FROM read.dead_letters \
         WHERE projector = $1 AND partition = $2 AND status = 'open' GROUP BY stream_id",
    )
    .bind(projector)
    .bind(partition)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Records `event` as an open dead letter of `projector` and returns its id.
pub(crate) async fn record(
    conn: &mut PgConnection,
    projector: &str,
    event: &RecordedEvent,
    error: &str,
    attempts: i32,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO read.dead_letters (projector, event_id, stream_id, tenant_id, partition, \
           transaction_id, global_position, event_type, error, attempts) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (projector, event_id) DO UPDATE SET error = EXCLUDED.error, \
           attempts = EXCLUDED.attempts, last_failed_at = now(), status = 'open', resolved_at = NULL \
         RETURNING id",
    )
    .bind(projector)
    .bind(event.event_id)
    .bind(&event.stream_id)
    .bind(&event.metadata.tenant_id)
    .bind(event.partition)
    .bind(event.transaction_id)
    .bind(event.global_position)
    .bind(&event.event_type)
    .bind(error)
    .bind(attempts)
    .fetch_one(&mut *conn)
    .await
}

/// The outcome of a retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum RetryOutcome {
    /// Every open dead letter of the stream was applied and resolved (ids in commit order; empty
    /// when there was nothing open any more).
    Resolved(Vec<i64>),
    /// Applying still fails: the ones before the failing one were resolved, the failing one and
    /// those after it stay open.
    StillFailing {
        /// Dead letters resolved by this retry.
        resolved: Vec<i64>,
        /// The dead letter that failed again.
        failed: i64,
        /// Its error.
        error: String,
    },
}

/// Why a retry could not run.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// No such dead letter in the caller's tenant.
    #[error("dead letter not found")]
    NotFound,
    /// The dead letter names a projector this binary does not know.
    #[error("unknown projector {0}")]
    UnknownProjector(String),
    /// A dead letter's event is no longer in the log.
    #[error("event {0} is missing from the event store")]
    MissingEvent(Uuid),
    /// Postgres failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Reading events failed.
    #[error(transparent)]
    Store(#[from] nura_store::StoreError),
}

/// Re-applies every open dead letter of the stream of dead letter `id`, in commit order, in one
/// transaction that also holds the partition's checkpoint lock (so the projector cannot park or
/// apply that stream meanwhile). `tenant` confines the lookup to one tenant (`None`: any).
pub async fn retry_dead_letter(
    store: &EventStore,
    tenant: Option<&str>,
    id: i64,
) -> Result<RetryOutcome, RetryError> {
    let mut tx = store.pool().begin().await?;
    let row = sqlx::query(
        "SELECT projector, stream_id, partition FROM read.dead_letters \
         WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2)",
    )
    .bind(id)
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(RetryError::NotFound)?;
    let projector: String = row.get(0);
    let stream_id: String = row.get(1);
    let partition: i32 = row.get(2);
    let projection = projection_named(&projector)
        .ok_or_else(|| RetryError::UnknownProjector(projector.clone()))?;
    crate::runtime::lock_checkpoint(&mut tx, &projector, partition).await?;
    let open: Vec<(i64, Uuid)> = sqlx::query_as(
        "SELECT id, event_id FROM read.dead_letters \
         WHERE projector = $1 AND stream_id = $2 AND status = 'open' \
         ORDER BY transaction_id, global_position FOR UPDATE",
    )
    .bind(&projector)
    .bind(&stream_id)
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<Uuid> = open.iter().map(|(_, e)| *e).collect();
    let events: HashMap<Uuid, RecordedEvent> = store
        .events_by_id(&ids)
        .await?
        .into_iter()
        .map(|e| (e.event_id, e))
        .collect();
    let mut resolved = Vec::new();
    for (dl, event_id) in open {
        let event = events
            .get(&event_id)
            .ok_or(RetryError::MissingEvent(event_id))?;
        sqlx::query("SAVEPOINT retry").execute(&mut *tx).await?;
        match projection.apply(&mut tx, event).await {
            Ok(()) => {
                sqlx::query("RELEASE SAVEPOINT retry")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE read.dead_letters SET status = 'resolved', resolved_at = now() WHERE id = $1",
                )
                .bind(dl)
                .execute(&mut *tx)
                .await?;
                resolved.push(dl);
            }
            Err(e) => {
                sqlx::query("ROLLBACK TO SAVEPOINT retry")
                    .execute(&mut *tx)
                    .await?;
                let error = e.to_string();
                sqlx::query(
                    "UPDATE read.dead_letters SET error = $2, attempts = attempts + 1, \
                       last_failed_at = now() WHERE id = $1",
                )
                .bind(dl)
                .bind(&error)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                metrics::counter!("nura_projector_dead_letters_resolved_total", "projector" => projector)
                    .increment(resolved.len() as u64);
                tracing::warn!(dead_letter = dl, %error, "dead letter retry still fails");
                return Ok(RetryOutcome::StillFailing {
                    resolved,
                    failed: dl,
                    error,
                });
            }
        }
    }
    tx.commit().await?;
    metrics::counter!("nura_projector_dead_letters_resolved_total", "projector" => projector)
        .increment(resolved.len() as u64);
    tracing::info!(
        stream_id,
        resolved = resolved.len(),
        "dead letters resolved by retry"
    );
    Ok(RetryOutcome::Resolved(resolved))
}

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;

/// Query of `GET /v1/dead-letters`.
#[derive(Debug, Deserialize)]
// Unknown parameters (a `sort`, a misspelt filter) are refused, never silently ignored.
#[serde(deny_unknown_fields)]
struct ListParams {
    /// `open` or `resolved`; all when absent.
    status: Option<String>,
    /// Keyset cursor: the last id of the previous page.
    after: Option<i64>,
    /// Page size, clamped to `1..=200`.
    limit: Option<i64>,
}

/// Admin HTTP routes for dead letters; the gateway puts authentication in front (a
/// [`Principal`] in the request extensions), these check the admin role and the tenant:
///
/// * `GET /v1/dead-letters?status=open|resolved&after=<id>&limit=<n>` →
///   `{"items": [DeadLetter], "next_after": <id>|null}`, oldest first, keyset-paginated.
/// * `POST /v1/dead-letters/{id}/retry` → `200 {"status": "resolved", "resolved": [ids]}`, or
///   `409 still_failing` with the error in `details`; `404` for another tenant's ids.
pub fn admin_router(store: EventStore) -> Router {
    Router::new()
        .route("/v1/dead-letters", get(list))
        .route("/v1/dead-letters/{id}/retry", post(retry))
        .with_state(store)
}

async fn list(
    State(store): State<EventStore>,
    principal: Principal,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<ApiJson<serde_json::Value>, ApiError> {
    principal.require_any(&[Role::Admin])?;
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    if let Some(s) = params.status.as_deref()
        && s != "open"
        && s != "resolved"
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "status must be open or resolved",
        ));
    }
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let rows = sqlx::query(
        "SELECT id, projector, event_id, stream_id, partition, transaction_id, global_position, \
           event_type, error, attempts, status, first_failed_at, last_failed_at, resolved_at \
         FROM read.dead_letters \
         WHERE tenant_id = $1 AND ($2::text IS NULL OR status = $2) AND id > $3 \
         ORDER BY id LIMIT $4",
    )
    .bind(&principal.tenant_id)
    .bind(params.status.as_deref())
    .bind(params.after.unwrap_or(0))
    .bind(limit)
    .fetch_all(store.pool())
    .await
    .map_err(ApiError::internal)?;
    let items: Vec<DeadLetter> = rows
        .iter()
        .map(|r| DeadLetter {
            id: r.get("id"),
            projector: r.get("projector"),
            event_id: r.get("event_id"),
            stream_id: r.get("stream_id"),
            partition: r.get("partition"),
            position: format!(
                "{}.{}",
                r.get::<i64, _>("transaction_id"),
                r.get::<i64, _>("global_position")
            ),
            event_type: r.get("event_type"),
            error: r.get("error"),
            attempts: r.get("attempts"),
            status: r.get("status"),
            first_failed_at: r.get("first_failed_at"),
            last_failed_at: r.get("last_failed_at"),
            resolved_at: r.get("resolved_at"),
        })
        .collect();
    let next_after = if items.len() as i64 == limit {
        items.last().map(|d| d.id)
    } else {
        None
    };
    Ok(ApiJson(json!({"items": items, "next_after": next_after})))
}

async fn retry(
    State(store): State<EventStore>,
    principal: Principal,
    Path(id): Path<i64>,
) -> Result<ApiJson<serde_json::Value>, ApiError> {
    principal.require_any(&[Role::Admin])?;
    match retry_dead_letter(&store, Some(&principal.tenant_id), id).await {
        Ok(RetryOutcome::Resolved(resolved)) => {
            Ok(ApiJson(json!({"status": "resolved", "resolved": resolved})))
        }
        Ok(RetryOutcome::StillFailing {
            resolved,
            failed,
            error,
        }) => Err(
            ApiError::conflict("still_failing", "the dead letter still fails to apply")
                .with_details(
                    json!({"dead_letter_id": failed, "error": error, "resolved": resolved}),
                ),
        ),
        Err(RetryError::NotFound) => Err(ApiError::not_found("dead letter")),
        Err(e) => Err(ApiError::internal(e)),
    }
}
