//! Load → decide → append for conversations.

use chrono::Utc;
use nura_domain::conversation::{
    Actor, Conversation, ConversationCommand, ConversationError, ConversationEvent,
    ConversationState, stream_id,
};
use nura_domain::{Aggregate, DomainEvent};
use nura_store::{
    Appended, CommandRecord, CommitToken, EventStore, ExpectedVersion, Metadata, NewEvent,
    StoreError,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use uuid::Uuid;

/// Longest accepted `Idempotency-Key`, in bytes.
const MAX_KEY_LEN: usize = 128;

/// A client-chosen idempotency key: 1–128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

/// An `Idempotency-Key` that is empty, too long or not printable ASCII (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to 128 printable ASCII characters")]
pub struct InvalidIdempotencyKey;

impl IdempotencyKey {
    /// Validates a raw key.
    pub fn parse(raw: &str) -> Result<Self, InvalidIdempotencyKey> {
        let printable = raw.bytes().all(|b| (0x20..=0x7e).contains(&b));
        if raw.is_empty() || raw.len() > MAX_KEY_LEN || !printable {
            return Err(InvalidIdempotencyKey);
        }
        Ok(Self(raw.to_owned()))
    }

    /// The key as the client sent it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who issues a command and how to recognise a repeat of it. Built from the credential and the
/// request headers, never from a body.
#[derive(Debug, Clone)]
pub struct CommandMeta {
    /// The tenant and user acting (stored as the events' `tenant_id` and `actor`).
    pub actor: Actor,
    /// The request id (or the triggering event's correlation id, for workers).
    pub correlation_id: String,
    /// The client's idempotency key; without one every call is a new command.
    pub idempotency_key: Option<IdempotencyKey>,
    /// `If-Match`: the stream version the client last saw; a different loaded version is a
    /// conflict before anything is decided.
    pub expected_version: Option<i64>,
    /// The event that caused this command, for commands issued by workers.
    pub causation_id: Option<Uuid>,
}

/// The outcome of an accepted command (or of its first run, for a repeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The conversation written (for a repeated start: the one the first run created).
    pub conversation_id: Uuid,
    /// Ids of the events written, in order; empty for a no-op. A `MessagePosted` event's id is
    /// its message id.
    pub event_ids: Vec<Uuid>,
    /// The stream's version after the command.
    pub version: i64,
    /// The commit token of the stream's last event, for read-your-writes.
    pub commit: CommitToken,
    /// True when this is the stored result of an earlier identical command.
    pub replayed: bool,
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A business rule refused it (HTTP 404/409/422 depending on the rule).
    #[error(transparent)]
    Rejected(#[from] ConversationError),
    /// The stream is not at the version the client or the handler expected (HTTP 409).
    #[error("stream {stream_id} is at version {actual}, not the expected {expected}")]
    Conflict {
        /// The stream in question.
        stream_id: String,
        /// The version expected (from `If-Match`, or the one loaded before a concurrent write).
        expected: i64,
        /// The version found.
        actual: i64,
    },
    /// The event store failed or refused (duplicate event, idempotency key reused, database).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs conversation commands against the event store.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    store: EventStore,
}

impl CommandHandler {
    /// A handler over `store`.
    pub fn new(store: EventStore) -> Self {
        Self { store }
    }

    /// The store commands are appended to.
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Starts a conversation with a fresh id (UUIDv7). A repeat returns the first conversation.
    pub async fn start_conversation(
        &self,
        meta: &CommandMeta,
        title: &str,
    ) -> Result<Committed, CommandError> {
        let conversation_id = Uuid::now_v7();
        let cmd = ConversationCommand::Start {
            conversation_id,
            title: title.to_owned(),
            by: meta.actor.clone(),
            at: Utc::now(),
        };
        let body = serde_json::json!({ "title": title });
        self.execute("StartConversation", conversation_id, None, &body, meta, cmd)
            .await
    }

    /// Posts a message (its id is a fresh UUIDv7 and equals the event id). A repeat returns the
    /// first message id.
    pub async fn post_message(
        &self,
        meta: &CommandMeta,
        conversation_id: Uuid,
        text: &str,
    ) -> Result<Committed, CommandError> {
        let cmd = ConversationCommand::PostMessage {
            message_id: Uuid::now_v7(),
            text: text.to_owned(),
            by: meta.actor.clone(),
            at: Utc::now(),
        };
        let body = serde_json::json!({ "text": text });
        let path = Some(conversation_id);
        self.execute("PostMessage", conversation_id, path, &body, meta, cmd)
            .await
    }

    /// Archives a conversation; archiving an archived one appends nothing and returns the
    /// stream's current commit.
    pub async fn archive_conversation(
        &self,
        meta: &CommandMeta,
        conversation_id: Uuid,
    ) -> Result<Committed, CommandError> {
        let cmd = ConversationCommand::Archive {
            by: meta.actor.clone(),
            at: Utc::now(),
        };
        let path = Some(conversation_id);
        let body = serde_json::json!({});
        self.execute(
            "ArchiveConversation",
            conversation_id,
            path,
            &body,
            meta,
            cmd,
        )
        .await
    }

    async fn execute(
        &self,
        name: &'static str,
        conversation_id: Uuid,
        path_id: Option<Uuid>,
        body: &Value,
        meta: &CommandMeta,
        cmd: ConversationCommand,
    ) -> Result<Committed, CommandError> {
        let stream = stream_id(conversation_id);
        let tenant = &meta.actor.tenant_id;
        // The key is scoped by tenant; the length prefix keeps `a:b` + `c` apart from `a` + `b:c`.
        let command_id = match &meta.idempotency_key {
            Some(key) => format!("{}:{tenant}:{}", tenant.len(), key.as_str()),
            None => format!("{}:{tenant}:{}", tenant.len(), Uuid::now_v7()),
        };
        let span = tracing::info_span!(
            "command",
            command = name,
            stream = %stream,
            command_id = %command_id,
            correlation_id = %meta.correlation_id,
        );
        let record = CommandRecord {
            request_hash: request_hash(tenant, name, path_id, body),
            command_id,
        };
        let result = self
            .run(&stream, &record, meta, cmd)
            .instrument(span.clone())
            .await;
        let outcome = match &result {
            Ok(c) if c.replayed => "replayed",
            Ok(c) if c.event_ids.is_empty() => "no_op",
            Ok(_) => "accepted",
            Err(CommandError::Rejected(_)) => "rejected",
            Err(CommandError::Conflict { .. }) => "conflict",
            Err(CommandError::Store(_)) => "failed",
        };
        metrics::counter!("nura_commands_total", "command" => name, "outcome" => outcome)
            .increment(1);
        span.in_scope(|| match &result {
            Err(CommandError::Store(e)) => tracing::warn!(error = %e, "command failed"),
            _ => tracing::debug!(outcome, "command handled"),
        });
        result
    }

    async fn run(
        &self,
        stream: &str,
        record: &CommandRecord,
        meta: &CommandMeta,
        cmd: ConversationCommand,
    ) -> Result<Committed, CommandError> {
        // A repeat is answered before deciding: the stream may have moved on since the first run
        // (a message repeated after an archive must still return the first message id).
        if meta.idempotency_key.is_some()
            && let Some((hash, first)) = self.store.recorded_command(&record.command_id).await?
        {
            if hash != record.request_hash {
                return Err(StoreError::IdempotencyMismatch(record.command_id.clone()).into());
            }
            if let Some(first) = first {
                return committed(first);
            }
            // The first attempt is still in flight: append below waits for it and replays it.
        }

        // A start names a fresh UUIDv7 stream, so there is nothing to load: skip the read (the
        // append's expected version 0 still refuses a stream that somehow exists).
        let (state, loaded, last_commit) = if matches!(cmd, ConversationCommand::Start { .. }) {
            (ConversationState::default(), 0, None)
        } else {
            self.load(stream).await?
        };
        if let Some(expected) = meta.expected_version
            && expected != loaded
        {
            return Err(CommandError::Conflict {
                stream_id: stream.to_owned(),
                expected,
                actual: loaded,
            });
        }
        let events = Conversation::decide(&cmd, &state)?;
        if events.is_empty() {
            let commit = last_commit.ok_or(ConversationError::NotFound)?;
            return Ok(Committed {
                conversation_id: conversation_of(stream)?,
                event_ids: vec![],
                version: loaded,
                commit,
                replayed: false,
            });
        }
        let new_events: Vec<NewEvent> = events.iter().map(to_new_event).collect();
        let metadata = Metadata {
            tenant_id: meta.actor.tenant_id.clone(),
            actor: meta.actor.user_id.clone(),
            command_id: record.command_id.clone(),
            correlation_id: meta.correlation_id.clone(),
            causation_id: meta.causation_id,
        };
        let appended = self
            .store
            .append(
                stream,
                ExpectedVersion::Exact(loaded),
                &new_events,
                &metadata,
                Some(record),
            )
            .await;
        match appended {
            Ok(a) => committed(a),
            Err(StoreError::Conflict { .. }) => Err(CommandError::Conflict {
                stream_id: stream.to_owned(),
                expected: loaded,
                actual: self.store.stream_version(stream).await?,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Folds the stream; returns the state, its version and the commit token of its last event.
    async fn load(
        &self,
        stream: &str,
    ) -> Result<(ConversationState, i64, Option<CommitToken>), CommandError> {
        let recorded = self.store.read_stream(stream, 0, i64::MAX).await?;
        let mut state = ConversationState::default();
        for e in &recorded {
            let event = ConversationEvent::from_stored(&e.event_type, &e.payload)
                .map_err(|err| StoreError::Corrupt(err.to_string()))?;
            state = Conversation::evolve(state, &event);
        }
        let last = recorded.last();
        Ok((
            state,
            last.map_or(0, |e| e.stream_version),
            last.map(|e| e.commit_token()),
        ))
    }
}

fn to_new_event(event: &ConversationEvent) -> NewEvent {
    let event_id = match event {
        // The message id doubles as the event id, so a repeated post hands back the first id
        // straight from the stored `Appended.event_ids`.
        ConversationEvent::MessagePosted { message_id, .. } => *message_id,
        _ => Uuid::now_v7(),
    };
    NewEvent {
        event_id,
        event_type: event.event_type().to_owned(),
        schema_version: 1,
        payload: event.to_payload(),
    }
}

fn committed(a: Appended) -> Result<Committed, CommandError> {
    Ok(Committed {
        conversation_id: conversation_of(&a.stream_id)?,
        event_ids: a.event_ids,
        version: a.last_version,
        commit: a.commit,
        replayed: a.replayed,
    })
}

fn conversation_of(stream: &str) -> Result<Uuid, CommandError> {
    stream
        .strip_prefix("conversation-")
        .and_then(|id| Uuid::parse_str(id).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("not a conversation stream: {stream}")).into())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_1_to_128_printable_ascii_characters() {
        assert!(IdempotencyKey::parse("a").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(128)).is_ok());
        assert!(IdempotencyKey::parse("order 42 / retry-1").is_ok());
        for bad in [String::new(), "k".repeat(129), "tab\t".into(), "é".into()] {
            assert_eq!(
                IdempotencyKey::parse(&bad),
                Err(InvalidIdempotencyKey),
                "{bad:?}"
            );
        }
    }

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
