//! The Redis settings both binaries take (`CHAT_REDIS_*` variables and flags), validated in
//! one place: one primary (`CHAT_REDIS_MODE=single`, `CHAT_REDIS_URL` its URL), a Redis
//! Cluster (`cluster`, `CHAT_REDIS_URL` a comma-separated list of seed nodes), or one primary
//! found through Sentinel (`sentinel`, `CHAT_REDIS_URL` the sentinels; see
//! [`crate::sentinel`]).
//!
//! Every connection (commands, the gateway's pub/sub, the consumer, `WAIT`) is made from the
//! same [`ConnectionInfo`]: TLS when the URLs are `rediss://` (trusting `CHAT_REDIS_CA_FILE`,
//! with the client certificate of `CHAT_REDIS_CERT_FILE`/`CHAT_REDIS_KEY_FILE` when given) and
//! the ACL user of `CHAT_REDIS_USERNAME`/`CHAT_REDIS_PASSWORD` (over what the URL carries).
//! [`RedisSettings::node_info`] says how to open a connection of our own to one node (the
//! gateway's pub/sub connections, one per primary, see `gateway::broker::redis`); the
//! connections themselves are made in [`crate::redis_conn`].

use std::path::Path;
use std::time::Duration;

use redis::{
    ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion,
    TlsCertificates,
};

/// How the product reaches Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One primary (with or without replicas).
    Single,
    /// A Redis Cluster: rooms spread over its shards by partition.
    Cluster,
    /// One primary, found by asking Sentinel (and found again after a failover).
    Sentinel,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "single" => Ok(Mode::Single),
            "cluster" => Ok(Mode::Cluster),
            "sentinel" => Ok(Mode::Sentinel),
            other => Err(format!(
                "CHAT_REDIS_MODE must be single, cluster or sentinel (got {other})"
            )),
        }
    }
}

/// Default number of partitions on a Redis Cluster (`CHAT_REDIS_PARTITIONS`): enough to
/// spread over 3–8 shards.
pub const DEFAULT_CLUSTER_PARTITIONS: u16 = 64;
/// Default number of partitions on one primary: one. Partitions only spread keys over
/// shards; each is a stream every history replica reads on its own, so on one primary more
/// of them only split the store's batches (64 made one store transaction per ~1 message
/// instead of per ~60 at 2,000 msg/s in 250 rooms).
pub const DEFAULT_SINGLE_PARTITIONS: u16 = 1;
/// At most this many partitions: each is a stream every history replica polls.
pub const MAX_PARTITIONS: u16 = 1024;

/// The Redis settings both binaries take (flags and `CHAT_*` variables), before validation.
#[derive(Clone, Debug, clap::Args)]
pub struct RedisArgs {
    /// Redis URL (`redis://host:6379`, `rediss://` for TLS); with `CHAT_REDIS_MODE=cluster` a
    /// comma-separated list of seed nodes, with `sentinel` the sentinels. Gateway: unset → in-process broker (single node). History service:
    /// unset → API only, no persistence-stream consumer.
    #[arg(
        long = "redis-url",
        env = "CHAT_REDIS_URL",
        hide_env_values = true,
        global = true
    )]
    pub url: Option<String>,
    /// File holding `CHAT_REDIS_URL` (it may carry a password): a mounted Secret.
    #[arg(long = "redis-url-file", env = "CHAT_REDIS_URL_FILE", global = true)]
    pub url_file: Option<std::path::PathBuf>,
    /// `single` (one primary, with or without replicas), `cluster` (a Redis Cluster) or
    /// `sentinel` (one primary, found through the sentinels of `CHAT_REDIS_URL`).
    #[arg(
        long = "redis-mode",
        env = "CHAT_REDIS_MODE",
        default_value = "single",
        global = true
    )]
    pub mode: String,
    /// Partitions rooms and persistence streams are spread over; every gateway and history
    /// service of a deployment uses the same number (checked at start). Default: 1 on one
    /// primary, 64 on a Redis Cluster.
    #[arg(
        long = "redis-partitions",
        env = "CHAT_REDIS_PARTITIONS",
        global = true
    )]
    pub partitions: Option<u16>,
    /// A stored event counts as written (gateway: acknowledged; history service: stored)
    /// only once this many replicas have it (`WAIT`); 0: at once.
    #[arg(
        long = "redis-wait-replicas",
        env = "CHAT_REDIS_WAIT_REPLICAS",
        default_value_t = 0,
        global = true
    )]
    pub wait_replicas: u32,
    /// How long one `WAIT` for replicas may take (the gateway then answers `unavailable`).
    #[arg(
        long = "redis-wait-timeout-ms",
        env = "CHAT_REDIS_WAIT_TIMEOUT_MS",
        default_value_t = 500,
        global = true
    )]
    pub wait_timeout_ms: u64,
    /// ACL user for every Redis connection (over the one in `CHAT_REDIS_URL`).
    #[arg(long = "redis-username", env = "CHAT_REDIS_USERNAME", global = true)]
    pub username: Option<String>,
    /// Password of that user (over the one in `CHAT_REDIS_URL`).
    #[arg(
        long = "redis-password",
        env = "CHAT_REDIS_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub password: Option<String>,
    /// File holding `CHAT_REDIS_PASSWORD`: a mounted Secret.
    #[arg(
        long = "redis-password-file",
        env = "CHAT_REDIS_PASSWORD_FILE",
        global = true
    )]
    pub password_file: Option<std::path::PathBuf>,
    /// With `CHAT_REDIS_MODE=sentinel`: the name the sentinels monitor the primary under.
    #[arg(
        long = "redis-sentinel-master",
        env = "CHAT_REDIS_SENTINEL_MASTER",
        default_value = "mymaster",
        global = true
    )]
    pub sentinel_master: String,
    /// Password the sentinels ask for (`requirepass` of the sentinels), when they have one of
    /// their own; unset: the sentinels' URLs carry it, or they need none.
    #[arg(
        long = "redis-sentinel-password",
        env = "CHAT_REDIS_SENTINEL_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub sentinel_password: Option<String>,
    /// File holding `CHAT_REDIS_SENTINEL_PASSWORD`: a mounted Secret.
    #[arg(
        long = "redis-sentinel-password-file",
        env = "CHAT_REDIS_SENTINEL_PASSWORD_FILE",
        global = true
    )]
    pub sentinel_password_file: Option<std::path::PathBuf>,
    /// PEM bundle of the CAs to trust for `rediss://` (unset: the system's roots).
    #[arg(long = "redis-ca-file", env = "CHAT_REDIS_CA_FILE", global = true)]
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; with `CHAT_REDIS_KEY_FILE`.
    #[arg(long = "redis-cert-file", env = "CHAT_REDIS_CERT_FILE", global = true)]
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of `CHAT_REDIS_CERT_FILE`.
    #[arg(long = "redis-key-file", env = "CHAT_REDIS_KEY_FILE", global = true)]
    pub key_file: Option<std::path::PathBuf>,
}

impl RedisArgs {
    /// Replaces `CHAT_REDIS_URL`, `CHAT_REDIS_PASSWORD` and `CHAT_REDIS_SENTINEL_PASSWORD` by
    /// what their `_FILE` settings hold (a second call does nothing).
    pub fn load_secret_file(&mut self) -> Result<(), String> {
        use crate::secrets::setting;
        self.url = setting(
            "CHAT_REDIS_URL",
            self.url.take(),
            self.url_file.take().as_deref(),
        )?;
        self.password = setting(
            "CHAT_REDIS_PASSWORD",
            self.password.take(),
            self.password_file.take().as_deref(),
        )?;
        self.sentinel_password = setting(
            "CHAT_REDIS_SENTINEL_PASSWORD",
            self.sentinel_password.take(),
            self.sentinel_password_file.take().as_deref(),
        )?;
        Ok(())
    }

    /// The validated settings, when a Redis is configured (reads the TLS files).
    pub fn settings(&self) -> Result<Option<RedisSettings>, String> {
        let Some(url) = self.url.as_deref() else {
            return Ok(None);
        };
        let access = Access {
            username: self.username.clone(),
            password: self.password.clone(),
            sentinel_master: self.sentinel_master.clone(),
            sentinel_password: self.sentinel_password.clone(),
            tls: tls_certificates(
                self.ca_file.as_deref(),
                self.cert_file.as_deref(),
                self.key_file.as_deref(),
            )?,
        };
        RedisSettings::parse(
            &self.mode,
            url,
            self.partitions,
            self.wait_replicas,
            self.wait_timeout_ms,
        )?
        .with_access(access)
        .map(Some)
    }
}

/// Credentials and TLS material for the connections, over what the URLs carry.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// ACL user of the data nodes.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// The primary's name at the sentinels.
    pub sentinel_master: String,
    /// The sentinels' own password.
    pub sentinel_password: Option<String>,
    /// CA and client certificate; `None`: the system's roots, no client certificate.
    pub tls: Option<TlsCertificates>,
}

/// Reads the TLS files: `None` when none is set. Errors name the setting.
pub fn tls_certificates(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<TlsCertificates>, String> {
    let read = |name: &str, path: &Path| {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read {name} {}: {e}", path.display()))?;
        // rustls skips what is not PEM: a wrong file would trust nothing, silently.
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN ") {
            return Err(format!("{name} {} holds no PEM block", path.display()));
        }
        Ok(pem)
    };
    let root_cert = ca.map(|p| read("CHAT_REDIS_CA_FILE", p)).transpose()?;
    let client_tls = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("CHAT_REDIS_CERT_FILE", cert)?,
            client_key: read("CHAT_REDIS_KEY_FILE", key)?,
        }),
        (Some(_), None) => {
            return Err("CHAT_REDIS_CERT_FILE is set without CHAT_REDIS_KEY_FILE".into())
        }
        (None, Some(_)) => {
            return Err("CHAT_REDIS_KEY_FILE is set without CHAT_REDIS_CERT_FILE".into())
        }
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// Everything about reaching Redis, validated.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub mode: Mode,
    /// The primary (single), the seed nodes (cluster), or the sentinels (sentinel).
    pub nodes: Vec<ConnectionInfo>,
    /// How to reach a data node (its address aside): transport, TLS, ACL user.
    pub data: ConnectionInfo,
    /// The CA and client certificate, when given (a cluster client takes them as such).
    pub tls: Option<TlsCertificates>,
    /// The primary's name at the sentinels.
    pub sentinel_master: String,
    /// Rooms and persistence streams are spread over this many partitions.
    pub partitions: u16,
    /// `WAIT` for this many replicas before a stored event counts as written (0: do not).
    pub wait_replicas: u32,
    /// How long one `WAIT` may take.
    pub wait_timeout: Duration,
    /// Every command gives up after this.
    pub timeout: Duration,
}

impl RedisSettings {
    /// Parses the settings; errors are one line naming the setting.
    pub fn parse(
        mode: &str,
        url: &str,
        partitions: Option<u16>,
        wait_replicas: u32,
        wait_timeout_ms: u64,
    ) -> Result<Self, String> {
        let mode: Mode = mode.parse()?;
        let partitions = partitions.unwrap_or(match mode {
            Mode::Single | Mode::Sentinel => DEFAULT_SINGLE_PARTITIONS,
            Mode::Cluster => DEFAULT_CLUSTER_PARTITIONS,
        });
        let urls: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err("CHAT_REDIS_URL is empty".into());
        }
        if mode == Mode::Single && urls.len() > 1 {
            return Err(
                "CHAT_REDIS_URL holds several URLs: set CHAT_REDIS_MODE=cluster for a Redis Cluster"
                    .into(),
            );
        }
        let mut nodes = Vec::with_capacity(urls.len());
        let tls = urls[0].starts_with("rediss://");
        for u in urls {
            if !u.starts_with("redis://") && !u.starts_with("rediss://") {
                return Err(format!("CHAT_REDIS_URL must start with redis:// (got {u})"));
            }
            if u.starts_with("rediss://") != tls {
                return Err("CHAT_REDIS_URL mixes redis:// and rediss:// URLs".into());
            }
            nodes.push(
                u.into_connection_info()
                    .map_err(|e| format!("CHAT_REDIS_URL: {e}"))?,
            );
        }
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(format!(
                "CHAT_REDIS_PARTITIONS must be between 1 and {MAX_PARTITIONS}"
            ));
        }
        if wait_replicas > 0 && wait_timeout_ms == 0 {
            return Err("CHAT_REDIS_WAIT_TIMEOUT_MS must be > 0".into());
        }
        Ok(Self {
            mode,
            data: nodes[0].clone(),
            nodes,
            tls: None,
            sentinel_master: "mymaster".into(),
            partitions,
            wait_replicas,
            wait_timeout: Duration::from_millis(wait_timeout_ms),
            timeout: Duration::from_secs(3),
        })
    }

    /// Applies credentials and TLS material (see [`Access`]); errors name the setting.
    pub fn with_access(mut self, access: Access) -> Result<Self, String> {
        let tls = matches!(self.data.addr(), ConnectionAddr::TcpTls { .. });
        if access.tls.is_some() && !tls {
            return Err(
                "CHAT_REDIS_CA_FILE/CHAT_REDIS_CERT_FILE are set but CHAT_REDIS_URL is not rediss://"
                    .into(),
            );
        }
        if access.sentinel_password.is_some() && self.mode != Mode::Sentinel {
            return Err(
                "CHAT_REDIS_SENTINEL_PASSWORD is set but CHAT_REDIS_MODE is not sentinel".into(),
            );
        }
        if access.sentinel_master.is_empty() {
            return Err("CHAT_REDIS_SENTINEL_MASTER is empty".into());
        }
        let certified = |info: ConnectionInfo| match &access.tls {
            Some(certs) => redis::Client::build_with_tls(info, certs.clone())
                .map(|c| c.get_connection_info().clone())
                .map_err(|e| {
                    format!("CHAT_REDIS_CA_FILE/CHAT_REDIS_CERT_FILE/CHAT_REDIS_KEY_FILE: {e}")
                }),
            None => Ok(info),
        };
        let with_user = |info: ConnectionInfo| {
            let mut r = info.redis_settings().clone();
            if let Some(u) = &access.username {
                r = r.set_username(u);
            }
            if let Some(p) = &access.password {
                r = r.set_password(p);
            }
            info.set_redis_settings(r)
        };
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for n in self.nodes {
            nodes.push(certified(match (self.mode, &access.sentinel_password) {
                (Mode::Sentinel, Some(p)) => {
                    let r = n.redis_settings().clone().set_password(p);
                    n.set_redis_settings(r)
                }
                (Mode::Sentinel, None) => n,
                _ => with_user(n),
            })?);
        }
        self.data = match self.mode {
            // The primary's user is not the sentinels': only the transport comes from them.
            Mode::Sentinel => {
                let r = redis::RedisConnectionInfo::default();
                with_user(nodes[0].clone().set_redis_settings(r))
            }
            _ => nodes[0].clone(),
        };
        self.nodes = nodes;
        self.tls = access.tls;
        self.sentinel_master = access.sentinel_master;
        Ok(self)
    }

    /// `host:port` of the first node, without credentials (for error messages).
    pub fn addr(&self) -> String {
        self.nodes
            .first()
            .map_or_else(String::new, |n| n.addr().to_string())
    }

    /// How to connect to the data node at `addr` (`host:port`) with the configured
    /// credentials and transport, speaking `protocol`.
    pub fn node_info(&self, addr: &str, protocol: ProtocolVersion) -> ConnectionInfo {
        let seed = self.data.clone();
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
            .unwrap_or_else(|| (addr.to_owned(), 6379));
        let addr = match seed.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        let redis = seed.redis_settings().clone().set_protocol(protocol);
        seed.set_addr(addr).set_redis_settings(redis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_the_setting_they_refuse() {
        let ok = RedisSettings::parse("single", "redis://127.0.0.1:6379", None, 0, 500).unwrap();
        assert_eq!(ok.mode, Mode::Single);
        assert_eq!(ok.addr(), "127.0.0.1:6379");
        assert_eq!(ok.partitions, DEFAULT_SINGLE_PARTITIONS);
        let c = RedisSettings::parse("cluster", "redis://a:1, redis://b:2", None, 1, 500).unwrap();
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.partitions, DEFAULT_CLUSTER_PARTITIONS);
        let set = RedisSettings::parse("single", "redis://a:1", Some(8), 0, 500).unwrap();
        assert_eq!(set.partitions, 8);
        for (mode, url, parts, wait_ms, want) in [
            ("both", "redis://a:1", 64, 500, "CHAT_REDIS_MODE"),
            (
                "single",
                "redis://a:1,redis://b:2",
                64,
                500,
                "CHAT_REDIS_MODE=cluster",
            ),
            ("single", "http://a:1", 64, 500, "CHAT_REDIS_URL"),
            ("single", " ", 64, 500, "CHAT_REDIS_URL"),
            ("single", "redis://a:1", 0, 500, "CHAT_REDIS_PARTITIONS"),
            ("single", "redis://a:1", 2000, 500, "CHAT_REDIS_PARTITIONS"),
            ("single", "redis://a:1", 64, 0, "CHAT_REDIS_WAIT_TIMEOUT_MS"),
        ] {
            let e = RedisSettings::parse(mode, url, Some(parts), 1, wait_ms).unwrap_err();
            assert!(e.contains(want), "{mode} {url}: {e}");
        }
    }

    #[test]
    fn node_info_keeps_the_seed_credentials() {
        let s =
            RedisSettings::parse("cluster", "redis://user:pw@seed:7000", Some(8), 0, 1).unwrap();
        let n = s.node_info("10.0.0.2:7001", redis::ProtocolVersion::RESP3);
        assert_eq!(n.addr().to_string(), "10.0.0.2:7001");
        assert_eq!(n.redis_settings().username(), Some("user"));
        assert_eq!(n.redis_settings().password(), Some("pw"));
        assert_eq!(n.redis_settings().protocol(), redis::ProtocolVersion::RESP3);
    }

    #[test]
    fn credentials_and_tls_settings_are_checked() {
        let parse = |mode: &str, url: &str, access: Access| {
            RedisSettings::parse(mode, url, None, 0, 500)
                .unwrap()
                .with_access(access)
        };
        let access = || Access {
            sentinel_master: "mymaster".into(),
            ..Access::default()
        };
        let user = Access {
            username: Some("chat".into()),
            password: Some("pw".into()),
            ..access()
        };
        let s = parse("single", "redis://old:secret@a:1", user.clone()).unwrap();
        assert_eq!(s.data.redis_settings().username(), Some("chat"));
        assert_eq!(s.data.redis_settings().password(), Some("pw"));
        // Behind Sentinel the primary gets the ACL user, the sentinels their own password.
        let sentinels = Access {
            sentinel_password: Some("spw".into()),
            ..user
        };
        let s = parse("sentinel", "redis://s1:26379,redis://s2:26379", sentinels).unwrap();
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nodes[1].redis_settings().password(), Some("spw"));
        assert_eq!(s.nodes[1].redis_settings().username(), None);
        let primary = s.node_info("10.0.0.9:6379", ProtocolVersion::RESP3);
        assert_eq!(primary.redis_settings().username(), Some("chat"));
        assert_eq!(primary.redis_settings().password(), Some("pw"));

        let tls = Access {
            tls: Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            }),
            ..access()
        };
        let e = parse("single", "redis://a:1", tls).unwrap_err();
        assert!(e.contains("is not rediss://"), "{e}");
        let junk = std::env::temp_dir().join(format!("chat-ca-junk-{}", std::process::id()));
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = tls_certificates(Some(&junk), None, None).unwrap_err();
        assert!(
            e.contains("CHAT_REDIS_CA_FILE") && e.contains("no PEM"),
            "{e}"
        );
        std::fs::remove_file(&junk).unwrap();
        let e =
            RedisSettings::parse("cluster", "rediss://a:1,redis://b:2", None, 0, 500).unwrap_err();
        assert!(e.contains("mixes"), "{e}");
        let spw = Access {
            sentinel_password: Some("x".into()),
            ..access()
        };
        let e = parse("single", "redis://a:1", spw).unwrap_err();
        assert!(e.contains("CHAT_REDIS_SENTINEL_PASSWORD"), "{e}");
        let e = tls_certificates(None, Some(Path::new("/nonexistent")), None).unwrap_err();
        assert!(e.contains("without CHAT_REDIS_KEY_FILE"), "{e}");
        let e = tls_certificates(Some(Path::new("/nonexistent/ca.pem")), None, None).unwrap_err();
        assert!(
            e.contains("cannot read CHAT_REDIS_CA_FILE /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
