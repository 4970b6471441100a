//! The `ApiKey` aggregate: a credential for services and integrations, scoped to one tenant and
//! a set of roles, issued and revoked through commands so the log records who did it.
//!
//! The secret never enters the domain: the command carries only its hash (sha256, hex), computed
//! by the caller, and the events store only that hash.

use crate::conversation::Actor;
use crate::{Aggregate, DomainEvent, UnknownEvent};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest key name, in characters, after trimming.
pub const MAX_NAME_CHARS: usize = 100;

/// The roles a key may carry. `admin` is deliberately absent: a leaked integration key must not
/// be able to mint more keys or read every operational table; administration stays with people
/// who log in with a JWT.
pub const GRANTABLE_ROLES: &[&str] = &["member", "viewer", "service"];

/// The stream id of an API key: `apikey-<uuid>`.
pub fn stream_id(key_id: Uuid) -> String {
    format!("apikey-{key_id}")
}

/// A command on an API key. Ids, time and the secret's hash are chosen by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiKeyCommand {
    /// Issues a new key for the actor's tenant.
    Issue {
        key_id: Uuid,
        name: String,
        roles: Vec<String>,
        /// sha256 of the secret, lowercase hex (64 characters).
        secret_hash: String,
        by: Actor,
        at: DateTime<Utc>,
    },
    /// Revokes a key; revoking a revoked key is a no-op.
    Revoke { by: Actor, at: DateTime<Utc> },
}

/// What happened to an API key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ApiKeyEvent {
    /// A key was issued. Only the hash of its secret is recorded.
    ApiKeyIssued {
        key_id: Uuid,
        tenant_id: String,
        name: String,
        roles: Vec<String>,
        secret_hash: String,
        issued_by: String,
        at: DateTime<Utc>,
    },
    /// A key was revoked: it authenticates nothing from now on.
    ApiKeyRevoked {
        revoked_by: String,
        at: DateTime<Utc>,
    },
}

/// A broken API-key rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    /// The name is blank after trimming.
    #[error("name must not be blank")]
    NameEmpty,
    /// The name is longer than [`MAX_NAME_CHARS`] after trimming.
    #[error("name must be at most {MAX_NAME_CHARS} characters")]
    NameTooLong,
    /// No roles were asked for.
    #[error("a key needs at least one role")]
    NoRoles,
    /// A role outside [`GRANTABLE_ROLES`] (including `admin`) was asked for.
    #[error("a key may only carry the roles member, viewer and service")]
    RoleNotGrantable,
    /// The secret hash is not 64 lowercase hex characters (a caller bug, never user input).
    #[error("secret hash must be a sha256 in lowercase hex")]
    BadSecretHash,
    /// A key with this id was already issued.
    #[error("api key already exists")]
    AlreadyIssued,
    /// The key does not exist.
    #[error("api key not found")]
    NotFound,
    /// The key belongs to another tenant; callers must not learn it exists.
    #[error("api key not found")]
    ForeignTenant,
}

/// The state of one key, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ApiKeyState {
    /// No events yet.
    #[default]
    New,
    /// Issued and usable.
    Active { tenant_id: String },
    /// Revoked: authenticates nothing.
    Revoked { tenant_id: String },
}

impl ApiKeyState {
    fn owned_by(&self, by: &Actor) -> Result<(), ApiKeyError> {
        match self {
            Self::New => Err(ApiKeyError::NotFound),
            Self::Active { tenant_id } | Self::Revoked { tenant_id }
                if *tenant_id != by.tenant_id =>
            {
                Err(ApiKeyError::ForeignTenant)
            }
            _ => Ok(()),
        }
    }
}

/// The API-key aggregate.
pub struct ApiKey;

impl Aggregate for ApiKey {
    type State = ApiKeyState;
    type Command = ApiKeyCommand;
    type Event = ApiKeyEvent;
    type Error = ApiKeyError;

    fn decide(cmd: &ApiKeyCommand, state: &ApiKeyState) -> Result<Vec<ApiKeyEvent>, ApiKeyError> {
        use ApiKeyError as E;
        match cmd {
            ApiKeyCommand::Issue {
                key_id,
                name,
                roles,
                secret_hash,
                by,
                at,
            } => {
                if *state != ApiKeyState::New {
                    return Err(E::AlreadyIssued);
                }
                let name = name.trim();
                if name.is_empty() {
                    return Err(E::NameEmpty);
                }
                if name.chars().count() > MAX_NAME_CHARS {
                    return Err(E::NameTooLong);
                }
                if roles.is_empty() {
                    return Err(E::NoRoles);
                }
                if !roles.iter().all(|r| GRANTABLE_ROLES.contains(&r.as_str())) {
                    return Err(E::RoleNotGrantable);
                }
                let hex_ok = secret_hash.len() == 64
                    && secret_hash
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if !hex_ok {
                    return Err(E::BadSecretHash);
                }
                // Sorted and deduplicated so equal grants are stored equally.
                let mut roles = roles.clone();
                roles.sort();
                roles.dedup();
                Ok(vec![ApiKeyEvent::ApiKeyIssued {
                    key_id: *key_id,
                    tenant_id: by.tenant_id.clone(),
                    name: name.to_owned(),
                    roles,
                    secret_hash: secret_hash.clone(),
                    issued_by: by.user_id.clone(),
                    at: *at,
                }])
            }
            ApiKeyCommand::Revoke { by, at } => {
                state.owned_by(by)?;
                if matches!(state, ApiKeyState::Revoked { .. }) {
                    return Ok(vec![]);
                }
                Ok(vec![ApiKeyEvent::ApiKeyRevoked {
                    revoked_by: by.user_id.clone(),
                    at: *at,
                }])
            }
        }
    }

    fn evolve(state: ApiKeyState, event: &ApiKeyEvent) -> ApiKeyState {
        match (state, event) {
            (_, ApiKeyEvent::ApiKeyIssued { tenant_id, .. }) => ApiKeyState::Active {
                tenant_id: tenant_id.clone(),
            },
            (
                ApiKeyState::Active { tenant_id } | ApiKeyState::Revoked { tenant_id },
                ApiKeyEvent::ApiKeyRevoked { .. },
            ) => ApiKeyState::Revoked { tenant_id },
            (state, _) => state,
        }
    }
}

impl DomainEvent for ApiKeyEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::ApiKeyIssued { .. } => "ApiKeyIssued",
            Self::ApiKeyRevoked { .. } => "ApiKeyRevoked",
        }
    }

    fn to_payload(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("api key events serialize");
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
    fn admin() -> Actor {
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
    fn hash() -> String {
        "ab".repeat(32)
    }
    fn issue(name: &str, roles: &[&str]) -> ApiKeyCommand {
        ApiKeyCommand::Issue {
            key_id: Uuid::from_u128(9),
            name: name.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            secret_hash: hash(),
            by: admin(),
            at: at(),
        }
    }
    fn issued() -> ApiKeyEvent {
        ApiKeyEvent::ApiKeyIssued {
            key_id: Uuid::from_u128(9),
            tenant_id: "acme".into(),
            name: "ci".into(),
            roles: vec!["service".into()],
            secret_hash: hash(),
            issued_by: "alice".into(),
            at: at(),
        }
    }
    fn revoked() -> ApiKeyEvent {
        ApiKeyEvent::ApiKeyRevoked {
            revoked_by: "alice".into(),
            at: at(),
        }
    }
    fn revoke(by: Actor) -> ApiKeyCommand {
        ApiKeyCommand::Revoke { by, at: at() }
    }

    #[test]
    fn a_key_is_issued_to_the_issuers_tenant_with_a_trimmed_name() {
        given::<ApiKey>([])
            .when(issue("  ci  ", &["service"]))
            .then([issued()]);
    }

    #[test]
    fn roles_are_stored_sorted_and_without_duplicates() {
        let ApiKeyEvent::ApiKeyIssued { roles, .. } = ApiKey::decide(
            &issue("ci", &["viewer", "member", "viewer"]),
            &ApiKeyState::New,
        )
        .unwrap()
        .remove(0) else {
            panic!("expected ApiKeyIssued");
        };
        assert_eq!(roles, ["member", "viewer"]);
    }

    #[test]
    fn a_key_name_must_not_be_blank() {
        given::<ApiKey>([])
            .when(issue("   ", &["service"]))
            .then_err(ApiKeyError::NameEmpty);
    }

    #[test]
    fn a_key_name_is_at_most_100_characters() {
        given::<ApiKey>([])
            .when(issue(&"é".repeat(100), &["service"]))
            .then([ApiKeyEvent::ApiKeyIssued {
                key_id: Uuid::from_u128(9),
                tenant_id: "acme".into(),
                name: "é".repeat(100),
                roles: vec!["service".into()],
                secret_hash: hash(),
                issued_by: "alice".into(),
                at: at(),
            }]);
        given::<ApiKey>([])
            .when(issue(&"n".repeat(101), &["service"]))
            .then_err(ApiKeyError::NameTooLong);
    }

    #[test]
    fn a_key_needs_at_least_one_role() {
        given::<ApiKey>([])
            .when(issue("ci", &[]))
            .then_err(ApiKeyError::NoRoles);
    }

    #[test]
    fn a_key_can_never_carry_the_admin_role_or_an_unknown_one() {
        for bad in ["admin", "root", "Service", ""] {
            given::<ApiKey>([])
                .when(issue("ci", &["service", bad]))
                .then_err(ApiKeyError::RoleNotGrantable);
        }
    }

    #[test]
    fn only_a_sha256_hex_hash_is_accepted_as_the_secret() {
        for bad in ["", "nura_secret", &"AB".repeat(32), &"ab".repeat(33)] {
            let mut cmd = issue("ci", &["service"]);
            if let ApiKeyCommand::Issue { secret_hash, .. } = &mut cmd {
                *secret_hash = bad.to_string();
            }
            given::<ApiKey>([])
                .when(cmd)
                .then_err(ApiKeyError::BadSecretHash);
        }
    }

    #[test]
    fn a_key_id_cannot_be_issued_twice() {
        given::<ApiKey>([issued()])
            .when(issue("ci", &["service"]))
            .then_err(ApiKeyError::AlreadyIssued);
    }

    #[test]
    fn an_active_key_is_revoked_by_its_tenant() {
        given::<ApiKey>([issued()])
            .when(revoke(admin()))
            .then([revoked()]);
    }

    #[test]
    fn revoking_a_revoked_key_changes_nothing() {
        given::<ApiKey>([issued(), revoked()])
            .when(revoke(admin()))
            .then([]);
    }

    #[test]
    fn another_tenant_cannot_revoke_a_key_and_learns_nothing() {
        given::<ApiKey>([issued()])
            .when(revoke(mallory()))
            .then_err(ApiKeyError::ForeignTenant);
        assert_eq!(
            ApiKeyError::ForeignTenant.to_string(),
            ApiKeyError::NotFound.to_string()
        );
    }

    #[test]
    fn a_key_that_was_never_issued_cannot_be_revoked() {
        given::<ApiKey>([])
            .when(revoke(admin()))
            .then_err(ApiKeyError::NotFound);
    }

    #[test]
    fn events_round_trip_through_their_stored_form() {
        for e in [issued(), revoked()] {
            let back = ApiKeyEvent::from_stored(e.event_type(), &e.to_payload()).unwrap();
            assert_eq!(back, e);
        }
    }
}
