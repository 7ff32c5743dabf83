//! What the servers under test spent during a measurement, sampled before and after it and
//! reported as deltas per unit of work (per message, per delivery, per connection):
//! - CPU time and RSS of each process (`--server-pid NAME=PID`), from `/proc`; summed by role
//!   (the name without its trailing digits: `gw1` and `gw2` are the role `gw`);
//! - Redis `INFO commandstats` (`--redis-url`): calls and µs spent in commands;
//! - the counters of Prometheus `/metrics` endpoints (`--metrics-url NAME=URL`): every
//!   `*_total`, `*_count` and `*_sum` series that moved.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::client::Endpoint;
use crate::Common;

/// How long one Redis or `/metrics` probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `INFO commandstats` reply read (a few hundred commands at most).
const MAX_INFO_BYTES: usize = 1 << 20;

/// A name in reports: 1-64 characters.
fn checked_name(name: &str) -> Result<String, String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("a name must be 1-64 characters, got {name:?}"));
    }
    Ok(name.to_string())
}

/// A named server process: `NAME=PID`, or a bare `PID` (named by its pid).
#[derive(Clone, Debug)]
pub struct ServerProc {
    pub name: String,
    pub pid: u32,
}

impl FromStr for ServerProc {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, pid) = s.split_once('=').unwrap_or((s, s));
        let pid = pid
            .trim()
            .parse()
            .map_err(|_| format!("expected NAME=PID or PID, got {s:?}"))?;
        Ok(Self {
            name: checked_name(name)?,
            pid,
        })
    }
}

/// A named Prometheus endpoint: `NAME=URL`, or a bare URL (named `metrics`).
#[derive(Clone, Debug)]
pub struct MetricsUrl {
    pub name: String,
    pub url: String,
}

impl FromStr for MetricsUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, url) = match s.split_once('=') {
            Some((n, u)) if !n.contains('/') => (n, u),
            _ => ("metrics", s),
        };
        let ep = Endpoint::parse(url).map_err(|e| format!("--metrics-url: {e}"))?;
        Ok(Self {
            name: checked_name(name)?,
            url: ep.http_base(),
        })
    }
}

/// CPU time (utime + stime) and RSS of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub cpu_us: u64,
    pub rss_kb: u64,
}

fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// Samples `/proc/<pid>` (`"self"` for the generator).
pub fn sample(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_us: ticks * 1_000_000 / clk_tck(),
        rss_kb,
    })
}

/// Samples every process; a missing one is `None`.
pub fn sample_all(procs: &[ServerProc]) -> Vec<Option<ProcSample>> {
    procs.iter().map(|p| sample(&p.pid.to_string())).collect()
}

/// Calls and µs per Redis command.
type CommandStats = BTreeMap<String, (u64, u64)>;
/// Counter values per series.
type Counters = BTreeMap<String, f64>;

/// Everything sampled at one instant.
pub struct Snapshot {
    at: Instant,
    procs: Vec<Option<ProcSample>>,
    redis: Option<Result<CommandStats, String>>,
    metrics: Vec<Result<Counters, String>>,
}

/// The servers under test, as the command line names them.
pub struct Probes {
    procs: Vec<ServerProc>,
    redis: Option<String>,
    metrics: Vec<MetricsUrl>,
    http: reqwest::Client,
}

impl Probes {
    /// Checks that the Redis and `/metrics` endpoints answer, so that a wrong address fails
    /// the run at once instead of leaving holes in its report.
    pub async fn new(common: &Common) -> Result<Self> {
        let redis = match &common.redis_url {
            Some(u) => {
                let rest = u
                    .strip_prefix("redis://")
                    .ok_or_else(|| anyhow!("--redis-url must start with redis:// (got {u})"))?;
                Some(Endpoint::parse(&format!("http://{rest}"))?.host_port)
            }
            None => None,
        };
        let probes = Self {
            procs: common.server_pid.clone(),
            redis,
            metrics: common.metrics_url.clone(),
            http: reqwest::Client::builder().timeout(PROBE_TIMEOUT).build()?,
        };
        if let Some(addr) = &probes.redis {
            commandstats(addr)
                .await
                .with_context(|| format!("--redis-url: INFO commandstats from {addr}"))?;
        }
        for m in &probes.metrics {
            probes
                .counters(&m.url)
                .await
                .with_context(|| format!("--metrics-url {}: GET {}", m.name, m.url))?;
        }
        Ok(probes)
    }

    pub async fn snapshot(&self) -> Snapshot {
        let redis = match &self.redis {
            Some(addr) => Some(commandstats(addr).await.map_err(|e| format!("{e:#}"))),
            None => None,
        };
        let mut metrics = Vec::with_capacity(self.metrics.len());
        for m in &self.metrics {
            metrics.push(self.counters(&m.url).await.map_err(|e| format!("{e:#}")));
        }
        Snapshot {
            at: Instant::now(),
            procs: sample_all(&self.procs),
            redis,
            metrics,
        }
    }

    async fn counters(&self, url: &str) -> Result<Counters> {
        let text = self
            .http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(parse_counters(&text))
    }

    /// The deltas between two snapshots, per unit of work: `units` names each count
    /// (`("message", sent)` gives `cpu_us_per_message`, `calls_per_message`, …). Returns the
    /// keys `server_cpu`, and `redis` and `metrics` when those are probed.
    pub fn report(
        &self,
        before: &Snapshot,
        after: &Snapshot,
        units: &[(&str, u64)],
    ) -> Map<String, Value> {
        let mut out = Map::new();
        let window = after.at.duration_since(before.at);
        out.insert(
            "server_cpu".into(),
            cpu_report(&self.procs, &before.procs, &after.procs, window, units),
        );
        if let (Some(b), Some(a)) = (&before.redis, &after.redis) {
            let r = delta(b, a, |b, a| redis_report(b, a, units));
            out.insert("redis".into(), r);
        }
        if !self.metrics.is_empty() {
            let mut all = Map::new();
            for ((m, b), a) in self.metrics.iter().zip(&before.metrics).zip(&after.metrics) {
                let r = delta(b, a, |b, a| metrics_report(b, a, units));
                all.insert(m.name.clone(), r);
            }
            out.insert("metrics".into(), Value::Object(all));
        }
        out
    }
}

/// `value / count`, rounded to 2 decimals; `None` without work.
fn per(value: f64, count: u64) -> Option<f64> {
    (count > 0).then(|| (value / count as f64 * 100.0).round() / 100.0)
}

/// Adds `<prefix>_per_<unit>` for each unit.
fn add_per(o: &mut Map<String, Value>, prefix: &str, value: f64, units: &[(&str, u64)]) {
    for (unit, count) in units {
        o.insert(format!("{prefix}_per_{unit}"), json!(per(value, *count)));
    }
}

/// The role of a process: its name without trailing digits (`gw1` → `gw`).
fn role(name: &str) -> &str {
    let r = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if r.is_empty() {
        name
    } else {
        r
    }
}

/// CPU of each process and role between two samples taken `window` apart, per unit of work.
pub fn cpu_report(
    procs: &[ServerProc],
    before: &[Option<ProcSample>],
    after: &[Option<ProcSample>],
    window: Duration,
    units: &[(&str, u64)],
) -> Value {
    let window_us = window.as_micros().max(1) as f64;
    let pct = |us: u64| (us as f64 / window_us * 1000.0).round() / 10.0;
    let entry = |us: u64| {
        let mut o = Map::new();
        o.insert("cpu_us".into(), json!(us));
        o.insert("cpu_pct".into(), json!(pct(us)));
        add_per(&mut o, "cpu_us", us as f64, units);
        o
    };
    let mut processes = Map::new();
    let mut roles: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total = 0u64;
    for ((p, b), a) in procs.iter().zip(before).zip(after) {
        if let (Some(b), Some(a)) = (b, a) {
            let us = a.cpu_us.saturating_sub(b.cpu_us);
            total += us;
            *roles.entry(role(&p.name)).or_default() += us;
            let mut o = entry(us);
            o.insert("pid".into(), json!(p.pid));
            o.insert("rss_kb_after".into(), json!(a.rss_kb));
            processes.insert(p.name.clone(), Value::Object(o));
        }
    }
    let mut out = entry(total);
    out.insert("window_s".into(), json!((window_us / 1e5).round() / 10.0));
    out.insert("processes".into(), Value::Object(processes));
    out.insert(
        "roles".into(),
        Value::Object(
            roles
                .into_iter()
                .map(|(r, us)| (r.to_string(), Value::Object(entry(us))))
                .collect(),
        ),
    );
    // The names bench.sh and older results use.
    out.insert("total_cpu_us".into(), json!(total));
    Value::Object(out)
}

/// `f` of two samples, or the error that kept one of them from being taken.
fn delta<T>(
    before: &Result<T, String>,
    after: &Result<T, String>,
    f: impl FnOnce(&T, &T) -> Value,
) -> Value {
    match (before, after) {
        (Ok(b), Ok(a)) => f(b, a),
        (Err(e), _) | (_, Err(e)) => json!({ "error": e }),
    }
}

/// Calls and µs, in total and per unit.
fn calls_entry(calls: u64, usec: u64, units: &[(&str, u64)]) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("calls".into(), json!(calls));
    o.insert("usec".into(), json!(usec));
    add_per(&mut o, "calls", calls as f64, units);
    add_per(&mut o, "usec", usec as f64, units);
    o
}

fn redis_report(b: &CommandStats, a: &CommandStats, units: &[(&str, u64)]) -> Value {
    let mut commands = Map::new();
    let (mut calls, mut usec) = (0u64, 0u64);
    for (cmd, (ac, au)) in a {
        // The generator's own INFO calls are not the servers' work.
        if cmd == "info" {
            continue;
        }
        let (bc, bu) = b.get(cmd).copied().unwrap_or((0, 0));
        let (dc, du) = (ac.saturating_sub(bc), au.saturating_sub(bu));
        if dc == 0 {
            continue;
        }
        calls += dc;
        usec += du;
        commands.insert(cmd.clone(), Value::Object(calls_entry(dc, du, units)));
    }
    let mut out = calls_entry(calls, usec, units);
    out.insert("commands".into(), Value::Object(commands));
    Value::Object(out)
}

fn metrics_report(b: &Counters, a: &Counters, units: &[(&str, u64)]) -> Value {
    let mut out = Map::new();
    for (series, av) in a {
        let d = av - b.get(series).copied().unwrap_or(0.0);
        if d == 0.0 {
            continue;
        }
        let mut o = Map::new();
        o.insert("delta".into(), json!((d * 1e6).round() / 1e6));
        for (unit, count) in units {
            let v = (*count > 0).then(|| ((d / *count as f64) * 1e6).round() / 1e6);
            o.insert(format!("per_{unit}"), json!(v));
        }
        out.insert(series.clone(), Value::Object(o));
    }
    Value::Object(out)
}

/// Every `*_total`, `*_count` and `*_sum` series of a Prometheus text exposition.
fn parse_counters(text: &str) -> Counters {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.trim().rsplit_once(' ')?;
            let name = series.split('{').next()?;
            let counter = ["_total", "_count", "_sum"]
                .iter()
                .any(|s| name.ends_with(s));
            Some((series.to_string(), value.parse().ok()?)).filter(|_| counter)
        })
        .collect()
}

/// `INFO commandstats` over a plain connection (an inline command; the reply is one bulk
/// string of `cmdstat_<name>:calls=N,usec=N,…` lines).
async fn commandstats(addr: &str) -> Result<CommandStats> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"INFO commandstats\r\n").await?;
        let mut buf = Vec::with_capacity(8192);
        loop {
            if let Some(reply) = bulk_reply(&buf)? {
                return Ok(parse_commandstats(reply));
            }
            if buf.len() > MAX_INFO_BYTES {
                bail!("INFO reply larger than {MAX_INFO_BYTES} bytes");
            }
            if s.read_buf(&mut buf).await? == 0 {
                bail!("redis closed the connection mid-reply");
            }
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("no answer within {PROBE_TIMEOUT:?}"))?
}

/// The payload of a complete RESP bulk string reply, `None` while incomplete.
fn bulk_reply(buf: &[u8]) -> Result<Option<&str>> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..eol])?;
    let len: usize = match head.strip_prefix('$') {
        Some(n) => n
            .parse()
            .with_context(|| format!("bad bulk length {head:?}"))?,
        None => bail!("redis answered {head:?}"),
    };
    let body = &buf[eol + 2..];
    if body.len() < len {
        return Ok(None);
    }
    Ok(Some(std::str::from_utf8(&body[..len])?))
}

fn parse_commandstats(info: &str) -> CommandStats {
    info.lines()
        .filter_map(|l| {
            let (cmd, fields) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |k: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
            };
            Some((cmd.to_string(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_names_and_roles() {
        let p: ServerProc = "gw2=1234".parse().unwrap();
        assert_eq!((p.name.as_str(), p.pid, role(&p.name)), ("gw2", 1234, "gw"));
        let bare: ServerProc = "77".parse().unwrap();
        assert_eq!((bare.name.as_str(), role(&bare.name)), ("77", "77"));
        assert!("gw=abc".parse::<ServerProc>().is_err());
        assert!("=12".parse::<ServerProc>().is_err());
    }

    #[test]
    fn metrics_urls_are_named_and_loopback_only() {
        let m: MetricsUrl = "history=http://127.0.0.1:18090/metrics".parse().unwrap();
        assert_eq!(
            (m.name.as_str(), m.url.as_str()),
            ("history", "http://127.0.0.1:18090/metrics")
        );
        let bare: MetricsUrl = "http://127.0.0.1:9/metrics".parse().unwrap();
        assert_eq!(bare.name, "metrics");
        assert!("h=http://10.0.0.1:9/metrics".parse::<MetricsUrl>().is_err());
    }

    #[test]
    fn commandstats_reply_is_parsed_when_complete() {
        let body = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=250,usec_per_call=25.00,rejected_calls=0,failed_calls=0\r\ncmdstat_client|setname:calls=2,usec=3,usec_per_call=1.5\r\n";
        let reply = format!("${}\r\n{body}\r\n", body.len());
        assert_eq!(bulk_reply(&reply.as_bytes()[..20]).unwrap(), None);
        let stats = parse_commandstats(bulk_reply(reply.as_bytes()).unwrap().unwrap());
        assert_eq!(stats["evalsha"], (10, 250));
        assert_eq!(stats["client|setname"], (2, 3));
        assert!(bulk_reply(b"-ERR unknown\r\n").is_err());
    }

    #[test]
    fn only_counters_are_kept_and_deltas_are_per_unit() {
        let before = parse_counters(
            "# TYPE chat_store_batch_seconds summary\nchat_store_batch_seconds{quantile=\"0.5\"} 0.001\nchat_store_batch_seconds_count 4\nchat_stream_entries_total 10\nchat_stream_lag 3\n",
        );
        assert!(!before.contains_key("chat_stream_lag"));
        assert!(!before.contains_key("chat_store_batch_seconds{quantile=\"0.5\"}"));
        let after =
            parse_counters("chat_store_batch_seconds_count 14\nchat_stream_entries_total 110\n");
        let r = metrics_report(&before, &after, &[("message", 100)]);
        assert_eq!(r["chat_store_batch_seconds_count"]["delta"], json!(10.0));
        assert_eq!(
            r["chat_store_batch_seconds_count"]["per_message"],
            json!(0.1)
        );
        assert_eq!(r["chat_stream_entries_total"]["per_message"], json!(1.0));
    }

    #[test]
    fn redis_deltas_leave_out_the_probes_own_info_calls() {
        let b: CommandStats = [("publish".into(), (5, 50)), ("info".into(), (1, 9))].into();
        let a: CommandStats = [
            ("publish".into(), (105, 1050)),
            ("info".into(), (2, 18)),
            ("evalsha".into(), (100, 3000)),
        ]
        .into();
        let r = redis_report(&b, &a, &[("message", 100)]);
        assert_eq!(r["calls"], json!(200));
        assert_eq!(r["usec_per_message"], json!(40.0));
        assert_eq!(r["commands"]["publish"]["calls_per_message"], json!(1.0));
        assert!(r["commands"].get("info").is_none());
        let failed = delta(&Ok(b), &Err("refused".to_string()), |_, _| json!({}));
        assert_eq!(failed["error"], json!("refused"));
    }

    #[test]
    fn cpu_is_reported_per_process_role_and_unit() {
        let procs: Vec<ServerProc> = ["gw1=1", "gw2=2", "redis=3"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let s = |us| {
            Some(ProcSample {
                cpu_us: us,
                rss_kb: 1,
            })
        };
        let r = cpu_report(
            &procs,
            &[s(0), s(0), s(0)],
            &[s(300_000), s(100_000), s(100_000)],
            Duration::from_secs(1),
            &[("message", 1000), ("delivery", 4000)],
        );
        assert_eq!(r["roles"]["gw"]["cpu_us"], json!(400_000));
        assert_eq!(r["roles"]["gw"]["cpu_pct"], json!(40.0));
        assert_eq!(r["roles"]["gw"]["cpu_us_per_message"], json!(400.0));
        assert_eq!(r["processes"]["redis"]["cpu_us_per_delivery"], json!(25.0));
        assert_eq!(r["cpu_us_per_delivery"], json!(125.0));
        assert_eq!(r["total_cpu_us"], json!(500_000));
    }
}
