//! Connecting to a target and the two wire dialects the generator speaks: the chat protocol
//! (docs/protocol.md: `hello`, `join`/`joined`, `message`) and a minimal Engine.IO v4 / Socket.IO
//! framing over the websocket transport (`0{..}` open, `40` connect, `42[..]` events, `2`/`3`
//! ping/pong) for the Socket.IO peer under `loadtest/peers/socketio/`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// How long one handshake step (TCP + upgrade, `hello`, `joined`) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The chat gateway (directly or through nginx).
    Chat,
    /// The Socket.IO 4 peer (loadtest/peers/socketio).
    Socketio,
}

/// Where to connect: a loopback `host:port` and an optional path prefix.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub host_port: String,
    pub prefix: String,
}

impl Endpoint {
    /// Parses `ws://127.0.0.1:8080[/prefix]` (or `http://`); refuses anything not on loopback:
    /// the generator is a tool for this machine's servers only.
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| anyhow!("--url must start with ws:// or http:// (got {url})"))?;
        let (host_port, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let host = host_port
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(host_port);
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            bail!("--url must point at loopback (127.0.0.1/localhost), got {host}");
        }
        Ok(Self {
            host_port: host_port.to_string(),
            prefix: prefix.to_string(),
        })
    }

    pub fn http_base(&self) -> String {
        format!("http://{}{}", self.host_port, self.prefix)
    }
}

/// Where client tokens come from.
#[derive(Clone)]
pub enum Tokens {
    /// HS256-signed locally with the server's secret.
    Secret(Vec<u8>),
    /// `POST /api/dev/token` (servers running on their built-in development key).
    Dev { http: reqwest::Client, url: String },
    /// The Socket.IO peer needs none.
    None,
}

impl Tokens {
    pub async fn token(&self, user: &str) -> Result<String> {
        match self {
            Tokens::Secret(s) => Ok(proto::auth::sign_hs256(
                s,
                &proto::auth::claims(user, user, 6 * 3600),
            )),
            Tokens::Dev { http, url } => {
                let v: serde_json::Value = http
                    .post(url)
                    .json(&serde_json::json!({ "name": user }))
                    .send()
                    .await
                    .context("POST /api/dev/token")?
                    .error_for_status()
                    .context("POST /api/dev/token (is the server on its dev key? else pass --jwt-secret)")?
                    .json()
                    .await?;
                v["token"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("no token in /api/dev/token answer"))
            }
            Tokens::None => Ok(String::new()),
        }
    }
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: the idle mode holds 10k+ sockets in this process too.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// Opens a websocket and completes the target's handshake (chat: `hello`; Socket.IO: open +
/// namespace connect).
pub async fn open(target: Target, ep: &Endpoint, token: &str) -> Result<Ws> {
    let path = match target {
        Target::Chat => format!("{}/ws?token={token}", ep.prefix),
        Target::Socketio => format!("{}/socket.io/?EIO=4&transport=websocket", ep.prefix),
    };
    let fut = async {
        let tcp = TcpStream::connect(&ep.host_port).await?;
        tcp.set_nodelay(true)?;
        let url = format!("ws://{}{}", ep.host_port, path);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, tcp, Some(ws_config())).await?;
        anyhow::Ok(ws)
    };
    let mut ws = tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("connect timed out"))??;
    match target {
        Target::Chat => {
            wait_for(&mut ws, target, |t| t.contains("\"type\":\"hello\"")).await?;
        }
        Target::Socketio => {
            wait_for(&mut ws, target, |t| t.starts_with('0')).await?;
            ws.send(Message::text("40")).await?;
            wait_for(&mut ws, target, |t| t.starts_with("40")).await?;
        }
    }
    Ok(ws)
}

/// Joins a room and waits for the answer (`joined`; Socket.IO peer: the `joined` event).
pub async fn join(ws: &mut Ws, target: Target, room: &str) -> Result<()> {
    match target {
        Target::Chat => {
            let cmd = serde_json::json!({"type": "join", "room": room, "ref": "j"});
            ws.send(Message::text(cmd.to_string())).await?;
            wait_for(ws, target, |t| t.contains("\"type\":\"joined\"")).await
        }
        Target::Socketio => {
            ws.send(Message::text(format!("42[\"join\",\"{room}\"]")))
                .await?;
            wait_for(ws, target, |t| t.starts_with("42[\"joined\"")).await
        }
    }
}

/// The frame that posts `content` to `room`.
pub fn message_frame(target: Target, room: &str, content: &str) -> String {
    match target {
        Target::Chat => format!(r#"{{"type":"message","room":"{room}","content":"{content}"}}"#),
        Target::Socketio => {
            format!(r#"42["message",{{"room":"{room}","content":"{content}"}}]"#)
        }
    }
}

/// Reads until a text frame satisfies `done`; a chat `error` frame or a close fails.
async fn wait_for(ws: &mut Ws, target: Target, done: impl Fn(&str) -> bool) -> Result<()> {
    let fut = async {
        while let Some(m) = ws.next().await {
            match m? {
                Message::Text(t) => {
                    if done(&t) {
                        return Ok(());
                    }
                    if target == Target::Chat && t.contains("\"type\":\"error\"") {
                        bail!("server error: {}", t.as_str());
                    }
                    if target == Target::Socketio && t.as_str() == "2" {
                        ws.send(Message::text("3")).await?;
                    }
                }
                Message::Close(c) => bail!("closed by server: {c:?}"),
                _ => {}
            }
        }
        bail!("connection ended")
    };
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("timed out waiting for the server"))?
}
