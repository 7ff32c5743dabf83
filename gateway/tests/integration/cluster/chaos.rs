//! Chaos on a real local cluster: 3 gateways, Redis (AOF `appendfsync always`), the history
//! service and nginx. Clients talk only through nginx under steady traffic, and behave as the
//! protocol asks a client to: on close or error they reconnect through the load balancer,
//! rejoin with `since` and the room's `epoch`, fill from history when that is not recovered,
//! and retry every unacknowledged message with the same `client_msg_id`. Faults, one after
//! another while traffic flows: `kill -9` a gateway, restart Redis, kill and restart the
//! history service, SIGTERM-drain a gateway. Afterwards every ack is checked against the
//! history API ([`check`]): nothing lost, nothing duplicated, seqs strictly increasing, and
//! every client saw every acknowledged message exactly once.
//!
//! The client and the checks are shared with the tests of Redis losing data
//! (`super::redis_loss`).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::procs::*;
use crate::support::*;

pub const ROOM: &str = "chaos";
const CLIENTS: usize = 4;
/// One message per client per tick: steady traffic well under the rate limit.
const TICK: Duration = Duration::from_millis(60);

/// What every chaos client shares with the test.
#[derive(Default)]
pub struct Shared {
    /// How many clients share it.
    pub clients: usize,
    /// Stop sending new messages (in-flight ones are still retried until acked).
    pub stop: AtomicBool,
    /// Clients whose last message is acked after `stop`.
    done_sending: AtomicUsize,
    /// Every acked message id, from every client, with its seq.
    acked: Mutex<HashMap<String, u64>>,
}

impl Shared {
    pub fn new(clients: usize) -> Arc<Shared> {
        Arc::new(Shared {
            clients,
            ..Shared::default()
        })
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }
}

/// What one client observed.
#[derive(Debug, Default)]
pub struct Tally {
    user: String,
    /// (client_msg_id, id, seq) of every ack, retries included.
    acks: Vec<(String, String, u64)>,
    /// Message id → how many times it was delivered to this client.
    seen: HashMap<String, usize>,
    /// The room's seq when this client first joined: earlier messages are history to it (a
    /// first join replays nothing), later ones it must see.
    first_seq: Option<u64>,
    /// Deliveries whose seq was not above the previous one (duplicate or out of order).
    order_violations: Vec<String>,
    /// Rejoins answered `recovered: false` (then the client filled its gap from history).
    unrecovered: usize,
    reconnects: usize,
    /// Each connection: the node, the `since` of its join, the joined seq and the events
    /// replayed (shown when the client fails).
    connections: Vec<String>,
    /// Set when the client gave up (the test fails with it).
    failure: Option<String>,
}

impl Tally {
    /// Whether this client must see the message with `seq` (it came after its first join).
    fn expects(&self, seq: u64) -> bool {
        self.first_seq.is_some_and(|first| seq > first)
    }
}

struct Pending {
    cmid: String,
    r#ref: String,
    /// Sent on the current connection and not answered yet.
    sent: bool,
    retry_at: Instant,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket through the load balancer and reads `hello`; retries while nodes come and go.
/// Returns the socket and the node that took it.
async fn connect_lb(lb: SocketAddr, user: &str, deadline: Instant) -> Result<(Ws, String), String> {
    let url = format!("ws://{lb}/ws?token={}", token(user));
    loop {
        if Instant::now() > deadline {
            return Err(format!("{user}: could not reconnect through the LB"));
        }
        if let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        {
            if let Ok(Some(Ok(Message::Text(t)))) =
                tokio::time::timeout(Duration::from_secs(3), ws.next()).await
            {
                if let Ok(v) = serde_json::from_str::<Value>(&t) {
                    if v["type"] == "hello" {
                        return Ok((ws, v["node"].as_str().unwrap_or("?").to_string()));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // reconnect backoff
    }
}

/// A client that rides out every fault; returns what it saw.
pub async fn chaos_client(lb: SocketAddr, user: String, shared: Arc<Shared>) -> Tally {
    let mut t = Tally {
        user: user.clone(),
        ..Tally::default()
    };
    let give_up = Instant::now() + Duration::from_secs(70);
    let mut last_seq = 0u64;
    let mut epoch: Option<Value> = None;
    let mut next = 0usize;
    let mut pending: Option<Pending> = None;
    let mut reported_done = false;
    let mut first = true;
    'connection: loop {
        if !first {
            t.reconnects += 1;
        }
        first = false;
        let (mut ws, node) = match connect_lb(lb, &user, give_up).await {
            Ok(c) => c,
            Err(e) => {
                t.failure = Some(e);
                return t;
            }
        };
        if let Some(p) = &mut pending {
            p.sent = false;
            p.retry_at = Instant::now();
        }
        // Join (with `since` after the first time), retrying while a backend is down.
        let mut join_ref = 0;
        'join: loop {
            join_ref += 1;
            let r = format!("join-{join_ref}");
            let mut join = json!({"type": "join", "room": ROOM, "ref": r});
            if last_seq > 0 {
                join["since"] = json!(last_seq);
            }
            if let Some(e) = &epoch {
                join["epoch"] = e.clone();
            }
            let since = last_seq;
            let mut replayed = 0;
            if ws.send(Message::text(join.to_string())).await.is_err() {
                continue 'connection;
            }
            loop {
                let f = match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(Message::Text(x)))) => serde_json::from_str::<Value>(&x).unwrap(),
                    Ok(Some(Ok(_))) => continue,
                    _ => continue 'connection,
                };
                if f["type"] == "message" {
                    record(&mut t, &mut last_seq, &f);
                    replayed += 1;
                } else if f["ref"] == json!(r) {
                    if f["type"] == "joined" {
                        let joined_seq = f["seq"].as_u64().unwrap();
                        t.first_seq.get_or_insert(joined_seq);
                        t.connections.push(format!(
                            "{node}: since {since} epoch {epoch:?}, joined at seq {joined_seq} epoch {}, \
                             {replayed} replayed, recovered {}",
                            f["epoch"], f["recovered"]
                        ));
                        if last_seq > 0 && f["recovered"] != true {
                            t.unrecovered += 1;
                            if epoch.as_ref().is_some_and(|e| *e != f["epoch"]) {
                                // Another epoch: Redis lost data, and seqs this client saw
                                // may since belong to other events. It reads the room again.
                                let first = t.first_seq.unwrap_or(0);
                                for m in history_between(lb, ROOM, first, joined_seq).await {
                                    let id = m["id"].as_str().unwrap().to_string();
                                    t.seen.entry(id).or_insert(1);
                                }
                                last_seq = joined_seq;
                            } else {
                                // What was missed is in history, up to the joined seq.
                                for m in history_between(lb, ROOM, last_seq, joined_seq).await {
                                    record(&mut t, &mut last_seq, &m);
                                }
                            }
                        }
                        epoch = Some(f["epoch"].clone());
                        break 'join;
                    }
                    if f["code"] == "unavailable" || f["code"] == "rate_limited" {
                        tokio::time::sleep(Duration::from_millis(200)).await; // backoff
                        continue 'join;
                    }
                    t.failure = Some(format!("{user}: join refused: {f}"));
                    return t;
                }
            }
        }
        let mut tick = tokio::time::interval(TICK);
        let mut leave_at: Option<Instant> = None;
        loop {
            if Instant::now() > give_up {
                let acked = shared.acked.lock().unwrap().clone();
                let missing: Vec<_> = acked
                    .iter()
                    .filter(|(id, &seq)| t.expects(seq) && !t.seen.contains_key(*id))
                    .collect();
                t.failure = Some(format!(
                    "{user}: still running at the deadline (pending {:?}, seen {} of {} acked, \
                     missing (id, seq) {missing:?}, last seq {last_seq}, connections {:?})",
                    pending.as_ref().map(|p| &p.cmid),
                    t.seen.len(),
                    acked.len(),
                    t.connections
                ));
                return t;
            }
            tokio::select! {
                _ = tick.tick() => {
                    if leave_at.is_some_and(|at| Instant::now() >= at) {
                        // told to reconnect by a draining node: go now, as a client would
                        let _ = ws.close(None).await;
                        continue 'connection;
                    }
                    if pending.is_none() && !shared.stop.load(Ordering::SeqCst) {
                        let cmid = format!("{user}-{next}");
                        pending = Some(Pending {
                            r#ref: format!("m-{cmid}"),
                            cmid,
                            sent: false,
                            retry_at: Instant::now(),
                        });
                    }
                    if let Some(p) = &mut pending {
                        if !p.sent && Instant::now() >= p.retry_at {
                            let m = json!({"type": "message", "room": ROOM, "content": p.cmid,
                                           "client_msg_id": p.cmid, "ref": p.r#ref});
                            if ws.send(Message::text(m.to_string())).await.is_err() {
                                continue 'connection;
                            }
                            p.sent = true;
                        }
                    }
                    if pending.is_none() && shared.stop.load(Ordering::SeqCst) {
                        if !reported_done {
                            reported_done = true;
                            shared.done_sending.fetch_add(1, Ordering::SeqCst);
                        }
                        if shared.done_sending.load(Ordering::SeqCst) == shared.clients {
                            let acked = shared.acked.lock().unwrap().clone();
                            if acked.iter().all(|(id, &seq)| !t.expects(seq) || t.seen.contains_key(id)) {
                                let _ = ws.close(None).await;
                                return t;
                            }
                        }
                    }
                }
                frame = ws.next() => {
                    let f: Value = match frame {
                        Some(Ok(Message::Text(x))) => serde_json::from_str(&x).unwrap(),
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => continue 'connection,
                        Some(Ok(_)) => continue,
                    };
                    match f["type"].as_str().unwrap_or("") {
                        "message" => record(&mut t, &mut last_seq, &f),
                        "reconnect" => {
                            let after = f["after_ms"].as_u64().unwrap_or(0);
                            leave_at = Some(Instant::now() + Duration::from_millis(after));
                        }
                        "ack" | "error" => {
                            let Some(p) = pending.as_mut().filter(|p| f["ref"] == json!(p.r#ref)) else {
                                continue;
                            };
                            if f["type"] == "ack" {
                                let id = f["id"].as_str().unwrap().to_string();
                                let seq = f["seq"].as_u64().unwrap();
                                t.acks.push((p.cmid.clone(), id.clone(), seq));
                                shared.acked.lock().unwrap().insert(id, seq);
                                pending = None;
                                next += 1;
                            } else if f["code"] == "unavailable" || f["code"] == "rate_limited" {
                                let wait = f["retry_after_ms"].as_u64().unwrap_or(100);
                                p.sent = false;
                                p.retry_at = Instant::now() + Duration::from_millis(wait);
                            } else {
                                t.failure = Some(format!("{user}: message refused: {f}"));
                                return t;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

fn record(t: &mut Tally, last_seq: &mut u64, f: &Value) {
    let seq = f["seq"].as_u64().unwrap();
    let id = f["id"].as_str().unwrap().to_string();
    if seq <= *last_seq {
        t.order_violations
            .push(format!("seq {seq} (id {id}) after {last_seq}"));
    } else {
        *last_seq = seq;
    }
    *t.seen.entry(id).or_default() += 1;
}

/// Waits until `shared` holds at least `n` more acks than now: traffic flows after a fault.
pub async fn progress(shared: &Shared, n: usize, what: &str) {
    let target = shared.acked_count() + n;
    let deadline = Instant::now() + Duration::from_secs(25);
    while shared.acked_count() < target {
        assert!(
            Instant::now() < deadline,
            "no progress after {what}: {} acked, wanted {target}",
            shared.acked_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("chaos: {what}: {} acked", shared.acked_count());
}

/// Every message of `room` in the history service, oldest first, paging with `after`.
pub async fn history_of(history: SocketAddr, room: &str) -> Vec<Value> {
    history_between(history, room, 0, u64::MAX).await
}

/// The messages of `room` with `after < seq <= upto`, oldest first, from the history API at
/// `addr` (a history service, or a gateway / the load balancer in front of them).
async fn history_between(addr: SocketAddr, room: &str, after: u64, upto: u64) -> Vec<Value> {
    let mut all = vec![];
    let mut after = after;
    loop {
        let r = http()
            .get(format!(
                "http://{addr}/api/rooms/{room}/messages?after={after}&limit=100"
            ))
            .bearer_auth(token("auditor"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        let msgs = page["messages"].as_array().unwrap().clone();
        let done = msgs.iter().any(|m| m["seq"].as_u64() > Some(upto));
        all.extend(
            msgs.into_iter()
                .filter(|m| m["seq"].as_u64().is_some_and(|s| s <= upto)),
        );
        match page["next_after"].as_u64() {
            Some(a) if !done => after = a,
            _ => return all,
        }
    }
}

/// What [`check`] counted.
#[derive(Debug)]
pub struct Checked {
    pub acked: usize,
    pub stored: usize,
    pub reconnects: usize,
    /// Rejoins answered `recovered: false` (filled from history).
    pub unrecovered: usize,
    /// Acknowledged messages stored under another seq than their ack's (published again).
    pub moved: usize,
    /// Clients whose messages history holds in another order than they were sent.
    pub out_of_order: usize,
}

/// The chaos tests' verdict on what the clients saw and what history holds: every
/// acknowledged message is in history exactly once, and every client saw each acknowledged
/// message after its first join exactly once, in order within an epoch (live, replayed, or
/// read from history). With `always_recovered`, no rejoin may have needed history, and every
/// message is stored with the seq of its ack, each client's in the order sent.
pub async fn check(tallies: &[Tally], history: SocketAddr, always_recovered: bool) -> Checked {
    if std::env::var_os("CHAT_TEST_DEBUG").is_some() {
        for m in history_of(history, ROOM).await {
            eprintln!("HIST {} {} {}", m["seq"], m["id"], m["content"]);
        }
        for t in tallies {
            for a in &t.acks {
                eprintln!("ACK {} {a:?}", t.user);
            }
        }
    }
    // Acks: one id per client_msg_id, however many times it was retried.
    let mut by_cmid: HashMap<String, (String, u64)> = HashMap::new();
    for t in tallies {
        assert!(t.failure.is_none(), "{:?}", t.failure);
        for (cmid, id, seq) in &t.acks {
            let first = by_cmid
                .entry(cmid.clone())
                .or_insert_with(|| (id.clone(), *seq));
            assert_eq!(first, &(id.clone(), *seq), "{cmid} acked twice differently");
        }
    }
    let acked: HashMap<String, u64> = by_cmid.values().cloned().collect();
    assert_eq!(
        acked.len(),
        by_cmid.len(),
        "distinct messages, distinct ids"
    );

    // Every client saw every acked message exactly once, in seq order (live, replayed, or
    // filled from history after a rejoin that was not recovered) — or, after a data loss,
    // once more under a new seq: a message delivered before the
    // loss whose seq went to another event, published again by its gateway or by its
    // sender's retry with the same `client_msg_id` (with `WAIT`, a message is delivered
    // before the replica confirms it, and its sender is told `unavailable`).
    for t in tallies {
        let missing: Vec<_> = acked
            .iter()
            .filter(|(id, &seq)| t.expects(seq) && !t.seen.contains_key(*id))
            .collect();
        assert!(missing.is_empty(), "{} missed {missing:?}", t.user);
        let dups: Vec<_> = t.seen.iter().filter(|(_, &n)| n > 1).collect();
        if always_recovered {
            assert!(dups.is_empty(), "{} got duplicates {dups:?}", t.user);
        }
        assert!(
            dups.iter().all(|(_, &n)| n == 2),
            "{} got a message more than twice: {dups:?}",
            t.user
        );
        assert!(
            t.order_violations.is_empty(),
            "{}: {:?}",
            t.user,
            t.order_violations
        );
        if always_recovered {
            assert_eq!(t.unrecovered, 0, "{}: a rejoin was not recovered", t.user);
        }
    }

    // History: every ack is stored with its seq; nothing twice; seqs strictly increasing.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stored = loop {
        let stored = history_of(history, ROOM).await;
        let ids: HashSet<&str> = stored.iter().filter_map(|m| m["id"].as_str()).collect();
        if acked.keys().all(|id| ids.contains(id.as_str())) || Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // the consumer catches up
    };
    let mut stored_seq: HashMap<String, u64> = HashMap::new();
    let mut cmids: HashMap<String, usize> = HashMap::new();
    let mut last = 0;
    for m in &stored {
        let seq = m["seq"].as_u64().unwrap();
        assert!(seq > last, "history seq {seq} after {last}");
        last = seq;
        stored_seq.insert(m["id"].as_str().unwrap().to_string(), seq);
        // History does not return `client_msg_id`; this test sends it as the content too.
        if let Some(c) = m["content"].as_str() {
            *cmids.entry(c.to_string()).or_default() += 1;
        }
    }
    let lost: Vec<_> = acked
        .keys()
        .filter(|id| !stored_seq.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "acked but not in history: {lost:?}");
    // Published again under another seq after Redis lost it (its seq had been taken).
    let moved = acked
        .iter()
        .filter(|(id, seq)| stored_seq.get(*id) != Some(seq))
        .count();
    // Each client's messages in history in the order it sent them.
    let out_of_order = tallies
        .iter()
        .filter(|t| {
            let seqs: Vec<u64> = t
                .acks
                .iter()
                .filter_map(|(_, id, _)| stored_seq.get(id).copied())
                .collect();
            seqs.windows(2).any(|w| w[0] > w[1])
        })
        .count();
    let dup: Vec<_> = cmids.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dup.is_empty(), "stored twice: {dup:?}");
    for cmid in by_cmid.keys() {
        assert!(cmids.contains_key(cmid), "{cmid} stored without its key");
    }
    if always_recovered {
        assert_eq!(moved, 0, "every message stored with the seq of its ack");
        assert_eq!(out_of_order, 0, "every client's messages in the order sent");
    }
    Checked {
        acked: acked.len(),
        stored: stored.len(),
        reconnects: tallies.iter().map(|t| t.reconnects).sum(),
        unrecovered: tallies.iter().map(|t| t.unrecovered).sum(),
        moved,
        out_of_order,
    }
}

#[tokio::test]
async fn faults_in_sequence_lose_and_duplicate_no_acked_message() {
    let started = std::time::Instant::now();
    let mut backend = Backend::start().await;
    let env = [("CHAT_MESSAGES_PER_S", "100"), ("CHAT_BURST", "100")];
    let mut g1 = Some(Gateway::start(&backend, "g1", &env).await);
    let g2 = Gateway::start(&backend, "g2", &env).await;
    let g3 = Gateway::start(&backend, "g3", &env).await;
    let g1_port = g1.as_ref().unwrap().addr.port();
    let lb = Nginx::start(
        &[g1.as_ref().unwrap().addr, g2.addr, g3.addr],
        backend.history.addr,
    )
    .await;
    // The room exists before the clients race to join it.
    let mut owner = Client::connect_addr(lb.addr, "owner", "/ws").await;
    owner.join(ROOM).await;
    drop(owner);

    let shared = Shared::new(CLIENTS);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(chaos_client(lb.addr, format!("c{i}"), shared.clone())))
        .collect();
    progress(&shared, 20, "steady traffic").await;

    g1.take().unwrap().sigkill().await;
    progress(&shared, 60, "kill -9 of g1").await;
    // the node comes back on its port (as a supervisor restarts it); nginx finds it again
    let _g1 = Gateway::start_on(&backend, "g1", g1_port, &env).await;

    backend.redis.restart().await;
    progress(&shared, 60, "redis restart").await;

    backend.history.kill().await;
    progress(&shared, 60, "history service down").await;
    backend.history.restart().await;
    progress(&shared, 60, "history service restarted").await;

    g2.sigterm();
    progress(&shared, 60, "drain of g2").await;
    let status = g2.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "drained node exits cleanly: {status:?}");

    shared.stop.store(true, Ordering::SeqCst);
    let mut tallies = vec![];
    for c in clients {
        tallies.push(c.await.unwrap());
    }

    let checked = check(&tallies, backend.history.addr, true).await;
    eprintln!("chaos: {checked:?}, {:?}", started.elapsed());
    assert!(checked.reconnects >= 1, "the faults did move clients");
    assert!(started.elapsed() < Duration::from_secs(90), "time budget");
}
