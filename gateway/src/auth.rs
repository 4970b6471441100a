//! Authentication and authorisation of every `/v1` request, in this order:
//!
//! 1. the credential: an API key (`X-Api-Key: nura_…` or `Authorization: Bearer nura_…`) or a
//!    bearer JWT, checked against its key with the algorithm pinned, `exp`, `iss` and `aud`
//!    required and `nbf` honoured → a [`Principal`], else 401;
//! 2. the per-principal rate limit → 429;
//! 3. the route's roles from [`crate::roles`] → 403 (405 for a method the table does not list).
//!
//! Tokens and keys are never logged; rejections log their reason at debug level.

use crate::jwks::Jwks;
use crate::keys::VerifyingKey;
use crate::rate_limit::Limiter;
use crate::roles::{Access, RouteRole};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use nura_http::{ApiError, Principal, Role};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The most clock skew ever tolerated on `exp`/`nbf`, whatever the configuration says.
pub const MAX_LEEWAY: Duration = Duration::from_secs(30);
/// Longest tenant or user id accepted from a token.
const MAX_ID_LEN: usize = 128;
/// Longest credential looked at; anything longer is refused unparsed.
const MAX_CREDENTIAL_LEN: usize = 8 * 1024;
/// The header an API key may come in.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Every API key starts with this.
const API_KEY_PREFIX: &str = "nura_";

/// The claims Nura reads; `iss`, `aud`, `exp` (and `nbf` when present) are checked by
/// jsonwebtoken itself.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    tenant: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// The claims Nura signs for development tokens.
#[derive(Debug, Serialize)]
struct IssuedClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    tenant: &'a str,
    roles: Vec<Role>,
    iat: u64,
    exp: u64,
}

/// Everything the middleware needs, built once by [`crate::app`].
pub(crate) struct Authenticator {
    /// Verifies tokens without a `kid` (development HS256); absent when no secret is set.
    hs256: Option<VerifyingKey>,
    /// Configured public keys by `kid`.
    keys: HashMap<String, Arc<VerifyingKey>>,
    jwks: Option<Jwks>,
    issuer: String,
    audience: String,
    leeway: u64,
    pool: sqlx::PgPool,
    per_principal: Limiter<(String, String)>,
    routes: Vec<RouteRole>,
}

/// The parts of [`crate::GatewayConfig`] the authenticator is built from.
pub(crate) struct AuthSettings {
    pub(crate) hs256: Option<VerifyingKey>,
    pub(crate) keys: Vec<VerifyingKey>,
    pub(crate) jwks: Option<Jwks>,
    pub(crate) issuer: String,
    pub(crate) audience: String,
    pub(crate) leeway: Duration,
    pub(crate) per_principal: Limiter<(String, String)>,
    pub(crate) routes: Vec<RouteRole>,
}

enum Credential<'a> {
    Jwt(&'a str),
    ApiKey(&'a str),
}

impl Authenticator {
    pub(crate) fn new(s: AuthSettings, pool: sqlx::PgPool) -> Self {
        let keys = s
            .keys
            .into_iter()
            .filter_map(|k| Some((k.kid()?.to_owned(), Arc::new(k))))
            .collect();
        Self {
            hs256: s.hs256,
            keys,
            jwks: s.jwks,
            issuer: s.issuer,
            audience: s.audience,
            leeway: s.leeway.min(MAX_LEEWAY).as_secs(),
            pool,
            per_principal: s.per_principal,
            routes: s.routes,
        }
    }

    /// The caller of a request: 401 without a valid credential, 403 when it grants no known role,
    /// 503 when the API-key lookup cannot reach the database.
    async fn principal(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        match credential(headers)? {
            Credential::ApiKey(key) => match crate::api_keys::authenticate(&self.pool, key).await {
                Ok(Some(p)) => Ok(p),
                Ok(None) => {
                    tracing::debug!("API key rejected");
                    Err(invalid())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "API key lookup failed");
                    Err(ApiError::unavailable("cannot check the API key now"))
                }
            },
            Credential::Jwt(token) => self.verify_jwt(token).await,
        }
    }

    async fn verify_jwt(&self, token: &str) -> Result<Principal, ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            tracing::debug!(reason = %e, "token rejected: unreadable header");
            invalid()
        })?;
        let key = match header.kid.as_deref() {
            None => self.hs256.clone().map(Arc::new),
            Some(kid) => match self.keys.get(kid) {
                Some(k) => Some(k.clone()),
                None => match &self.jwks {
                    Some(jwks) => jwks.key(kid).await,
                    None => None,
                },
            },
        }
        .ok_or_else(|| {
            tracing::debug!(
                has_kid = header.kid.is_some(),
                "token rejected: no such key"
            );
            invalid()
        })?;
        // Pinned: only the key's own algorithm, whatever the header says.
        let mut validation = Validation::new(key.alg());
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        // jsonwebtoken checks iss/aud only when present unless they are required.
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway;
        let claims = jsonwebtoken::decode::<Claims>(token, key.decoding_key(), &validation)
            .map_err(|e| {
                tracing::debug!(reason = %e, alg = ?key.alg(), "token rejected");
                invalid()
            })?
            .claims;
        // Ids travel on as JetStream header values and log fields: no control characters.
        let valid_id =
            |s: &str| !s.is_empty() && s.len() <= MAX_ID_LEN && !s.chars().any(char::is_control);
        if !valid_id(&claims.tenant) || !valid_id(&claims.sub) {
            return Err(invalid());
        }
        let mut roles: Vec<Role> = claims.roles.iter().filter_map(|r| Role::parse(r)).collect();
        roles.sort();
        roles.dedup();
        if roles.is_empty() {
            return Err(ApiError::forbidden("the credential grants no role"));
        }
        Ok(Principal {
            tenant_id: claims.tenant,
            user_id: claims.sub,
            roles,
        })
    }

    /// 403 unless the table lets one of the principal's roles call this route.
    fn authorise(
        &self,
        method: &Method,
        path: Option<&str>,
        principal: &Principal,
    ) -> Result<(), ApiError> {
        let access = match path {
            Some(p) => {
                let own = crate::roles::access(&self.routes, method, p);
                if own == Access::NotListed {
                    crate::roles::access(crate::roles::ROUTE_ROLES, method, p)
                } else {
                    own
                }
            }
            None => Access::NotListed,
        };
        match access {
            Access::Roles(roles) => principal.require_any(roles),
            Access::MethodNotListed => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed",
            )),
            Access::NotListed => {
                tracing::error!(
                    route = path.unwrap_or("unmatched"),
                    %method,
                    "route missing from the role table; refused"
                );
                Err(ApiError::forbidden("this endpoint is not open to any role"))
            }
        }
    }
}

/// The one credential of a request. Both an API-key header and an `Authorization` header is
/// ambiguous and refused.
fn credential(headers: &HeaderMap) -> Result<Credential<'_>, ApiError> {
    let bearer = headers.get(header::AUTHORIZATION).map(|v| {
        usable(v).and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim())
                .filter(|t| !t.is_empty())
        })
    });
    let api_key = headers.get(API_KEY_HEADER).map(usable);
    match (bearer, api_key) {
        (Some(_), Some(_)) => Err(ApiError::unauthorized(
            "send one credential: Authorization or X-Api-Key, not both",
        )),
        (None, Some(Some(k))) if k.starts_with(API_KEY_PREFIX) => Ok(Credential::ApiKey(k)),
        (Some(Some(t)), None) if t.starts_with(API_KEY_PREFIX) => Ok(Credential::ApiKey(t)),
        (Some(Some(t)), None) => Ok(Credential::Jwt(t)),
        (None, None) => Err(ApiError::unauthorized(
            "a bearer token or an API key is required",
        )),
        _ => Err(invalid()),
    }
}

fn usable(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?.trim();
    (!s.is_empty() && s.len() <= MAX_CREDENTIAL_LEN).then_some(s)
}

fn invalid() -> ApiError {
    ApiError::unauthorized("the credential is invalid or expired")
}

/// Middleware on every `/v1` route: authenticate, rate-limit by principal, check the route's
/// roles; on success the [`Principal`] goes into the request extensions. 401s carry
/// `WWW-Authenticate: Bearer`.
pub(crate) async fn authenticate(
    State(auth): State<Arc<Authenticator>>,
    mut req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let checked = match auth.principal(req.headers()).await {
        Ok(principal) => auth
            .per_principal
            .check(&(principal.tenant_id.clone(), principal.user_id.clone()))
            .and_then(|()| auth.authorise(&method, path.as_deref(), &principal))
            .map(|()| principal),
        Err(e) => Err(e),
    };
    match checked {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => {
            let challenge = e.status == StatusCode::UNAUTHORIZED;
            let mut res = e.into_response();
            if challenge {
                res.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"nura\""),
                );
            }
            res
        }
    }
}

/// Signs a development HS256 token with `iss`, `aud`, `sub = user`, `tenant`, `roles`, `iat` and
/// `exp = now + ttl`.
pub fn issue_token(
    secret: &SecretString,
    issuer: &str,
    audience: &str,
    tenant: &str,
    user: &str,
    roles: &[Role],
    ttl: Duration,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        !secret.expose_secret().is_empty(),
        "the JWT secret must not be empty"
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let claims = IssuedClaims {
        iss: issuer,
        aud: audience,
        sub: user,
        tenant,
        roles: roles.to_vec(),
        iat: now.as_secs(),
        exp: (now + ttl).as_secs(),
    };
    let key = EncodingKey::from_secret(secret.expose_secret().as_bytes());
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_key_may_come_in_either_header_but_not_alongside_a_token() {
        let mut h = HeaderMap::new();
        h.insert(API_KEY_HEADER, "nura_abc".parse().unwrap());
        assert!(matches!(credential(&h), Ok(Credential::ApiKey("nura_abc"))));
        h.insert(header::AUTHORIZATION, "Bearer x.y.z".parse().unwrap());
        assert!(credential(&h).is_err());
        h.remove(API_KEY_HEADER);
        assert!(matches!(credential(&h), Ok(Credential::Jwt("x.y.z"))));
        h.insert(header::AUTHORIZATION, "bearer nura_k".parse().unwrap());
        assert!(matches!(credential(&h), Ok(Credential::ApiKey("nura_k"))));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(credential(&h).is_err());
        let mut h = HeaderMap::new();
        h.insert(API_KEY_HEADER, "not-a-key".parse().unwrap());
        assert!(credential(&h).is_err());
    }
}
