//! The read side over HTTP: conversation read models and the audit history from the event store.
//!
//! * `GET /v1/conversations` (keyset pages), `GET /v1/conversations/{id}` (with its messages):
//!   read from `read.conversations` / `read.messages`, always confined to the caller's tenant.
//! * `GET /v1/streams/{stream_id}/events`: the stored events of one stream, owned by the caller's
//!   tenant (checked on the events' metadata).
//! * `GET /v1/api-keys`, `GET /v1/api-keys/{id}` (admin only, [`api_keys`]): `read.api_keys`
//!   without hashes; `?after=` waits on the `api_keys` projector.
//! * Read-your-writes (DESIGN.md invariant 7): every endpoint takes a commit token (`?after=` or
//!   `Nura-After`) and waits, up to [`QueryConfig::read_your_writes_timeout`], until the
//!   `conversations` projector's checkpoint for the token's partition has passed it; otherwise
//!   504 `not_caught_up`.
//!
//! Limits: read-only (never writes a row); a conversation's messages are capped at
//! [`MAX_MESSAGES`] per response; waiters watch a [`CheckpointBoard`] ([`ReadYourWrites`]):
//! the process's projector workers post to it after each commit, and one poller reads
//! `read.checkpoints` every 10 ms for the whole process while anyone waits.

pub mod api_keys;
mod consistency;
mod routes;

pub use consistency::{AFTER_HEADER, PROJECTOR, ReadYourWrites};
pub use routes::{MAX_MESSAGES, router};

use nura_store::CheckpointBoard;
use std::time::Duration;

/// Settings of the query API.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// The longest a query waits for the projection to pass a commit token before answering 504.
    pub read_your_writes_timeout: Duration,
    /// The board this process's projector workers post their checkpoints to (a fresh one when
    /// none run here: waiters then learn from the poll).
    pub checkpoint_board: CheckpointBoard,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            read_your_writes_timeout: Duration::from_secs(5),
            checkpoint_board: CheckpointBoard::default(),
        }
    }
}
