//! The command HTTP routes and the one mapping of [`CommandError`] to [`ApiError`].
//!
//! Handlers are thin: extract the caller and the body, call one [`CommandHandler`] method, map
//! the result.

use crate::handler::{CommandError, CommandHandler, CommandMeta, Committed, IdempotencyKey};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use nura_domain::conversation::{Actor, ConversationError};
use nura_http::{ApiError, ApiJson, Principal, RequestId, Role};
use nura_store::StoreError;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

/// The request header carrying the client's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The roles allowed to issue commands (admin holds every role).
const WRITERS: &[Role] = &[Role::Member, Role::Service];

/// The command routes, with their state applied:
/// `POST /v1/conversations`, `POST /v1/conversations/{id}/messages`,
/// `POST /v1/conversations/{id}/archive`, plus the API-key routes of [`crate::api_keys::router`].
/// They need a [`Principal`] in the request extensions
/// (the gateway's authentication puts it there).
pub fn router(handler: CommandHandler) -> Router {
    // The API-key commands (admin only) share the store and the edge.
    let keys =
        crate::api_keys::router(crate::api_keys::ApiKeyHandler::new(handler.store().clone()));
    Router::new()
        .route("/v1/conversations", post(start_conversation))
        .route("/v1/conversations/{id}/messages", post(post_message))
        .route("/v1/conversations/{id}/archive", post(archive_conversation))
        .with_state(handler)
        .merge(keys)
}

/// Body of `POST /v1/conversations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    title: String,
}

/// Body of `POST /v1/conversations/{id}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostBody {
    text: String,
}

/// Body of `POST /v1/conversations/{id}/archive`: empty or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchiveBody {}

async fn start_conversation(
    State(handler): State<CommandHandler>,
    Writer(principal): Writer,
    request_id: RequestId,
    headers: HeaderMap,
    ApiJson(body): ApiJson<StartBody>,
) -> Result<Response, ApiError> {
    let meta = command_meta(&principal, request_id, &headers)?;
    let done = handler.start_conversation(&meta, &body.title).await?;
    let location = format!("/v1/conversations/{}", done.conversation_id);
    let body = json!({"conversation_id": done.conversation_id, "commit": done.commit, "version": done.version});
    Ok(respond(StatusCode::CREATED, &done, Some(location), body))
}

async fn post_message(
    State(handler): State<CommandHandler>,
    Writer(principal): Writer,
    request_id: RequestId,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PostBody>,
) -> Result<Response, ApiError> {
    let meta = command_meta(&principal, request_id, &headers)?;
    let id = conversation_id(&id)?;
    let done = handler.post_message(&meta, id, &body.text).await?;
    let message_id = done
        .event_ids
        .first()
        .copied()
        .ok_or_else(|| ApiError::internal("a posted message returned no event id"))?;
    let body = json!({"message_id": message_id, "commit": done.commit, "version": done.version});
    Ok(respond(StatusCode::CREATED, &done, None, body))
}

async fn archive_conversation(
    State(handler): State<CommandHandler>,
    Writer(principal): Writer,
    request_id: RequestId,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let meta = command_meta(&principal, request_id, &headers)?;
    let id = conversation_id(&id)?;
    empty_or_json::<ArchiveBody>(&headers, &body)?;
    let done = handler.archive_conversation(&meta, id).await?;
    let body = json!({"commit": done.commit, "version": done.version});
    Ok(respond(StatusCode::OK, &done, None, body))
}

/// The caller, if allowed to issue commands: extracted from the request parts, so a viewer gets
/// 403 before its body is even read (and whatever is wrong with it).
struct Writer(Principal);

impl<S: Send + Sync> FromRequestParts<S> for Writer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state).await?;
        principal.require_any(WRITERS)?;
        Ok(Writer(principal))
    }
}

/// The caller's identity and the command headers.
pub(crate) fn command_meta(
    principal: &Principal,
    request_id: RequestId,
    headers: &HeaderMap,
) -> Result<CommandMeta, ApiError> {
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| IdempotencyKey::parse(s).ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_idempotency_key",
                        "Idempotency-Key must be 1 to 128 printable ASCII characters",
                    )
                })?,
        ),
    };
    let expected_version = match headers.get(header::IF_MATCH) {
        None => None,
        Some(v) => Some(parse_if_match(v).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_if_match",
                "If-Match must be a stream version such as \"3\"",
            )
        })?),
    };
    Ok(CommandMeta {
        actor: Actor {
            tenant_id: principal.tenant_id.clone(),
            user_id: principal.user_id.clone(),
        },
        correlation_id: request_id.0,
        idempotency_key,
        expected_version,
        causation_id: None,
    })
}

/// `If-Match: "3"` (or `W/"3"`, or a bare `3`) → 3.
fn parse_if_match(v: &HeaderValue) -> Option<i64> {
    let s = v.to_str().ok()?.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    let s = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s);
    s.parse().ok().filter(|v: &i64| *v >= 0)
}

/// A path id that is not a UUID names no conversation: 404, like any unknown id.
fn conversation_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("conversation"))
}

/// Accepts an empty body, or a JSON body of type `T` (with a JSON content type).
pub(crate) fn empty_or_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim();
            m.eq_ignore_ascii_case("application/json") || m.ends_with("+json")
        });
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected Content-Type: application/json",
        ));
    }
    serde_json::from_slice::<T>(body).map(drop).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            "request body does not match the expected shape",
        )
        .with_details(json!({"reason": e.to_string()}))
    })
}

fn respond(
    status: StatusCode,
    done: &Committed,
    location: Option<String>,
    body: serde_json::Value,
) -> Response {
    let mut res = (status, ApiJson(body)).into_response();
    let h = res.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", done.version)) {
        h.insert(header::ETAG, etag);
    }
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LOCATION, loc);
    }
    if done.replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        use ConversationError as C;
        match e {
            CommandError::Rejected(rule) => match rule {
                C::TitleEmpty => field_error("title_empty", rule, "title"),
                C::TitleTooLong => field_error("title_too_long", rule, "title"),
                C::MessageEmpty => field_error("message_empty", rule, "text"),
                C::MessageTooLong => field_error("message_too_long", rule, "text"),
                // Another tenant's conversation must look exactly like a missing one.
                C::NotFound | C::ForeignTenant => ApiError::not_found("conversation"),
                C::AlreadyStarted => ApiError::conflict("already_started", rule.to_string()),
                C::Archived => ApiError::conflict("conversation_archived", rule.to_string()),
            },
            CommandError::Conflict {
                expected, actual, ..
            } => ApiError::conflict(
                "version_conflict",
                "the conversation changed since the version you expected",
            )
            .with_details(json!({"expected_version": expected, "actual_version": actual})),
            CommandError::Store(e) => store_error(e),
        }
    }
}

fn field_error(code: &'static str, rule: ConversationError, field: &str) -> ApiError {
    ApiError::unprocessable(code, rule.to_string()).with_details(json!({"field": field}))
}

pub(crate) fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Conflict { .. } => ApiError::conflict(
            "version_conflict",
            "the conversation changed since the version you expected",
        ),
        StoreError::DuplicateEvent => {
            ApiError::conflict("duplicate_event", "an event with this id is already stored")
        }
        StoreError::IdempotencyMismatch(_) => ApiError::unprocessable(
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different request",
        ),
        StoreError::Database(
            ref db @ (sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)),
        ) => {
            tracing::warn!(error = %db, "database unavailable");
            ApiError::unavailable("the event store is unavailable; retry shortly")
        }
        other => ApiError::internal(other),
    }
}
