//! The history service binary: `history-service [serve]` runs the HTTP API and the
//! persistence-stream consumer; `history-service migrate` applies the store schema and exits
//! (the Kubernetes schema Job and the compose `schema-migrate` service run it).
//!
//! Every setting is a flag with an environment fallback (the flag wins), parsed and validated
//! before any port is bound; a bad setting prints one line and exits with status 2.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use history_service::consumer::ConsumerConfig;
use history_service::keys::{Authenticator, KeySettings};
use history_service::redis_settings::RedisArgs;
use history_service::server::{self, RunOptions};
use history_service::startup;
use history_service::store::scylla::{DriverSettings, TlsSettings, DEFAULT_REPLICATION};
use history_service::telemetry::{self, OtlpProtocol, TelemetryConfig};
use history_service::{AnyStore, HistoryApi};

#[derive(Debug, Parser)]
#[command(
    name = "history-service",
    version,
    about = "Durable chat history: HTTP API, persistence-stream consumer, schema migrations"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API and consume the persistence stream (the default).
    Serve,
    /// Create or upgrade the store's schema (idempotent), then exit.
    Migrate,
}

#[derive(Debug, clap::Args)]
struct Config {
    /// Address to listen on; port 0 picks a free port (printed as `listening on ADDR`).
    #[arg(
        long,
        env = "CHAT_LISTEN",
        default_value = "127.0.0.1:8081",
        global = true
    )]
    listen: SocketAddr,
    /// Second address for the internal API (`/internal/v1/*`), `/healthz`, `/readyz` and
    /// `/metrics`; then the main address serves only the public API. Unset → one port.
    #[arg(long, env = "CHAT_INTERNAL_LISTEN", global = true)]
    internal_listen: Option<SocketAddr>,
    /// `sqlite://<path>` or `scylla://[user:pass@]host[:port][,host2[:port]]/keyspace`.
    #[arg(
        long,
        env = "CHAT_STORE",
        default_value = "sqlite://./data/history.db",
        global = true
    )]
    store: String,
    #[command(flatten)]
    redis: RedisArgs,
    /// This replica's consumer name in the stream's group; defaults to the host name.
    #[arg(long, env = "CHAT_NODE_ID", global = true)]
    node_id: Option<String>,
    /// Shared token the internal API (`/internal/v1/*`) requires; unset → open (keep the
    /// port private).
    #[arg(
        long,
        env = "CHAT_INTERNAL_TOKEN",
        hide_env_values = true,
        global = true
    )]
    internal_token: Option<String>,
    /// File holding `CHAT_INTERNAL_TOKEN`.
    #[arg(long, env = "CHAT_INTERNAL_TOKEN_FILE", global = true)]
    internal_token_file: Option<PathBuf>,
    /// HS256 secret; with no key at all the built-in development key is used.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true, global = true)]
    jwt_secret: Option<String>,
    /// File holding `CHAT_JWT_SECRET`.
    #[arg(long, env = "CHAT_JWT_SECRET_FILE", global = true)]
    jwt_secret_file: Option<PathBuf>,
    /// Path to a PEM public key (RS256, ES256 or EdDSA).
    #[arg(long, env = "CHAT_JWT_PUBLIC_KEY", global = true)]
    jwt_public_key: Option<PathBuf>,
    /// Directory of keys chosen by the token's `kid`: `<kid>.pem` or `<kid>.secret`.
    #[arg(long, env = "CHAT_JWT_KEYS_DIR", global = true)]
    jwt_keys_dir: Option<PathBuf>,
    /// JWKS URL of the identity provider; keys chosen by `kid`, refreshed in the background.
    #[arg(long, env = "CHAT_JWT_JWKS_URL", global = true)]
    jwt_jwks_url: Option<String>,
    /// Seconds between background JWKS refreshes.
    #[arg(
        long,
        env = "CHAT_JWT_JWKS_REFRESH_SECONDS",
        default_value_t = 300,
        global = true
    )]
    jwt_jwks_refresh_seconds: u64,
    #[arg(long, env = "CHAT_JWT_ISSUER", global = true)]
    jwt_issuer: Option<String>,
    #[arg(long, env = "CHAT_JWT_AUDIENCE", global = true)]
    jwt_audience: Option<String>,
    /// `migrate` on ScyllaDB: keyspace replication factor, in every datacenter
    /// (NetworkTopologyStrategy).
    #[arg(long, env = "CHAT_SCYLLA_REPLICATION_FACTOR", global = true)]
    scylla_replication_factor: Option<u32>,
    /// `migrate` on ScyllaDB: the whole replication map instead, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`.
    #[arg(long, env = "CHAT_SCYLLA_REPLICATION", global = true)]
    scylla_replication: Option<String>,
    /// ScyllaDB: the local datacenter. Requests go to its nodes only, so LOCAL_QUORUM is a
    /// quorum there; unset → every node counts as local (one datacenter).
    #[arg(long, env = "CHAT_SCYLLA_DATACENTER", global = true)]
    scylla_datacenter: Option<String>,
    /// ScyllaDB: connect with TLS (the nodes' TLS CQL port, usually 9142), verifying their
    /// certificates against the system's CAs.
    #[arg(long, env = "CHAT_SCYLLA_TLS", global = true)]
    scylla_tls: bool,
    /// ScyllaDB: a PEM file of CAs to trust for the nodes' certificates; implies TLS.
    #[arg(long, env = "CHAT_SCYLLA_TLS_CA_FILE", global = true)]
    scylla_tls_ca_file: Option<PathBuf>,
    /// ScyllaDB: a PEM client certificate (chain) for clusters that require one; implies TLS,
    /// needs the key too.
    #[arg(long, env = "CHAT_SCYLLA_TLS_CERT_FILE", global = true)]
    scylla_tls_cert_file: Option<PathBuf>,
    /// ScyllaDB: the PEM private key of the client certificate.
    #[arg(long, env = "CHAT_SCYLLA_TLS_KEY_FILE", global = true)]
    scylla_tls_key_file: Option<PathBuf>,
    /// ScyllaDB: seconds the driver waits for one request; keep it above the server's longest
    /// timeout (`range_request_timeout_in_ms`, 10 s by default) so the server answers first.
    #[arg(
        long,
        env = "CHAT_SCYLLA_REQUEST_TIMEOUT_SECS",
        default_value_t = 12,
        global = true
    )]
    scylla_request_timeout_secs: u64,
    /// `serve`: apply the schema before serving (what `migrate` does).
    #[arg(long, env = "CHAT_MIGRATE_ON_START", global = true)]
    migrate_on_start: bool,
    /// Seconds in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "CHAT_DRAIN_SECONDS", default_value_t = 20, global = true)]
    drain_seconds: u64,
    /// Milliseconds the stream consumer waits after a read that was not a full batch, so the
    /// next batch gathers (one store transaction per batch); 0: read again at once.
    #[arg(
        long,
        env = "CHAT_CONSUMER_LINGER_MS",
        default_value_t = 25,
        value_parser = clap::value_parser!(u64).range(0..=1000),
        global = true
    )]
    consumer_linger_ms: u64,
    /// OTLP collector for traces (`http://collector:4317` for gRPC); unset → no export.
    #[arg(long, env = "CHAT_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,
    /// OTLP transport: `grpc` or `http/protobuf` (then `/v1/traces` is appended to an
    /// endpoint without a path).
    #[arg(
        long,
        env = "CHAT_OTLP_PROTOCOL",
        default_value = "grpc",
        global = true
    )]
    otlp_protocol: String,
    /// Share of traces recorded, 0.0-1.0 (parent-based: a sampled caller's trace is kept).
    #[arg(
        long,
        env = "CHAT_TRACE_SAMPLE_RATIO",
        default_value_t = 1.0,
        global = true
    )]
    trace_sample_ratio: f64,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "CHAT_LOG", default_value = "info", global = true)]
    log: String,
    /// `json` for JSON lines, `text` otherwise.
    #[arg(long, env = "CHAT_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
}

impl Config {
    /// Checks what clap cannot; the error is the one line to print.
    fn validate(&self) -> Result<(), String> {
        history_service::store::any::StoreUrl::parse(&self.store)
            .map_err(|e| format!("CHAT_STORE: {e}"))?;
        self.redis.settings()?;
        if self.scylla_replication.is_some() && self.scylla_replication_factor.is_some() {
            return Err(
                "set either CHAT_SCYLLA_REPLICATION or CHAT_SCYLLA_REPLICATION_FACTOR, not both"
                    .into(),
            );
        }
        if self.scylla_replication_factor == Some(0) {
            return Err("CHAT_SCYLLA_REPLICATION_FACTOR must be at least 1".into());
        }
        self.scylla_driver()?;
        self.otlp_protocol.parse::<OtlpProtocol>()?;
        if let Some(endpoint) = &self.otlp_endpoint {
            telemetry::validate_endpoint(endpoint)?;
        }
        telemetry::validate_sample_ratio(self.trace_sample_ratio)?;
        if self.internal_listen == Some(self.listen) {
            return Err("CHAT_INTERNAL_LISTEN must differ from CHAT_LISTEN".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(format!(
                "CHAT_LOG_FORMAT must be text or json (got {})",
                self.log_format
            ));
        }
        self.key_settings().verifier().map(drop)
    }

    /// Replaces each `*_FILE` setting by the value its file holds. Runs before [`validate`].
    fn load_secret_files(&mut self) -> Result<(), String> {
        use history_service::secrets::setting;
        self.jwt_secret = setting(
            "CHAT_JWT_SECRET",
            self.jwt_secret.take(),
            self.jwt_secret_file.take().as_deref(),
        )?;
        self.internal_token = setting(
            "CHAT_INTERNAL_TOKEN",
            self.internal_token.take(),
            self.internal_token_file.take().as_deref(),
        )?;
        self.redis.load_secret_file()?;
        Ok(())
    }

    fn key_settings(&self) -> KeySettings {
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

    /// The ScyllaDB driver settings; TLS files are loaded here, so a bad one is reported
    /// before anything starts.
    fn scylla_driver(&self) -> Result<DriverSettings, String> {
        if self
            .scylla_datacenter
            .as_deref()
            .is_some_and(|dc| dc.trim().is_empty())
        {
            return Err("CHAT_SCYLLA_DATACENTER is empty".into());
        }
        if self.scylla_request_timeout_secs == 0 {
            return Err("CHAT_SCYLLA_REQUEST_TIMEOUT_SECS must be at least 1".into());
        }
        let client_cert =
            match (&self.scylla_tls_cert_file, &self.scylla_tls_key_file) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                (None, None) => None,
                _ => return Err(
                    "set both CHAT_SCYLLA_TLS_CERT_FILE and CHAT_SCYLLA_TLS_KEY_FILE, or neither"
                        .into(),
                ),
            };
        let tls = (self.scylla_tls || self.scylla_tls_ca_file.is_some() || client_cert.is_some())
            .then(|| TlsSettings {
                ca_file: self.scylla_tls_ca_file.clone(),
                client_cert,
            });
        if let Some(tls) = &tls {
            tls.context().map_err(|e| {
                // OpenSSL's reason spans lines; the first says which file and why.
                let e = e.to_string();
                let first = e.lines().next().unwrap_or_default().trim_end_matches(':');
                format!(
                    "cannot load the TLS files of CHAT_SCYLLA_TLS_CA_FILE / \
                     CHAT_SCYLLA_TLS_CERT_FILE / CHAT_SCYLLA_TLS_KEY_FILE: {first}"
                )
            })?;
        }
        Ok(DriverSettings {
            datacenter: self.scylla_datacenter.clone(),
            tls,
            request_timeout: Duration::from_secs(self.scylla_request_timeout_secs),
        })
    }

    /// The CQL replication map `migrate` creates the keyspace with.
    fn replication(&self) -> String {
        match (&self.scylla_replication, self.scylla_replication_factor) {
            (Some(map), _) => map.clone(),
            (None, Some(rf)) => {
                format!("{{'class': 'NetworkTopologyStrategy', 'replication_factor': {rf}}}")
            }
            (None, None) => DEFAULT_REPLICATION.to_owned(),
        }
    }

    /// The consumer name: the node id, else the host name, else a random one (a replica that
    /// restarts under a new name leaves its pending entries to be reclaimed by the others).
    fn node_name(&self) -> String {
        self.node_id
            .clone()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
            })
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .subsec_nanos();
                format!("history-{:x}{:08x}", std::process::id(), nanos)
            })
    }
}

fn fail(what: impl std::fmt::Display) -> ! {
    eprintln!("history-service: {what}");
    std::process::exit(2);
}

/// Resolves on SIGTERM or SIGINT.
async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => fail(format!("cannot handle SIGTERM: {e}")),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = startup::parse();
    let mut config = cli.config;
    if let Err(e) = config.load_secret_files().and_then(|()| config.validate()) {
        fail(e);
    }
    // Logs go to stderr, so stdout's first line is `listening on ADDR` for whoever started us.
    let command = cli.command.unwrap_or(Command::Serve);
    let serving = matches!(command, Command::Serve);
    let telemetry = telemetry::init(&TelemetryConfig {
        service: "history-service",
        instance: Some(config.node_name()),
        log_filter: &config.log,
        log_format: &config.log_format,
        log_to_stderr: true,
        // `migrate` is a one-off Job: nothing worth tracing.
        otlp_endpoint: config.otlp_endpoint.as_deref().filter(|_| serving),
        otlp_protocol: config.otlp_protocol.parse().unwrap_or_else(|e| fail(e)),
        sample_ratio: config.trace_sample_ratio,
    })
    .unwrap_or_else(|e| fail(e));

    let result = match command {
        Command::Migrate => {
            let driver = config.scylla_driver().unwrap_or_else(|e| fail(e));
            if let Err(e) = AnyStore::migrate(&config.store, &config.replication(), &driver).await {
                eprintln!("history-service: migrate failed: {e}");
                std::process::exit(1);
            }
            tracing::info!(store = %config.store, "schema is up to date");
            Ok(())
        }
        Command::Serve => serve(config).await,
    };
    telemetry.shutdown().await;
    result
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let verifier = Authenticator::start(&config.key_settings())
        .await
        .unwrap_or_else(|e| fail(e));
    let driver = config.scylla_driver().unwrap_or_else(|e| fail(e));
    if config.migrate_on_start {
        if let Err(e) = AnyStore::migrate(&config.store, &config.replication(), &driver).await {
            eprintln!("history-service: migrate failed: {e}");
            std::process::exit(1);
        }
    }
    let store = match AnyStore::connect_with(&config.store, &driver).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("history-service: cannot open the store (CHAT_STORE / --store): {e}");
            std::process::exit(1);
        }
    };
    let redis = config.redis.settings().unwrap_or_else(|e| fail(e));
    let node = config.node_name();
    let api = Arc::new(
        HistoryApi::new(store.clone(), verifier).with_internal_token(config.internal_token.clone()),
    );

    let listener = startup::bind(config.listen, "CHAT_LISTEN", "--listen")
        .await
        .unwrap_or_else(|e| fail(e));
    let addr = listener.local_addr()?;
    let internal = match config.internal_listen {
        Some(at) => Some(
            startup::bind(at, "CHAT_INTERNAL_LISTEN", "--internal-listen")
                .await
                .unwrap_or_else(|e| fail(e)),
        ),
        None => None,
    };
    if let Some(internal) = &internal {
        // Before `listening on`: whoever waits for that line may use both right away.
        println!("internal listener on {}", internal.local_addr()?);
    }
    println!("listening on {addr}");
    tracing::info!(
        %addr,
        store = store.kind(),
        consumer = if redis.is_some() { node.as_str() } else { "off" },
        dev_key = api.verifier().is_dev(),
        internal_token = api.internal_token().is_some(),
        "history-service started"
    );
    if redis.is_none() {
        tracing::warn!("CHAT_REDIS_URL is not set: the persistence stream is not consumed");
    }

    server::run(
        listener,
        api,
        RunOptions {
            redis,
            consumer: ConsumerConfig {
                linger: Duration::from_millis(config.consumer_linger_ms),
                ..ConsumerConfig::new(node)
            },
            drain: Duration::from_secs(config.drain_seconds),
            internal,
        },
        signal(),
    )
    .await?;
    Ok(())
}
