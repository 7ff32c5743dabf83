//! Where the store connects and how the driver behaves: the `scylla://` URL
//! ([`ScyllaConfig`]), the settings that are not part of it ([`DriverSettings`]: local
//! datacenter, TLS, request timeout) and the session built from both.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::{SslConnector, SslFiletype, SslMethod};
use scylla::client::execution_profile::{ExecutionProfile, ExecutionProfileHandle};
use scylla::client::session::{OpenSsl010Config, Session};
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::speculative_execution::SimpleSpeculativeExecutionPolicy;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::statement::{Consistency, SerialConsistency};

use crate::store::StoreError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default client-side request timeout. ScyllaDB's own timeouts are 2 s (writes), 5 s
/// (reads, counter writes) and 10 s (`range_request_timeout_in_ms`: scans such as the room
/// listing); the client must wait longer than the server, or it gives up on requests the
/// server would still answer (with a proper timeout error the retry policy understands).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(12);
/// A read that has not answered after this long is sent to a second replica too (reads only:
/// they are idempotent, and a duplicate costs one read). Well above a healthy LOCAL_QUORUM
/// read (single-digit milliseconds), so it only fires on a stalled replica.
const SPECULATIVE_DELAY: Duration = Duration::from_millis(100);

/// A parsed `scylla://[user:password@]host[:port][,host2[:port]]/keyspace` URL, plus the
/// driver settings (defaults unless [`ScyllaConfig::with_driver`] sets them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScyllaConfig {
    /// `host:port` of the contact points (port defaults to 9042).
    pub nodes: Vec<String>,
    pub keyspace: String,
    pub credentials: Option<(String, String)>,
    pub driver: DriverSettings,
}

/// How the driver talks to the cluster (history-service's `CHAT_SCYLLA_*` settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverSettings {
    /// The local datacenter: requests go to its nodes only, so LOCAL_QUORUM is a quorum of
    /// this datacenter's replicas. None: every node counts as local (one datacenter).
    pub datacenter: Option<String>,
    /// TLS to the nodes; None: plaintext.
    pub tls: Option<TlsSettings>,
    /// How long the driver waits for one request (see [`DEFAULT_REQUEST_TIMEOUT`]).
    pub request_timeout: Duration,
}

/// TLS to the nodes. Node certificates are verified against the system's CAs plus
/// `ca_file`, and against the node's IP address (the driver connects to the addresses the
/// cluster announces, not to host names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// A PEM file of CA certificates to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// A PEM certificate chain and its PEM private key, for clusters that require client
    /// certificates.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl Default for DriverSettings {
    fn default() -> Self {
        Self {
            datacenter: None,
            tls: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl TlsSettings {
    /// The driver's TLS context; loading the files here reports a bad path or PEM at once.
    pub fn context(&self) -> Result<OpenSsl010Config, StoreError> {
        let bad = |what: &str, e: openssl::error::ErrorStack| {
            StoreError::Internal(format!("scylla TLS: {what}: {e}"))
        };
        // An SslConnector verifies the peer and trusts the system's CAs by default.
        let mut builder =
            SslConnector::builder(SslMethod::tls_client()).map_err(|e| bad("init", e))?;
        if let Some(ca) = &self.ca_file {
            builder
                .set_ca_file(ca)
                .map_err(|e| bad(&format!("CA file {}", ca.display()), e))?;
        }
        if let Some((cert, key)) = &self.client_cert {
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| bad(&format!("certificate {}", cert.display()), e))?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| bad(&format!("key {}", key.display()), e))?;
            builder
                .check_private_key()
                .map_err(|e| bad("the key does not match the certificate", e))?;
        }
        Ok(OpenSsl010Config::new(builder))
    }
}

/// The two execution profiles: writes, and reads (which may be speculatively executed).
#[derive(Clone)]
pub struct Profiles {
    pub writes: ExecutionProfileHandle,
    pub reads: ExecutionProfileHandle,
}

impl DriverSettings {
    /// LOCAL_QUORUM reads and writes overlap on every replica set (RF 3: any one replica may
    /// be down); LWTs use LOCAL_SERIAL so they do not cross datacenters. With a datacenter
    /// set, the load balancer only picks that datacenter's nodes (no failover to remote
    /// ones: LOCAL_QUORUM there would be a quorum of the wrong datacenter).
    pub fn profiles(&self) -> Profiles {
        let mut policy = DefaultPolicy::builder()
            .token_aware(true)
            .permit_dc_failover(false);
        if let Some(dc) = &self.datacenter {
            policy = policy.prefer_datacenter(dc.clone());
        }
        let writes = ExecutionProfile::builder()
            .consistency(Consistency::LocalQuorum)
            .serial_consistency(Some(SerialConsistency::LocalSerial))
            .request_timeout(Some(self.request_timeout))
            .load_balancing_policy(policy.build())
            .build();
        let reads = writes
            .to_builder()
            .speculative_execution_policy(Some(Arc::new(SimpleSpeculativeExecutionPolicy {
                max_retry_count: 1,
                retry_interval: SPECULATIVE_DELAY,
            })))
            .build();
        Profiles {
            writes: writes.into_handle(),
            reads: reads.into_handle(),
        }
    }
}

impl ScyllaConfig {
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::Internal(format!("bad scylla url {url:?}: {why}"));
        let rest = url
            .strip_prefix("scylla://")
            .ok_or_else(|| bad("must start with scylla://"))?;
        let (authority, keyspace) = rest
            .split_once('/')
            .ok_or_else(|| bad("missing /keyspace"))?;
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((cred, hosts)) => {
                let (u, p) = cred
                    .split_once(':')
                    .ok_or_else(|| bad("credentials must be user:password"))?;
                (Some((u.to_owned(), p.to_owned())), hosts)
            }
            None => (None, authority),
        };
        let mut nodes = Vec::new();
        for host in hosts.split(',').map(str::trim) {
            if host.is_empty() {
                return Err(bad("empty host"));
            }
            match host.rsplit_once(':') {
                Some((h, port)) if !h.is_empty() && !h.ends_with(':') => {
                    port.parse::<u16>().map_err(|_| bad("bad port"))?;
                    nodes.push(host.to_owned());
                }
                _ => nodes.push(format!("{host}:9042")),
            }
        }
        if !valid_keyspace(keyspace) {
            return Err(bad(
                "keyspace must be 1-48 characters of [a-z0-9_], starting with a letter",
            ));
        }
        Ok(Self {
            nodes,
            keyspace: keyspace.to_owned(),
            credentials,
            driver: DriverSettings::default(),
        })
    }

    pub fn with_driver(mut self, driver: DriverSettings) -> Self {
        self.driver = driver;
        self
    }

    /// A session with `profiles.writes` as its default profile. Client-side timestamps come
    /// from one monotonic generator per session, so this process's upserts and deletes of
    /// one row (members, bans) apply in the order it issued them, whatever the coordinators'
    /// clocks say. (Statements with `USING TIMESTAMP` keep their own.)
    pub async fn session(&self, profiles: &Profiles) -> Result<Session, StoreError> {
        let mut builder = SessionBuilder::new()
            .known_nodes(&self.nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .default_execution_profile_handle(profiles.writes.clone())
            .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()));
        if let Some((user, password)) = &self.credentials {
            builder = builder.user(user, password);
        }
        if let Some(tls) = &self.driver.tls {
            builder = builder.tls_context(Some(tls.context()?));
        }
        let session = builder
            .build()
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to scylla: {e}")))?;
        let datacenters: BTreeSet<String> = session
            .get_cluster_state()
            .get_nodes_info()
            .iter()
            .filter_map(|n| n.datacenter.clone())
            .collect();
        check_datacenter(self.driver.datacenter.as_deref(), &datacenters)?;
        Ok(session)
    }
}

/// A configured datacenter must exist (otherwise every request fails with the driver's
/// "empty plan"); without one, several datacenters deserve a warning: LOCAL_QUORUM would be
/// a quorum of whichever datacenter the chosen coordinator is in.
fn check_datacenter(wanted: Option<&str>, known: &BTreeSet<String>) -> Result<(), StoreError> {
    match wanted {
        Some(dc) if !known.contains(dc) => Err(StoreError::Internal(format!(
            "CHAT_SCYLLA_DATACENTER={dc}: no ScyllaDB node in that datacenter (the cluster has {known:?})"
        ))),
        None if known.len() > 1 => {
            tracing::warn!(
                datacenters = ?known,
                "several ScyllaDB datacenters and no CHAT_SCYLLA_DATACENTER: LOCAL_QUORUM is \
                 evaluated in whichever datacenter coordinates each request"
            );
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A CQL identifier we are willing to splice into statements (keyspace names cannot be bound).
fn valid_keyspace(ks: &str) -> bool {
    !ks.is_empty()
        && ks.len() <= 48
        && ks.starts_with(|c: char| c.is_ascii_lowercase())
        && ks
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_default_driver_settings() {
        let c = ScyllaConfig::parse("scylla://a:9042,b/chat").unwrap();
        assert_eq!(c.driver, DriverSettings::default());
        assert_eq!(c.driver.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        let dc = DriverSettings {
            datacenter: Some("dc1".into()),
            ..DriverSettings::default()
        };
        assert_eq!(c.with_driver(dc.clone()).driver, dc);
    }

    #[test]
    fn the_client_waits_longer_than_the_server() {
        // ScyllaDB's longest request timeout the store can hit: range scans, 10 s.
        assert!(DEFAULT_REQUEST_TIMEOUT > Duration::from_secs(10));
        let p = DriverSettings::default().profiles();
        let (writes, reads) = (p.writes.to_profile(), p.reads.to_profile());
        assert_eq!(writes.get_request_timeout(), Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(reads.get_request_timeout(), Some(DEFAULT_REQUEST_TIMEOUT));
        assert_eq!(writes.get_consistency(), Consistency::LocalQuorum);
        assert!(writes.get_speculative_execution_policy().is_none());
        assert!(reads.get_speculative_execution_policy().is_some());
    }

    #[test]
    fn a_datacenter_must_exist() {
        let known: BTreeSet<String> = ["dc1".to_owned(), "dc2".to_owned()].into();
        assert!(check_datacenter(Some("dc1"), &known).is_ok());
        let e = check_datacenter(Some("dc3"), &known).unwrap_err();
        assert!(e.to_string().contains("dc3"), "{e}");
        assert!(check_datacenter(None, &known).is_ok());
    }

    #[test]
    fn tls_files_are_checked_when_the_context_is_built() {
        assert!(TlsSettings::default().context().is_ok(), "system CAs only");
        let missing = TlsSettings {
            ca_file: Some("/nonexistent/ca.pem".into()),
            client_cert: None,
        };
        let e = missing.context().err().expect("a missing CA file fails");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
