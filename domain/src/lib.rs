//! Nura's domain: aggregates with pure `decide`/`evolve`, their commands, events and errors.
//!
//! Nothing here performs I/O or reads a clock: time, new ids and the caller's identity arrive
//! inside the command. That keeps every rule testable with [`testing::given`] and keeps the
//! event store ignorant of any aggregate.

pub mod api_key;
pub mod conversation;
pub mod testing;

/// An event-sourced aggregate: business rules live in `decide`, state changes in `evolve`.
pub trait Aggregate {
    /// The state folded from past events; `Default` is the state of a stream with no events.
    type State: Default;
    /// What a caller asks for.
    type Command;
    /// What happened; the only thing that is stored.
    type Event;
    /// The broken rule when a command is rejected.
    type Error: std::error::Error;

    /// Decides which events a command produces in the given state. Pure and deterministic.
    /// An empty vector means the command is accepted but changes nothing (a no-op).
    fn decide(cmd: &Self::Command, state: &Self::State) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one event to the state. Never fails: events are facts.
    fn evolve(state: Self::State, event: &Self::Event) -> Self::State;
}

/// A domain event as it is stored: a type name, a schema version and a JSON payload.
pub trait DomainEvent: Sized {
    /// The event's type name, e.g. `MessagePosted`.
    fn event_type(&self) -> &'static str;
    /// The payload as JSON (without the type tag).
    fn to_payload(&self) -> serde_json::Value;
    /// Rebuilds an event from its stored type name and payload.
    fn from_stored(event_type: &str, payload: &serde_json::Value) -> Result<Self, UnknownEvent>;
}

/// A stored event that this version of the domain cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode event {event_type}: {reason}")]
pub struct UnknownEvent {
    /// The stored type name.
    pub event_type: String,
    /// Why decoding failed.
    pub reason: String,
}

/// The bounded context a stream belongs to, from the aggregate prefix of its stream id
/// (`conversation-<uuid>` → `conversations`). Used for JetStream subjects.
pub fn context_of(stream_id: &str) -> &'static str {
    match aggregate_of(stream_id) {
        "conversation" => "conversations",
        "apikey" => "identity",
        _ => "other",
    }
}

/// The aggregate type of a stream id: the part before the first `-`.
pub fn aggregate_of(stream_id: &str) -> &str {
    stream_id.split_once('-').map_or(stream_id, |(a, _)| a)
}
