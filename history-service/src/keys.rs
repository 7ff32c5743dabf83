//! The keys client tokens are verified with, for both binaries: the configured ones (a secret,
//! a PEM, a directory of keys by `kid`) and, with `CHAT_JWT_JWKS_URL`, an identity provider's
//! JWKS fetched over HTTP(S) and kept fresh. `proto::auth::Verifier` does the pure part (a key
//! set and the checks); this module does the I/O around it.
//!
//! **JWKS refresh.** The set is fetched at start, then every `CHAT_JWT_JWKS_REFRESH_SECONDS`
//! in the background. A token whose `kid` is unknown triggers one extra fetch, at most one per
//! [`ON_DEMAND_MIN_INTERVAL`] whatever the tokens say: a flood of made-up `kid`s costs the
//! identity provider at most one request per interval, and concurrent requests wait for the
//! fetch in flight instead of starting their own. A failed fetch keeps the previous keys.
//!
//! **Keys directory** (`CHAT_JWT_KEYS_DIR`): one file per key, the file name is the `kid` —
//! `<kid>.pem` a public key (RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA), `<kid>.secret`
//! an HS256 secret (its trailing line break dropped). Hidden entries and directories are
//! skipped (a mounted Kubernetes Secret has `..data` beside its keys); any other file is an
//! error. Read at start: adding a key is a rolling restart, which keeps every session.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use proto::auth::{AuthError, Identity, KeyConfig, Verifier};

/// Unknown `kid`s refresh the JWKS at most this often.
pub const ON_DEMAND_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// One JWKS request at most this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS body accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Most files read from a keys directory.
const MAX_KEY_FILES: usize = 64;

/// The token-key settings of a binary, as configured (flags and `CHAT_JWT_*`).
#[derive(Clone, Debug, Default)]
pub struct KeySettings {
    /// `CHAT_JWT_SECRET` (or the content of `CHAT_JWT_SECRET_FILE`).
    pub secret: Option<String>,
    /// `CHAT_JWT_PUBLIC_KEY`: a PEM file.
    pub public_key: Option<PathBuf>,
    /// `CHAT_JWT_KEYS_DIR`: keys by `kid`.
    pub keys_dir: Option<PathBuf>,
    /// `CHAT_JWT_JWKS_URL`.
    pub jwks_url: Option<String>,
    /// `CHAT_JWT_JWKS_REFRESH_SECONDS`.
    pub jwks_refresh: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl KeySettings {
    /// The configured keys (files read, no network): the verifier before any JWKS. With no
    /// key at all, the built-in development key. Errors are the one line to print.
    pub fn verifier(&self) -> Result<Verifier, String> {
        if self.secret.is_some() && self.public_key.is_some() {
            return Err("set either CHAT_JWT_SECRET or CHAT_JWT_PUBLIC_KEY, not both".into());
        }
        let by_kid = self.keys_dir.is_some() || self.jwks_url.is_some();
        let default = match (&self.secret, &self.public_key) {
            (Some(s), _) if s.is_empty() => return Err("CHAT_JWT_SECRET is empty".into()),
            (Some(s), _) => KeyConfig::Secret(s.as_bytes().to_vec()),
            (None, Some(path)) => std::fs::read(path)
                .map(KeyConfig::PublicPem)
                .map_err(|e| format!("cannot read CHAT_JWT_PUBLIC_KEY {}: {e}", path.display()))?,
            (None, None) if by_kid => KeyConfig::KidOnly,
            (None, None) => KeyConfig::Dev,
        };
        let setting = match default {
            KeyConfig::PublicPem(_) => "CHAT_JWT_PUBLIC_KEY",
            _ => "CHAT_JWT_SECRET",
        };
        let mut verifier =
            Verifier::new(&default, self.issuer.as_deref(), self.audience.as_deref())
                .map_err(|e| format!("{setting}: {e}"))?;
        if let Some(dir) = &self.keys_dir {
            for (kid, key) in read_keys_dir(dir)? {
                verifier
                    .add_key(&kid, &key)
                    .map_err(|e| format!("CHAT_JWT_KEYS_DIR {}: {kid}: {e}", dir.display()))?;
            }
        }
        if let Some(url) = &self.jwks_url {
            validate_jwks_url(url)?;
            if self.jwks_refresh < ON_DEMAND_MIN_INTERVAL {
                return Err(format!(
                    "CHAT_JWT_JWKS_REFRESH_SECONDS must be at least {}",
                    ON_DEMAND_MIN_INTERVAL.as_secs()
                ));
            }
            // From now on a token's `kid` must name a key (JWKS keys arrive with the fetch).
            verifier.set_jwks(&JwkSet { keys: Vec::new() });
        }
        Ok(verifier)
    }
}

fn validate_jwks_url(url: &str) -> Result<(), String> {
    let parsed: reqwest::Url = url
        .parse()
        .map_err(|e| format!("CHAT_JWT_JWKS_URL: invalid URL {url}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "CHAT_JWT_JWKS_URL must be an http:// or https:// URL (got {url})"
        ));
    }
    Ok(())
}

/// The keys of a keys directory, by `kid`, in file-name order.
fn read_keys_dir(dir: &Path) -> Result<Vec<(String, KeyConfig)>, String> {
    let what = |e: std::io::Error| format!("CHAT_JWT_KEYS_DIR {}: {e}", dir.display());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(what)? {
        let path = entry.map_err(what)?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        // `..data` and the timestamped directory of a mounted Secret; editors' dot files.
        if name.as_deref().is_none_or(|n| n.starts_with('.')) || path.is_dir() {
            continue;
        }
        names.push(path);
    }
    names.sort();
    if names.len() > MAX_KEY_FILES {
        return Err(format!(
            "CHAT_JWT_KEYS_DIR {}: more than {MAX_KEY_FILES} files",
            dir.display()
        ));
    }
    let mut keys = Vec::new();
    for path in names {
        let (Some(kid), Some(ext)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            return Err(format!(
                "CHAT_JWT_KEYS_DIR: {} is neither <kid>.pem nor <kid>.secret",
                path.display()
            ));
        };
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("CHAT_JWT_KEYS_DIR: cannot read {}: {e}", path.display()))?;
        let key = match ext {
            "pem" => KeyConfig::PublicPem(bytes),
            "secret" => {
                let text = String::from_utf8_lossy(&bytes);
                KeyConfig::Secret(text.trim_end_matches(['\r', '\n']).as_bytes().to_vec())
            }
            _ => {
                return Err(format!(
                    "CHAT_JWT_KEYS_DIR: {} is neither <kid>.pem nor <kid>.secret",
                    path.display()
                ))
            }
        };
        keys.push((kid.to_owned(), key));
    }
    Ok(keys)
}

/// Verifies client tokens: the configured keys, plus a JWKS kept fresh when configured.
/// Cheap to clone (all clones share the keys); the background refresh stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<Arc<Verifier>>,
    jwks: Option<Jwks>,
}

struct Jwks {
    url: String,
    client: reqwest::Client,
    /// When the last on-demand fetch started; held while one is in flight, so concurrent
    /// unknown `kid`s wait for it rather than fetch again.
    on_demand: tokio::sync::Mutex<Option<Instant>>,
}

impl From<Verifier> for Authenticator {
    /// Configured keys only, no JWKS.
    fn from(verifier: Verifier) -> Self {
        Self {
            inner: Arc::new(Inner {
                current: RwLock::new(Arc::new(verifier)),
                jwks: None,
            }),
        }
    }
}

impl Authenticator {
    /// Loads the configured keys and, with a JWKS URL, fetches the JWKS once (a failure is
    /// logged: the background refresh and unknown `kid`s try again) and starts the periodic
    /// refresh. Must run inside the Tokio runtime.
    pub async fn start(settings: &KeySettings) -> Result<Self, String> {
        let verifier = settings.verifier()?;
        let Some(url) = &settings.jwks_url else {
            return Ok(verifier.into());
        };
        let client = reqwest::Client::builder()
            .connect_timeout(FETCH_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("CHAT_JWT_JWKS_URL: http client: {e}"))?;
        let auth = Self {
            inner: Arc::new(Inner {
                current: RwLock::new(Arc::new(verifier)),
                jwks: Some(Jwks {
                    url: url.clone(),
                    client,
                    on_demand: tokio::sync::Mutex::new(None),
                }),
            }),
        };
        auth.inner.refresh().await;
        tokio::spawn(refresh_periodically(
            Arc::downgrade(&auth.inner),
            settings.jwks_refresh,
        ));
        Ok(auth)
    }

    /// The keys as of now.
    pub fn current(&self) -> Arc<Verifier> {
        self.inner.current_verifier()
    }

    /// True when running with the built-in development key.
    pub fn is_dev(&self) -> bool {
        self.current().is_dev()
    }

    /// Who `token` says the caller is. An unknown `kid` with a JWKS configured refreshes the
    /// JWKS first (rate-limited, see the module doc) and tries once more.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        match self.current().verify(token) {
            Err(AuthError::UnknownKey) if self.inner.jwks.is_some() => {
                self.inner.refresh_on_demand().await;
                self.current().verify(token)
            }
            other => other,
        }
    }
}

impl Inner {
    fn current_verifier(&self) -> Arc<Verifier> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn refresh_on_demand(&self) {
        let Some(jwks) = &self.jwks else { return };
        let mut last = jwks.on_demand.lock().await;
        if last.is_some_and(|t| t.elapsed() < ON_DEMAND_MIN_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        self.refresh().await;
    }

    /// Fetches the JWKS and installs its keys; on failure keeps the previous ones.
    async fn refresh(&self) {
        let Some(jwks) = &self.jwks else { return };
        match jwks.fetch().await {
            Ok(set) => {
                let mut next = Verifier::clone(&self.current_verifier());
                let skipped = next.set_jwks(&set);
                tracing::debug!(keys = next.jwks_len(), ?skipped, url = %jwks.url, "JWKS fetched");
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
            }
            Err(e) => {
                metrics::counter!("chat_jwks_fetch_errors_total").increment(1);
                tracing::warn!(error = %e, url = %jwks.url, "JWKS fetch failed; keeping the previous keys");
            }
        }
    }
}

impl Jwks {
    async fn fetch(&self) -> Result<JwkSet, String> {
        let mut resp = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("body larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))
    }
}

/// HELP text of this module's metric (both binaries' `/metrics` call it).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "chat_jwks_fetch_errors_total",
        "Failed JWKS fetches (CHAT_JWT_JWKS_URL); the previous keys stay in use."
    );
}

/// Refreshes every `period` until the authenticator is gone.
async fn refresh_periodically(inner: Weak<Inner>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        inner.refresh().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("chat-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const SECRET: &str = "a-key-by-kid-0123456789-0123456789";

    fn token(kid: Option<&str>, secret: &str) -> String {
        let header = jsonwebtoken::Header {
            kid: kid.map(str::to_owned),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        };
        jsonwebtoken::encode(
            &header,
            &proto::auth::claims("u", "u", 60),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn keys_dir_keys_by_file_name_skipping_hidden_entries() {
        let d = dir("ok");
        std::fs::write(d.join("2024-06.secret"), format!("{SECRET}\n")).unwrap();
        std::fs::create_dir(d.join("..2024_06_01")).unwrap();
        std::fs::write(d.join(".swp"), "x").unwrap();
        let settings = KeySettings {
            keys_dir: Some(d.clone()),
            ..Default::default()
        };
        let v = settings.verifier().unwrap();
        assert!(!v.is_dev(), "keys by kid replace the development key");
        assert!(v.verify(&token(Some("2024-06"), SECRET)).is_ok());
        assert_eq!(
            v.verify(&token(Some("2024-09"), SECRET)),
            Err(AuthError::UnknownKey)
        );
        assert!(v.verify(&token(None, SECRET)).is_err(), "no kid, no key");
        std::fs::write(d.join("notes.txt"), "x").unwrap();
        let e = settings.verifier().err().expect("notes.txt refused");
        assert!(e.contains("notes.txt"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_settings_are_refused() {
        let both = KeySettings {
            secret: Some("s".into()),
            public_key: Some("/nope.pem".into()),
            ..Default::default()
        };
        assert!(both.verifier().is_err());
        for url in ["ftp://idp/jwks", "not a url", "http://"] {
            let s = KeySettings {
                jwks_url: Some(url.into()),
                jwks_refresh: Duration::from_secs(300),
                ..Default::default()
            };
            assert!(s.verifier().is_err(), "{url}");
        }
        let too_often = KeySettings {
            jwks_url: Some("https://idp.example/jwks".into()),
            jwks_refresh: Duration::from_secs(5),
            ..Default::default()
        };
        assert!(too_often.verifier().is_err());
        assert!(KeySettings::default().verifier().unwrap().is_dev());
    }
}
