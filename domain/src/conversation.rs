//! The `Conversation` aggregate: a titled thread of messages owned by one tenant.

use crate::{Aggregate, DomainEvent, UnknownEvent};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest title, in characters, after trimming.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest message text, in characters.
pub const MAX_MESSAGE_CHARS: usize = 32_000;

/// The stream id of a conversation: `conversation-<uuid>`.
pub fn stream_id(conversation_id: Uuid) -> String {
    format!("conversation-{conversation_id}")
}

/// Who issues a command: always taken from the credential, never from a request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The tenant the caller belongs to.
    pub tenant_id: String,
    /// The user (or API key) acting.
    pub user_id: String,
}

/// A command on a conversation. Ids and time are chosen by the caller, never inside `decide`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversationCommand {
    /// Opens a new conversation.
    Start {
        conversation_id: Uuid,
        title: String,
        by: Actor,
        at: DateTime<Utc>,
    },
    /// Adds a message to an active conversation.
    PostMessage {
        message_id: Uuid,
        text: String,
        by: Actor,
        at: DateTime<Utc>,
    },
    /// Closes the conversation to new messages; archiving an archived conversation is a no-op.
    Archive { by: Actor, at: DateTime<Utc> },
}

/// What happened to a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ConversationEvent {
    /// A conversation was opened with a (trimmed) title.
    ConversationStarted {
        conversation_id: Uuid,
        tenant_id: String,
        title: String,
        started_by: String,
        at: DateTime<Utc>,
    },
    /// A message was posted.
    MessagePosted {
        message_id: Uuid,
        author: String,
        text: String,
        at: DateTime<Utc>,
    },
    /// The conversation was archived.
    ConversationArchived {
        archived_by: String,
        at: DateTime<Utc>,
    },
}

/// A broken conversation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConversationError {
    /// The title is blank after trimming.
    #[error("title must not be blank")]
    TitleEmpty,
    /// The title is longer than [`MAX_TITLE_CHARS`] after trimming.
    #[error("title must be at most {MAX_TITLE_CHARS} characters")]
    TitleTooLong,
    /// The message text is blank.
    #[error("message text must not be blank")]
    MessageEmpty,
    /// The message text is longer than [`MAX_MESSAGE_CHARS`].
    #[error("message text must be at most {MAX_MESSAGE_CHARS} characters")]
    MessageTooLong,
    /// The conversation does not exist.
    #[error("conversation not found")]
    NotFound,
    /// The conversation belongs to another tenant; callers must not learn it exists.
    #[error("conversation not found")]
    ForeignTenant,
    /// A conversation with this id was already started.
    #[error("conversation already exists")]
    AlreadyStarted,
    /// The conversation is archived and takes no more messages.
    #[error("conversation is archived")]
    Archived,
}

/// The state of one conversation, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConversationState {
    /// No events yet.
    #[default]
    New,
    /// Started and open to messages.
    Active { tenant_id: String, messages: u64 },
    /// Archived: read-only.
    Archived { tenant_id: String, messages: u64 },
}

impl ConversationState {
    fn owned_by(&self, by: &Actor) -> Result<(), ConversationError> {
        match self {
            Self::New => Err(ConversationError::NotFound),
            Self::Active { tenant_id, .. } | Self::Archived { tenant_id, .. }
                if *tenant_id != by.tenant_id =>
            {
                Err(ConversationError::ForeignTenant)
            }
            _ => Ok(()),
        }
    }
}

/// The conversation aggregate.
pub struct Conversation;

impl Aggregate for Conversation {
    type State = ConversationState;
    type Command = ConversationCommand;
    type Event = ConversationEvent;
    type Error = ConversationError;

    fn decide(
        cmd: &ConversationCommand,
        state: &ConversationState,
    ) -> Result<Vec<ConversationEvent>, ConversationError> {
        use ConversationCommand as C;
        use ConversationError as E;
        match cmd {
            C::Start {
                conversation_id,
                title,
                by,
                at,
            } => {
                if *state != ConversationState::New {
                    return Err(E::AlreadyStarted);
                }
                let title = title.trim();
                if title.is_empty() {
                    return Err(E::TitleEmpty);
                }
                if title.chars().count() > MAX_TITLE_CHARS {
                    return Err(E::TitleTooLong);
                }
                Ok(vec![ConversationEvent::ConversationStarted {
                    conversation_id: *conversation_id,
                    tenant_id: by.tenant_id.clone(),
                    title: title.to_owned(),
                    started_by: by.user_id.clone(),
                    at: *at,
                }])
            }
            C::PostMessage {
                message_id,
                text,
                by,
                at,
            } => {
                state.owned_by(by)?;
                if matches!(state, ConversationState::Archived { .. }) {
                    return Err(E::Archived);
                }
                if text.trim().is_empty() {
                    return Err(E::MessageEmpty);
                }
                if text.chars().count() > MAX_MESSAGE_CHARS {
                    return Err(E::MessageTooLong);
                }
                Ok(vec![ConversationEvent::MessagePosted {
                    message_id: *message_id,
                    author: by.user_id.clone(),
                    text: text.clone(),
                    at: *at,
                }])
            }
            C::Archive { by, at } => {
                state.owned_by(by)?;
                if matches!(state, ConversationState::Archived { .. }) {
                    return Ok(vec![]);
                }
                Ok(vec![ConversationEvent::ConversationArchived {
                    archived_by: by.user_id.clone(),
                    at: *at,
                }])
            }
        }
    }

    fn evolve(state: ConversationState, event: &ConversationEvent) -> ConversationState {
        use ConversationState as S;
        match (state, event) {
            (_, ConversationEvent::ConversationStarted { tenant_id, .. }) => S::Active {
                tenant_id: tenant_id.clone(),
                messages: 0,
            },
            (
                S::Active {
                    tenant_id,
                    messages,
                },
                ConversationEvent::MessagePosted { .. },
            ) => S::Active {
                tenant_id,
                messages: messages + 1,
            },
            (
                S::Active {
                    tenant_id,
                    messages,
                }
                | S::Archived {
                    tenant_id,
                    messages,
                },
                ConversationEvent::ConversationArchived { .. },
            ) => S::Archived {
                tenant_id,
                messages,
            },
            (state, _) => state,
        }
    }
}

impl DomainEvent for ConversationEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::ConversationStarted { .. } => "ConversationStarted",
            Self::MessagePosted { .. } => "MessagePosted",
            Self::ConversationArchived { .. } => "ConversationArchived",
        }
    }

    fn to_payload(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("conversation events serialize");
        if let Some(o) = v.as_object_mut() {
            o.remove("type");
        }
        v
    }

    fn from_stored(event_type: &str, payload: &serde_json::Value) -> Result<Self, UnknownEvent> {
        crate::from_tagged_payload(event_type, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }
    fn alice() -> Actor {
        Actor {
            tenant_id: "acme".into(),
            user_id: "alice".into(),
        }
    }
    fn mallory() -> Actor {
        Actor {
            tenant_id: "evil".into(),
            user_id: "mallory".into(),
        }
    }
    fn id() -> Uuid {
        Uuid::from_u128(7)
    }
    fn start(title: &str) -> ConversationCommand {
        ConversationCommand::Start {
            conversation_id: id(),
            title: title.into(),
            by: alice(),
            at: at(),
        }
    }
    fn started() -> ConversationEvent {
        ConversationEvent::ConversationStarted {
            conversation_id: id(),
            tenant_id: "acme".into(),
            title: "Hello".into(),
            started_by: "alice".into(),
            at: at(),
        }
    }
    fn post(text: &str) -> ConversationCommand {
        ConversationCommand::PostMessage {
            message_id: Uuid::from_u128(9),
            text: text.into(),
            by: alice(),
            at: at(),
        }
    }
    fn posted(text: &str) -> ConversationEvent {
        ConversationEvent::MessagePosted {
            message_id: Uuid::from_u128(9),
            author: "alice".into(),
            text: text.into(),
            at: at(),
        }
    }
    fn archive(by: Actor) -> ConversationCommand {
        ConversationCommand::Archive { by, at: at() }
    }
    fn archived() -> ConversationEvent {
        ConversationEvent::ConversationArchived {
            archived_by: "alice".into(),
            at: at(),
        }
    }

    #[test]
    fn a_conversation_starts_with_its_title_trimmed() {
        given::<Conversation>([])
            .when(start("  Hello \n"))
            .then([started()]);
    }

    #[test]
    fn a_blank_title_is_rejected() {
        given::<Conversation>([])
            .when(start(" \t "))
            .then_err(ConversationError::TitleEmpty);
    }

    #[test]
    fn a_title_of_200_characters_is_accepted_and_201_rejected() {
        let ok = "é".repeat(MAX_TITLE_CHARS);
        assert!(Conversation::decide(&start(&ok), &ConversationState::New).is_ok());
        given::<Conversation>([])
            .when(start(&"é".repeat(MAX_TITLE_CHARS + 1)))
            .then_err(ConversationError::TitleTooLong);
    }

    #[test]
    fn a_conversation_cannot_be_started_twice() {
        given::<Conversation>([started()])
            .when(start("Again"))
            .then_err(ConversationError::AlreadyStarted);
    }

    #[test]
    fn a_message_is_posted_to_an_active_conversation() {
        given::<Conversation>([started()])
            .when(post("hi"))
            .then([posted("hi")]);
    }

    #[test]
    fn a_blank_message_is_rejected() {
        given::<Conversation>([started()])
            .when(post("  "))
            .then_err(ConversationError::MessageEmpty);
    }

    #[test]
    fn a_message_of_32000_characters_is_accepted_and_32001_rejected() {
        let state = given_state([started()]);
        assert!(Conversation::decide(&post(&"x".repeat(MAX_MESSAGE_CHARS)), &state).is_ok());
        given::<Conversation>([started()])
            .when(post(&"x".repeat(MAX_MESSAGE_CHARS + 1)))
            .then_err(ConversationError::MessageTooLong);
    }

    #[test]
    fn a_message_cannot_be_posted_to_an_archived_conversation() {
        given::<Conversation>([started(), archived()])
            .when(post("hello"))
            .then_err(ConversationError::Archived);
    }

    #[test]
    fn a_message_cannot_be_posted_to_a_conversation_that_does_not_exist() {
        given::<Conversation>([])
            .when(post("hello"))
            .then_err(ConversationError::NotFound);
    }

    #[test]
    fn another_tenant_cannot_post_to_a_conversation() {
        let cmd = ConversationCommand::PostMessage {
            message_id: id(),
            text: "hi".into(),
            by: mallory(),
            at: at(),
        };
        given::<Conversation>([started()])
            .when(cmd)
            .then_err(ConversationError::ForeignTenant);
    }

    #[test]
    fn another_tenant_cannot_archive_a_conversation() {
        given::<Conversation>([started()])
            .when(archive(mallory()))
            .then_err(ConversationError::ForeignTenant);
    }

    #[test]
    fn archiving_an_active_conversation_records_it() {
        given::<Conversation>([started(), posted("a")])
            .when(archive(alice()))
            .then([archived()]);
    }

    #[test]
    fn archiving_twice_is_a_no_op() {
        given::<Conversation>([started(), archived()])
            .when(archive(alice()))
            .then([]);
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        for e in [started(), posted("x"), archived()] {
            let back = ConversationEvent::from_stored(e.event_type(), &e.to_payload()).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn stored_events_decode_by_their_stored_type_name() {
        let payload = archived().to_payload();
        let mut with_type = payload.clone();
        with_type["type"] = "MessagePosted".into();
        assert_eq!(
            ConversationEvent::from_stored("ConversationArchived", &with_type).unwrap(),
            archived()
        );
        let wrong = ConversationEvent::from_stored("MessagePosted", &payload).unwrap_err();
        assert_eq!(wrong.event_type, "MessagePosted");
        assert!(wrong.reason.contains("missing field"), "{}", wrong.reason);
        let unknown = ConversationEvent::from_stored("Renamed", &payload).unwrap_err();
        assert!(
            unknown.reason.contains("unknown variant"),
            "{}",
            unknown.reason
        );
        let not_object = ConversationEvent::from_stored("ConversationArchived", &"x".into());
        assert_eq!(not_object.unwrap_err().reason, "payload is not an object");
    }

    #[test]
    fn evolve_counts_messages() {
        let s = given_state([started(), posted("a"), posted("b"), archived()]);
        assert_eq!(
            s,
            ConversationState::Archived {
                tenant_id: "acme".into(),
                messages: 2
            }
        );
    }

    fn given_state(events: impl IntoIterator<Item = ConversationEvent>) -> ConversationState {
        events
            .into_iter()
            .fold(ConversationState::default(), |s, e| {
                Conversation::evolve(s, &e)
            })
    }
}
