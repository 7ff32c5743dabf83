//! Recovery under stress. Readers on every node drop their connection at random moments (in
//! the middle of a join too) and rejoin with `since` while several senders post, and new rooms
//! are created by concurrent joins meanwhile. Each reader's stream is checked as it arrives
//! against the promise of `join {since: S}` answered `recovered: true`: every stored event
//! with seq > S exactly once and in seq order (the replay before `joined`, then held and live
//! events after it); and at the end against the room's history (HTTP history API).
//!
//! Embedded mode: one node. Scaled mode (`CHAT_TEST_SCALED=1`): two gateway processes on a
//! real Redis and history service, whose Redis pub/sub connections are also cut now and then
//! (each node resubscribes, fills its gap from the rooms' windows, and closes with 1012 the
//! joins it cannot vouch for: the reader rejoins). Traffic runs `CHAT_STRESS_SECONDS`
//! (default 15), longer on a slow machine (see [`TARGET_REJOINS`]). The random choices
//! (nodes, when to drop) come from a seed, printed at the start and on failure; `CHAT_TEST_SEED=<seed>` makes the same choices again (the interleaving of
//! tasks still varies from run to run).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::procs::{Backend, Gateway};
use crate::support::*;

const ROOM: &str = "stress";
const READERS: usize = 12;
const SENDERS: usize = 4;
/// Each sender posts once per tick: 4 × 50 events/s, far inside the recovery window (1000)
/// for readers that stay away at most a few hundred milliseconds.
const SEND_EVERY: Duration = Duration::from_millis(20);
/// A reader keeps a joined connection for up to this long.
const MAX_HOLD_MS: u64 = 120;
/// One connection in four is dropped up to this long after its `join` was sent, joined or
/// not: mostly while the join is in flight.
const MAX_EARLY_DROP_MS: u64 = 40;
/// Joiners of each newly created room (besides its poster), and the messages posted in it.
const FRESH_JOINERS: usize = 4;
const FRESH_MESSAGES: usize = 3;
/// How long the last connection of a reader may take to catch up with the room.
const CATCH_UP: Duration = Duration::from_secs(30);
/// Traffic runs `CHAT_STRESS_SECONDS`, and on a slow machine up to three times as long, until
/// the readers of the main room have rejoined this many times.
const TARGET_REJOINS: usize = 1500;
/// Scaled mode: how often the gateways' Redis pub/sub connections are cut.
const CUT_EVERY: Duration = Duration::from_millis(1500);

/// The gateways under test: one in-process node, or two processes on one backend. A reader
/// reconnects dozens of times a second and its dropped connections stay counted until their
/// node has taken them out of the room, so the per-user connection limit is raised.
struct Nodes {
    addrs: Vec<SocketAddr>,
    server: Option<Server>,
    _gateways: Vec<Gateway>,
    backend: Option<Backend>,
}

impl Nodes {
    async fn start() -> Nodes {
        if scaled() {
            let backend = Backend::start().await;
            let env = [
                ("CHAT_MESSAGES_PER_S", "1000"),
                ("CHAT_BURST", "1000"),
                ("CHAT_MAX_CONNECTIONS_PER_USER", "1000"),
            ];
            let gateways = vec![
                Gateway::start(&backend, "stress-1", &env).await,
                Gateway::start(&backend, "stress-2", &env).await,
            ];
            Nodes {
                addrs: gateways.iter().map(|g| g.addr).collect(),
                server: None,
                _gateways: gateways,
                backend: Some(backend),
            }
        } else {
            let server = Server::start_with(|c| {
                c.messages_per_s = 1000;
                c.burst = 1000;
                c.max_connections_per_user = 1000;
            })
            .await;
            Nodes {
                addrs: vec![server.addr],
                server: Some(server),
                _gateways: Vec::new(),
                backend: None,
            }
        }
    }

    fn pick(&self, rng: &mut StdRng) -> SocketAddr {
        self.addrs[rng.random_range(0..self.addrs.len())]
    }

    async fn stop(self) {
        if let Some(s) = self.server {
            s.stop().await;
        }
    }
}

/// When a connection is dropped.
#[derive(Clone, Copy, Debug)]
enum Hangup {
    /// This long after `joined` arrived.
    AfterJoined(Duration),
    /// This long after `join` was sent, whether the join was answered or not.
    AfterJoin(Duration),
}

impl Hangup {
    fn random(rng: &mut StdRng) -> Hangup {
        if rng.random_bool(0.25) {
            Hangup::AfterJoin(Duration::from_millis(
                rng.random_range(0..=MAX_EARLY_DROP_MS),
            ))
        } else {
            Hangup::AfterJoined(Duration::from_millis(rng.random_range(0..=MAX_HOLD_MS)))
        }
    }
}

/// The room a frame is about: `room` is the id, or the room's settings (with `id`) in
/// `room_created`, `room_updated` and `joined`.
fn room_of(f: &Value) -> Option<&str> {
    f["room"].as_str().or_else(|| f["room"]["id"].as_str())
}

/// The seq of a stored event of `room`; None for answers, receipts and ephemeral events.
fn stored_seq(f: &Value, room: &str) -> Option<u64> {
    let answer = matches!(
        f["type"].as_str(),
        Some("joined" | "ack" | "receipt" | "error")
    );
    if answer || room_of(f) != Some(room) {
        return None;
    }
    f["seq"].as_u64().filter(|s| *s > 0)
}

/// One client following one room over many connections.
struct Reader {
    user: String,
    room: String,
    /// The last seq of the room's stream this reader has; None before its first `joined`.
    last: Option<u64>,
    /// `joined.seq` of the first join: the stream this reader must have starts after it.
    start: Option<u64>,
    /// (seq, id) of every message in the stream, as received.
    messages: Vec<(u64, String)>,
    /// Joins with `since` that were answered.
    rejoins: usize,
    /// Connections the server closed with 1012, or whose join it answered `unavailable`: both
    /// after a cut pub/sub connection, and the reader rejoins.
    retried: usize,
    /// From sending `join` to its `joined`, for each answered join.
    join_times: Vec<Duration>,
    failures: Vec<String>,
}

impl Reader {
    fn new(user: String, room: &str) -> Reader {
        Reader {
            user,
            room: room.into(),
            last: None,
            start: None,
            messages: Vec::new(),
            rejoins: 0,
            retried: 0,
            join_times: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, what: String) {
        // The first few tell the story; the rest would only bury it.
        if self.failures.len() < 10 {
            self.failures
                .push(format!("{} in {}: {what}", self.user, self.room));
        }
    }

    /// One connection: joins (with `since` once the reader has a seq), reads until `hangup`,
    /// or until the stream reaches `until`, and drops the connection without a close frame.
    async fn connection(&mut self, addr: SocketAddr, hangup: Hangup, until: Option<u64>) {
        let mut c = Client::connect_addr(addr, &self.user, "/ws").await;
        let since = self.last;
        let mut join = json!({"type": "join", "room": self.room, "ref": "j"});
        if let Some(s) = since {
            join["since"] = json!(s);
        }
        c.send(join).await;
        let sent = Instant::now();
        let mut deadline = match hangup {
            Hangup::AfterJoin(d) => sent + d,
            Hangup::AfterJoined(_) => sent + CATCH_UP,
        };
        // Stored events before `joined`: the replay, after any announcement that reached the
        // connection before its join did.
        let mut before: Vec<Value> = Vec::new();
        let mut joined = false;
        loop {
            if joined && until.is_some_and(|u| self.last >= Some(u)) {
                return;
            }
            let msg = match tokio::time::timeout_at(deadline, c.ws.next()).await {
                Err(_) if !joined && matches!(hangup, Hangup::AfterJoined(_)) => {
                    return self.fail(format!("no joined within {CATCH_UP:?}"));
                }
                Err(_) => return, // held long enough: drop the connection
                Ok(Some(Ok(m))) => m,
                Ok(other) => return self.fail(format!("connection ended: {other:?}")),
            };
            let f: Value = match msg {
                Message::Text(t) => serde_json::from_str(&t).expect("server sends JSON"),
                Message::Close(Some(c)) if u16::from(c.code) == 1012 && scaled() => {
                    self.retried += 1;
                    return;
                }
                Message::Close(c) => return self.fail(format!("closed by the server: {c:?}")),
                _ => continue,
            };
            if f["ref"] == "j" {
                if f["type"] != "joined" {
                    if retry(&f) {
                        self.retried += 1;
                        return;
                    }
                    return self.fail(format!("join refused: {f}"));
                }
                joined = true;
                self.join_times.push(sent.elapsed());
                if let Hangup::AfterJoined(d) = hangup {
                    deadline = Instant::now() + d;
                }
                self.joined(since, std::mem::take(&mut before), &f);
            } else if let Some(seq) = stored_seq(&f, &self.room) {
                if joined {
                    self.next(seq, &f);
                } else {
                    before.push(f);
                }
            }
        }
    }

    /// Connections until the stream reaches `until` (more than one when the server tells the
    /// reader to reconnect).
    async fn catch_up(&mut self, addr: SocketAddr, until: u64) {
        let deadline = Instant::now() + CATCH_UP;
        while self.last < Some(until) && self.failures.is_empty() {
            if Instant::now() > deadline {
                let last = self.last;
                return self.fail(format!(
                    "caught up to {last:?} only, the room is at {until}"
                ));
            }
            let hangup = Hangup::AfterJoined(CATCH_UP);
            self.connection(addr, hangup, Some(until)).await;
        }
    }

    /// Checks what came before `joined`: with `since` S, the last `joined.seq − S` stored
    /// events are the replay, exactly S+1..=joined.seq; anything earlier can only be an
    /// announcement of the room's creation that reached the connection before its join. A
    /// first join replays nothing.
    fn joined(&mut self, since: Option<u64>, before: Vec<Value>, joined: &Value) {
        let seq = joined["seq"].as_u64().expect("joined.seq");
        let Some(since) = since else {
            if let Some(f) = before.iter().find(|f| f["seq"].as_u64() > Some(seq)) {
                self.fail(format!("{f} arrived before a first joined at seq {seq}"));
            }
            self.start = Some(seq);
            self.last = Some(seq);
            return;
        };
        self.rejoins += 1;
        if joined["recovered"] != true {
            return self.fail(format!("rejoin since {since} not recovered: {joined}"));
        }
        let replayed = seq.saturating_sub(since) as usize;
        let Some(split) = before.len().checked_sub(replayed) else {
            let got: Vec<_> = before.iter().map(|f| f["seq"].clone()).collect();
            return self.fail(format!(
                "joined at {seq} after since {since}, but only seqs {got:?} were replayed"
            ));
        };
        let (announced, replay) = before.split_at(split);
        if let Some(f) = announced.iter().find(|f| f["type"] != "room_created") {
            self.fail(format!(
                "since {since}, joined at {seq}: {f} is neither replay nor announcement"
            ));
        }
        for f in replay {
            self.next(f["seq"].as_u64().expect("seq"), f);
        }
        if self.last != Some(seq) {
            self.fail(format!(
                "since {since}: the replay ended at {:?}, joined at {seq}",
                self.last
            ));
            self.last = Some(seq);
        }
    }

    /// The next event of the stream: it must be the one after the last.
    fn next(&mut self, seq: u64, f: &Value) {
        let last = self.last.expect("in the stream after a joined");
        if seq != last + 1 {
            let what = if seq <= last {
                "duplicate or out of order"
            } else {
                "gap"
            };
            self.fail(format!("{what}: seq {seq} ({}) after {last}", f["type"]));
        }
        self.last = Some(last.max(seq));
        if f["type"] == "message" {
            let id = f["id"].as_str().expect("message id").to_string();
            self.messages.push((seq, id));
        }
    }

    /// Compares the messages received with the room's history after the first join.
    fn check_history(&mut self, history: &[(u64, String)]) {
        let Some(start) = self.start else {
            return self.fail("never joined".into());
        };
        let want: Vec<_> = history
            .iter()
            .filter(|(s, _)| *s > start)
            .cloned()
            .collect();
        if self.messages != want {
            let got = self.messages.len();
            let first = self.messages.iter().zip(&want).find(|(a, b)| a != b);
            self.fail(format!(
                "received {got} messages after seq {start}, history has {}; first difference \
                 (received, history): {first:?}",
                want.len()
            ));
        }
    }
}

/// Every message of a room, oldest first, from the history API (in scaled mode the history
/// service writes behind the broker: waits until it has `last`).
async fn history(addr: SocketAddr, room: &str, last: u64) -> Vec<(u64, String)> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let mut out: Vec<(u64, String)> = Vec::new();
        let mut after = 0;
        loop {
            let page: Value = http()
                .get(format!(
                    "http://{addr}/api/rooms/{room}/messages?after={after}&limit=100"
                ))
                .bearer_auth(token("auditor"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for m in page["messages"].as_array().expect("messages") {
                let id = m["id"].as_str().expect("id").to_string();
                out.push((m["seq"].as_u64().expect("seq"), id));
            }
            match page["next_after"].as_u64() {
                Some(a) => after = a,
                None => break,
            }
        }
        if out.last().is_some_and(|(s, _)| *s >= last) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{room}: history never reached seq {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cuts the gateways' Redis pub/sub connections every [`CUT_EVERY`] until `stop`; returns
/// how many were cut.
async fn cut_pubsub(redis_url: String, stop: Arc<AtomicBool>) -> u64 {
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut tick = tokio::time::interval(CUT_EVERY);
    tick.tick().await; // the first tick is at once
    let mut cuts = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let killed: Result<u64, _> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await;
        // A cut that timed out on a loaded machine is only one fault fewer.
        cuts += killed.unwrap_or(0);
    }
    cuts
}

/// Joins `room` as `user` and posts every [`SEND_EVERY`] until `done(messages acked)`;
/// returns the acked (seq, id). In scaled mode a cut pub/sub connection can end a connection
/// with 1012 or answer `unavailable`: the same command is then sent again, on a new
/// connection if need be, a message with the same `client_msg_id`, so that it is stored once.
async fn post(
    addr: SocketAddr,
    user: &str,
    room: &str,
    done: impl Fn(usize) -> bool,
) -> Vec<(u64, String)> {
    let mut acked = Vec::new();
    let mut tick = tokio::time::interval(SEND_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'connection: while !done(acked.len()) {
        let mut c = Client::connect_addr(addr, user, "/ws").await;
        c.send(json!({"type": "join", "room": room, "ref": "j"}))
            .await;
        match answer(&mut c, "j").await {
            Some(j) if j["type"] == "joined" => {}
            Some(e) if !retry(&e) => panic!("{user}: {e}"),
            _ => continue 'connection,
        }
        while !done(acked.len()) {
            tick.tick().await;
            let cmid = format!("{user}:{}", acked.len());
            let r = format!("m{}", acked.len());
            let msg = json!({"type": "message", "room": room, "content": cmid,
                             "client_msg_id": cmid, "ref": r});
            c.send(msg).await;
            match answer(&mut c, &r).await {
                Some(a) if a["type"] == "ack" => {
                    let id = a["id"].as_str().unwrap().to_string();
                    acked.push((a["seq"].as_u64().unwrap(), id));
                }
                Some(e) if !retry(&e) => panic!("{user}: {e}"),
                Some(_) => {}
                None => continue 'connection,
            }
        }
    }
    acked
}

/// An error a client retries: `unavailable`, in scaled mode (see [`post`]).
fn retry(error: &Value) -> bool {
    error["code"] == "unavailable" && scaled()
}

/// The answer to the command sent with `r`; None when the server closed the connection with
/// 1012 in scaled mode (see [`post`]).
async fn answer(c: &mut Client, r: &str) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(CATCH_UP, c.ws.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no answer to {r}", c.user));
        match msg {
            Some(Ok(Message::Text(t))) => {
                let f: Value = serde_json::from_str(&t).expect("server sends JSON");
                if f["ref"] == r {
                    return Some(f);
                }
            }
            Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 1012 && scaled() => {
                return None;
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => {
                panic!("{}: connection ended: {msg:?}", c.user)
            }
            Some(Ok(_)) => {}
        }
    }
}

/// One room created by concurrent joins: [`FRESH_JOINERS`] readers and a poster join at once
/// (whoever comes first creates it), the readers drop and rejoin at random moments while the
/// poster posts, then catch up. Returns the readers and the acked messages.
async fn fresh_room(
    nodes: &Nodes,
    room: String,
    rng: &mut StdRng,
) -> (Vec<Reader>, Vec<(u64, String)>) {
    let (done, final_seq) = tokio::sync::watch::channel(None::<u64>);
    let mut joiners = Vec::new();
    for k in 0..FRESH_JOINERS {
        let mut r = Reader::new(format!("{room}-r{k}"), &room);
        let hangups: Vec<Hangup> = (0..2).map(|_| Hangup::random(rng)).collect();
        let addrs: Vec<SocketAddr> = (0..3).map(|_| nodes.pick(rng)).collect();
        let mut final_seq = final_seq.clone();
        joiners.push(tokio::spawn(async move {
            for (hangup, addr) in hangups.iter().zip(&addrs) {
                r.connection(*addr, *hangup, None).await;
            }
            let until = *final_seq.wait_for(Option::is_some).await.unwrap();
            r.catch_up(addrs[2], until.expect("set")).await;
            r
        }));
    }
    let poster = format!("{room}-poster");
    let acked = post(nodes.pick(rng), &poster, &room, |n| n >= FRESH_MESSAGES).await;
    done.send_replace(acked.last().map(|(s, _)| *s));
    let mut readers = Vec::new();
    for j in joiners {
        readers.push(j.await.unwrap());
    }
    (readers, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoins_with_since_get_every_event_once_in_order_under_stress() {
    let seed: u64 = match std::env::var("CHAT_TEST_SEED") {
        Ok(s) => s.parse().expect("CHAT_TEST_SEED is a number"),
        Err(_) => rand::random(),
    };
    let secs: u64 = std::env::var("CHAT_STRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    eprintln!("recovery stress: seed {seed} (CHAT_TEST_SEED={seed} makes the same choices)");
    let nodes = Arc::new(Nodes::start().await);
    // The room exists before the readers come: its creation is the fresh rooms' subject.
    let mut opener = Client::connect_addr(nodes.addrs[0], "opener", "/ws").await;
    opener.join(ROOM).await;
    drop(opener);

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|n| {
            let (addr, stop) = (nodes.addrs[n % nodes.addrs.len()], stop.clone());
            let user = format!("sender-{n}");
            tokio::spawn(
                async move { post(addr, &user, ROOM, |_| stop.load(Ordering::Relaxed)).await },
            )
        })
        .collect();
    let readers: Vec<_> = (0..READERS)
        .map(|n| {
            let (nodes, stop, progress) = (nodes.clone(), stop.clone(), progress.clone());
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(n as u64));
            tokio::spawn(async move {
                let mut r = Reader::new(format!("reader-{n}"), ROOM);
                while !stop.load(Ordering::Relaxed) {
                    let (hangup, before) = (Hangup::random(&mut rng), r.rejoins);
                    r.connection(nodes.pick(&mut rng), hangup, None).await;
                    progress.fetch_add(r.rejoins - before, Ordering::Relaxed);
                }
                (r, nodes.pick(&mut rng))
            })
        })
        .collect();
    let fresh = {
        let (nodes, stop) = (nodes.clone(), stop.clone());
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(READERS as u64));
        tokio::spawn(async move {
            let mut rooms = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let room = format!("fresh-{}", rooms.len());
                let (readers, acked) = fresh_room(&nodes, room.clone(), &mut rng).await;
                rooms.push((room, readers, acked));
            }
            rooms
        })
    };

    let cutter = nodes
        .backend
        .as_ref()
        .map(|b| tokio::spawn(cut_pubsub(b.redis.url(), stop.clone())));

    let started = Instant::now();
    let (min, max) = (Duration::from_secs(secs), Duration::from_secs(3 * secs));
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await; // the traffic's duration
        let enough = progress.load(Ordering::Relaxed) >= TARGET_REJOINS;
        if started.elapsed() >= max || (started.elapsed() >= min && enough) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let cuts = match cutter {
        Some(c) => c.await.unwrap(),
        None => 0,
    };
    let mut acked: Vec<(u64, String)> = Vec::new();
    for s in senders {
        acked.extend(s.await.unwrap());
    }
    acked.sort();
    let last = acked.last().expect("messages were sent").0;
    let mut all: Vec<Reader> = Vec::new();
    for r in readers {
        let (mut r, addr) = r.await.unwrap();
        r.catch_up(addr, last).await;
        all.push(r);
    }
    let rejoins: usize = all.iter().map(|r| r.rejoins).sum();

    let history_of_room = history(nodes.addrs[0], ROOM, last).await;
    let mut failures = Vec::new();
    if history_of_room != acked {
        failures.push(format!(
            "{ROOM}: history has {} messages, {} were acked",
            history_of_room.len(),
            acked.len()
        ));
    }
    for r in &mut all {
        r.check_history(&history_of_room);
    }
    let rooms = fresh.await.unwrap();
    let fresh_count = rooms.len();
    for (room, mut readers, acked) in rooms {
        let h = history(nodes.addrs[0], &room, acked.last().unwrap().0).await;
        if h != acked {
            failures.push(format!("{room}: history {h:?}, acked {acked:?}"));
        }
        for r in &mut readers {
            r.check_history(&h);
        }
        all.extend(readers);
    }
    failures.extend(all.iter().flat_map(|r| r.failures.clone()));
    let fresh_rejoins: usize = all.iter().map(|r| r.rejoins).sum::<usize>() - rejoins;
    let retried: usize = all.iter().map(|r| r.retried).sum();
    let mut join_times: Vec<Duration> = all.iter().flat_map(|r| r.join_times.clone()).collect();
    join_times.sort();
    eprintln!(
        "recovery stress: {} messages, {rejoins} rejoins with since in {ROOM}, {fresh_count} \
         rooms created by concurrent joins ({fresh_rejoins} rejoins there), {} node(s); \
         {cuts} pub/sub connections cut, {retried} connections told to retry; \
         join→joined median {:?}, max {:?}",
        acked.len(),
        nodes.addrs.len(),
        join_times
            .get(join_times.len() / 2)
            .copied()
            .unwrap_or_default(),
        join_times.last().copied().unwrap_or_default(),
    );
    assert!(
        failures.is_empty(),
        "seed {seed} (rerun with CHAT_TEST_SEED={seed}): {} findings:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The run must have stressed what it claims to.
    assert!(rejoins >= 300, "seed {seed}: only {rejoins} rejoins");
    assert!(
        fresh_count >= 5,
        "seed {seed}: only {fresh_count} rooms created"
    );
    if let Ok(nodes) = Arc::try_unwrap(nodes) {
        nodes.stop().await;
    }
}
