//! Read-your-writes: wait until a projection has passed a commit token.

use axum::http::HeaderMap;
use nura_http::ApiError;
use nura_store::CommitToken;
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;
use tokio::time::Instant;

/// The projector whose checkpoints the conversation endpoints wait on.
pub const PROJECTOR: &str = "conversations";

/// The request header alternative to `?after=`.
pub const AFTER_HEADER: &str = "nura-after";

/// How often the checkpoint is polled while waiting. NOTIFY would be faster but is only a hint;
/// a short poll is simple and bounded.
const POLL: Duration = Duration::from_millis(15);

/// The commit token a request asks to see, from `?after=` (preferred) or `Nura-After`;
/// malformed or out of the store's partition range → 400.
pub(crate) fn requested_token(
    query_after: Option<&str>,
    headers: &HeaderMap,
    partitions: i32,
) -> Result<Option<CommitToken>, ApiError> {
    let raw = match query_after {
        Some(q) => Some(q.to_owned()),
        None => match headers.get(AFTER_HEADER) {
            None => None,
            Some(v) => Some(v.to_str().map(str::to_owned).map_err(|_| bad_token())?),
        },
    };
    let Some(raw) = raw else { return Ok(None) };
    let token: CommitToken = raw.trim().parse().map_err(|_| bad_token())?;
    if token.partition >= partitions {
        return Err(bad_token());
    }
    Ok(Some(token))
}

fn bad_token() -> ApiError {
    ApiError::bad_request(
        "invalid_commit_token",
        "after must be a commit token returned by a command (<tx>.<pos>.<partition>)",
    )
}

/// Waits until `projector`'s checkpoint for the token's partition is at or beyond the token's
/// position, polling `read.checkpoints` up to `bound`. Timeout → 504 `not_caught_up` with
/// `Retry-After`; a database failure → 503.
pub async fn wait_for(
    pool: &PgPool,
    projector: &str,
    token: CommitToken,
    bound: Duration,
) -> Result<(), ApiError> {
    let deadline = Instant::now() + bound;
    loop {
        let passed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM read.checkpoints WHERE projector = $1 AND partition = $2 \
               AND (transaction_id, global_position) >= ($3, $4))",
        )
        .bind(projector)
        .bind(token.partition)
        .bind(token.position.tx)
        .bind(token.position.pos)
        .fetch_one(pool)
        .await
        .map_err(crate::routes::db_error)?;
        if passed {
            return Ok(());
        }
        if Instant::now() + POLL > deadline {
            metrics::counter!("nura_query_not_caught_up_total").increment(1);
            return Err(ApiError::new(
                axum::http::StatusCode::GATEWAY_TIMEOUT,
                "not_caught_up",
                "the read model has not caught up with your write yet; retry",
            )
            .with_details(json!({"after": token, "waited_ms": bound.as_millis() as u64}))
            .with_retry_after(1));
        }
        tokio::time::sleep(POLL).await;
    }
}
