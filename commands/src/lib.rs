//! Command handling: the only place that loads a stream, decides and appends (DESIGN.md
//! invariant 2), plus the command HTTP routes.
//!
//! * One flow for every aggregate (`execute`) loads a stream's events, folds them, lets the pure
//!   domain decide and appends the outcome with `ExpectedVersion::Exact(loaded)` and an
//!   idempotency record, so a concurrent writer loses with a conflict and a repeated command
//!   returns its first result. [`CommandHandler`] and [`api_keys::ApiKeyHandler`] run it.
//! * [`router`] exposes the three conversation commands over HTTP; tenant and actor come only
//!   from the authenticated [`nura_http::Principal`], never from a body.
//!
//! * [`api_keys`]: API keys for services — the key format, issue/revoke commands and their
//!   admin-only routes (the secret is shown once and stored only as a sha256).
//!
//! Errors come in three layers: the domain's `ConversationError`, this crate's [`CommandError`],
//! and the one mapping to `nura_http::ApiError` in [`routes`].
//!
//! Limits: a stream is loaded whole on every command (no snapshots); this crate never reads
//! read-model tables.

pub mod api_keys;
mod execute;
mod handler;
pub mod routes;

pub use handler::{
    CommandError, CommandHandler, CommandMeta, Committed, IdempotencyKey, InvalidIdempotencyKey,
};
pub use routes::router;
