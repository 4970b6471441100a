//! Read-your-writes: wait until a projection has passed a commit token.

use axum::http::HeaderMap;
use nura_http::ApiError;
use nura_store::{CheckpointBoard, CommitToken, Position};
use serde_json::json;
use sqlx::PgPool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The projector whose checkpoints the conversation endpoints wait on.
pub const PROJECTOR: &str = "conversations";

/// The request header alternative to `?after=`.
pub const AFTER_HEADER: &str = "nura-after";

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

/// How often `read.checkpoints` is read while someone waits (one query for the whole process,
/// whatever the number of waiters). Projectors running in this process post their checkpoints
/// to the board directly, so their waiters do not wait for the poll.
const POLL: Duration = Duration::from_millis(10);

/// Read-your-writes for the whole process: waiters watch a [`CheckpointBoard`], which the
/// projector workers of this process post to after each commit and which one poller task fills
/// from `read.checkpoints` (for partitions projected elsewhere) while anyone waits. No request
/// queries the database while waiting. Cheap to clone; the poller ends with the last clone.
#[derive(Clone)]
pub struct ReadYourWrites {
    board: CheckpointBoard,
    shared: Arc<Shared>,
}

struct Shared {
    /// Requests waiting now; the poller sleeps while there are none.
    waiting: AtomicUsize,
    /// Wakes the poller when the first waiter arrives.
    someone_waits: Notify,
}

/// Counts a waiter for as long as it waits.
struct Waiting<'a>(&'a Shared);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ReadYourWrites {
    /// Starts the poller on `pool`'s database (needs a Tokio runtime). `board` is the one the
    /// process's projector workers post to (any board, if none run here).
    pub fn start(pool: PgPool, board: CheckpointBoard) -> Self {
        let shared = Arc::new(Shared {
            waiting: AtomicUsize::new(0),
            someone_waits: Notify::new(),
        });
        tokio::spawn(poll(pool, board.clone(), Arc::downgrade(&shared)));
        Self { board, shared }
    }

    /// Waits until `projector`'s checkpoint for the token's partition is at or beyond the token's
    /// position, up to `bound`. Timeout → 504 `not_caught_up` with `Retry-After`.
    pub async fn wait_for(
        &self,
        projector: &str,
        token: CommitToken,
        bound: Duration,
    ) -> Result<(), ApiError> {
        let mut board = self.board.subscribe();
        if board.borrow_and_update().passed(projector, token) {
            return Ok(());
        }
        let deadline = Instant::now() + bound;
        self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.shared);
        self.shared.someone_waits.notify_one();
        loop {
            match tokio::time::timeout_at(deadline, board.changed()).await {
                Ok(Ok(())) if board.borrow_and_update().passed(projector, token) => return Ok(()),
                Ok(Ok(())) => {}
                // The board cannot close while `self` holds it; time out like any other wait.
                Ok(Err(_)) | Err(_) => {
                    metrics::counter!("nura_query_not_caught_up_total").increment(1);
                    return Err(ApiError::new(
                        axum::http::StatusCode::GATEWAY_TIMEOUT,
                        "not_caught_up",
                        "the read model has not caught up with your write yet; retry",
                    )
                    .with_details(json!({"after": token, "waited_ms": bound.as_millis() as u64}))
                    .with_retry_after(1));
                }
            }
        }
    }
}

/// While anyone waits, reads every checkpoint each [`POLL`] and posts them to the board. Ends
/// when the last [`ReadYourWrites`] is dropped.
async fn poll(pool: PgPool, board: CheckpointBoard, shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        if s.waiting.load(Ordering::Relaxed) == 0 {
            // Checked again after a while: a waiter gone before notifying, or the last clone
            // dropped, must not leave this task asleep forever.
            let _ = tokio::time::timeout(Duration::from_secs(1), s.someone_waits.notified()).await;
            continue;
        }
        drop(s);
        let rows: Result<Vec<(String, i32, i64, i64)>, _> = sqlx::query_as(
            "SELECT projector, partition, transaction_id, global_position FROM read.checkpoints",
        )
        .fetch_all(&pool)
        .await;
        match rows {
            Ok(rows) => {
                for (projector, partition, tx, pos) in rows {
                    board.post(&projector, partition, Position { tx, pos });
                }
            }
            Err(e) => {
                metrics::counter!("nura_query_checkpoint_poll_errors_total").increment(1);
                tracing::warn!(error = %e, "reading read.checkpoints failed; waiters may time out");
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
