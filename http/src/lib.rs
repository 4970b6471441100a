//! The HTTP vocabulary shared by the command, query and admin routers and the gateway.
//!
//! * [`ApiError`]: the one error type of every handler, rendered as the envelope
//!   `{"error": {"code", "message", "details", "request_id"}}`. 5xx bodies say "internal error";
//!   the cause goes to the log.
//! * [`envelope_errors`]: middleware that puts the request id into every error envelope and turns
//!   any other 4xx/5xx (unknown route, body too large, …) into the envelope too.
//! * [`Principal`]: who is calling, put into request extensions by the gateway's authentication;
//!   a handler that extracts it can never be reached anonymously.
//! * [`ApiJson`]: JSON bodies with `Content-Type` checks and enveloped rejections.

mod error;
mod extract;

pub use error::{ApiError, envelope_errors};
pub use extract::{ApiJson, Principal, REQUEST_ID_HEADER, RequestId, Role};
