//! Multi-node behaviour with several real gateway processes, a real redis-server, and nginx
//! as the load balancer.

mod chaos;
pub mod procs;
mod production_redis;
pub mod redis_cluster;
mod redis_loss;
mod sentinel;
mod soak;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;
use procs::*;

#[tokio::test]
async fn cross_node_delivery_typing_and_presence() {
    let backend = Backend::start().await;
    let gw1 = Gateway::start(&backend, "gw1", &[]).await;
    let gw2 = Gateway::start(&backend, "gw2", &[]).await;
    let mut ann = Client::connect_addr(gw1.addr, "ann", "/ws").await;
    let mut bob = Client::connect_addr(gw2.addr, "bob", "/ws").await;
    assert_eq!(ann.hello["node"], "gw1");
    assert_eq!(bob.hello["node"], "gw2");
    ann.join("x").await;
    let joined = bob.join("x").await;
    let online: HashSet<String> = joined["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        online,
        HashSet::from(["ann".to_string(), "bob".to_string()]),
        "presence spans nodes"
    );
    assert_eq!(ann.recv_type("join").await["user"]["id"], "bob");

    let ack = ann.say("x", "across").await;
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["content"].clone(), m["seq"].clone()),
        (json!("across"), ack["seq"].clone())
    );

    bob.send(json!({"type": "typing", "room": "x"})).await;
    assert_eq!(ann.recv_type("typing").await["user"]["id"], "bob");
    bob.assert_none_before_pong(|f| f["type"] == "typing").await;

    // a site-wide notice reaches both nodes
    let r = http()
        .post(format!("http://{}/api/admin/notice", gw1.addr))
        .bearer_auth(admin_token("root"))
        .json(&json!({"content": "all nodes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(bob.recv_type("notice").await["content"], "all nodes");
    assert_eq!(ann.recv_type("notice").await["content"], "all nodes");
}

#[tokio::test]
async fn seq_is_gapless_when_senders_on_different_nodes_race() {
    let backend = Backend::start().await;
    let env = [("CHAT_MESSAGES_PER_S", "1000"), ("CHAT_BURST", "1000")];
    let gws = [
        Gateway::start(&backend, "n1", &env).await,
        Gateway::start(&backend, "n2", &env).await,
    ];
    let mut watchers = Vec::new();
    // The first join creates the room: its `room_created` takes the first seq.
    let mut base = 0;
    for g in &gws {
        let mut w = Client::connect_addr(g.addr, &format!("watch-{}", g.node), "/ws").await;
        base = w.join("race").await["seq"].as_u64().unwrap();
        watchers.push(w);
    }
    const EACH: usize = 30;
    let mut tasks = Vec::new();
    for (i, g) in gws.iter().chain(gws.iter()).enumerate() {
        let mut c = Client::connect_addr(g.addr, &format!("s{i}"), "/ws").await;
        c.join("race").await;
        tasks.push(tokio::spawn(async move {
            let mut seqs = vec![];
            for n in 0..EACH {
                seqs.push(
                    c.say("race", &format!("{n}")).await["seq"]
                        .as_u64()
                        .unwrap(),
                );
            }
            seqs
        }));
    }
    let mut acked = HashSet::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let total = (4 * EACH) as u64;
    assert_eq!(acked, (base + 1..=base + total).collect());
    for w in &mut watchers {
        let mut seen = vec![];
        while seen.len() < total as usize {
            seen.push(w.recv_type("message").await["seq"].as_u64().unwrap());
        }
        assert_eq!(
            seen,
            (base + 1..=base + total).collect::<Vec<_>>(),
            "{}: in order, no gaps",
            w.user
        );
    }
}

#[tokio::test]
async fn a_killed_nodes_users_go_offline_within_the_ttl() {
    let backend = Backend::start().await;
    let gw1 = Gateway::start(&backend, "alive", &[]).await;
    let gw2 = Gateway::start(&backend, "doomed", &[]).await;
    let mut ann = Client::connect_addr(gw1.addr, "ann", "/ws").await;
    let mut bob = Client::connect_addr(gw2.addr, "bob", "/ws").await;
    ann.join("p").await;
    bob.join("p").await;
    ann.recv_where(|f| f["type"] == "online_users" && f["count"] == 2)
        .await;
    let killed = std::time::Instant::now();
    gw2.sigkill().await;
    let leave = ann.recv_type("leave").await;
    assert_eq!(leave["user"]["id"], "bob");
    let o = ann
        .recv_where(|f| f["type"] == "online_users" && f["count"] == 1)
        .await;
    assert_eq!(o["users"][0]["id"], "ann");
    // TTL 3 s plus one refresh period (1 s) and some scheduling slack
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "{:?}",
        killed.elapsed()
    );
    let rooms = ann.call(json!({"type": "list_rooms"})).await;
    let p = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "p")
        .cloned()
        .unwrap();
    assert_eq!(p["online_count"], 1);

    // The sweep keeps a list of rooms with anyone in them: a room joined once is listed at
    // once, and leaves the list when nobody is left (else every node would sweep every room
    // ever joined, on every refresh, forever).
    let redis = redis::Client::open(backend.redis.url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    // One primary has one partition, so every room is listed in partition 0's set.
    let rooms_key = format!("{}:presence-rooms", history_service::partitions::base(0));
    let listed = |conn: &mut redis::aio::MultiplexedConnection, room: &'static str| {
        let mut conn = conn.clone();
        let rooms_key = rooms_key.clone();
        async move {
            redis::cmd("SISMEMBER")
                .arg(rooms_key)
                .arg(room)
                .query_async::<bool>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert!(
        listed(&mut conn, "p").await,
        "a room with users online is listed"
    );
    ann.call(json!({"type": "leave", "room": "p"})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listed(&mut conn, "p").await {
        assert!(
            std::time::Instant::now() < deadline,
            "an empty room stays on the sweep's list"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ann.join("p").await;
    assert!(
        listed(&mut conn, "p").await,
        "listed again by the next join"
    );
}

#[tokio::test]
async fn recovery_after_reconnecting_to_another_node() {
    let backend = Backend::start().await;
    let gw1 = Gateway::start(&backend, "a", &[]).await;
    let gw2 = Gateway::start(&backend, "b", &[]).await;
    let mut ann = Client::connect_addr(gw1.addr, "ann", "/ws").await;
    let mut bob = Client::connect_addr(gw2.addr, "bob", "/ws").await;
    ann.join("r").await;
    bob.join("r").await;
    ann.say("r", "seen").await;
    let seen = bob.recv_type("message").await["seq"].as_u64().unwrap();
    drop(bob);
    for n in 0..4 {
        ann.say("r", &format!("missed {n}")).await;
    }
    let mut bob = Client::connect_addr(gw1.addr, "bob", "/ws").await;
    bob.send(json!({"type": "join", "room": "r", "since": seen}))
        .await;
    let mut got = vec![];
    loop {
        let f = bob.recv().await;
        if f["type"] == "joined" {
            assert_eq!(f["recovered"], true);
            break;
        }
        if f["type"] == "message" {
            got.push(f["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(got, (seen + 1..=seen + 4).collect::<Vec<_>>());
}

#[tokio::test]
async fn delivery_through_nginx_spreads_connections_over_nodes() {
    let backend = Backend::start().await;
    let gw1 = Gateway::start(&backend, "lb1", &[]).await;
    let gw2 = Gateway::start(&backend, "lb2", &[]).await;
    let lb = Nginx::start(&[gw1.addr, gw2.addr], backend.history.addr).await;
    let mut clients = vec![];
    for i in 0..4 {
        let mut c = Client::connect_addr(lb.addr, &format!("u{i}"), "/ws").await;
        c.join("lb").await;
        clients.push(c);
    }
    let nodes: HashSet<String> = clients
        .iter()
        .map(|c| c.hello["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(nodes.len(), 2, "least_conn puts clients on both nodes");
    for (i, c) in clients.iter_mut().enumerate() {
        c.say("lb", &format!("from u{i}")).await;
    }
    for c in &mut clients {
        let mut got = HashSet::new();
        while got.len() < 4 {
            got.insert(
                c.recv_type("message").await["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    let r = http()
        .get(format!("http://{}/readyz", lb.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Sends `n` messages with idempotency keys, retrying each on `unavailable` (and after the
/// asked pause on `rate_limited`) until acked, the way a client rides out a broker outage.
/// Returns (id, seq) of every ack.
async fn send_with_retries(mut c: Client, room: &'static str, n: usize) -> Vec<(String, u64)> {
    let verbose = std::env::var_os("CHAT_TEST_LOGS").is_some();
    let mut acks = vec![];
    for i in 0..n {
        let cmid = format!("{}-{i}", c.user);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = c.call(json!({"type": "message", "room": room, "content": cmid, "client_msg_id": cmid})).await;
            if r["type"] == "ack" {
                if verbose {
                    eprintln!("acked {} seq {}", r["id"], r["seq"]);
                }
                acks.push((
                    r["id"].as_str().unwrap().to_string(),
                    r["seq"].as_u64().unwrap(),
                ));
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never acked");
            let backoff = match r["code"].as_str() {
                // The token bucket (20/s, burst 40 by default) asks for a pause.
                Some("rate_limited") => r["retry_after_ms"].as_u64().unwrap(),
                Some("unavailable") => 100,
                _ => panic!("unexpected answer {r}"),
            };
            tokio::time::sleep(Duration::from_millis(backoff)).await; // client backoff between retries
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // steady traffic, not a burst
    }
    acks
}

/// Reads messages until every id in `want` arrived; fails on a duplicate or a seq out of order.
async fn receive_all(c: &mut Client, want: &HashSet<String>) {
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut last_seq = 0;
    while !want.iter().all(|id| count.contains_key(id)) {
        let f = match tokio::time::timeout(WAIT, c.recv_type("message")).await {
            Ok(f) => f,
            Err(_) => panic!(
                "{}: missing {:?}; last seq {last_seq}",
                c.user,
                want.iter()
                    .filter(|id| !count.contains_key(*id))
                    .collect::<Vec<_>>()
            ),
        };
        let seq = f["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "{}: seq {seq} after {last_seq}", c.user);
        last_seq = seq;
        *count
            .entry(f["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(count.values().all(|&n| n == 1), "{}: duplicates", c.user);
}

#[tokio::test]
async fn redis_restart_mid_traffic_loses_and_duplicates_nothing() {
    let mut backend = Backend::start().await;
    let gw1 = Gateway::start(&backend, "c1", &[]).await;
    let gw2 = Gateway::start(&backend, "c2", &[]).await;
    let mut r1 = Client::connect_addr(gw1.addr, "r1", "/ws").await;
    let mut r2 = Client::connect_addr(gw2.addr, "r2", "/ws").await;
    r1.join("chaos").await;
    r2.join("chaos").await;
    let mut s1 = Client::connect_addr(gw1.addr, "s1", "/ws").await;
    let mut s2 = Client::connect_addr(gw2.addr, "s2", "/ws").await;
    s1.join("chaos").await;
    s2.join("chaos").await;
    let t1 = tokio::spawn(send_with_retries(s1, "chaos", 40));
    let t2 = tokio::spawn(send_with_retries(s2, "chaos", 40));
    // restart once traffic is flowing
    let tenth = r1
        .recv_where(|f| f["type"] == "message" && f["seq"].as_u64() >= Some(10))
        .await;
    r1.pending.push_back(tenth); // after the earlier ones it set aside: receive_all counts it
    backend.redis.restart().await;
    let a1 = t1.await.unwrap();
    let a2 = t2.await.unwrap();
    let mut acked: HashSet<String> = a1.into_iter().map(|a| a.0).collect();
    acked.extend(a2.into_iter().map(|a| a.0));
    assert_eq!(acked.len(), 80);
    // readiness comes back once the subscriber reconnected
    wait_ready(gw1.addr).await;
    wait_ready(gw2.addr).await;
    receive_all(&mut r1, &acked).await;
    receive_all(&mut r2, &acked).await;
}

/// A Redis outage shorter than `history_service::redis_up::UNREADY_AFTER` (30 s) leaves the
/// node ready (every node would leave its Service at once otherwise); `chat_redis_up` tells.
#[tokio::test]
async fn a_redis_blip_keeps_readyz_and_shows_in_chat_redis_up() {
    let mut backend = Backend::start().await;
    let gw = Gateway::start(&backend, "ready", &[]).await;
    assert_eq!(metric(gw.addr, "chat_redis_up").await, 1.0);
    backend.redis.kill().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(gw.addr, "chat_redis_up").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reported redis down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = http()
        .get(format!("http://{}/readyz", gw.addr))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 200, "a blip does not take the node out of its Service");
    let mut c = Client::connect_addr(gw.addr, "u", "/ws").await;
    let r = c.call(json!({"type": "join", "room": "down"})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    assert_eq!(
        c.call(json!({"type": "ping"})).await["type"],
        "pong",
        "connection survives"
    );
    backend.redis.restart().await;
    c.join("down").await;
    assert_eq!(metric(gw.addr, "chat_redis_up").await, 1.0);
}

#[tokio::test]
async fn draining_a_node_moves_its_clients_without_losing_acked_messages() {
    let backend = Backend::start().await;
    let gw1 = Gateway::start(&backend, "stay", &[]).await;
    let gw2 = Gateway::start(&backend, "drain", &[]).await;
    let lb = Nginx::start(&[gw1.addr, gw2.addr], backend.history.addr).await;
    let mut sender = Client::connect_addr(gw1.addr, "sender", "/ws").await;
    sender.join("d").await;
    let mut moving = Client::connect_addr(gw2.addr, "mover", "/ws").await;
    moving.join("d").await;
    let sending = tokio::spawn(send_with_retries(sender, "d", 60));
    let first = moving
        .recv_where(|f| f["type"] == "message" && f["seq"].as_u64() >= Some(5))
        .await;

    gw2.sigterm();
    let r = moving.recv_type("reconnect").await;
    assert!(r["after_ms"].as_u64().unwrap() <= 2000);
    // readiness is off while draining
    assert_eq!(
        http()
            .get(format!("http://{}/readyz", gw2.addr))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    // everything up to the close, then reconnect through the LB with since
    let mut last_seq = 0;
    let mut ids: HashMap<String, usize> =
        HashMap::from([(first["id"].as_str().unwrap().into(), 1)]);
    loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut moving.ws))
            .await
            .unwrap()
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let f: Value = serde_json::from_str(&t).unwrap();
                if f["type"] == "message" {
                    last_seq = f["seq"].as_u64().unwrap();
                    *ids.entry(f["id"].as_str().unwrap().into()).or_default() += 1;
                }
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(c)))) => {
                assert_eq!(u16::from(c.code), 1012);
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected end of the draining connection: {other:?}"),
        }
    }
    for f in std::mem::take(&mut moving.pending) {
        if f["type"] == "message" {
            *ids.entry(f["id"].as_str().unwrap().into()).or_default() += 1;
        }
    }
    let mut moved = Client::connect_addr(lb.addr, "mover", "/ws").await;
    assert_eq!(
        moved.hello["node"], "stay",
        "the LB sends the reconnect to the remaining node"
    );
    let j = moved
        .call(json!({"type": "join", "room": "d", "since": last_seq}))
        .await;
    assert_eq!(
        (j["type"].clone(), j["recovered"].clone()),
        (json!("joined"), json!(true)),
        "{j}"
    );
    let acked: HashSet<String> = sending.await.unwrap().into_iter().map(|a| a.0).collect();
    while !acked.iter().all(|id| ids.contains_key(id)) {
        let f = match tokio::time::timeout(WAIT, moved.recv_type("message")).await {
            Ok(f) => f,
            Err(_) => panic!(
                "missing {:?} after since={last_seq}",
                acked
                    .iter()
                    .filter(|id| !ids.contains_key(*id))
                    .collect::<Vec<_>>()
            ),
        };
        *ids.entry(f["id"].as_str().unwrap().into()).or_default() += 1;
    }
    assert!(
        ids.values().all(|&n| n == 1),
        "no duplicates across the move"
    );
    let status = gw2.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "drained node exits cleanly: {status:?}");
}

/// Room state changed on one node is enforced on the others at once: a ban on node A removes
/// the user's connection on node B and blocks rejoining through the load balancer; a mute
/// issued on A of a user who became a member on B stops their posts on B.
#[tokio::test]
async fn moderation_on_one_node_is_enforced_on_the_others() {
    let backend = Backend::start().await;
    let gw1 = Gateway::start(&backend, "m1", &[]).await;
    let gw2 = Gateway::start(&backend, "m2", &[]).await;
    let lb = Nginx::start(&[gw1.addr, gw2.addr], backend.history.addr).await;
    let mut owner = Client::connect_addr(gw1.addr, "boss", "/ws").await;
    owner.join("mod").await; // creates the room: boss is its owner
    let mut troll = Client::connect_addr(gw2.addr, "troll", "/ws").await;
    troll.join("mod").await; // a public join makes a member, on node 2 only
    let mut chatty = Client::connect_addr(gw2.addr, "chatty", "/ws").await;
    chatty.join("mod").await;

    let ack = owner
        .call(json!({"type": "mute", "room": "mod", "user": "chatty"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    chatty.recv_type("muted").await;
    let r = chatty
        .call(json!({"type": "message", "room": "mod", "content": "hi"}))
        .await;
    assert_eq!(r["code"], "muted", "{r}");

    let ack = owner
        .call(json!({"type": "ban", "room": "mod", "user": "troll", "reason": "spam"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let banned = troll.recv_type("banned").await;
    assert_eq!(banned["user"]["id"], "troll");
    let r = troll
        .call(json!({"type": "message", "room": "mod", "content": "still here?"}))
        .await;
    assert_eq!(r["code"], "banned", "{r}");
    // through the load balancer, whichever node it picks
    for _ in 0..2 {
        let mut again = Client::connect_addr(lb.addr, "troll", "/ws").await;
        let r = again.call(json!({"type": "join", "room": "mod"})).await;
        assert_eq!(r["code"], "banned", "{r}");
    }
    // the owner's node saw the troll leave the room's presence
    owner
        .recv_where(|f| {
            f["type"] == "online_users"
                && !f["users"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|u| u["id"] == "troll")
        })
        .await;
}

/// Receipts and pins made on one node reach the others and the history service; room state
/// (a private room and its members) survives restarting every gateway.
#[tokio::test]
async fn receipts_pins_and_room_state_across_nodes_and_restarts() {
    let backend = Backend::start().await;
    let gw1 = Gateway::start(&backend, "p1", &[]).await;
    let gw2 = Gateway::start(&backend, "p2", &[]).await;
    let mut ann = Client::connect_addr(gw1.addr, "ann", "/ws").await;
    let mut bob = Client::connect_addr(gw2.addr, "bob", "/ws").await;
    let ack = ann
        .call(json!({"type": "create_room", "room": "vault", "name": "Vault", "visibility": "private"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let ack = ann
        .call(json!({"type": "add_member", "room": "vault", "user": "bob"}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ann.join("vault").await;
    bob.join("vault").await;
    let m = ann.say("vault", "the combination").await;
    let seq = m["seq"].as_u64().unwrap();
    bob.recv_where(|f| f["type"] == "message" && f["seq"] == seq)
        .await;
    let a = bob
        .call(json!({"type": "read", "room": "vault", "seq": seq}))
        .await;
    assert_eq!(a["type"], "ack", "{a}");
    let r = ann.recv_type("receipt").await;
    assert_eq!(
        (r["user"]["id"].clone(), r["seq"].clone()),
        (json!("bob"), json!(seq))
    );
    let ack = ann
        .call(json!({"type": "pin", "room": "vault", "id": m["id"]}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(bob.recv_type("pinned").await["message"]["id"], m["id"]);

    // the history service has all of it (the stream consumer may lag a moment)
    let base = backend.history.url();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let get = |path: String| {
            let url = format!("{base}{path}");
            async move {
                http()
                    .get(url)
                    .bearer_auth(token("bob"))
                    .send()
                    .await
                    .unwrap()
                    .json::<Value>()
                    .await
                    .unwrap()
            }
        };
        let receipts = get("/api/rooms/vault/receipts".into()).await;
        let pins = get("/api/rooms/vault/pins".into()).await;
        let has_marker = receipts["markers"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["user"] == "bob" && m["seq"] == seq));
        let has_pin = pins
            .as_array()
            .or(pins["pins"].as_array())
            .is_some_and(|p| p.iter().any(|p| p["message"]["id"] == m["id"]));
        if has_marker && has_pin {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history service never got them: {receipts} {pins}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // every gateway restarts: the private room still keeps strangers out and lets bob in
    drop((ann, bob));
    gw1.sigkill().await;
    gw2.sigkill().await;
    let gw3 = Gateway::start(&backend, "p3", &[]).await;
    let mut eve = Client::connect_addr(gw3.addr, "eve", "/ws").await;
    let r = eve.call(json!({"type": "join", "room": "vault"})).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let mut bob = Client::connect_addr(gw3.addr, "bob", "/ws").await;
    let j = bob.join("vault").await;
    assert_eq!(j["role"], "member");
    assert_eq!(j["pins"][0]["message"]["id"], m["id"]);
    assert_eq!(j["unread"], j["seq"].as_u64().unwrap() - seq);
}

/// Joining a public room makes a member without a room event; every node hears of it and
/// drops its cached member list, so a member limit holds whichever node a joiner lands on.
#[tokio::test]
async fn a_public_join_on_one_node_counts_against_the_limit_on_the_others() {
    let backend = Backend::start().await;
    let gw1 = Gateway::start(&backend, "l1", &[]).await;
    let gw2 = Gateway::start(&backend, "l2", &[]).await;
    let mut host = Client::connect_addr(gw1.addr, "host", "/ws").await;
    let ack = host
        .call(json!({"type": "create_room", "room": "tiny", "visibility": "public", "max_members": 3}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let mut watcher = Client::connect_addr(gw2.addr, "watcher", "/ws").await;
    watcher.join("tiny").await;
    // node 2 caches the room's state (2 members) while checking this message
    watcher.say("tiny", "anyone?").await;

    let mut ann = Client::connect_addr(gw1.addr, "ann", "/ws").await;
    assert_eq!(ann.join("tiny").await["role"], "member"); // member 3, made on node 1
                                                          // node 1 announced the membership before ann's `join`; node 2 reads both in that order
    watcher
        .recv_where(|f| f["type"] == "join" && f["user"]["id"] == "ann")
        .await;
    let mut bob = Client::connect_addr(gw2.addr, "bob", "/ws").await;
    let r = bob.call(json!({"type": "join", "room": "tiny"})).await;
    assert_eq!(r["code"], "room_full", "{r}");
    // ann leaves on node 1: the place frees up on node 2 too
    let left = ann.call(json!({"type": "leave", "room": "tiny"})).await;
    assert_eq!(left["type"], "left", "{left}");
    watcher
        .recv_where(|f| f["type"] == "leave" && f["user"]["id"] == "ann")
        .await;
    assert_eq!(bob.join("tiny").await["role"], "member");
}
