//! JWT claims and their verification: who a connection or an HTTP request is. Pure computation
//! (no I/O), shared by the gateway, the history service, the load generator and tests.
//!
//! The user id is only ever the token's `sub`; nothing in a payload can change it.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::UserRef;

/// The HS256 key used when no key is configured. Public on purpose: anyone can mint tokens
/// with it, which is why `/api/dev/token` exists only in this mode.
pub const DEV_SECRET: &[u8] = b"chat-gateway-development-key-do-not-use-in-production";

/// The shortest HS256 secret accepted: RFC 7518 §3.2 requires a key of at least the hash's
/// size (256 bits), and a shorter one can be brute-forced from any token it signed.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Who a verified token says the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: UserRef,
    /// A global admin (`roles` contains `"admin"`).
    pub admin: bool,
    /// Seconds since the epoch at which the token expires.
    pub exp: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token too large")]
    TooLarge,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("invalid key: {0}")]
    BadKey(String),
    #[error(
        "HS256 secret is {0} bytes; at least {MIN_HS256_SECRET_BYTES} are required (RFC 7518): \
         generate one with `openssl rand -base64 48`"
    )]
    WeakSecret(usize),
}

/// Where the verification key comes from.
#[derive(Clone, Debug)]
pub enum KeyConfig {
    /// The built-in development key (HS256 with [`DEV_SECRET`]).
    Dev,
    /// An operator's HS256 secret.
    Secret(Vec<u8>),
    /// An operator's public key in PEM: RSA (RS256) or Ed25519 (EdDSA).
    PublicPem(Vec<u8>),
}

/// Verifies tokens against one key, one algorithm, and optional issuer/audience.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    dev: bool,
}

impl Verifier {
    pub fn new(
        key: &KeyConfig,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, AuthError> {
        let bad = |e: jsonwebtoken::errors::Error| AuthError::BadKey(e.to_string());
        let dev = matches!(key, KeyConfig::Dev);
        let (key, alg) = match key {
            KeyConfig::Dev => (DecodingKey::from_secret(DEV_SECRET), Algorithm::HS256),
            KeyConfig::Secret(s) if s.len() < MIN_HS256_SECRET_BYTES => {
                return Err(AuthError::WeakSecret(s.len()))
            }
            KeyConfig::Secret(s) => (DecodingKey::from_secret(s), Algorithm::HS256),
            KeyConfig::PublicPem(pem) => match DecodingKey::from_rsa_pem(pem) {
                Ok(k) => (k, Algorithm::RS256),
                Err(_) => (
                    DecodingKey::from_ed_pem(pem).map_err(bad)?,
                    Algorithm::EdDSA,
                ),
            },
        };
        // Exactly one algorithm: this is what stops HS/RS confusion and `alg: none`.
        let mut validation = Validation::new(alg);
        // A configured issuer/audience must also be present, not just match when present.
        let mut required = vec!["exp", "sub"];
        required.extend(issuer.map(|_| "iss"));
        required.extend(audience.map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = 30;
        match issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            key,
            validation,
            dev,
        })
    }

    /// True when running with the built-in development key.
    pub fn is_dev(&self) -> bool {
        self.dev
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 128 {
            return Err(AuthError::Invalid("`sub` must be 1-128 bytes".into()));
        }
        let name = c
            .name
            .filter(|n| !n.trim().is_empty())
            .map(|n| n.chars().take(64).collect())
            .unwrap_or_else(|| c.sub.clone());
        Ok(Identity {
            admin: c.roles.iter().any(|r| r == "admin"),
            user: UserRef { id: c.sub, name },
            exp: c.exp,
        })
    }
}

/// Signs HS256 claims (development tokens, tests, the load generator).
pub fn sign_hs256(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing cannot fail")
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Claims for a user valid for `ttl_s` seconds.
pub fn claims(sub: &str, name: &str, ttl_s: u64) -> Claims {
    Claims {
        sub: sub.into(),
        name: Some(name.into()),
        exp: now_s() + ttl_s,
        roles: vec![],
        iss: None,
        aud: None,
        nbf: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> Verifier {
        Verifier::new(&KeyConfig::Dev, None, None).unwrap()
    }

    #[test]
    fn accepts_a_good_token_and_takes_identity_from_it() {
        let mut c = claims("u1", "Ann", 60);
        c.roles = vec!["admin".into()];
        let id = dev().verify(&sign_hs256(DEV_SECRET, &c)).unwrap();
        assert_eq!(id.user.id, "u1");
        assert_eq!(id.user.name, "Ann");
        assert!(id.admin);
    }

    #[test]
    fn name_falls_back_to_sub() {
        let mut c = claims("u1", "", 60);
        c.name = None;
        let id = dev().verify(&sign_hs256(DEV_SECRET, &c)).unwrap();
        assert_eq!(id.user.name, "u1");
    }

    #[test]
    fn refuses_expired_wrong_key_none_and_garbage() {
        let v = dev();
        let mut expired = claims("u", "u", 0);
        expired.exp = now_s() - 3600;
        assert!(v.verify(&sign_hs256(DEV_SECRET, &expired)).is_err());
        assert!(v
            .verify(&sign_hs256(b"other", &claims("u", "u", 60)))
            .is_err());
        // alg: none with a valid payload and no signature
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(v.verify(none).is_err());
        assert!(v.verify("garbage").is_err());
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(AuthError::TooLarge)
        );
    }

    /// A secret of exactly the minimum length.
    const SECRET: &[u8] = b"unit-test-hs256-secret-32-bytes!";

    #[test]
    fn checks_issuer_and_audience_when_configured() {
        let v = Verifier::new(
            &KeyConfig::Secret(SECRET.to_vec()),
            Some("me"),
            Some("chat"),
        )
        .unwrap();
        let mut c = claims("u", "u", 60);
        assert!(v.verify(&sign_hs256(SECRET, &c)).is_err(), "no iss/aud");
        c.iss = Some("me".into());
        c.aud = Some("chat".into());
        assert!(v.verify(&sign_hs256(SECRET, &c)).is_ok());
        c.aud = Some("other".into());
        assert!(v.verify(&sign_hs256(SECRET, &c)).is_err());
    }

    #[test]
    fn refuses_hs256_secrets_shorter_than_256_bits() {
        assert_eq!(SECRET.len(), MIN_HS256_SECRET_BYTES);
        for short in [&b""[..], b"short", &SECRET[1..]] {
            let err = Verifier::new(&KeyConfig::Secret(short.to_vec()), None, None)
                .err()
                .expect("a short secret is refused");
            assert_eq!(err, AuthError::WeakSecret(short.len()));
            assert!(err.to_string().contains("openssl rand"), "{err}");
        }
        assert!(Verifier::new(&KeyConfig::Secret(SECRET.to_vec()), None, None).is_ok());
    }
}
