//! Pinned messages and read receipts: pin order, unpin, deleted messages, the pin limit,
//! pins as stored events; read markers (monotonic across devices, coalesced, unread counts);
//! both across a restart.

use std::time::Duration;

use serde_json::{json, Value};

use crate::rooms::{ack, code, connect_as, get_json, roomy};
use crate::support::*;

/// The pinned messages' contents, as GET /api/rooms/{room}/pins lists them.
async fn pinned_contents(server: &Server, room: &str) -> Vec<String> {
    let (status, body) = get_json(server, &format!("/api/rooms/{room}/pins"), &token("own")).await;
    assert_eq!(status, 200, "{body}");
    contents(&body["pins"])
}

/// Polls the pin list until `want` holds, and returns it: in scaled mode the history service
/// stores pins as the persistence stream reaches it, a moment after the ack.
async fn await_pins(server: &Server, room: &str, want: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pins = pinned_contents(server, room).await;
        if want(&pins) {
            return pins;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{room}: pins stuck at {pins:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn contents(pins: &Value) -> Vec<String> {
    pins.as_array()
        .unwrap()
        .iter()
        .map(|p| p["message"]["content"].as_str().unwrap().to_string())
        .collect()
}

/// `user`'s stored marker in `room` (0: none).
async fn marker(server: &Server, room: &str, user: &str) -> u64 {
    let (status, body) = get_json(
        server,
        &format!("/api/rooms/{room}/receipts"),
        &token("own"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["markers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"] == user)
        .map_or(0, |m| m["seq"].as_u64().unwrap())
}

/// Polls the stored marker until it is `want` (receipts are written behind the broadcast).
async fn await_marker(server: &Server, room: &str, user: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = marker(server, room, user).await;
        if m == want {
            return;
        }
        assert!(m <= want, "{user}'s marker {m} went past {want}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user}'s marker stuck at {m}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pin(room: &str, id: &Value) -> Value {
    json!({"type": "pin", "room": room, "id": id})
}

fn unpin(room: &str, id: &Value) -> Value {
    json!({"type": "unpin", "room": room, "id": id})
}

#[tokio::test]
async fn pins_most_recent_first_in_the_api_and_in_joined() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("board").await;
    let mut ids = Vec::new();
    for c in ["m1", "m2", "m3"] {
        ids.push(own.say("board", c).await["id"].clone());
    }
    for i in [0, 2, 1] {
        let a = ack(&own.call(pin("board", &ids[i])).await).clone();
        let p = own.recv_type("pinned").await;
        assert_eq!(
            p["seq"], a["seq"],
            "the pinned event is the acked stored event"
        );
        assert!(p["seq"].as_u64().unwrap() > 0);
        assert_eq!(p["message"]["id"], ids[i]);
        assert_eq!(p["by"]["id"], "own");
        assert!(p["pinned_at"].is_string());
    }
    await_pins(&server, "board", |p| p == ["m2", "m3", "m1"]).await;
    let mut ann = Client::connect(&server, "ann").await;
    let j = ann.join("board").await;
    assert_eq!(contents(&j["pins"]), ["m2", "m3", "m1"]);

    assert_eq!(code(&own.call(pin("board", &ids[0])).await), "conflict");
    let a = ack(&own.call(unpin("board", &ids[2])).await).clone();
    let u = ann.recv_type("unpinned").await;
    assert_eq!(
        (u["id"].clone(), u["seq"].clone()),
        (ids[2].clone(), a["seq"].clone())
    );
    assert_eq!(u["by"]["id"], "own");
    await_pins(&server, "board", |p| p == ["m2", "m1"]).await;
    assert_eq!(code(&own.call(unpin("board", &ids[2])).await), "not_found");
    // pinned again: now the most recent
    ack(&own.call(pin("board", &ids[2])).await);
    await_pins(&server, "board", |p| p == ["m3", "m2", "m1"]).await;
    let mut bob = Client::connect(&server, "bob").await;
    assert_eq!(
        contents(&bob.join("board").await["pins"]),
        ["m3", "m2", "m1"]
    );
    // an edit shows in the pin
    ack(&own
        .call(json!({"type": "edit", "room": "board", "id": ids[0], "content": "m1 edited"}))
        .await);
    await_pins(&server, "board", |p| p == ["m3", "m2", "m1 edited"]).await;
    // ... and in a later join's pins (a node's copy of the room's pins is dropped by the edit)
    let mut cat = Client::connect(&server, "cat").await;
    assert_eq!(
        contents(&cat.join("board").await["pins"]),
        ["m3", "m2", "m1 edited"]
    );
    server.stop().await;
}

#[tokio::test]
async fn deleted_messages_cannot_be_pinned_and_deleting_unpins() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("del").await;
    let gone = own.say("del", "gone").await["id"].clone();
    let kept = own.say("del", "kept").await["id"].clone();
    ack(&own
        .call(json!({"type": "delete", "room": "del", "id": gone}))
        .await);
    assert_eq!(code(&own.call(pin("del", &gone)).await), "not_found");
    assert_eq!(
        code(&own.call(pin("del", &json!("12345"))).await),
        "not_found",
        "an unknown message"
    );
    ack(&own.call(pin("del", &kept)).await);
    await_pins(&server, "del", |p| p == ["kept"]).await;
    ack(&own
        .call(json!({"type": "delete", "room": "del", "id": kept}))
        .await);
    await_pins(&server, "del", |p| p.is_empty()).await;
    let mut ann = Client::connect(&server, "ann").await;
    assert_eq!(ann.join("del").await["pins"], json!([]));
    // a message of another room is not this room's
    own.join("other").await;
    let elsewhere = own.say("other", "elsewhere").await["id"].clone();
    assert_eq!(code(&own.call(pin("del", &elsewhere)).await), "not_found");
    server.stop().await;
}

#[tokio::test]
async fn at_most_fifty_pins() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("many").await;
    let mut ids = Vec::new();
    for n in 0..51 {
        ids.push(own.say("many", &format!("n{n}")).await["id"].clone());
    }
    for id in &ids[..50] {
        ack(&own.call(pin("many", id)).await);
    }
    let e = own.call(pin("many", &ids[50])).await;
    assert_eq!(code(&e), "conflict", "{e}");
    assert!(e["message"].as_str().unwrap().contains("50"), "{e}");
    await_pins(&server, "many", |p| p.len() == 50).await;
    ack(&own.call(unpin("many", &ids[0])).await);
    ack(&own.call(pin("many", &ids[50])).await);
    await_pins(&server, "many", |p| p.len() == 50 && p[0] == "n50").await;
    server.stop().await;
}

/// Pins racing for the last place: exactly one gets it, and an unpin right after a pin
/// finds it (the pin set is decided before the events are stored).
#[tokio::test]
async fn racing_pins_never_pass_the_limit() {
    let server = Server::start_with(|c| {
        roomy(c);
        c.messages_per_s = 1000;
        c.burst = 1000;
    })
    .await;
    let mut own = Client::connect(&server, "own").await;
    own.join("race").await;
    let mut ids = Vec::new();
    for n in 0..55 {
        ids.push(own.say("race", &format!("n{n}")).await["id"].clone());
    }
    for id in &ids[..49] {
        ack(&own.call(pin("race", id)).await);
    }
    let mut admins = Vec::new();
    for n in 0..6 {
        let mut c = connect_as(&server, &format!("root{n}"), true).await;
        c.join("race").await;
        admins.push(c);
    }
    let answers = futures_util::future::join_all(
        admins
            .iter_mut()
            .zip(&ids[49..])
            .map(|(c, id)| c.call(pin("race", id))),
    )
    .await;
    let won = answers.iter().filter(|a| a["type"] == "ack").count();
    assert_eq!(won, 1, "{answers:?}");
    for a in answers.iter().filter(|a| a["type"] != "ack") {
        assert_eq!(code(a), "conflict", "{a}");
    }
    // an unpin at once after a pin
    ack(&own.call(unpin("race", &ids[0])).await);
    ack(&own.call(pin("race", &ids[0])).await);
    ack(&own.call(unpin("race", &ids[0])).await);
    await_pins(&server, "race", |p| p.len() == 49).await;
    server.stop().await;
}

#[tokio::test]
async fn a_pin_is_a_stored_event_replayed_by_recovery() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("rec").await;
    let id = own.say("rec", "important").await["id"].clone();
    let mut ann = Client::connect(&server, "ann").await;
    let seen = ann.join("rec").await["seq"].as_u64().unwrap();
    drop(ann);
    // while ann is away
    let pinned_seq = ack(&own.call(pin("rec", &id)).await)["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(pinned_seq, seen + 1);
    let unpinned_seq = ack(&own.call(unpin("rec", &id)).await)["seq"]
        .as_u64()
        .unwrap();
    ack(&own.call(pin("rec", &id)).await);

    let mut ann = Client::connect(&server, "ann").await;
    ann.send(json!({"type": "join", "room": "rec", "since": seen, "ref": "j"}))
        .await;
    let mut replayed = Vec::new();
    let joined = loop {
        let f = ann.recv().await;
        if f["type"] == "joined" {
            break f;
        }
        if f["seq"].as_u64().is_some() {
            replayed.push((
                f["type"].as_str().unwrap().to_string(),
                f["seq"].as_u64().unwrap(),
            ));
        }
    };
    assert_eq!(joined["recovered"], true);
    assert_eq!(
        replayed,
        vec![
            ("pinned".to_string(), pinned_seq),
            ("unpinned".to_string(), unpinned_seq),
            ("pinned".to_string(), unpinned_seq + 1),
        ]
    );
    assert_eq!(contents(&joined["pins"]), ["important"]);
    server.stop().await;
}

#[tokio::test]
async fn read_markers_only_move_forward_across_two_devices() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("rd").await;
    let mut last = 0;
    for n in 0..30 {
        last = own.say("rd", &format!("m{n}")).await["seq"]
            .as_u64()
            .unwrap();
    }
    let mut phone = Client::connect(&server, "bob").await;
    let mut laptop = Client::connect(&server, "bob").await;
    phone.join("rd").await;
    laptop.join("rd").await;
    // the two devices race: one reads upwards, the other downwards from the top
    let up = async {
        for seq in 1..=last {
            phone
                .send(json!({"type": "read", "room": "rd", "seq": seq}))
                .await;
        }
        phone
            .assert_none_before_pong(|f| f["type"] == "error")
            .await;
    };
    let down = async {
        for seq in (1..=last).rev() {
            laptop
                .send(json!({"type": "read", "room": "rd", "seq": seq}))
                .await;
        }
        laptop
            .assert_none_before_pong(|f| f["type"] == "error")
            .await;
    };
    tokio::join!(up, down);
    await_marker(&server, "rd", "bob", last).await;
    // the room saw bob's marker only go forward, ending at the top
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let r = own
            .recv_where(|f| f["type"] == "receipt" && f["user"]["id"] == "bob")
            .await;
        assert_eq!(r["room"], "rd");
        seen.push(r["seq"].as_u64().unwrap());
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "receipts went back: {seen:?}"
    );
    // an older read later changes nothing and is not broadcast
    let a = phone
        .call(json!({"type": "read", "room": "rd", "seq": 3}))
        .await;
    assert_eq!(a["type"], "ack", "{a}");
    own.assert_none_before_pong(|f| f["type"] == "receipt")
        .await;
    tokio::time::sleep(gateway::receipts::WINDOW * 2).await; // a trailing broadcast is due by now
    own.assert_none_before_pong(|f| f["type"] == "receipt")
        .await;
    assert_eq!(marker(&server, "rd", "bob").await, last);
    // a read past the room's end stands for the last seq: it marks no future message read
    let a = phone
        .call(json!({"type": "read", "room": "rd", "seq": last + 100}))
        .await;
    assert_eq!(a["seq"], last, "{a}");
    own.assert_none_before_pong(|f| f["type"] == "receipt")
        .await;
    let next = own.say("rd", "new").await["seq"].as_u64().unwrap();
    let a = laptop
        .call(json!({"type": "read", "room": "rd", "seq": next}))
        .await;
    assert_eq!(a["seq"], next, "{a}");
    let r = own
        .recv_where(|f| f["type"] == "receipt" && f["user"]["id"] == "bob")
        .await;
    assert_eq!(r["seq"], next, "{r}");
    await_marker(&server, "rd", "bob", next).await;
    server.stop().await;
}

#[tokio::test]
async fn many_reads_are_coalesced_into_few_broadcasts() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("co").await;
    let mut last = 0;
    for n in 0..20 {
        last = own.say("co", &format!("m{n}")).await["seq"]
            .as_u64()
            .unwrap();
    }
    let first = last - 19;
    let mut bob = Client::connect(&server, "bob").await;
    bob.join("co").await;
    for seq in first..=last {
        bob.send(json!({"type": "read", "room": "co", "seq": seq}))
            .await;
    }
    // `read` without a ref is not acknowledged
    bob.assert_none_before_pong(|f| f["type"] == "ack" || f["type"] == "error")
        .await;
    let started = tokio::time::Instant::now();
    let mut seen = Vec::new();
    while seen.last() != Some(&last) {
        let r = own
            .recv_where(|f| f["type"] == "receipt" && f["user"]["id"] == "bob")
            .await;
        seen.push(r["seq"].as_u64().unwrap());
    }
    assert_eq!(
        seen[0], first,
        "the first read is broadcast at once: {seen:?}"
    );
    assert!(
        seen.len() <= 3,
        "{} reads became {} broadcasts: {seen:?}",
        last - first + 1,
        seen.len()
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    await_marker(&server, "co", "bob", last).await;
    // the reader's own connections get the receipt too (their other devices clear the badge)
    bob.recv_where(|f| f["type"] == "receipt" && f["seq"] == last)
        .await;

    // refusals
    let e = bob
        .call(json!({"type": "read", "room": "co", "seq": 0}))
        .await;
    assert_eq!(code(&e), "invalid");
    let e = bob
        .call(json!({"type": "read", "room": "elsewhere", "seq": 1}))
        .await;
    assert_eq!(code(&e), "not_found");
    own.join("side").await;
    let e = bob
        .call(json!({"type": "read", "room": "side", "seq": 1}))
        .await;
    assert_eq!(code(&e), "forbidden", "not joined");
    server.stop().await;
}

#[tokio::test]
async fn joined_unread_is_last_seq_minus_marker() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("un").await;
    let mut seqs = Vec::new();
    for n in 0..10 {
        seqs.push(
            own.say("un", &format!("m{n}")).await["seq"]
                .as_u64()
                .unwrap(),
        );
    }
    let mut bob = Client::connect(&server, "bob").await;
    let j = bob.join("un").await;
    let last = *seqs.last().unwrap();
    assert_eq!(j["seq"], last);
    assert_eq!(j["unread"], last, "no marker yet: everything is unread");
    let a = bob
        .call(json!({"type": "read", "room": "un", "seq": seqs[3]}))
        .await;
    assert_eq!(
        (a["type"].as_str(), a["seq"].as_u64()),
        (Some("ack"), Some(seqs[3]))
    );
    await_marker(&server, "un", "bob", seqs[3]).await;
    let mut bob2 = Client::connect(&server, "bob").await;
    let j = bob2.join("un").await;
    assert_eq!(j["unread"], last - seqs[3]);
    // the listing says the same, over HTTP and over the socket
    let (_, listed) = get_json(&server, "/api/rooms", &token("bob")).await;
    let un = |rooms: &serde_json::Value| {
        rooms["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "un")
            .cloned()
            .unwrap()
    };
    assert_eq!(un(&listed)["unread"], last - seqs[3]);
    assert_eq!(
        un(&bob2.call(json!({"type": "list_rooms"})).await)["unread"],
        last - seqs[3]
    );
    // a marker of one user is not another's
    let mut ann = Client::connect(&server, "ann").await;
    let j = ann.join("un").await;
    assert_eq!(j["unread"], j["seq"]);
    bob.call(json!({"type": "read", "room": "un", "seq": last}))
        .await;
    await_marker(&server, "un", "bob", last).await;
    let mut bob3 = Client::connect(&server, "bob").await;
    assert_eq!(bob3.join("un").await["unread"], 0);
    // read-by: every user whose marker is >= S has read S
    let (_, r) = get_json(&server, "/api/rooms/un/receipts", &token("ann")).await;
    let read_by: Vec<&str> = r["markers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["seq"].as_u64().unwrap() >= seqs[5])
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert_eq!(read_by, ["bob"]);
    server.stop().await;
}

#[tokio::test]
async fn pins_and_markers_survive_a_restart() {
    if skipped_in_scaled_mode() {
        return;
    }
    let dir = temp_dir();
    let server = Server::start_in(dir.clone(), roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("keep").await;
    let mut ids = Vec::new();
    for c in ["a", "b", "c"] {
        ids.push(own.say("keep", c).await["id"].clone());
    }
    ack(&own.call(pin("keep", &ids[1])).await);
    ack(&own.call(pin("keep", &ids[0])).await);
    let mut bob = Client::connect(&server, "bob").await;
    let top = bob.join("keep").await["seq"].as_u64().unwrap();
    bob.call(json!({"type": "read", "room": "keep", "seq": top}))
        .await;
    await_marker(&server, "keep", "bob", top).await;
    drop((own, bob));
    server.stop().await;

    let server = Server::start_in(dir, roomy).await;
    await_pins(&server, "keep", |p| p == ["a", "b"]).await;
    assert_eq!(marker(&server, "keep", "bob").await, top);
    let mut own = Client::connect(&server, "own").await;
    let j = own.join("keep").await;
    assert_eq!(contents(&j["pins"]), ["a", "b"]);
    let mut bob = connect_as(&server, "bob", false).await;
    bob.join("keep").await;
    // an older read after the restart neither moves the marker back nor is announced
    bob.call(json!({"type": "read", "room": "keep", "seq": 1}))
        .await;
    own.assert_none_before_pong(|f| f["type"] == "receipt")
        .await;
    assert_eq!(marker(&server, "keep", "bob").await, top);
    server.stop().await;
}

/// What needs the room's seq to continue after a restart: an unpin must win over the stored
/// pin, a read of a new message must move the marker, `joined.unread` must count from it.
#[tokio::test]
async fn unpin_and_reads_work_after_a_restart() {
    if skipped_in_scaled_mode() {
        return;
    }
    let dir = temp_dir();
    let server = Server::start_in(dir.clone(), roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("again").await;
    let id = own.say("again", "pinned").await["id"].clone();
    ack(&own.call(pin("again", &id)).await);
    let top = own.say("again", "read").await["seq"].as_u64().unwrap();
    own.call(json!({"type": "read", "room": "again", "seq": top}))
        .await;
    await_marker(&server, "again", "own", top).await;
    drop(own);
    server.stop().await;

    let server = Server::start_in(dir, roomy).await;
    let mut own = Client::connect(&server, "own").await;
    let j = own.join("again").await;
    assert_eq!(
        (j["seq"].as_u64(), j["unread"].as_u64()),
        (Some(top), Some(0)),
        "{j}"
    );
    ack(&own.call(unpin("again", &id)).await);
    await_pins(&server, "again", |p| p.is_empty()).await;
    let next = own.say("again", "new").await["seq"].as_u64().unwrap();
    assert!(next > top);
    own.call(json!({"type": "read", "room": "again", "seq": next}))
        .await;
    await_marker(&server, "again", "own", next).await;
    server.stop().await;
}
