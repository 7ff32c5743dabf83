//! The primary behind Sentinel (`CHAT_REDIS_MODE=sentinel`): asked of the sentinels
//! (`SENTINEL get-master-addr-by-name`), checked with `ROLE` (a sentinel that has not noticed a
//! failover yet names a node that is a replica now), and asked again whenever the connection
//! to it breaks or it refuses a write (`READONLY`: it was demoted). The command that failed
//! fails (its caller retries, as after any Redis blip); the next one goes to the primary the
//! sentinels name then. Everything else follows from the primary's address: the gateway's
//! pub/sub connections and its watch of replication ids read it through
//! [`crate::redis_conn::Redis::primaries`], so a failover looks to them like the primary
//! moving (and, when the new one missed writes, like Redis losing them — see the gateway's
//! epochs).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, ProtocolVersion, RedisError, RedisFuture,
    RedisResult, Value,
};

use crate::redis_settings::RedisSettings;

/// After a failed search, commands fail at once for this long instead of asking the sentinels
/// again each (a failover takes seconds; every caller retries).
const SEARCH_PAUSE: Duration = Duration::from_millis(100);

/// A multiplexed connection to the current primary; cheap to clone (clones share it).
#[derive(Clone)]
pub struct PrimaryConnection {
    shared: Arc<Shared>,
}

struct Shared {
    settings: RedisSettings,
    /// How long a reply may take.
    response: Duration,
    current: Mutex<State>,
    /// One search at a time.
    searching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    conn: Option<Current>,
    /// When the last search failed, and why.
    failed: Option<(Instant, RedisError)>,
    next_gen: u64,
}

#[derive(Clone)]
struct Current {
    gen: u64,
    addr: String,
    conn: MultiplexedConnection,
}

impl PrimaryConnection {
    /// Finds the primary and connects to it (fails when no sentinel names a reachable one).
    pub async fn connect(settings: RedisSettings, response: Duration) -> RedisResult<Self> {
        let me = Self {
            shared: Arc::new(Shared {
                settings,
                response,
                current: Mutex::new(State::default()),
                searching: tokio::sync::Mutex::new(()),
            }),
        };
        me.current().await?;
        Ok(me)
    }

    /// `host:port` of the primary in use (found anew when the last one was lost).
    pub async fn addr(&self) -> RedisResult<String> {
        Ok(self.current().await?.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.current.lock().expect("sentinel state lock")
    }

    async fn current(&self) -> RedisResult<Current> {
        if let Some(c) = self.state().conn.clone() {
            return Ok(c);
        }
        let _one = self.shared.searching.lock().await;
        {
            let state = self.state();
            if let Some(c) = state.conn.clone() {
                return Ok(c);
            }
            if let Some((at, e)) = &state.failed {
                if at.elapsed() < SEARCH_PAUSE {
                    return Err(e.clone());
                }
            }
        }
        let found = find(&self.shared.settings, self.shared.response).await;
        let mut state = self.state();
        match found {
            Ok((addr, conn)) => {
                state.next_gen += 1;
                let c = Current {
                    gen: state.next_gen,
                    addr,
                    conn,
                };
                tracing::info!(primary = %c.addr, "redis primary found through sentinel");
                state.conn = Some(c.clone());
                state.failed = None;
                Ok(c)
            }
            Err(e) => {
                state.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// After `e` on connection `gen`: is the primary to be searched for again?
    fn check(&self, gen: u64, e: &RedisError) {
        let lost = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
            || e.code() == Some("READONLY");
        if !lost {
            return;
        }
        let mut state = self.state();
        if state.conn.as_ref().is_some_and(|c| c.gen == gen) {
            tracing::warn!(error = %e, "redis primary lost; asking the sentinels again");
            state.conn = None;
        }
    }
}

impl ConnectionLike for PrimaryConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut c = self.current().await?;
            let r = c.conn.req_packed_command(cmd).await;
            if let Err(e) = &r {
                self.check(c.gen, e);
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut c = self.current().await?;
            let r = c.conn.req_packed_commands(cmd, offset, count).await;
            if let Err(e) = &r {
                self.check(c.gen, e);
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.settings.data.redis_settings().db()
    }
}

/// Asks each sentinel in turn for the primary, until one names a node that says it is one.
async fn find(
    settings: &RedisSettings,
    response: Duration,
) -> RedisResult<(String, MultiplexedConnection)> {
    let config = |response| {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(response))
    };
    let mut last = RedisError::from((ErrorKind::Io, "no sentinel configured"));
    for sentinel in &settings.nodes {
        let named = async {
            let mut s = redis::Client::open(sentinel.clone())?
                .get_multiplexed_async_connection_with_config(&config(settings.timeout))
                .await?;
            let (host, port): (String, u16) = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&settings.sentinel_master)
                .query_async::<Option<(String, u16)>>(&mut s)
                .await?
                .ok_or_else(|| {
                    RedisError::from((
                        ErrorKind::Client,
                        "the sentinel does not know CHAT_REDIS_SENTINEL_MASTER",
                        settings.sentinel_master.clone(),
                    ))
                })?;
            let addr = format!("{host}:{port}");
            let info = settings.node_info(&addr, ProtocolVersion::RESP3);
            let mut conn = redis::Client::open(info)?
                .get_multiplexed_async_connection_with_config(&config(response))
                .await?;
            let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
            match role.first() {
                Some(Value::BulkString(r)) if r == b"master" => Ok((addr, conn)),
                Some(Value::SimpleString(r)) if r == "master" => Ok((addr, conn)),
                _ => Err(RedisError::from((
                    ErrorKind::Client,
                    "the node the sentinel names is not a primary (yet)",
                    addr,
                ))),
            }
        };
        match tokio::time::timeout(settings.timeout * 2, named).await {
            Ok(Ok(found)) => return Ok(found),
            Ok(Err(e)) => {
                tracing::debug!(sentinel = %sentinel.addr(), error = %e, "sentinel gave no primary");
                last = e;
            }
            Err(_) => {
                last = RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("sentinel {} timed out", sentinel.addr()),
                ));
            }
        }
    }
    Err(last)
}
