//! API keys for services and integrations: the key format, and the issue/revoke commands with
//! their routes (`POST /v1/api-keys`, `POST /v1/api-keys/{id}/revoke`, admin only).
//!
//! A key is `nura_<key id, 32 hex>_<secret: 32 random bytes, 43 base64url characters>`. Only the
//! secret's sha256 (hex) is ever stored — in the `ApiKeyIssued` event and in `read.api_keys`; the
//! plaintext key appears exactly once, in the response to the issuing request. A repeat of that
//! request with the same `Idempotency-Key` returns the key id with `api_key: null`: the secret of
//! the first response cannot be recovered, and a new one was never stored.

use crate::execute::{Failure, Outcome, Request, execute, fresh_event_id};
use crate::handler::CommandMeta;
use crate::routes::{command_meta, empty_or_json, store_error};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use nura_domain::api_key::{ApiKey, ApiKeyCommand, ApiKeyError, ApiKeyEvent, stream_id};
use nura_http::{ApiError, ApiJson, Principal, RequestId, Role};
use nura_store::{Appended, CommitToken, EventStore, StoreError};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

/// The prefix every API key starts with (lets scanners and the gateway recognise one).
pub const KEY_PREFIX: &str = "nura_";
/// Length of a key's secret part: 32 bytes in base64url without padding.
pub const SECRET_CHARS: usize = 43;
/// Length of a whole key: `nura_` + 32 hex + `_` + 43.
pub const KEY_CHARS: usize = KEY_PREFIX.len() + 32 + 1 + SECRET_CHARS;

/// The roles that may manage API keys.
const KEY_ADMINS: &[Role] = &[Role::Admin];

/// A freshly generated key: the plaintext (shown once) and the hash that is stored.
pub struct NewApiKey {
    /// `nura_<key_id>_<secret>`; never logged, never stored.
    pub plaintext: String,
    /// sha256 of the secret part, lowercase hex.
    pub secret_hash: String,
}

impl std::fmt::Debug for NewApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewApiKey")
            .field("plaintext", &"[redacted]")
            .field("secret_hash", &self.secret_hash)
            .finish()
    }
}

/// Generates a key for `key_id` from 32 bytes of the thread-local CSPRNG (ChaCha, seeded by the OS).
pub fn generate_key(key_id: Uuid) -> NewApiKey {
    let bytes: [u8; 32] = rand::random();
    let secret = URL_SAFE_NO_PAD.encode(bytes);
    NewApiKey {
        plaintext: format!("{KEY_PREFIX}{}_{secret}", key_id.simple()),
        secret_hash: hash_secret(&secret),
    }
}

/// sha256 of a key's secret part, lowercase hex: the only form in which a secret is stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Splits a presented key into its id and secret, strictly: exactly [`KEY_CHARS`] ASCII
/// characters, the prefix, 32 lowercase hex, `_`, 43 base64url characters. Anything else is
/// `None` (and needs no database round trip).
pub fn parse_key(presented: &str) -> Option<(Uuid, &str)> {
    if presented.len() != KEY_CHARS {
        return None;
    }
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_at_checked(32)?;
    let secret = secret.strip_prefix('_')?;
    let id_ok = id
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let secret_ok = secret.len() == SECRET_CHARS
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !id_ok || !secret_ok {
        return None;
    }
    Some((Uuid::parse_str(id).ok()?, secret))
}

/// Whether `secret` hashes to `stored_hash`, compared in constant time (the stored hash's length
/// is public: always 64).
pub fn secret_matches(secret: &str, stored_hash: &str) -> bool {
    hash_secret(secret)
        .as_bytes()
        .ct_eq(stored_hash.as_bytes())
        .into()
}

/// The outcome of an API-key command (or of its first run, for a repeat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCommitted {
    /// The key written.
    pub key_id: Uuid,
    /// The stream's version after the command.
    pub version: i64,
    /// The commit token, for read-your-writes on `GET /v1/api-keys?after=`.
    pub commit: CommitToken,
    /// True when this is the stored result of an earlier identical command.
    pub replayed: bool,
    /// True when the command changed nothing (revoking a revoked key).
    pub no_op: bool,
}

/// An issued key: the commit, and the plaintext key unless this was a replay. `Debug` redacts
/// the key.
#[derive(Clone)]
pub struct IssuedKey {
    /// What was written.
    pub committed: KeyCommitted,
    /// The plaintext key; `None` for a replayed request (the secret is shown only once).
    pub plaintext: Option<String>,
    /// The roles granted (sorted, deduplicated).
    pub roles: Vec<String>,
    /// The trimmed name.
    pub name: String,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("committed", &self.committed)
            .field("plaintext", &self.plaintext.as_ref().map(|_| "[redacted]"))
            .field("roles", &self.roles)
            .field("name", &self.name)
            .finish()
    }
}

/// Why an API-key command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyCommandError {
    /// A rule refused it (HTTP 404/409/422).
    #[error(transparent)]
    Rejected(#[from] ApiKeyError),
    /// The key changed concurrently (HTTP 409).
    #[error("api key stream {stream_id} changed concurrently")]
    Conflict {
        /// The stream in question.
        stream_id: String,
    },
    /// The event store failed or refused (HTTP 422 for a reused idempotency key, else 5xx).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs API-key commands against the event store (load → decide → append, like
/// [`crate::CommandHandler`]).
#[derive(Debug, Clone)]
pub struct ApiKeyHandler {
    store: EventStore,
}

impl ApiKeyHandler {
    /// A handler over `store`.
    pub fn new(store: EventStore) -> Self {
        Self { store }
    }

    /// Issues a key with a fresh id to the caller's tenant. The plaintext is returned only by the
    /// run that stored it; a repeat (same Idempotency-Key and body) returns the first key id
    /// without a secret.
    pub async fn issue(
        &self,
        meta: &CommandMeta,
        name: &str,
        roles: &[String],
    ) -> Result<IssuedKey, ApiKeyCommandError> {
        let key_id = Uuid::now_v7();
        let key = generate_key(key_id);
        let cmd = ApiKeyCommand::Issue {
            key_id,
            name: name.to_owned(),
            roles: roles.to_vec(),
            secret_hash: key.secret_hash,
            by: meta.actor.clone(),
            at: Utc::now(),
        };
        // The hash covers what the client asked for, never the generated secret.
        let body = json!({"name": name, "roles": roles});
        let (committed, events) = self
            .execute("IssueApiKey", key_id, None, &body, meta, cmd)
            .await?;
        let (name, roles) = match events.first() {
            Some(ApiKeyEvent::ApiKeyIssued { name, roles, .. }) => (name.clone(), roles.clone()),
            _ => {
                let mut roles = roles.to_vec();
                roles.sort();
                roles.dedup();
                (name.trim().to_owned(), roles)
            }
        };
        let plaintext = (!committed.replayed).then_some(key.plaintext);
        Ok(IssuedKey {
            committed,
            plaintext,
            roles,
            name,
        })
    }

    /// Revokes a key of the caller's tenant; revoking a revoked key appends nothing.
    pub async fn revoke(
        &self,
        meta: &CommandMeta,
        key_id: Uuid,
    ) -> Result<KeyCommitted, ApiKeyCommandError> {
        let cmd = ApiKeyCommand::Revoke {
            by: meta.actor.clone(),
            at: Utc::now(),
        };
        let (committed, _) = self
            .execute("RevokeApiKey", key_id, Some(key_id), &json!({}), meta, cmd)
            .await?;
        Ok(committed)
    }

    async fn execute(
        &self,
        name: &'static str,
        key_id: Uuid,
        path_id: Option<Uuid>,
        body: &Value,
        meta: &CommandMeta,
        cmd: ApiKeyCommand,
    ) -> Result<(KeyCommitted, Vec<ApiKeyEvent>), ApiKeyCommandError> {
        let stream = stream_id(key_id);
        let request = Request::<ApiKey> {
            name,
            stream: stream.clone(),
            path_id,
            body,
            meta,
            cmd,
            creates_stream: false,
            event_id: fresh_event_id,
        };
        match execute(&self.store, request).await {
            Ok(Outcome::Appended(a, events)) => Ok((key_committed(a)?, events)),
            // A replay (or a concurrent identical first attempt that won): without our events.
            Ok(Outcome::Replayed(a)) => Ok((key_committed(a)?, vec![])),
            Ok(Outcome::NoOp { version, commit }) => {
                let committed = KeyCommitted {
                    key_id: key_of(&stream)?,
                    version,
                    commit: commit.ok_or(ApiKeyError::NotFound)?,
                    replayed: false,
                    no_op: true,
                };
                Ok((committed, vec![]))
            }
            Err(Failure::Rejected(e)) => Err(e.into()),
            Err(Failure::Conflict { .. }) => {
                Err(ApiKeyCommandError::Conflict { stream_id: stream })
            }
            Err(Failure::Store(e)) => Err(e.into()),
        }
    }
}

fn key_committed(a: Appended) -> Result<KeyCommitted, ApiKeyCommandError> {
    Ok(KeyCommitted {
        key_id: key_of(&a.stream_id)?,
        version: a.last_version,
        commit: a.commit,
        replayed: a.replayed,
        no_op: false,
    })
}

fn key_of(stream: &str) -> Result<Uuid, ApiKeyCommandError> {
    stream
        .strip_prefix("apikey-")
        .and_then(|id| Uuid::parse_str(id).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("not an api key stream: {stream}")).into())
}

/// The API-key command routes, with their state applied: `POST /v1/api-keys` and
/// `POST /v1/api-keys/{id}/revoke`. Admin only; tenant and actor come from the [`Principal`].
pub fn router(handler: ApiKeyHandler) -> Router {
    Router::new()
        .route("/v1/api-keys", post(issue_key))
        .route("/v1/api-keys/{id}/revoke", post(revoke_key))
        .with_state(handler)
}

/// Body of `POST /v1/api-keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueBody {
    name: String,
    roles: Vec<String>,
}

/// Body of `POST /v1/api-keys/{id}/revoke`: empty or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {}

/// The caller, if an admin: checked from the request parts, before the body is read.
struct KeyAdmin(Principal);

impl<S: Send + Sync> FromRequestParts<S> for KeyAdmin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let principal = Principal::from_request_parts(parts, state).await?;
        principal.require_any(KEY_ADMINS)?;
        Ok(KeyAdmin(principal))
    }
}

async fn issue_key(
    State(handler): State<ApiKeyHandler>,
    KeyAdmin(principal): KeyAdmin,
    request_id: RequestId,
    headers: HeaderMap,
    ApiJson(body): ApiJson<IssueBody>,
) -> Result<Response, ApiError> {
    let meta = command_meta(&principal, request_id, &headers)?;
    let issued = handler.issue(&meta, &body.name, &body.roles).await?;
    let c = &issued.committed;
    let mut out = json!({
        "key_id": c.key_id,
        "api_key": issued.plaintext,
        "name": issued.name,
        "roles": issued.roles,
        "commit": c.commit,
        "version": c.version,
    });
    if c.replayed {
        out["note"] =
            json!("repeated request: the key's secret is shown only in the first response");
    }
    let location = format!("/v1/api-keys/{}", c.key_id);
    Ok(respond(StatusCode::CREATED, c, Some(location), out))
}

async fn revoke_key(
    State(handler): State<ApiKeyHandler>,
    KeyAdmin(principal): KeyAdmin,
    request_id: RequestId,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let meta = command_meta(&principal, request_id, &headers)?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("api key"))?;
    empty_or_json::<RevokeBody>(&headers, &body)?;
    let done = handler.revoke(&meta, id).await?;
    let out = json!({"key_id": done.key_id, "commit": done.commit, "version": done.version});
    Ok(respond(StatusCode::OK, &done, None, out))
}

fn respond(
    status: StatusCode,
    done: &KeyCommitted,
    location: Option<String>,
    body: Value,
) -> Response {
    let mut res = (status, ApiJson(body)).into_response();
    let h = res.headers_mut();
    // The plaintext key must not linger in any cache.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        h.insert(header::LOCATION, loc);
    }
    if done.replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}

impl From<ApiKeyCommandError> for ApiError {
    fn from(e: ApiKeyCommandError) -> Self {
        use ApiKeyError as K;
        match e {
            ApiKeyCommandError::Rejected(rule) => match rule {
                K::NameEmpty => field_error("name_empty", rule, "name"),
                K::NameTooLong => field_error("name_too_long", rule, "name"),
                K::NoRoles => field_error("roles_empty", rule, "roles"),
                K::RoleNotGrantable => field_error("role_not_grantable", rule, "roles")
                    .with_details(json!({"field": "roles", "grantable": nura_domain::api_key::GRANTABLE_ROLES})),
                // Another tenant's key must look exactly like a missing one.
                K::NotFound | K::ForeignTenant => ApiError::not_found("api key"),
                K::AlreadyIssued => ApiError::conflict("already_issued", rule.to_string()),
                K::BadSecretHash => ApiError::internal(rule),
            },
            ApiKeyCommandError::Conflict { .. } => {
                ApiError::conflict("version_conflict", "the api key changed concurrently; retry")
            }
            ApiKeyCommandError::Store(e) => store_error(e),
        }
    }
}

fn field_error(code: &'static str, rule: ApiKeyError, field: &str) -> ApiError {
    ApiError::unprocessable(code, rule.to_string()).with_details(json!({"field": field}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_back_to_its_id_and_matches_its_hash() {
        let id = Uuid::now_v7();
        let key = generate_key(id);
        assert_eq!(key.plaintext.len(), KEY_CHARS);
        let (parsed, secret) = parse_key(&key.plaintext).expect("parses");
        assert_eq!(parsed, id);
        assert!(secret_matches(secret, &key.secret_hash));
        assert!(!format!("{key:?}").contains(secret));
    }

    #[test]
    fn two_keys_never_share_a_secret() {
        let id = Uuid::now_v7();
        assert_ne!(generate_key(id).plaintext, generate_key(id).plaintext);
    }

    #[test]
    fn malformed_keys_are_refused_without_a_lookup() {
        let good = generate_key(Uuid::now_v7()).plaintext;
        let bad = [
            String::new(),
            "nura_".into(),
            good[..good.len() - 1].to_string(),
            format!("{good}A"),
            good.replacen("nura_", "nurb_", 1),
            good.to_uppercase(),
            format!("{}!{}", &good[..40], &good[41..]),
            format!("{}.{}", &good[..37], &good[38..]),
            format!("{}é", &good[..good.len() - 2]),
        ];
        for b in bad {
            assert!(parse_key(&b).is_none(), "{b:?}");
        }
    }

    #[test]
    fn a_wrong_secret_of_the_right_length_does_not_match() {
        let key = generate_key(Uuid::now_v7());
        assert!(!secret_matches(&"A".repeat(SECRET_CHARS), &key.secret_hash));
        assert!(!secret_matches("", &key.secret_hash));
    }
}
