//! Conversation commands (through the shared flow in `execute`).

use crate::execute::{Failure, Outcome, Request, execute};
use chrono::Utc;
use nura_domain::conversation::{
    Actor, Conversation, ConversationCommand, ConversationError, ConversationEvent, stream_id,
};
use nura_store::{Appended, CommitToken, EventStore, StoreError};
use serde_json::Value;
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
        let creates_stream = matches!(cmd, ConversationCommand::Start { .. });
        let request = Request::<Conversation> {
            name,
            stream: stream.clone(),
            path_id,
            body,
            meta,
            cmd,
            creates_stream,
            event_id: event_id_of,
        };
        match execute(&self.store, request).await {
            Ok(Outcome::Appended(a, _) | Outcome::Replayed(a)) => committed(a),
            Ok(Outcome::NoOp { version, commit }) => Ok(Committed {
                conversation_id: conversation_of(&stream)?,
                event_ids: vec![],
                version,
                commit: commit.ok_or(ConversationError::NotFound)?,
                replayed: false,
            }),
            Err(Failure::Rejected(e)) => Err(e.into()),
            Err(Failure::Conflict { expected, actual }) => Err(CommandError::Conflict {
                stream_id: stream,
                expected,
                actual,
            }),
            Err(Failure::Store(e)) => Err(e.into()),
        }
    }
}

/// The message id doubles as the event id, so a repeated post hands back the first id straight
/// from the stored `Appended.event_ids`.
fn event_id_of(event: &ConversationEvent) -> Uuid {
    match event {
        ConversationEvent::MessagePosted { message_id, .. } => *message_id,
        _ => Uuid::now_v7(),
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
}
