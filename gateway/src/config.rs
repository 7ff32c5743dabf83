//! Configuration: every setting is a flag with an environment fallback (the flag wins).
//! Parsed and validated before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use history_service::keys::KeySettings;
use history_service::redis_settings::RedisArgs;

use crate::api_keys::ApiKeys;
use history_service::secrets;

/// `CHAT_TOKEN_EXPIRING_SECONDS` at most: a day.
pub const MAX_TOKEN_EXPIRING_SECONDS: u64 = 24 * 3600;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "gateway",
    version,
    about = "Horizontally scalable real-time chat gateway"
)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (printed in the first log line).
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Second address for `/healthz`, `/readyz` and `/metrics`, which the main address then
    /// no longer serves; unset → everything on one address.
    #[arg(long, env = "CHAT_INTERNAL_LISTEN")]
    pub internal_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// History service URL; unset → history in-process on the embedded store.
    #[arg(long, env = "CHAT_HISTORY_URL")]
    pub history_url: Option<String>,
    /// Directory of the embedded store's SQLite file.
    #[arg(long, env = "CHAT_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Node id in `hello` and logs; defaults to the host name.
    #[arg(long, env = "CHAT_NODE_ID")]
    pub node_id: Option<String>,
    /// Comma-separated browser origins allowed to open WebSockets; unset → any (dev).
    #[arg(long, env = "CHAT_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// Seconds a draining node spreads reconnects over before it exits.
    #[arg(long, env = "CHAT_DRAIN_SECONDS", default_value_t = 20)]
    pub drain_seconds: u64,
    /// HS256 secret; with no key at all the built-in development key is used.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding `CHAT_JWT_SECRET`.
    #[arg(long, env = "CHAT_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Path to a PEM public key (RS256, ES256 or EdDSA).
    #[arg(long, env = "CHAT_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Directory of keys chosen by the token's `kid`: `<kid>.pem` or `<kid>.secret`.
    #[arg(long, env = "CHAT_JWT_KEYS_DIR")]
    pub jwt_keys_dir: Option<PathBuf>,
    /// JWKS URL of the identity provider; keys chosen by `kid`, refreshed in the background.
    #[arg(long, env = "CHAT_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// Seconds between background JWKS refreshes.
    #[arg(long, env = "CHAT_JWT_JWKS_REFRESH_SECONDS", default_value_t = 300)]
    pub jwt_jwks_refresh_seconds: u64,
    #[arg(long, env = "CHAT_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    #[arg(long, env = "CHAT_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// OTLP collector for traces (`http://collector:4317` for gRPC); unset → no export.
    #[arg(long, env = "CHAT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport: `grpc` or `http/protobuf` (then `/v1/traces` is appended to an
    /// endpoint without a path).
    #[arg(long, env = "CHAT_OTLP_PROTOCOL", default_value = "grpc")]
    pub otlp_protocol: String,
    /// Share of traces recorded, 0.0-1.0 (parent-based: a sampled caller's trace is kept).
    #[arg(long, env = "CHAT_TRACE_SAMPLE_RATIO", default_value_t = 1.0)]
    pub trace_sample_ratio: f64,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "CHAT_LOG", default_value = "info")]
    pub log: String,
    /// `json` for JSON lines.
    #[arg(long, env = "CHAT_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Largest accepted WebSocket message; larger closes with 1009.
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,
    /// Largest message content in characters.
    #[arg(long, env = "CHAT_MAX_CONTENT_CHARS", default_value_t = 4000)]
    pub max_content_chars: usize,
    /// Commands per second per connection (token bucket rate).
    #[arg(long, env = "CHAT_MESSAGES_PER_S", default_value_t = 20)]
    pub messages_per_s: u32,
    /// Token bucket burst.
    #[arg(long, env = "CHAT_BURST", default_value_t = 40)]
    pub burst: u32,
    /// Rooms one connection may be in at once.
    #[arg(long, env = "CHAT_MAX_ROOMS_PER_CONNECTION", default_value_t = 100)]
    pub max_rooms_per_connection: usize,
    /// Connections one user may hold at once (all nodes count separately).
    #[arg(long, env = "CHAT_MAX_CONNECTIONS_PER_USER", default_value_t = 16)]
    pub max_connections_per_user: usize,
    /// Connections this node accepts at once.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Frames queued for one client before it is closed as a slow consumer (1013).
    #[arg(long, env = "CHAT_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Stored events kept per room for recovery with `since`.
    #[arg(long, env = "CHAT_RECOVERY_WINDOW", default_value_t = 1000)]
    pub recovery_window: usize,
    /// WebSocket ping interval, announced as `heartbeat_s`; a client silent for 3 intervals is closed.
    #[arg(long, env = "CHAT_HEARTBEAT_SECONDS", default_value_t = 25)]
    pub heartbeat_seconds: u64,
    /// Seconds a node's presence entries live without a refresh: a killed node's users go
    /// offline within this (plus one refresh period).
    #[arg(long, env = "CHAT_PRESENCE_TTL_SECONDS", default_value_t = 30)]
    pub presence_ttl_seconds: u64,
    /// Rooms with more users online than this get presence coalesced: no `join`/`leave` per
    /// user, one `online_users` per interval listing who came and went (0: every room).
    #[arg(long, env = "CHAT_PRESENCE_COALESCE_ABOVE", default_value_t = 100)]
    pub presence_coalesce_above: u64,
    /// Milliseconds between two `online_users` of a room from one node, at most one per
    /// interval (leading and trailing edge).
    #[arg(long, env = "CHAT_PRESENCE_INTERVAL_MS", default_value_t = 500)]
    pub presence_interval_ms: u64,
    /// Shared token for the history service's internal API.
    #[arg(long, env = "CHAT_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// File holding `CHAT_INTERNAL_TOKEN`.
    #[arg(long, env = "CHAT_INTERNAL_TOKEN_FILE")]
    pub internal_token_file: Option<PathBuf>,
    /// Seconds before its token's `exp` at which a connection gets `token_expiring` (it is
    /// closed with 1008 at `exp` unless it sends `refresh` with a new token).
    #[arg(long, env = "CHAT_TOKEN_EXPIRING_SECONDS", default_value_t = 60)]
    pub token_expiring_seconds: u64,
    /// Directory of the server API's keys, one file per key (the file name names the key in
    /// logs); unset → no server API.
    #[arg(long, env = "CHAT_API_KEYS_DIR")]
    pub api_keys_dir: Option<PathBuf>,
    /// The keys read from `api_keys_dir` ([`Config::load_secret_files`]).
    #[arg(skip)]
    pub api_keys: Option<ApiKeys>,
    /// A `join` of a room that does not exist creates it public, the joiner as owner (as a
    /// `create_room` would). `false`: such a join answers `not_found`.
    #[arg(long, env = "CHAT_AUTO_CREATE_ROOMS", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_create_rooms: bool,
}

impl Config {
    /// Checks what clap cannot; returns the one line to print on failure.
    pub fn validate(&self) -> Result<(), String> {
        if !(1024..=16 * 1024 * 1024).contains(&self.max_frame_bytes) {
            return Err("CHAT_MAX_FRAME_BYTES must be between 1024 and 16777216".into());
        }
        if self.max_content_chars == 0 || self.max_content_chars * 4 > self.max_frame_bytes {
            return Err(
                "CHAT_MAX_CONTENT_CHARS must be > 0 and fit in a frame (4 bytes a char)".into(),
            );
        }
        if self.messages_per_s == 0 || self.burst == 0 {
            return Err("CHAT_MESSAGES_PER_S and CHAT_BURST must be > 0".into());
        }
        if self.outbound_queue < 16 {
            return Err("CHAT_OUTBOUND_QUEUE must be at least 16".into());
        }
        if self.presence_ttl_seconds < 3 {
            return Err("CHAT_PRESENCE_TTL_SECONDS must be at least 3".into());
        }
        if !(50..=60_000).contains(&self.presence_interval_ms) {
            return Err("CHAT_PRESENCE_INTERVAL_MS must be between 50 and 60000".into());
        }
        if self.heartbeat_seconds == 0 {
            return Err("CHAT_HEARTBEAT_SECONDS must be > 0".into());
        }
        if !(1..=MAX_TOKEN_EXPIRING_SECONDS).contains(&self.token_expiring_seconds) {
            return Err(format!(
                "CHAT_TOKEN_EXPIRING_SECONDS must be between 1 and {MAX_TOKEN_EXPIRING_SECONDS}"
            ));
        }
        self.redis.settings()?;
        if let Some(url) = &self.history_url {
            history_service::remote::RemoteStore::new(url, None)
                .map_err(|e| format!("CHAT_HISTORY_URL: {e}"))?;
        }
        self.otlp_protocol
            .parse::<history_service::telemetry::OtlpProtocol>()?;
        if let Some(endpoint) = &self.otlp_endpoint {
            history_service::telemetry::validate_endpoint(endpoint)?;
        }
        history_service::telemetry::validate_sample_ratio(self.trace_sample_ratio)?;
        if self.internal_listen.is_some_and(|a| a == self.listen) {
            return Err("CHAT_INTERNAL_LISTEN must differ from CHAT_LISTEN".into());
        }
        self.key_settings().verifier().map(drop)
    }

    /// Replaces each `*_FILE` setting by the value its file holds, and reads the server API's
    /// keys (before [`Config::validate`]; a second call does nothing).
    pub fn load_secret_files(&mut self) -> Result<(), String> {
        self.jwt_secret = secrets::setting(
            "CHAT_JWT_SECRET",
            self.jwt_secret.take(),
            self.jwt_secret_file.take().as_deref(),
        )?;
        self.internal_token = secrets::setting(
            "CHAT_INTERNAL_TOKEN",
            self.internal_token.take(),
            self.internal_token_file.take().as_deref(),
        )?;
        self.redis.load_secret_file()?;
        if let (None, Some(dir)) = (&self.api_keys, &self.api_keys_dir) {
            self.api_keys = Some(ApiKeys::load(dir)?);
        }
        Ok(())
    }

    /// The token keys as configured.
    pub fn key_settings(&self) -> KeySettings {
        KeySettings {
            secret: self.jwt_secret.clone(),
            public_key: self.jwt_public_key.clone(),
            keys_dir: self.jwt_keys_dir.clone(),
            jwks_url: self.jwt_jwks_url.clone(),
            jwks_refresh: Duration::from_secs(self.jwt_jwks_refresh_seconds),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
        }
    }

    pub fn node_name(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "gateway".into())
        })
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_seconds)
    }

    pub fn presence_interval(&self) -> Duration {
        Duration::from_millis(self.presence_interval_ms)
    }

    pub fn token_expiring(&self) -> Duration {
        Duration::from_secs(self.token_expiring_seconds)
    }

    /// Defaults as if started with no flags and no environment (for tests).
    pub fn for_tests() -> Self {
        Config::parse_from(["gateway"])
    }
}
