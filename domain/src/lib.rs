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

/// Decodes an internally tagged (`#[serde(tag = "type")]`) event from its stored type name and
/// payload object, reading the payload in place: serde sees the object with `type` as its first
/// entry, as if it had been inserted into a copy (a `type` field of the payload itself is
/// ignored, the stored type name wins). The projectors decode every event this way.
pub fn from_tagged_payload<T: serde::de::DeserializeOwned>(
    event_type: &str,
    payload: &serde_json::Value,
) -> Result<T, UnknownEvent> {
    let fail = |reason: String| UnknownEvent {
        event_type: event_type.to_owned(),
        reason,
    };
    let fields = payload
        .as_object()
        .ok_or_else(|| fail("payload is not an object".into()))?;
    T::deserialize(tagged::Tagged {
        tag: event_type,
        fields,
    })
    .map_err(|e| fail(e.to_string()))
}

/// The `Deserializer` behind [`from_tagged_payload`].
mod tagged {
    use serde::de::value::BorrowedStrDeserializer;
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
    use serde_json::{Error, Value};

    pub(crate) struct Tagged<'de> {
        pub(crate) tag: &'de str,
        pub(crate) fields: &'de serde_json::Map<String, Value>,
    }

    impl<'de> Deserializer<'de> for Tagged<'de> {
        type Error = Error;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_map(Entries {
                tag: Some(self.tag),
                fields: self.fields.iter(),
                value: None,
            })
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
            identifier ignored_any
        }
    }

    /// `type` and the tag first, then the payload's fields (but its own `type`).
    struct Entries<'de> {
        tag: Option<&'de str>,
        fields: serde_json::map::Iter<'de>,
        value: Option<&'de Value>,
    }

    impl<'de> MapAccess<'de> for Entries<'de> {
        type Error = Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Error> {
            if self.tag.is_some() {
                return seed
                    .deserialize(BorrowedStrDeserializer::new("type"))
                    .map(Some);
            }
            let Some((key, value)) = self.fields.find(|(k, _)| k.as_str() != "type") else {
                return Ok(None);
            };
            self.value = Some(value);
            seed.deserialize(BorrowedStrDeserializer::new(key.as_str()))
                .map(Some)
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
            if let Some(tag) = self.tag.take() {
                return seed.deserialize(BorrowedStrDeserializer::new(tag));
            }
            match self.value.take() {
                Some(value) => seed.deserialize(value),
                None => Err(serde::de::Error::custom("value asked for before its key")),
            }
        }
    }
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
