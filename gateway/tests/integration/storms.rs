//! Connection storms and big rooms: `hello` first whatever else happens meanwhile, presence
//! per user in small rooms and folded per interval in big ones, and a drain that spreads its
//! clients' returns.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// The first text frame of a fresh connection.
async fn first_frame(server: &Server, user: &str) -> Value {
    let url = format!("ws://{}/ws?token={}", server.addr_for(user), token(user));
    let mut ws = try_connect_url(&url).await.expect("upgrade accepted");
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("no error");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// Two connections in a 15 000-connection storm once got a `room_created` before their
/// `hello`: the session was registered for site-wide announcements before `hello` was
/// queued. Here rooms are created, and notices sent, while connections open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_is_the_first_frame_while_rooms_are_created() {
    let server = Server::start_with(|c| {
        c.messages_per_s = 1000;
        c.burst = 1000;
    })
    .await;
    let mut creator = Client::connect(&server, "creator").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let creating = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let room = format!("storm-{n}-{}", rand_u64());
                let a = creator
                    .call(json!({"type": "create_room", "room": room, "visibility": "public"}))
                    .await;
                assert_eq!(a["type"], "ack", "{a}");
                n += 1;
            }
            n
        }
    });
    let noticing = tokio::spawn({
        let (stop, url) = (stop.clone(), server.url("/api/admin/notice"));
        async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http()
                    .post(&url)
                    .bearer_auth(admin_token("root"))
                    .json(&json!({"content": "storm"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                n += 1;
            }
            n
        }
    });
    let server = std::sync::Arc::new(server);
    let mut opened = 0;
    for wave in 0..10 {
        let firsts = futures_util::future::join_all((0..30).map(|i| {
            let server = server.clone();
            async move { first_frame(&server, &format!("s{wave}-{i}")).await }
        }))
        .await;
        for f in firsts {
            assert_eq!(f["type"], "hello", "the first frame: {f}");
            opened += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (rooms, notices) = (creating.await.unwrap(), noticing.await.unwrap());
    assert!(rooms > 0 && notices > 0, "announcements ran alongside");
    eprintln!("{opened} connections, {rooms} rooms created, {notices} notices meanwhile");
    std::sync::Arc::into_inner(server)
        .expect("no other holder")
        .stop()
        .await;
}

#[tokio::test]
async fn a_small_room_announces_each_user() {
    let server = Server::start_with(|c| c.presence_coalesce_above = 3).await;
    let mut ann = Client::connect(&server, "ann").await;
    let j = ann.join("few").await;
    assert_eq!(j["online_count"], 1);
    let mut bob = Client::connect(&server, "bob").await;
    let j = bob.join("few").await;
    assert_eq!(
        (
            j["online_count"].clone(),
            j["online"].as_array().unwrap().len()
        ),
        (json!(2), 2)
    );
    assert_eq!(ann.recv_type("join").await["user"]["id"], "bob");
    let o = ann
        .recv_where(|f| f["type"] == "online_users" && f["count"] == 2)
        .await;
    assert!(o.get("joined_count").is_none(), "a small room's list: {o}");
    drop(bob);
    assert_eq!(ann.recv_type("leave").await["user"]["id"], "bob");
    server.stop().await;
}

/// Above `CHAT_PRESENCE_COALESCE_ABOVE` users online a room gets no `join`/`leave` per user:
/// each node folds its changes into at most one `online_users` per interval, with exact
/// counts and capped lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_room_folds_presence_into_one_update_per_interval() {
    const USERS: usize = 105; // more than the 100 an online list holds
    let interval = Duration::from_millis(300);
    let server = Server::start_with(|c| {
        c.presence_coalesce_above = 3;
        c.presence_interval_ms = interval.as_millis() as u64;
    })
    .await;
    let mut watcher = Client::connect(&server, "watcher").await;
    watcher.join("hall").await;
    let started = tokio::time::Instant::now();
    let server = std::sync::Arc::new(server);
    let mut clients = Vec::new();
    for wave in 0..(USERS - 1).div_ceil(26) {
        let n = 26.min(USERS - 1 - wave * 26);
        clients.extend(
            futures_util::future::join_all((0..n).map(|i| {
                let server = server.clone();
                async move {
                    let mut c = Client::connect(&server, &format!("u{wave}-{i}")).await;
                    c.join("hall").await;
                    c
                }
            }))
            .await,
        );
    }
    // Everyone who came is accounted for exactly once: by a `join`, or in the `joined_count`
    // of an update.
    let mut notices = 0u64;
    let mut folded = 0u64;
    let mut updates = 0u64;
    let mut last = Value::Null;
    while notices + folded < (USERS - 1) as u64 {
        let f = watcher.recv().await;
        match f["type"].as_str() {
            Some("join") => notices += 1,
            Some("online_users") => {
                updates += 1;
                folded += f["joined_count"].as_u64().unwrap_or(0);
                last = f;
            }
            _ => {}
        }
    }
    let took = started.elapsed();
    assert_eq!(
        notices + folded,
        (USERS - 1) as u64,
        "each joiner counted once"
    );
    assert!(
        notices <= 2,
        "only joins that left the room at 3 or fewer: {notices}"
    );
    // The last update may still be on its way.
    if last["count"] != USERS {
        last = watcher
            .recv_where(|f| f["type"] == "online_users" && f["count"] == USERS)
            .await;
        updates += 1;
    }
    assert_eq!(
        last["users"].as_array().unwrap().len(),
        100,
        "the list is capped"
    );
    assert!(last["joined"].as_array().unwrap().len() <= 20);
    // At most one update per interval per node, plus the leading one.
    let nodes = if scaled() { 2 } else { 1 };
    let bound = nodes * (took.as_millis() / interval.as_millis() + 2) as u64;
    assert!(
        updates <= bound,
        "{updates} updates in {took:?} (at most {bound}) for {} joins",
        USERS - 1
    );

    // A later joiner's `joined`: the exact count, a capped list.
    let mut late = Client::connect(&server, "late").await;
    let j = late.join("hall").await;
    assert_eq!(j["online_count"], USERS + 1);
    assert_eq!(j["online"].as_array().unwrap().len(), 100);
    // Leaving is folded too.
    let gone = clients.pop().unwrap();
    let gone_user = gone.user.clone();
    drop(gone);
    drop(late);
    // Until `gone` is listed as left and the count shows both gone. Scaled out, each node
    // folds its own leavers: the update listing `gone` may come before or after the other
    // node's, which may be the first with the final count.
    let mut seen = Vec::new();
    let (mut listed, mut counted) = (false, false);
    while !(listed && counted) {
        let f = watcher.recv().await; // fails the test when nothing more comes
        if f["type"] == "online_users" {
            listed |= f["left"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|u| u["id"] == gone_user.as_str());
            counted |= f["count"] == USERS - 1;
        }
        seen.push(f);
    }
    assert!(
        !seen
            .iter()
            .any(|f| f["type"] == "leave" || f["type"] == "join"),
        "no notices in a big room: {seen:?}"
    );
    drop(clients);
    std::sync::Arc::into_inner(server)
        .expect("no other holder")
        .stop()
        .await;
}

/// A drain spreads its clients over the window: one per slot of the window, each told its
/// time (`reconnect`) and closed then with 1012 and a reason that says to come back now.
#[tokio::test]
async fn a_drain_spreads_its_clients_and_tells_them_when_to_come_back() {
    const N: usize = 8;
    let server = Server::start_with(|c| c.drain_seconds = 2).await;
    let window_ms = 2000 * 3 / 4;
    let mut clients = Vec::new();
    for i in 0..N {
        // All on the drained node.
        let mut c = Client::connect_addr(server.addr, &format!("d{i}"), "/ws").await;
        c.join("leaving").await;
        clients.push(c);
    }
    let drained = tokio::spawn(gateway::shutdown::drain(server.node.clone()));
    let started = tokio::time::Instant::now();
    let mut after: Vec<u64> = Vec::new();
    for c in &mut clients {
        let r = c.recv_type("reconnect").await;
        after.push(r["after_ms"].as_u64().unwrap());
    }
    let mut slots: Vec<u64> = after.iter().map(|a| a * N as u64 / window_ms).collect();
    slots.sort_unstable();
    assert_eq!(
        slots,
        (0..N as u64).collect::<Vec<_>>(),
        "one per slot: {after:?}"
    );
    for (c, after_ms) in clients.iter_mut().zip(&after) {
        let (code, reason) = close_of(c).await;
        assert_eq!(code, 1012);
        assert!(reason.ends_with("retry_after_ms=0"), "{reason}");
        assert!(
            started.elapsed() + Duration::from_millis(50) >= Duration::from_millis(*after_ms),
            "closed at its time, not before"
        );
    }
    drained.await.unwrap();
    server.stop().await;
}

/// The close frame's code and reason.
async fn close_of(c: &mut Client) -> (u16, String) {
    loop {
        match tokio::time::timeout(WAIT, c.ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return (u16::from(f.code), f.reason.as_str().to_string())
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("{}: no close frame: {other:?}", c.user),
        }
    }
}
