//! JWT claims and their verification: who a connection or an HTTP request is. Pure computation
//! (no I/O), shared by the gateway, the history service, the load generator and tests.
//!
//! The user id is only ever the token's `sub`; nothing in a payload can change it.
//!
//! **Keys.** A [`Verifier`] holds at most one key for tokens without a `kid` header (the
//! configured secret or PEM) and any number of keys chosen by `kid`: configured ones
//! ([`Verifier::add_key`]) and those of the latest JWKS ([`Verifier::set_jwks`]; fetching it is
//! I/O, done by the history service's `keys` module). Every key has exactly one algorithm, and
//! a token must name that algorithm: no HS/RS confusion, no `alg: none`. A token whose `kid`
//! matches no key is refused with [`AuthError::UnknownKey`], which a caller with a JWKS answers
//! with one (rate-limited) refresh. When no keys by `kid` are configured at all, the `kid`
//! header is ignored, as it always was.

use std::collections::HashMap;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
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
    /// The token's `kid` names no key this verifier knows (yet: a JWKS may have gained it).
    #[error("invalid token: signed with an unknown key (kid)")]
    UnknownKey,
}

/// Where the verification key comes from.
#[derive(Clone, Debug)]
pub enum KeyConfig {
    /// The built-in development key (HS256 with [`DEV_SECRET`]).
    Dev,
    /// An operator's HS256 secret.
    Secret(Vec<u8>),
    /// An operator's public key in PEM: RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA).
    PublicPem(Vec<u8>),
    /// No key for tokens without a `kid`: only keys chosen by `kid` verify (configured with
    /// [`Verifier::add_key`] or from a JWKS).
    KidOnly,
}

/// Most keys taken from one JWKS; the rest are ignored (a JWKS is a handful of keys).
pub const MAX_JWKS_KEYS: usize = 64;

/// Verifies tokens against its keys (see the module doc), and optional issuer/audience.
#[derive(Clone)]
pub struct Verifier {
    /// For tokens without a `kid` (and for every token while no keys by `kid` exist).
    key: Option<Key>,
    /// Configured keys by `kid`; they win over a JWKS key with the same `kid`.
    by_kid: HashMap<String, Key>,
    /// The latest JWKS's keys by `kid`.
    jwks: HashMap<String, Key>,
    /// Keys by `kid` are in use (configured, or a JWKS source): a `kid` must then match.
    keyed: bool,
    issuer: Option<String>,
    audience: Option<String>,
    dev: bool,
}

/// One key and the validation that goes with it (its one algorithm).
#[derive(Clone)]
struct Key {
    key: DecodingKey,
    validation: Validation,
}

/// The decoding key and algorithm of a configured key; `None` for [`KeyConfig::KidOnly`].
fn decoding_key(key: &KeyConfig) -> Result<Option<(DecodingKey, Algorithm)>, AuthError> {
    let bad = |e: jsonwebtoken::errors::Error| AuthError::BadKey(e.to_string());
    Ok(Some(match key {
        KeyConfig::Dev => (DecodingKey::from_secret(DEV_SECRET), Algorithm::HS256),
        KeyConfig::Secret(s) if s.len() < MIN_HS256_SECRET_BYTES => {
            return Err(AuthError::WeakSecret(s.len()))
        }
        KeyConfig::Secret(s) => (DecodingKey::from_secret(s), Algorithm::HS256),
        KeyConfig::PublicPem(pem) => {
            if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (k, Algorithm::RS256)
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                (k, Algorithm::ES256)
            } else {
                (
                    DecodingKey::from_ed_pem(pem).map_err(bad)?,
                    Algorithm::EdDSA,
                )
            }
        }
        KeyConfig::KidOnly => return Ok(None),
    }))
}

impl Verifier {
    pub fn new(
        key: &KeyConfig,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Self, AuthError> {
        let mut verifier = Self {
            key: None,
            by_kid: HashMap::new(),
            jwks: HashMap::new(),
            keyed: false,
            issuer: issuer.map(str::to_owned),
            audience: audience.map(str::to_owned),
            dev: matches!(key, KeyConfig::Dev),
        };
        verifier.key = decoding_key(key)?.map(|(k, alg)| verifier.key_for(k, alg));
        Ok(verifier)
    }

    /// The validation of a key with algorithm `alg`.
    fn key_for(&self, key: DecodingKey, alg: Algorithm) -> Key {
        // Exactly one algorithm: this is what stops HS/RS confusion and `alg: none`.
        let mut validation = Validation::new(alg);
        // A configured issuer/audience must also be present, not just match when present.
        let mut required = vec!["exp", "sub"];
        required.extend(self.issuer.as_ref().map(|_| "iss"));
        required.extend(self.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        validation.leeway = 30;
        match &self.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Key { key, validation }
    }

    /// Adds a key chosen by tokens whose `kid` is `kid` (several at once: a new signing key
    /// can be added before the old one is retired).
    pub fn add_key(&mut self, kid: &str, key: &KeyConfig) -> Result<(), AuthError> {
        if kid.is_empty() || self.by_kid.contains_key(kid) {
            return Err(AuthError::BadKey(format!("key id {kid:?} empty or twice")));
        }
        let (k, alg) = decoding_key(key)?
            .ok_or_else(|| AuthError::BadKey(format!("key {kid:?} has no key material")))?;
        let key = self.key_for(k, alg);
        self.by_kid.insert(kid.to_owned(), key);
        self.keyed = true;
        Ok(())
    }

    /// Replaces the JWKS keys with the signing keys of `set` (at most [`MAX_JWKS_KEYS`]);
    /// returns why the others were skipped (for a log line). From now on a `kid` must match.
    pub fn set_jwks(&mut self, set: &JwkSet) -> Vec<String> {
        let mut skipped = Vec::new();
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            match jwks_key(jwk) {
                Ok(_) if kid.is_empty() => skipped.push("a key without kid".to_owned()),
                Ok(_) if keys.len() == MAX_JWKS_KEYS => {
                    skipped.push(format!("{kid:?}: more than {MAX_JWKS_KEYS} keys"))
                }
                Ok((k, alg)) => {
                    let key = self.key_for(k, alg);
                    keys.insert(kid, key);
                }
                Err(why) => skipped.push(format!("{kid:?}: {why}")),
            }
        }
        self.jwks = keys;
        self.keyed = true;
        skipped
    }

    /// Number of JWKS keys held.
    pub fn jwks_len(&self) -> usize {
        self.jwks.len()
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
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::Invalid(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let key = match header.kid.as_deref() {
            Some(kid) if self.keyed => self
                .by_kid
                .get(kid)
                .or_else(|| self.jwks.get(kid))
                .ok_or(AuthError::UnknownKey)?,
            _ => self
                .key
                .as_ref()
                .ok_or_else(|| AuthError::Invalid("token has no `kid` header".into()))?,
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(invalid)?;
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

/// The decoding key and algorithm of a JWKS entry meant for signatures: RSA (RS256 unless the
/// JWK names RS384/RS512/PS*), EC P-256/P-384 (ES256/ES384) or Ed25519 (EdDSA). Symmetric
/// (`oct`) keys are refused: a shared secret has no business in a published key set.
fn jwks_key(jwk: &Jwk) -> Result<(DecodingKey, Algorithm), String> {
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return Err("not a signing key (use)".into());
    }
    let named = match jwk.common.key_algorithm {
        None => None,
        Some(KeyAlgorithm::UNKNOWN_ALGORITHM) => return Err("unknown alg".into()),
        Some(a) => {
            Some(Algorithm::try_from(a).map_err(|_| format!("alg {a} is not for signatures"))?)
        }
    };
    let (default, family_ok): (Algorithm, fn(Algorithm) -> bool) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (Algorithm::RS256, |a| {
            use Algorithm::*;
            matches!(a, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
        }),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => (Algorithm::ES256, |a| a == Algorithm::ES256),
            EllipticCurve::P384 => (Algorithm::ES384, |a| a == Algorithm::ES384),
            ref c => return Err(format!("curve {c:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            (Algorithm::EdDSA, |a| a == Algorithm::EdDSA)
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            return Err(format!("curve {:?} is not supported", p.curve))
        }
        AlgorithmParameters::OctetKey(_) => return Err("symmetric keys are refused".into()),
        _ => return Err("unknown key type".into()),
    };
    let alg = named.unwrap_or(default);
    if !family_ok(alg) {
        return Err(format!("alg {alg:?} does not fit the key type"));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    Ok((key, alg))
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

    /// HS256 with a `kid` header.
    fn signed_with_kid(kid: Option<&str>, secret: &[u8], c: &Claims) -> String {
        let header = Header {
            kid: kid.map(str::to_owned),
            ..Header::new(Algorithm::HS256)
        };
        jsonwebtoken::encode(&header, c, &EncodingKey::from_secret(secret)).unwrap()
    }

    const KEY_A: &[u8] = b"key-a-0123456789-0123456789-0123456789";
    const KEY_B: &[u8] = b"key-b-0123456789-0123456789-0123456789";

    #[test]
    fn keys_by_kid_pick_the_key_and_refuse_other_kids() {
        let mut v = Verifier::new(&KeyConfig::KidOnly, None, None).unwrap();
        v.add_key("a", &KeyConfig::Secret(KEY_A.to_vec())).unwrap();
        v.add_key("b", &KeyConfig::Secret(KEY_B.to_vec())).unwrap();
        let c = claims("u", "u", 60);
        assert!(v.verify(&signed_with_kid(Some("a"), KEY_A, &c)).is_ok());
        assert!(v.verify(&signed_with_kid(Some("b"), KEY_B, &c)).is_ok());
        // the right kid with the other key's signature
        assert!(matches!(
            v.verify(&signed_with_kid(Some("b"), KEY_A, &c)),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(
            v.verify(&signed_with_kid(Some("c"), KEY_A, &c)),
            Err(AuthError::UnknownKey)
        );
        // no kid and no key for kid-less tokens
        assert!(matches!(
            v.verify(&signed_with_kid(None, KEY_A, &c)),
            Err(AuthError::Invalid(_))
        ));
        assert!(
            v.add_key("a", &KeyConfig::Secret(KEY_B.to_vec())).is_err(),
            "kid twice"
        );
        assert!(!v.is_dev());
    }

    #[test]
    fn kid_less_tokens_use_the_default_key_beside_keys_by_kid() {
        let mut v = Verifier::new(&KeyConfig::Secret(KEY_A.to_vec()), None, None).unwrap();
        let c = claims("u", "u", 60);
        // Without keys by kid, a kid header is ignored (as it always was).
        assert!(v.verify(&signed_with_kid(Some("any"), KEY_A, &c)).is_ok());
        v.add_key("new", &KeyConfig::Secret(KEY_B.to_vec()))
            .unwrap();
        assert!(
            v.verify(&signed_with_kid(None, KEY_A, &c)).is_ok(),
            "old tokens"
        );
        assert!(v.verify(&signed_with_kid(Some("new"), KEY_B, &c)).is_ok());
        assert_eq!(
            v.verify(&signed_with_kid(Some("any"), KEY_A, &c)),
            Err(AuthError::UnknownKey)
        );
    }

    /// Test-only Ed25519 key (also gateway/tests/integration/fixtures/test-only-ed25519-private.pem).
    const ED25519_PRIVATE: &str = concat!(
        "-----BEGIN PRIVATE KEY-----\n",
        "MC4CAQAwBQYDK2VwBCIEILUyTuj8wq8kUqJmzrzk2SdK3g5XiHTGLsq834WzRe30\n",
        "-----END PRIVATE KEY-----\n",
    );

    #[test]
    fn jwks_signing_keys_verify_and_the_rest_is_skipped() {
        let private = EncodingKey::from_ed_pem(ED25519_PRIVATE.as_bytes()).unwrap();
        let mut ed = Jwk::from_encoding_key(&private, Algorithm::EdDSA).unwrap();
        ed.common.key_id = Some("ed".into());
        let mut no_kid = ed.clone();
        no_kid.common.key_id = None;
        let mut for_encryption = ed.clone();
        for_encryption.common.key_id = Some("enc".into());
        for_encryption.common.public_key_use = Some(PublicKeyUse::Encryption);
        let mut wrong_alg = ed.clone();
        wrong_alg.common.key_id = Some("wrong-alg".into());
        wrong_alg.common.key_algorithm = Some(KeyAlgorithm::ES256);
        let mut oct =
            Jwk::from_encoding_key(&EncodingKey::from_secret(KEY_A), Algorithm::HS256).unwrap();
        oct.common.key_id = Some("oct".into());
        let set = JwkSet {
            keys: vec![ed, no_kid, for_encryption, wrong_alg, oct],
        };
        let mut v = Verifier::new(&KeyConfig::KidOnly, None, None).unwrap();
        let skipped = v.set_jwks(&set);
        assert_eq!(v.jwks_len(), 1, "{skipped:?}");
        assert_eq!(skipped.len(), 4, "{skipped:?}");

        let c = claims("u", "Ann", 60);
        let sign = |kid: &str, alg: Algorithm, key: &EncodingKey| {
            let header = Header {
                kid: Some(kid.into()),
                ..Header::new(alg)
            };
            jsonwebtoken::encode(&header, &c, key).unwrap()
        };
        let id = v.verify(&sign("ed", Algorithm::EdDSA, &private)).unwrap();
        assert_eq!(id.user.name, "Ann");
        // a symmetric key never comes from a JWKS: HS256 with its kid is unknown
        let hs = EncodingKey::from_secret(KEY_A);
        assert_eq!(
            v.verify(&sign("oct", Algorithm::HS256, &hs)),
            Err(AuthError::UnknownKey)
        );
        // the JWKS key's kid with another algorithm
        assert!(matches!(
            v.verify(&sign("ed", Algorithm::HS256, &hs)),
            Err(AuthError::Invalid(_))
        ));
        // a new JWKS replaces the old one
        v.set_jwks(&JwkSet { keys: vec![] });
        assert_eq!(
            v.verify(&sign("ed", Algorithm::EdDSA, &private)),
            Err(AuthError::UnknownKey)
        );
    }
}
