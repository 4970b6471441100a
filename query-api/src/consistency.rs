//! Read-your-writes: wait until a projection has passed a commit token.

use axum::http::HeaderMap;
use nura_http::ApiError;
use nura_store::CommitToken;
use nura_store::Position;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::watch;
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

/// The channel `read.checkpoints`' trigger notifies (migration 0004).
pub const CHECKPOINT_CHANNEL: &str = "nura_checkpoints";

/// How long a waiter sleeps between reads of `read.checkpoints` while the listener is down.
const FALLBACK_POLL: Duration = Duration::from_millis(25);
/// How long the listener waits before reconnecting after a failure.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);
/// The listener rereads the whole table this often: a deleted or rewound row (a rebuild) sends
/// no notification.
const FULL_RELOAD: Duration = Duration::from_secs(30);

/// What the listener knows of `read.checkpoints`.
#[derive(Debug, Default)]
struct Known {
    /// The listener is connected and has loaded the table since it connected: `at` is at most
    /// one notification behind the database.
    live: bool,
    at: HashMap<(String, i32), Position>,
}

impl Known {
    fn passed(&self, projector: &str, token: CommitToken) -> bool {
        // A borrowed key cannot look up a `(String, i32)`; the map holds a few dozen entries.
        self.at.iter().any(|((p, part), at)| {
            p == projector && *part == token.partition && *at >= token.position
        })
    }
}

/// The projectors' checkpoints as one process-wide listener sees them, so that read-your-writes
/// waiters wake on the notification of the commit that passes their token instead of each
/// polling the database. One `LISTEN` connection per process; while it is down waiters fall back
/// to polling the table. Cheap to clone; the listener ends when the last clone is dropped.
#[derive(Clone)]
pub struct Checkpoints {
    pool: PgPool,
    known: watch::Receiver<Known>,
}

impl Checkpoints {
    /// Starts the listener on `pool`'s database (needs a Tokio runtime).
    pub fn start(pool: PgPool) -> Self {
        let (tx, known) = watch::channel(Known::default());
        tokio::spawn(listen(pool.clone(), tx));
        Self { pool, known }
    }

    /// Waits until `projector`'s checkpoint for the token's partition is at or beyond the token's
    /// position, up to `bound`. Timeout → 504 `not_caught_up` with `Retry-After`; a database
    /// failure while the listener is down → 503.
    pub async fn wait_for(
        &self,
        projector: &str,
        token: CommitToken,
        bound: Duration,
    ) -> Result<(), ApiError> {
        let deadline = Instant::now() + bound;
        let mut known = self.known.clone();
        loop {
            let live = {
                let k = known.borrow_and_update();
                if k.passed(projector, token) {
                    return Ok(());
                }
                k.live
            };
            if !live && self.read_passed(projector, token).await? {
                return Ok(());
            }
            let wake = if live {
                deadline
            } else {
                deadline.min(Instant::now() + FALLBACK_POLL)
            };
            // A change (or the listener ending) wakes the waiter; so does the fallback poll.
            let changed = tokio::time::timeout_at(wake, known.changed()).await;
            if Instant::now() >= deadline {
                metrics::counter!("nura_query_not_caught_up_total").increment(1);
                return Err(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    "not_caught_up",
                    "the read model has not caught up with your write yet; retry",
                )
                .with_details(json!({"after": token, "waited_ms": bound.as_millis() as u64}))
                .with_retry_after(1));
            }
            if let Ok(Err(_)) = changed {
                // The listener is gone (the runtime is shutting down): poll until the deadline.
                tokio::time::sleep_until(deadline.min(Instant::now() + FALLBACK_POLL)).await;
            }
        }
    }

    async fn read_passed(&self, projector: &str, token: CommitToken) -> Result<bool, ApiError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM read.checkpoints WHERE projector = $1 AND partition = $2 \
               AND (transaction_id, global_position) >= ($3, $4))",
        )
        .bind(projector)
        .bind(token.partition)
        .bind(token.position.tx)
        .bind(token.position.pos)
        .fetch_one(&self.pool)
        .await
        .map_err(crate::routes::db_error)
    }
}

/// Keeps `known` up to date until every [`Checkpoints`] is dropped: listen, load the table,
/// apply each notification; after any failure mark it not live, reconnect and reload.
async fn listen(pool: PgPool, known: watch::Sender<Known>) {
    loop {
        let failure = tokio::select! {
            _ = known.closed() => return,
            Err(e) = follow(&pool, &known) => e,
        };
        known.send_modify(|k| k.live = false);
        if pool.is_closed() {
            // The process is shutting down; the pool's close waits for this connection.
            return;
        }
        metrics::gauge!("nura_query_checkpoint_listener_up").set(0.0);
        tracing::warn!(error = %failure, "checkpoint listener lost; read-your-writes waiters poll until it reconnects");
        tokio::select! {
            _ = known.closed() => return,
            _ = tokio::time::sleep(RECONNECT_AFTER) => {}
        }
    }
}

/// Follows the notifications until the connection fails; returns only with that error.
async fn follow(
    pool: &PgPool,
    known: &watch::Sender<Known>,
) -> Result<std::convert::Infallible, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHECKPOINT_CHANNEL).await?;
    let mut reload_at = Instant::now();
    loop {
        if Instant::now() >= reload_at {
            // Listening first, then reading: nothing committed in between is missed.
            let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(
                "SELECT projector, partition, transaction_id, global_position FROM read.checkpoints",
            )
            .fetch_all(pool)
            .await?;
            known.send_modify(|k| {
                k.at = rows
                    .into_iter()
                    .map(|(p, part, tx, pos)| ((p, part), Position { tx, pos }))
                    .collect();
                k.live = true;
            });
            metrics::gauge!("nura_query_checkpoint_listener_up").set(1.0);
            reload_at = Instant::now() + FULL_RELOAD;
        }
        let next = tokio::time::timeout_at(reload_at, listener.try_recv()).await;
        let Ok(next) = next else { continue };
        let Some(n) = next? else {
            return Err(sqlx::Error::Protocol(
                "checkpoint listener disconnected".into(),
            ));
        };
        match parse(n.payload()) {
            Some((projector, partition, at)) => known.send_modify(|k| {
                k.at.insert((projector.to_owned(), partition), at);
            }),
            None => tracing::warn!(payload = n.payload(), "unreadable checkpoint notification"),
        }
    }
}

/// `<projector> <partition> <transaction_id> <global_position>`.
fn parse(payload: &str) -> Option<(&str, i32, Position)> {
    let mut parts = payload.rsplitn(4, ' ');
    let pos = parts.next()?.parse().ok()?;
    let tx = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    let projector = parts.next()?;
    Some((projector, partition, Position { tx, pos }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_payload_parses_and_garbage_does_not() {
        assert_eq!(
            parse("conversations 3 1001 7"),
            Some(("conversations", 3, Position { tx: 1001, pos: 7 }))
        );
        assert_eq!(parse("conversations 3 1001"), None);
        assert_eq!(parse("conversations x 1001 7"), None);
        assert_eq!(parse(""), None);
    }
}
