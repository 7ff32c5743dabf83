//! Connections to Redis for both binaries, made from [`RedisSettings`]:
//!
//! - [`RedisSettings::connect`]: the command connection ([`Redis`]): multiplexed, reconnecting
//!   by itself; on a cluster it follows `MOVED`/`ASK` redirections and topology changes
//!   (failovers, slot migrations); with Sentinel it follows the primary
//!   ([`crate::sentinel`]).
//! - [`Redis::primaries`]: which primary serves which slots (one primary owning every slot
//!   when single).
//! - [`Redis::wait_replicas`]: `WAIT` on the primary that owns a key, over the connection
//!   that wrote it.
//!
//! Keys are laid out by [`crate::partitions`], so that everything one script touches is in
//! one hash slot.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, ProtocolVersion, RedisFuture};
use redis::{RedisError, RedisResult, Value};

use crate::redis_settings::{Mode, RedisSettings};

impl RedisSettings {
    /// The command connection.
    pub async fn connect(&self) -> RedisResult<Redis> {
        self.connect_with(self.timeout).await
    }

    /// The command connection, with replies allowed to take `response` (a consumer's reads).
    pub async fn connect_with(&self, response: Duration) -> RedisResult<Redis> {
        match self.mode {
            // RESP3: a lost connection is noticed (and reconnected) at once, not by the first
            // command that fails on it.
            Mode::Single => {
                let info = self.nodes[0].clone();
                let resp3 = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                let client = redis::Client::open(info.set_redis_settings(resp3))?;
                // Reconnects in the background until Redis is back (never gives up: the first
                // command after a long outage would fail otherwise); commands meanwhile wait
                // for it within their own deadline.
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(response))
                    .set_connection_timeout(Some(self.timeout))
                    .set_number_of_retries(usize::MAX)
                    .set_max_delay(Duration::from_secs(1));
                match tokio::time::timeout(
                    self.timeout,
                    client.get_connection_manager_with_config(config),
                )
                .await
                {
                    Ok(conn) => Ok(Redis::Single(conn?)),
                    // The manager retries whatever fails: one plain attempt tells why (a TLS
                    // or credentials error says more than a timeout).
                    Err(_) => {
                        let plain = redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(self.timeout))
                            .set_response_timeout(Some(self.timeout));
                        client
                            .get_multiplexed_async_connection_with_config(&plain)
                            .await?;
                        Err(timed_out("connecting"))
                    }
                }
            }
            Mode::Cluster => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(self.nodes.clone());
                if let Some(certs) = &self.tls {
                    builder = builder.certs(certs.clone());
                }
                let client = builder
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(self.timeout)
                    .response_timeout(response)
                    .retries(6)
                    .min_retry_wait(50)
                    .max_retry_wait(1000)
                    .build()?;
                let conn = tokio::time::timeout(self.timeout, client.get_async_connection())
                    .await
                    .map_err(|_| timed_out("connecting"))??;
                Ok(Redis::Cluster(conn))
            }
            Mode::Sentinel => Ok(Redis::Sentinel(
                crate::sentinel::PrimaryConnection::connect(self.clone(), response).await?,
            )),
        }
    }
}

fn timed_out(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("redis: {what} timed out"),
    ))
}

/// Which slots a primary serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Primary {
    /// `host:port`.
    pub addr: String,
    /// Inclusive slot ranges.
    pub slots: Vec<(u16, u16)>,
}

impl Primary {
    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its `{hash tag}` (the whole key without one),
/// modulo 16384 — as Redis computes it.
pub fn slot_of(key: &str) -> u16 {
    let key = key.as_bytes();
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &b in tagged.unwrap_or(key) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The command connection: multiplexed (cheap to clone; clones share the connection).
#[derive(Clone)]
pub enum Redis {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(crate::sentinel::PrimaryConnection),
}

impl Redis {
    /// The primaries and the slots each serves; a single primary owns every slot (behind
    /// Sentinel: the one it names now).
    pub async fn primaries(&mut self, settings: &RedisSettings) -> RedisResult<Vec<Primary>> {
        match self {
            Redis::Single(_) => Ok(vec![Primary {
                addr: settings.addr(),
                slots: vec![(0, 16383)],
            }]),
            Redis::Cluster(c) => {
                let v: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await?;
                Ok(parse_cluster_slots(&v))
            }
            Redis::Sentinel(c) => Ok(vec![Primary {
                addr: c.addr().await?,
                slots: vec![(0, 16383)],
            }]),
        }
    }

    /// `WAIT n timeout` on the primary that owns `key`, over this connection (the one whose
    /// writes it waits for). Returns how many replicas acknowledged them.
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        n: u32,
        timeout: Duration,
    ) -> RedisResult<u32> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(n).arg(timeout.as_millis() as u64);
        let v = match self {
            Redis::Single(c) => cmd.query_async::<Value>(c).await?,
            Redis::Sentinel(c) => cmd.query_async::<Value>(c).await?,
            Redis::Cluster(c) => {
                let route = redis::cluster_routing::Route::new(
                    slot_of(key),
                    redis::cluster_routing::SlotAddr::Master,
                );
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await?
            }
        };
        Ok(redis::from_redis_value(v)?)
    }

    /// `INFO replication` of the primary at `addr` (a single primary: the one there is).
    pub async fn replication_info(&mut self, addr: &str) -> RedisResult<String> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("replication");
        let v = match self {
            Redis::Single(c) => cmd.query_async::<Value>(c).await?,
            Redis::Sentinel(c) => cmd.query_async::<Value>(c).await?,
            Redis::Cluster(c) => {
                let (host, port) = addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
                    .ok_or_else(|| {
                        RedisError::from((redis::ErrorKind::Client, "bad node address"))
                    })?;
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
                )
                .await?
            }
        };
        Ok(redis::from_redis_value(v)?)
    }
}

/// `CLUSTER SLOTS` → primaries (the first node of each range), ranges merged per primary.
fn parse_cluster_slots(v: &Value) -> Vec<Primary> {
    let mut out: Vec<Primary> = Vec::new();
    let Value::Array(ranges) = v else { return out };
    for r in ranges {
        let Value::Array(parts) = r else { continue };
        let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(node))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let host = match node.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = node.get(1) else {
            continue;
        };
        let addr = format!("{host}:{port}");
        let range = (*a as u16, *b as u16);
        match out.iter_mut().find(|p| p.addr == addr) {
            Some(p) => p.slots.push(range),
            None => out.push(Primary {
                addr,
                slots: vec![range],
            }),
        }
    }
    out
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Redis::Single(c) => c.req_packed_command(cmd),
            Redis::Cluster(c) => c.req_packed_command(cmd),
            Redis::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Redis::Single(c) => c.req_packed_commands(cmd, offset, count),
            Redis::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Redis::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Redis::Single(c) => c.get_db(),
            Redis::Cluster(c) => c.get_db(),
            Redis::Sentinel(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn slots_are_the_ones_redis_computes() {
        // `CLUSTER KEYSLOT` of these keys on Redis 7.0.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("chat:{p1}:persist"), slot_of("p1"));
        assert_eq!(slot_of("p1"), 11819);
        assert_eq!(slot_of("a{}b"), 13694, "an empty tag hashes the whole key");
        assert_eq!(
            slot_of("{user1000}.following"),
            slot_of("{user1000}.followers")
        );
    }

    #[test]
    fn cluster_slots_are_read_per_primary() {
        let node = |h: &str, p: i64| {
            Value::Array(vec![Value::BulkString(h.into()), Value::Int(p), Value::Nil])
        };
        let v = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(99),
                node("a", 1),
                node("r", 9),
            ]),
            Value::Array(vec![Value::Int(100), Value::Int(16383), node("b", 2)]),
            Value::Array(vec![Value::Int(5000), Value::Int(5000), node("a", 1)]),
        ]);
        let p = parse_cluster_slots(&v);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].addr, "a:1");
        assert!(p[0].owns(50) && p[0].owns(5000) && !p[0].owns(100));
        assert!(p[1].owns(16383));
    }
}
