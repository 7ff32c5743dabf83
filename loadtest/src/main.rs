//! # loadgen — a load generator for the chat gateway (and its Socket.IO peer)
//!
//! For rates k6 cannot reach on this machine. Every mode prints one JSON document on stdout.
//!
//! # Layout
//! - `client`: endpoints (loopback only), tokens (HS256 with `--jwt-secret` or
//!   `POST /api/dev/token`), the handshakes of both targets: the chat protocol and a minimal
//!   Engine.IO v4 / Socket.IO framing (`0{..}`, `40`, `42[..]`, `2`/`3`).
//! - `fanout`: `fanout` and `ramp` — rooms × members, paced senders, delivery latency from a
//!   send timestamp carried in the message content, delivered ratio, server CPU per delivery.
//! - `idle`: opening many connections with bounded concurrency; `connect` (rate, latency) and
//!   `idle` (server RSS per held connection, from `/proc/<pid>/status`).
//! - `history`: append rate and paginated history read latency.
//! - `storm`: `fill` (one room filled by every connection, then fan-out in it) and `rollout`
//!   (a gateway drained and restarted under load; clients reconnect as the web UI's does).
//! - `stats`: sharded HDR histograms and `/proc` samples.
//!
//! Everything is bounded: connection counts ([`MAX_CONNECTIONS`]), durations
//! ([`MAX_SECONDS`]), handshake steps (15 s each), and targets must be on 127.0.0.1.

mod client;
mod fanout;
mod floor;
mod history;
mod idle;
mod servers;
mod stats;
mod storm;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use client::{Endpoint, Target, Tokens};

/// Most connections one run opens (the fd limit here is 20 000; leave room for the server).
pub const MAX_CONNECTIONS: usize = 20_000;
/// Longest measurement window of one step, in seconds.
pub const MAX_SECONDS: u64 = 600;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Load generator for the chat gateway and its Socket.IO peer"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Target base URL(s), comma-separated (connections are spread round-robin): the gateway,
    /// nginx in front of a cluster, or the Socket.IO peer. Loopback only.
    #[arg(
        long,
        global = true,
        env = "LOADGEN_URL",
        default_value = "ws://127.0.0.1:8080"
    )]
    pub url: String,
    /// What speaks at the URL.
    #[arg(long, global = true, value_enum, default_value = "chat")]
    pub target: Target,
    /// HS256 secret to sign client tokens with (the server's CHAT_JWT_SECRET). Without it,
    /// tokens come from POST /api/dev/token (servers on the built-in development key).
    #[arg(
        long,
        global = true,
        env = "LOADGEN_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// Server process(es) to sample for CPU and RSS, comma-separated `NAME=PID` (or bare pids).
    /// CPU is reported per process and per role: the name without trailing digits, so `gw1`
    /// and `gw2` add up to `gw`.
    #[arg(long, global = true, value_delimiter = ',')]
    pub server_pid: Vec<servers::ServerProc>,
    /// Redis of the servers under test (`redis://127.0.0.1:PORT`, loopback): its
    /// `INFO commandstats` delta over each step is reported (calls and µs, per message).
    #[arg(long, global = true)]
    pub redis_url: Option<String>,
    /// Prometheus endpoints of the servers under test, comma-separated `NAME=URL` (loopback):
    /// the delta of every `*_total`/`*_count`/`*_sum` series over each step is reported.
    #[arg(long, global = true, value_delimiter = ',')]
    pub metrics_url: Vec<servers::MetricsUrl>,
    /// Handshakes in flight while opening connections.
    #[arg(long, global = true, default_value_t = 64)]
    pub concurrency: usize,
    /// User id prefix (users are PREFIX0, PREFIX1, …).
    #[arg(long, global = true, default_value = "lg-user-")]
    pub user_prefix: String,
    /// Worker threads of the generator's runtime (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
}

impl Common {
    pub fn endpoints(&self) -> Result<Vec<Endpoint>> {
        let eps = self
            .url
            .split(',')
            .map(|u| Endpoint::parse(u.trim()))
            .collect::<Result<Vec<_>>>()?;
        if eps.is_empty() {
            bail!("--url is empty");
        }
        Ok(eps)
    }

    pub fn tokens(&self) -> Result<Tokens> {
        Ok(match (self.target, &self.jwt_secret) {
            (Target::Socketio, _) => Tokens::None,
            (Target::Chat, Some(s)) => Tokens::Secret(s.clone().into_bytes()),
            (Target::Chat, None) => Tokens::Dev {
                http: reqwest::Client::new(),
                url: format!("{}/api/dev/token", self.endpoints()?[0].http_base()),
            },
        })
    }
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Rooms × members, senders at a fixed rate: delivery latency, delivered ratio, CPU/delivery.
    Fanout(fanout::FanoutArgs),
    /// Step the rate up until delivered < 99.9 % or p99 ≥ 100 ms; report the highest passing rate.
    Ramp(fanout::RampArgs),
    /// Open and hold idle connections; report the server's RSS growth per connection.
    Idle(idle::IdleArgs),
    /// Connect + auth + join as fast as the concurrency allows; report the rate and latency.
    Connect(idle::ConnectArgs),
    /// Append messages (closed loop) and read history pages; report rates and latencies.
    History(history::HistoryArgs),
    /// Every connection joins one room: time to fill, frames per join, CPU; then fan-out in it.
    Fill(storm::FillArgs),
    /// Drain one gateway under load and restart it: time until every client is back and
    /// joined, missed events after recovery, peak CPU.
    Rollout(storm::RolloutArgs),
    /// The machine's floor: CPU per write() of a small WebSocket frame to loopback sockets.
    Floor(floor::FloorArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.common.concurrency == 0 || cli.common.concurrency > 4096 {
        bail!("--concurrency must be 1..=4096");
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.common.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build()?;
    let out = rt.block_on(async {
        let c = &cli.common;
        match &cli.mode {
            Mode::Fanout(a) => fanout::fanout(c, a).await,
            Mode::Ramp(a) => fanout::ramp(c, a).await,
            Mode::Idle(a) => idle::idle(c, a).await,
            Mode::Connect(a) => idle::connect(c, a).await,
            Mode::History(a) => history::history(c, a).await,
            Mode::Fill(a) => storm::fill(c, a).await,
            Mode::Rollout(a) => storm::rollout(c, a).await,
            Mode::Floor(a) => floor::floor(a).await,
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    // Do not wait for lingering sockets.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
