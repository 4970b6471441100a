//! Extractors: the caller, the request id, JSON bodies.

use crate::ApiError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The header carrying the request id (set by the gateway when absent, echoed on responses).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A role a principal may hold. Each endpoint names the least role it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only access to the tenant's data.
    Viewer,
    /// Reads and ordinary commands.
    Member,
    /// Machine callers (integrations, workers): commands and reads.
    Service,
    /// Everything, including operations (dead letters, API keys).
    Admin,
}

impl Role {
    /// Parses a role name (`admin`, `member`, `viewer`, `service`).
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            "viewer" => Some(Role::Viewer),
            "service" => Some(Role::Service),
            _ => None,
        }
    }
}

/// The authenticated caller, from the credential only. Inserted into request extensions by the
/// gateway; extracting it where it is missing is a 401, so no handler can be reached anonymously.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant every read and write of this request is confined to.
    pub tenant_id: String,
    /// The user or API key id, recorded as the actor of events.
    pub user_id: String,
    /// The roles granted by the credential.
    pub roles: Vec<Role>,
}

impl Principal {
    /// Whether the caller holds `role` (admin holds every role).
    pub fn has(&self, role: Role) -> bool {
        self.roles.iter().any(|r| *r == role || *r == Role::Admin)
    }

    /// 403 unless the caller holds one of `roles`.
    pub fn require_any(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.iter().any(|r| self.has(*r)) {
            Ok(())
        } else {
            Err(ApiError::forbidden("this endpoint needs another role")
                .with_details(json!({"required_any": roles})))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("authentication required"))
    }
}

/// The request id of this request (from `x-request-id`, which the gateway always sets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty() && s.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        Ok(RequestId(id))
    }
}

/// A JSON body (request) or JSON response. Rejections become enveloped 400/413/415 errors that
/// say what was wrong without echoing the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    use axum::http::StatusCode;
    match rej {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::bad_request("malformed_json", "request body is not valid JSON")
                .with_details(json!({"reason": e.body_text()}))
        }
        JsonRejection::JsonDataError(e) => ApiError::bad_request(
            "invalid_body",
            "request body does not match the expected shape",
        )
        .with_details(json!({"reason": e.body_text()})),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body too large",
            )
        }
        other => ApiError::bad_request("invalid_body", other.body_text()),
    }
}
