//! Keys that verify bearer JWTs, each with its algorithm pinned.
//!
//! A key's algorithm comes from configuration (the PEM's key type) or from the JWKS entry, never
//! from the token: a token whose header names another algorithm than its key's is refused, which
//! is what stops `alg=none` and "HS256 signed with the RSA public key" confusion attacks.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use std::path::PathBuf;

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The PEM is neither an RSA nor an Ed25519 public key.
    #[error("key {kid:?}: not an RSA or Ed25519 public key in PEM form")]
    Pem {
        /// The key id the PEM was configured under.
        kid: String,
    },
    /// A key id must be 1 to 256 printable ASCII characters.
    #[error("key id {0:?} must be 1 to 256 printable ASCII characters")]
    Kid(String),
    /// A JWKS entry Nura cannot use (no `kid`, unsupported type or algorithm, `use` = `enc`).
    #[error("JWKS entry {kid:?} skipped: {reason}")]
    Jwk {
        /// The entry's `kid`, if any.
        kid: Option<String>,
        /// Why it was skipped.
        reason: String,
    },
}

/// A public key (or, for development, the HS256 secret) that verifies tokens of exactly one
/// algorithm. `Debug` shows the key id and algorithm only.
#[derive(Clone)]
pub struct VerifyingKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// A public key in PEM (SPKI, `-----BEGIN PUBLIC KEY-----`) under key id `kid`: an Ed25519
    /// key verifies EdDSA tokens only, an RSA key RS256 tokens only.
    pub fn from_pem(kid: &str, pem: &[u8]) -> Result<Self, KeyError> {
        let kid = valid_kid(kid)?;
        let (alg, key) = if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            (Algorithm::EdDSA, key)
        } else if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            (Algorithm::RS256, key)
        } else {
            return Err(KeyError::Pem { kid });
        };
        Ok(Self {
            kid: Some(kid),
            alg,
            key,
        })
    }

    /// The development HS256 secret; it verifies tokens that carry no `kid`.
    pub(crate) fn hs256(secret: &[u8]) -> Self {
        Self {
            kid: None,
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
        }
    }

    /// A JWKS entry: it needs a `kid`; its algorithm is its `alg`, or follows from its key type
    /// (RSA → RS256, Ed25519 → EdDSA, P-256 → ES256, P-384 → ES384). Symmetric (`oct`) keys and
    /// encryption keys are refused: a JWKS is public.
    pub(crate) fn from_jwk(jwk: &Jwk) -> Result<Self, KeyError> {
        let kid = jwk.common.key_id.clone();
        let fail = |reason: &str| KeyError::Jwk {
            kid: kid.clone(),
            reason: reason.to_owned(),
        };
        let id = kid.as_deref().ok_or_else(|| fail("no kid"))?;
        let id = valid_kid(id)?;
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            return Err(fail("an encryption key"));
        }
        let by_type = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
                Algorithm::ES384
            }
            _ => return Err(fail("unsupported key type")),
        };
        let alg = match jwk.common.key_algorithm {
            None => by_type,
            Some(a) => Algorithm::try_from(a).map_err(|_| fail("unsupported alg"))?,
        };
        if alg.family() == AlgorithmFamily::Hmac || alg.family() != by_type.family() {
            return Err(fail("alg does not match the key type"));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| fail(&e.to_string()))?;
        Ok(Self {
            kid: Some(id),
            alg,
            key,
        })
    }

    /// The key id (`None` for the HS256 secret).
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The one algorithm this key verifies.
    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.key
    }
}

fn valid_kid(kid: &str) -> Result<String, KeyError> {
    if kid.is_empty() || kid.len() > 256 || !kid.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(KeyError::Kid(kid.chars().take(64).collect()));
    }
    Ok(kid.to_owned())
}

/// Where a JSON Web Key Set is read from. Either is re-read on refresh, so rotating keys needs
/// no restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// An `http://` URL (HTTPS needs a TLS-enabled build; see the README).
    Url(String),
    /// A file on disk (e.g. kept current by a sidecar).
    File(PathBuf),
}
