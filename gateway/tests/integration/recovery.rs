//! Recovery of missed events with `join {since}`.

use crate::support::*;
use serde_json::{json, Value};

/// Sends `join {since}` and reads up to its answer: the seqs of the stored events replayed
/// before it, and the `joined`.
async fn rejoin(c: &mut Client, room: &str, since: u64) -> (Vec<u64>, Value) {
    c.send(json!({"type": "join", "room": room, "since": since, "ref": "j"}))
        .await;
    let mut replayed = Vec::new();
    loop {
        let f = c.recv().await;
        if f["ref"] == "j" {
            return (replayed, f);
        }
        if let Some(seq) = f["seq"].as_u64() {
            replayed.push(seq);
        }
    }
}

#[tokio::test]
async fn join_with_since_replays_missed_events_in_order() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    let mut bob = Client::connect(&server, "bob").await;
    ann.join("r").await;
    bob.join("r").await;
    let seen = ann.say("r", "one").await["seq"].as_u64().unwrap();
    bob.recv_type("message").await;
    drop(bob);
    for n in 0..5 {
        ann.say("r", &format!("missed {n}")).await;
    }
    let mut bob = Client::connect(&server, "bob").await;
    bob.send(json!({"type": "join", "room": "r", "since": seen, "ref": "j"}))
        .await;
    let mut replayed = Vec::new();
    let joined = loop {
        let f = bob.recv().await;
        match f["type"].as_str().unwrap() {
            "message" => replayed.push((
                f["seq"].as_u64().unwrap(),
                f["content"].as_str().unwrap().to_string(),
            )),
            "joined" => break f,
            _ => {}
        }
    };
    assert_eq!(joined["recovered"], true);
    assert_eq!(joined["seq"].as_u64().unwrap(), seen + 5);
    let want: Vec<(u64, String)> = (0..5)
        .map(|n| (seen + 1 + n, format!("missed {n}")))
        .collect();
    assert_eq!(
        replayed, want,
        "replayed exactly the missed events, in order, before joined"
    );
    // live traffic continues without duplicates
    ann.say("r", "live").await;
    let m = bob.recv_type("message").await;
    assert_eq!(m["content"], "live");
    assert_eq!(m["seq"].as_u64().unwrap(), seen + 6);
    server.stop().await;
}

#[tokio::test]
async fn since_older_than_the_window_is_not_recovered() {
    let server = Server::start_with(|c| {
        c.recovery_window = 3;
        c.messages_per_s = 1000;
    })
    .await;
    let mut ann = Client::connect(&server, "ann").await;
    let base = ann.join("w").await["seq"].as_u64().unwrap();
    for n in 0..10 {
        ann.say("w", &format!("m{n}")).await;
    }
    // In scaled mode the window's stream is trimmed approximately and holds more than 3
    // events: a replay cut at the window must not claim to be complete.
    let mut bob = Client::connect(&server, "bob").await;
    let (replayed, j) = rejoin(&mut bob, "w", base + 2).await;
    assert_eq!(j["type"], "joined");
    assert_eq!(
        (j["recovered"].clone(), replayed),
        (json!(false), vec![]),
        "client must fill the gap from history"
    );
    assert_eq!(j["seq"], base + 10);
    // within the window it works
    let mut cat = Client::connect(&server, "cat").await;
    let (replayed, j) = rejoin(&mut cat, "w", base + 8).await;
    assert_eq!(j["recovered"], true);
    assert_eq!(replayed, vec![base + 9, base + 10]);
    server.stop().await;
}

#[tokio::test]
async fn draining_tells_clients_to_reconnect_then_closes_1012() {
    let server = Server::start_with(|c| c.drain_seconds = 1).await;
    let mut ann = Client::connect(&server, "ann").await;
    ann.join("drain").await;
    let node = server.node.clone();
    let drained = tokio::spawn(gateway::shutdown::drain(node));
    let r = ann.recv_type("reconnect").await;
    assert!(r["after_ms"].as_u64().unwrap() <= 1000);
    assert_eq!(ann.expect_close().await, 1012);
    drained.await.unwrap();
    server.stop().await;
}

/// A client that vanishes while its join replays leaves nothing behind: the dead socket ends
/// the connection's task in the middle of the join, and a session left in the room would hold
/// the room's events forever (and, scaled out, make every resubscription start from its
/// stale seq). Scaled mode is where it bites: an embedded join does not yield once it is in
/// the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_cut_off_by_a_vanished_client_leaves_no_session_in_the_room() {
    let server = Server::start_with(|c| {
        c.messages_per_s = 1000;
        c.burst = 1000;
        c.max_connections_per_user = 1000;
    })
    .await;
    let mut ann = Client::connect(&server, "ann").await;
    let base = ann.join("cut").await["seq"].as_u64().unwrap();
    for n in 0..200 {
        ann.say("cut", &format!("{n} {}", "x".repeat(200))).await;
    }
    for _ in 0..40 {
        let mut bob = Client::connect(&server, "bob").await;
        bob.send(json!({"type": "join", "room": "cut", "since": base}))
            .await;
        // Gone at once, with a reset: the replay's writes fail.
        match bob.ws.get_ref() {
            tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.set_zero_linger().unwrap(),
            _ => unreachable!("tests connect without TLS"),
        }
        drop(bob);
    }
    let room = proto::RoomId::new("cut").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Each vanished session leaves the room when its task ends; ann stays.
    while server.node.hub.sessions_count(&room) != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} sessions in the room, 1 connected",
            server.node.hub.sessions_count(&room)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.stop().await;
}
