//! The one load → decide → append flow every aggregate's commands go through: idempotency
//! (a repeat is answered before deciding), `If-Match`, the fold of the stream, the append with
//! `ExpectedVersion::Exact(loaded)`, and the command's span, log line and metric.

use crate::handler::CommandMeta;
use nura_domain::{Aggregate, DomainEvent};
use nura_store::{
    Appended, CommandRecord, CommitToken, EventStore, ExpectedVersion, Metadata, NewEvent,
    StoreError,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use uuid::Uuid;

/// One command for [`execute`]: which aggregate stream it targets and how it is recognised.
pub(crate) struct Request<'a, A: Aggregate> {
    /// The command's name in logs, metrics and the request hash (e.g. `PostMessage`).
    pub name: &'static str,
    /// The stream the command writes.
    pub stream: String,
    /// The id named in the request path, if any (part of the request hash).
    pub path_id: Option<Uuid>,
    /// The client's request body as the request hash sees it.
    pub body: &'a Value,
    pub meta: &'a CommandMeta,
    pub cmd: A::Command,
    /// The command creates its stream (fresh UUIDv7 id): there is nothing to load, and the
    /// append's expected version 0 still refuses a stream that somehow exists.
    pub creates_stream: bool,
    /// The id each new event gets (a fresh UUIDv7 unless the domain names one).
    pub event_id: fn(&A::Event) -> Uuid,
}

/// What an accepted command did.
pub(crate) enum Outcome<E> {
    /// Events were appended; `events` are the decided ones.
    Appended(Appended, Vec<E>),
    /// The stored result of an earlier identical command (or of a concurrent identical first
    /// attempt that won).
    Replayed(Appended),
    /// Accepted, nothing to write; the stream's version and the commit of its last event
    /// (`None` when the stream has no events).
    NoOp {
        version: i64,
        commit: Option<CommitToken>,
    },
}

/// Why a command was not carried out.
pub(crate) enum Failure<R> {
    /// A rule of the aggregate refused it.
    Rejected(R),
    /// The stream is not at the version the client (`If-Match`) or the load expected.
    Conflict { expected: i64, actual: i64 },
    /// The event store failed or refused.
    Store(StoreError),
}

impl<R> From<StoreError> for Failure<R> {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

/// Runs `req` against `store` with its span, log line and `nura_commands_total` metric.
pub(crate) async fn execute<A>(
    store: &EventStore,
    req: Request<'_, A>,
) -> Result<Outcome<A::Event>, Failure<A::Error>>
where
    A: Aggregate,
    A::Event: DomainEvent,
{
    let tenant = &req.meta.actor.tenant_id;
    // The key is scoped by tenant; the length prefix keeps `a:b` + `c` apart from `a` + `b:c`.
    let command_id = match &req.meta.idempotency_key {
        Some(key) => format!("{}:{tenant}:{}", tenant.len(), key.as_str()),
        None => format!("{}:{tenant}:{}", tenant.len(), Uuid::now_v7()),
    };
    let span = tracing::info_span!(
        "command",
        command = req.name,
        stream = %req.stream,
        command_id = %command_id,
        correlation_id = %req.meta.correlation_id,
    );
    let record = CommandRecord {
        request_hash: request_hash(tenant, req.name, req.path_id, req.body),
        command_id,
    };
    let name = req.name;
    let result = run::<A>(store, req, &record).instrument(span.clone()).await;
    let outcome = match &result {
        Ok(Outcome::Replayed(_)) => "replayed",
        Ok(Outcome::NoOp { .. }) => "no_op",
        Ok(Outcome::Appended(..)) => "accepted",
        Err(Failure::Rejected(_)) => "rejected",
        Err(Failure::Conflict { .. }) => "conflict",
        Err(Failure::Store(_)) => "failed",
    };
    metrics::counter!("nura_commands_total", "command" => name, "outcome" => outcome).increment(1);
    span.in_scope(|| match &result {
        Err(Failure::Store(e)) => tracing::warn!(error = %e, "command failed"),
        _ => tracing::debug!(outcome, "command handled"),
    });
    result
}

async fn run<A>(
    store: &EventStore,
    req: Request<'_, A>,
    record: &CommandRecord,
) -> Result<Outcome<A::Event>, Failure<A::Error>>
where
    A: Aggregate,
    A::Event: DomainEvent,
{
    let meta = req.meta;
    // A repeat is answered before deciding: the stream may have moved on since the first run
    // (a message repeated after an archive must still return the first message id).
    if meta.idempotency_key.is_some()
        && let Some((hash, first)) = store.recorded_command(&record.command_id).await?
    {
        if hash != record.request_hash {
            return Err(StoreError::IdempotencyMismatch(record.command_id.clone()).into());
        }
        if let Some(first) = first {
            return Ok(Outcome::Replayed(first));
        }
        // The first attempt is still in flight: the append below waits for it and replays it.
    }

    let (state, loaded, last_commit) = if req.creates_stream {
        (A::State::default(), 0, None)
    } else {
        load::<A>(store, &req.stream).await?
    };
    if let Some(expected) = meta.expected_version
        && expected != loaded
    {
        return Err(Failure::Conflict {
            expected,
            actual: loaded,
        });
    }
    let events = A::decide(&req.cmd, &state).map_err(Failure::Rejected)?;
    if events.is_empty() {
        return Ok(Outcome::NoOp {
            version: loaded,
            commit: last_commit,
        });
    }
    let new_events: Vec<NewEvent> = events
        .iter()
        .map(|e| NewEvent {
            event_id: (req.event_id)(e),
            event_type: e.event_type().to_owned(),
            schema_version: 1,
            payload: e.to_payload(),
        })
        .collect();
    let metadata = Metadata {
        tenant_id: meta.actor.tenant_id.clone(),
        actor: meta.actor.user_id.clone(),
        command_id: record.command_id.clone(),
        correlation_id: meta.correlation_id.clone(),
        causation_id: meta.causation_id,
    };
    let appended = store
        .append(
            &req.stream,
            ExpectedVersion::Exact(loaded),
            &new_events,
            &metadata,
            Some(record),
        )
        .await;
    match appended {
        Ok(a) if a.replayed => Ok(Outcome::Replayed(a)),
        Ok(a) => Ok(Outcome::Appended(a, events)),
        Err(StoreError::Conflict { .. }) => Err(Failure::Conflict {
            expected: loaded,
            actual: store.stream_version(&req.stream).await?,
        }),
        Err(e) => Err(e.into()),
    }
}

/// Folds the stream; returns the state, its version and the commit token of its last event.
async fn load<A>(
    store: &EventStore,
    stream: &str,
) -> Result<(A::State, i64, Option<CommitToken>), StoreError>
where
    A: Aggregate,
    A::Event: DomainEvent,
{
    let recorded = store.read_stream(stream, 0, i64::MAX).await?;
    let mut state = A::State::default();
    for e in &recorded {
        let event = A::Event::from_stored(&e.event_type, &e.payload)
            .map_err(|err| StoreError::Corrupt(err.to_string()))?;
        state = A::evolve(state, &event);
    }
    let last = recorded.last();
    Ok((
        state,
        last.map_or(0, |e| e.stream_version),
        last.map(|e| e.commit_token()),
    ))
}

/// sha256 over the tenant, the command name, the path id and the canonical body (serde_json
/// writes object keys in a fixed order), each part length-prefixed so parts cannot run together.
pub(crate) fn request_hash(
    tenant: &str,
    name: &str,
    path_id: Option<Uuid>,
    body: &Value,
) -> Vec<u8> {
    let path = path_id.map(|id| id.to_string()).unwrap_or_default();
    let body = body.to_string();
    let mut h = Sha256::new();
    for part in [tenant, name, path.as_str(), body.as_str()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().to_vec()
}

/// A fresh UUIDv7 per event: the default [`Request::event_id`].
pub(crate) fn fresh_event_id<E>(_: &E) -> Uuid {
    Uuid::now_v7()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_hash_changes_with_tenant_command_path_and_body() {
        let id = Some(Uuid::from_u128(1));
        let body = serde_json::json!({"text": "hi"});
        let base = request_hash("acme", "PostMessage", id, &body);
        assert_eq!(base, request_hash("acme", "PostMessage", id, &body));
        assert_ne!(base, request_hash("evil", "PostMessage", id, &body));
        assert_ne!(base, request_hash("acme", "Other", id, &body));
        assert_ne!(
            base,
            request_hash("acme", "PostMessage", Some(Uuid::from_u128(2)), &body)
        );
        assert_ne!(
            base,
            request_hash(
                "acme",
                "PostMessage",
                id,
                &serde_json::json!({"text": "ho"})
            )
        );
    }
}
