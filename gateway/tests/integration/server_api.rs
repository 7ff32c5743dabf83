//! The server API (docs/server-api.md): the application's backend acts through the same code
//! as clients' commands — same events, seqs, persistence and validation errors — with no
//! permission rules; keys; the OpenAPI description against the real routes. In scaled mode
//! users are on both nodes and calls go to either node.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::*;

/// The key the tests' backend uses, and an older one still configured (rotation).
const KEY: &str = "server-api-test-key-2026-02-0123456789abcdef";
const OLD_KEY: &str = "server-api-test-key-2026-01-0123456789abcdef";

/// A server with the server API on (keys in a directory, one file each).
async fn start() -> Server {
    let dir = temp_dir().join("api-keys");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("2026-01"), format!("{OLD_KEY}\n")).unwrap();
    std::fs::write(dir.join("2026-02"), KEY).unwrap();
    Server::start_with(|c| c.api_keys_dir = Some(dir)).await
}

/// The second node's address in scaled mode (the first's when embedded): calls there cross
/// nodes for users on the first.
fn other_node(server: &Server) -> SocketAddr {
    server.other.as_ref().map_or(server.addr, |o| o.addr)
}

/// Calls the server API on `addr` with `key`; the status and the JSON body (Null if none).
async fn call_with(
    addr: SocketAddr,
    key: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http().request(method, format!("http://{addr}{path}"));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.expect("http request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn call(addr: SocketAddr, method: Method, path: &str, body: Value) -> (u16, Value) {
    call_with(addr, Some(KEY), method, path, Some(body)).await
}

async fn get(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = call_with(addr, Some(KEY), Method::GET, path, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// Creates `room` through the API, owned by `owner`; returns its first seq.
async fn create(server: &Server, room: &str, owner: &str, visibility: &str) -> u64 {
    let body = json!({"room": room, "visibility": visibility, "owner": {"id": owner, "name": owner.to_uppercase()}});
    let (status, ack) = call(server.addr, Method::POST, "/server/v1/rooms", body).await;
    assert_eq!(status, 201, "{ack}");
    ack["seq"].as_u64().expect("seq")
}

/// Polls a read until `want` holds (the store learns of events from the persistence stream,
/// a moment after the ack in scaled mode).
async fn await_read(addr: SocketAddr, path: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = get(addr, path).await;
        if want(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} stuck at {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn seqs(messages: &Value) -> Vec<u64> {
    messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_published_message_reaches_clients_on_every_node_as_the_rooms_next_stored_event() {
    let server = start().await;
    let first = create(&server, "api-pub", "alice", "public").await;
    assert_eq!(first, 1, "room_created is the room's first event");
    let mut alice = Client::connect(&server, "alice").await;
    let mut bob = Client::connect(&server, "bob").await;
    assert_eq!(alice.join("api-pub").await["seq"], 1);
    bob.join("api-pub").await;

    // As the system sender, through the node bob is on (alice is on the other when scaled).
    let path = "/server/v1/rooms/api-pub/messages";
    let (status, ack) = call(
        other_node(&server),
        Method::POST,
        path,
        json!({"content": "maintenance at noon"}),
    )
    .await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack["seq"], 2);
    assert!(ack["id"].is_string() && ack["ts"].is_string(), "{ack}");
    for c in [&mut alice, &mut bob] {
        let m = c.recv_type("message").await;
        assert_eq!(m["seq"], 2);
        assert_eq!(m["id"], ack["id"]);
        assert_eq!(m["user"], json!({"id": "system", "name": "System"}));
        assert_eq!(m["content"], "maintenance at noon");
    }

    // As a given user, idempotent by client_msg_id: a repeat answers the first publication.
    let as_alice = json!({"content": "posted by the app", "user": {"id": "alice", "name": "Alice"}, "client_msg_id": "app-1"});
    let (_, first) = call(server.addr, Method::POST, path, as_alice.clone()).await;
    let (status, again) = call(other_node(&server), Method::POST, path, as_alice).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(first, again, "the repeat is answered with the first ack");
    assert_eq!(first["seq"], 3);
    // A client's own message comes next: the seq counts on, and the app's message came once.
    let ack = bob.say("api-pub", "from bob").await;
    assert_eq!(ack["seq"], 4);
    for c in [&mut alice, &mut bob] {
        let m = c
            .recv_where(|f| f["type"] == "message" && f["seq"] == 3)
            .await;
        assert_eq!(m["user"], json!({"id": "alice", "name": "Alice"}));
        assert_eq!(m["client_msg_id"], "app-1");
        c.recv_where(|f| f["type"] == "message" && f["seq"] == 4)
            .await;
        c.assert_none_before_pong(|f| f["type"] == "message").await;
    }

    // Stored like any message: the server API's history and the clients' history API agree.
    let stored = await_read(
        server.addr,
        "/server/v1/rooms/api-pub/messages?after=0",
        |b| seqs(b) == [2, 3, 4],
    )
    .await;
    assert_eq!(stored["messages"][0]["user"]["id"], "system");
    let (status, public) = crate::rooms::get_json(
        &server,
        "/api/rooms/api-pub/messages?after=0",
        &token("bob"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(public["messages"], stored["messages"]);
}

/// The error a client's command gets on its connection, as (code, message).
async fn ws_error(c: &mut Client, command: Value) -> (String, String) {
    let v = c.call(command).await;
    assert_eq!(v["type"], "error", "{v}");
    (
        v["code"].as_str().unwrap().into(),
        v["message"].as_str().unwrap().into(),
    )
}

/// The error the server API answers, as (code, message), with its status checked.
async fn api_error(addr: SocketAddr, method: Method, path: &str, body: Value) -> (String, String) {
    let body = (!body.is_null()).then_some(body);
    let (status, b) = call_with(addr, Some(KEY), method, path, body).await;
    let code = b["error"]["code"]
        .as_str()
        .expect("an error body")
        .to_string();
    let code_status = match code.as_str() {
        "invalid" => 400,
        "forbidden" => 403,
        "not_found" => 404,
        "conflict" => 409,
        "too_large" => 413,
        other => panic!("unexpected {other}"),
    };
    assert_eq!(status, code_status, "{b}");
    (code, b["error"]["message"].as_str().unwrap().into())
}

#[tokio::test]
async fn bad_input_gets_the_same_errors_as_the_clients_commands() {
    let server = start().await;
    create(&server, "api-val", "owner", "public").await;
    let mut owner = Client::connect(&server, "owner").await;
    owner.join("api-val").await;
    let addr = other_node(&server);
    let long = "x".repeat(4001);
    // (client command, API method, path, body)
    let cases = [
        (
            json!({"type": "message", "room": "api-val", "content": "  "}),
            Method::POST,
            "/server/v1/rooms/api-val/messages",
            json!({"content": "  "}),
        ),
        (
            json!({"type": "message", "room": "api-val", "content": long}),
            Method::POST,
            "/server/v1/rooms/api-val/messages",
            json!({"content": long}),
        ),
        (
            json!({"type": "message", "room": "api-val", "content": "hi", "client_msg_id": ""}),
            Method::POST,
            "/server/v1/rooms/api-val/messages",
            json!({"content": "hi", "client_msg_id": ""}),
        ),
        (
            json!({"type": "message", "room": "no-such-room", "content": "hi"}),
            Method::POST,
            "/server/v1/rooms/no-such-room/messages",
            json!({"content": "hi"}),
        ),
        (
            json!({"type": "ban", "room": "api-val", "user": "mallory", "duration_s": 0}),
            Method::POST,
            "/server/v1/rooms/api-val/bans",
            json!({"user": "mallory", "duration_s": 0}),
        ),
        (
            json!({"type": "add_member", "room": "api-val", "user": "ann", "role": "owner"}),
            Method::POST,
            "/server/v1/rooms/api-val/members",
            json!({"user": "ann", "role": "owner"}),
        ),
        (
            json!({"type": "update_room", "room": "api-val", "topic": "t".repeat(501)}),
            Method::PATCH,
            "/server/v1/rooms/api-val",
            json!({"topic": "t".repeat(501)}),
        ),
        (
            json!({"type": "update_room", "room": "api-val", "max_members": 0}),
            Method::PATCH,
            "/server/v1/rooms/api-val",
            json!({"max_members": 0}),
        ),
        (
            json!({"type": "create_room", "room": "api-val"}),
            Method::POST,
            "/server/v1/rooms",
            json!({"room": "api-val", "owner": {"id": "owner"}}),
        ),
        (
            json!({"type": "unban", "room": "api-val", "user": "nobody"}),
            Method::DELETE,
            "/server/v1/rooms/api-val/bans/nobody",
            json!({}),
        ),
    ];
    for (command, method, path, body) in cases {
        let want = ws_error(&mut owner, command.clone()).await;
        let got = api_error(addr, method, path, body).await;
        assert_eq!(got, want, "{command}");
    }

    // What only the API has: a bad room id, a bad user, a body that is not an object.
    let (code, _) = api_error(
        addr,
        Method::POST,
        "/server/v1/rooms/Not%20A%20Room/messages",
        json!({"content": "x"}),
    )
    .await;
    assert_eq!(code, "invalid");
    let (code, message) = api_error(
        addr,
        Method::POST,
        "/server/v1/rooms/api-val/messages",
        json!({"content": "x", "user": {"id": ""}}),
    )
    .await;
    assert_eq!(code, "invalid", "{message}");
    let (code, message) = api_error(
        addr,
        Method::POST,
        "/server/v1/rooms/api-val/messages",
        json!(["x"]),
    )
    .await;
    assert!(
        code == "invalid" && message.contains("JSON object"),
        "{message}"
    );
    let (code, message) = api_error(
        addr,
        Method::POST,
        "/server/v1/rooms/api-val/messages",
        json!({}),
    )
    .await;
    assert!(
        code == "invalid" && message.contains("content"),
        "{message}"
    );
    // A user id the node channel could not address, a body over a client's largest frame.
    let (code, message) = api_error(
        addr,
        Method::POST,
        "/server/v1/users/bob%0Aeve/disconnect",
        json!({}),
    )
    .await;
    assert!(
        code == "invalid" && message.contains("control"),
        "{message}"
    );
    let (code, _) = api_error(
        addr,
        Method::POST,
        "/server/v1/rooms/api-val/messages",
        json!({"content": "x".repeat(70_000)}),
    )
    .await;
    assert_eq!(code, "too_large");
    owner
        .assert_none_before_pong(|f| f["type"] == "message")
        .await;
}

#[tokio::test]
async fn rooms_members_and_sanctions_change_through_the_same_events() {
    let server = start().await;
    let mut owner = Client::connect(&server, "owner").await;
    let mut bob = Client::connect(&server, "bob").await;
    // A private room: its creation reaches the owner's connections only.
    let created = create(&server, "api-mod", "owner", "private").await;
    let ev = owner.recv_type("room_created").await;
    assert_eq!(
        (ev["seq"].as_u64(), &ev["room"]["owner"]),
        (Some(created), &json!("owner"))
    );
    owner.join("api-mod").await;

    let at = other_node(&server);
    let room = "/server/v1/rooms/api-mod";
    // Added by the backend: bob hears of it outside the room, then may join the private room.
    let (status, added) = call(
        at,
        Method::POST,
        &format!("{room}/members"),
        json!({"user": "bob"}),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    let ev = bob.recv_type("member_added").await;
    assert_eq!(
        (&ev["seq"], &ev["by"]["id"]),
        (&added["seq"], &json!("system"))
    );
    let joined = bob.join("api-mod").await;
    assert_eq!(joined["role"], "member");

    // A named moderator acts: events name it as `by`.
    let by = json!({"id": "moderation-bot", "name": "Moderation Bot"});
    let (_, muted) = call(
        at,
        Method::POST,
        &format!("{room}/mutes"),
        json!({"user": "bob", "duration_s": 60, "by": by}),
    )
    .await;
    let ev = owner.recv_type("muted").await;
    assert_eq!(
        (&ev["seq"], &ev["user"]["id"], &ev["by"]),
        (&muted["seq"], &json!("bob"), &by)
    );
    let refused = bob
        .call(json!({"type": "message", "room": "api-mod", "content": "hi"}))
        .await;
    assert_eq!(refused["code"], "muted", "{refused}");
    let (status, _) = call(at, Method::DELETE, &format!("{room}/mutes/bob"), json!({})).await;
    assert_eq!(status, 200);
    bob.recv_type("unmuted").await;
    bob.say("api-mod", "unmuted now").await;

    let (status, _) = call(
        at,
        Method::PATCH,
        &format!("{room}/members/bob"),
        json!({"role": "admin"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(owner.recv_type("member_updated").await["role"], "admin");
    let (status, _) = call(
        at,
        Method::PATCH,
        room,
        json!({"topic": "set by the app", "members_can_pin": true}),
    )
    .await;
    assert_eq!(status, 200);
    let ev = bob.recv_type("room_updated").await;
    assert_eq!(
        (&ev["room"]["topic"], &ev["room"]["members_can_pin"]),
        (&json!("set by the app"), &json!(true))
    );

    // What keeps a room whole holds for the backend too.
    let (code, _) = api_error(
        at,
        Method::POST,
        &format!("{room}/bans"),
        json!({"user": "owner"}),
    )
    .await;
    assert_eq!(code, "forbidden");
    let (code, _) = api_error(
        at,
        Method::PATCH,
        &format!("{room}/members/bob"),
        json!({"role": "owner"}),
    )
    .await;
    assert_eq!(code, "invalid");

    // A ban takes bob out of the room on his node; the unban lets him back in.
    let (status, banned) = call(
        at,
        Method::POST,
        &format!("{room}/bans"),
        json!({"user": "bob", "reason": "spam"}),
    )
    .await;
    assert_eq!(status, 200, "{banned}");
    let ev = bob.recv_type("banned").await;
    assert_eq!(
        (&ev["seq"], &ev["reason"]),
        (&banned["seq"], &json!("spam"))
    );
    assert_eq!(
        bob.call(json!({"type": "join", "room": "api-mod"})).await["code"],
        "banned"
    );
    let (status, _) = call(at, Method::DELETE, &format!("{room}/bans/bob"), json!({})).await;
    assert_eq!(status, 200);
    bob.recv_type("unbanned").await;

    let (status, deleted) = call(at, Method::DELETE, room, json!({})).await;
    assert_eq!(status, 200, "{deleted}");
    let ev = owner.recv_type("room_deleted").await;
    assert_eq!(
        (&ev["seq"], &ev["by"]["id"]),
        (&deleted["seq"], &json!("system"))
    );
    let (code, _) = api_error(
        at,
        Method::POST,
        &format!("{room}/messages"),
        json!({"content": "x"}),
    )
    .await;
    assert_eq!(code, "not_found");
}

#[tokio::test]
async fn a_kick_takes_the_users_connections_on_every_node_out_of_the_room() {
    let server = start().await;
    create(&server, "api-kick", "alice", "public").await;
    let mut alice = Client::connect_addr(server.addr, "alice", "/ws").await;
    let mut bob_a = Client::connect_addr(server.addr, "bob", "/ws").await;
    let mut bob_b = Client::connect_addr(other_node(&server), "bob", "/ws").await;
    for c in [&mut alice, &mut bob_a, &mut bob_b] {
        c.join("api-kick").await;
    }
    let (status, ack) = call(
        other_node(&server),
        Method::DELETE,
        "/server/v1/rooms/api-kick/members/bob",
        json!({"reason": "off topic"}),
    )
    .await;
    assert_eq!(status, 200, "{ack}");
    for c in [&mut alice, &mut bob_a, &mut bob_b] {
        let ev = c.recv_type("member_removed").await;
        assert_eq!(
            (&ev["seq"], &ev["user"]["id"], &ev["reason"]),
            (&ack["seq"], &json!("bob"), &json!("off topic"))
        );
    }
    alice.say("api-kick", "after the kick").await;
    for bob in [&mut bob_a, &mut bob_b] {
        bob.assert_none_before_pong(|f| f["type"] == "message")
            .await;
        let refused = bob
            .call(json!({"type": "message", "room": "api-kick", "content": "x"}))
            .await;
        assert_eq!(refused["code"], "forbidden", "out of the room: {refused}");
    }
}

#[tokio::test]
async fn a_disconnect_closes_every_connection_of_the_user_on_every_node_with_its_reason() {
    let server = start().await;
    let mut alice = Client::connect_addr(server.addr, "alice", "/ws").await;
    let mut bob_a = Client::connect_addr(server.addr, "bob", "/ws").await;
    let mut bob_b = Client::connect_addr(other_node(&server), "bob", "/ws").await;
    let (status, body) = call(
        other_node(&server),
        Method::POST,
        "/server/v1/users/bob/disconnect",
        json!({"reason": "account suspended"}),
    )
    .await;
    assert_eq!((status, body), (202, json!({"ok": true})));
    for bob in [&mut bob_a, &mut bob_b] {
        assert_eq!(
            bob.expect_close_frame().await,
            (1008, "account suspended".into())
        );
    }
    assert_eq!(alice.call(json!({"type": "ping"})).await["type"], "pong");

    // Without a reason, a default one; a reason that does not fit a close frame is refused.
    let mut bob = Client::connect_addr(server.addr, "bob", "/ws").await;
    call(
        server.addr,
        Method::POST,
        "/server/v1/users/bob/disconnect",
        json!({}),
    )
    .await;
    assert_eq!(
        bob.expect_close_frame().await,
        (1008, "disconnected by the server".into())
    );
    let (code, _) = api_error(
        server.addr,
        Method::POST,
        "/server/v1/users/bob/disconnect",
        json!({"reason": "r".repeat(124)}),
    )
    .await;
    assert_eq!(code, "too_large");
}

#[tokio::test]
async fn presence_pins_and_receipts_read_as_the_room_has_them() {
    let server = start().await;
    create(&server, "api-read", "alice", "public").await;
    let mut alice = Client::connect(&server, "alice").await;
    let mut bob = Client::connect(&server, "bob").await;
    alice.join("api-read").await;
    bob.join("api-read").await;
    let room = "/server/v1/rooms/api-read";

    let online = await_read(other_node(&server), &format!("{room}/presence"), |b| {
        b["count"] == 2
    })
    .await;
    let mut ids: Vec<&str> = online["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["alice", "bob"]);

    let said = alice.say("api-read", "pin me").await;
    let pinned = alice
        .call(json!({"type": "pin", "room": "api-read", "id": said["id"]}))
        .await;
    assert_eq!(pinned["type"], "ack", "{pinned}");
    let pins = await_read(server.addr, &format!("{room}/pins"), |b| {
        b["pins"].as_array().is_some_and(|p| !p.is_empty())
    })
    .await;
    assert_eq!(pins["pins"][0]["message"]["content"], "pin me");

    bob.send(json!({"type": "read", "room": "api-read", "seq": said["seq"]}))
        .await;
    let markers = await_read(other_node(&server), &format!("{room}/receipts"), |b| {
        b["markers"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["user"] == "bob"))
    })
    .await;
    let bobs = markers["markers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"] == "bob")
        .unwrap()
        .clone();
    assert_eq!(bobs["seq"], said["seq"]);

    for read in ["presence", "pins", "receipts", "messages"] {
        let (code, _) = api_error(
            server.addr,
            Method::GET,
            &format!("/server/v1/rooms/no-such-room/{read}"),
            Value::Null,
        )
        .await;
        assert_eq!(code, "not_found", "{read}");
    }
    let (code, _) = api_error(
        server.addr,
        Method::GET,
        &format!("{room}/messages?before=1&after=1"),
        Value::Null,
    )
    .await;
    assert_eq!(code, "invalid");
}

#[tokio::test]
async fn calls_need_a_configured_key_and_any_of_several_works() {
    let server = start().await;
    let path = "/server/v1/rooms/lobby/presence";
    for key in [
        None,
        Some("wrong-key-0123456789abcdef0123456789"),
        Some(&KEY[1..]),
    ] {
        let (status, body) = call_with(server.addr, key, Method::GET, path, None).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    create(&server, "lobby", "alice", "public").await;
    for key in [KEY, OLD_KEY] {
        let (status, body) = call_with(server.addr, Some(key), Method::GET, path, None).await;
        assert_eq!(status, 200, "{body}");
    }

    // Without keys there is no server API at all.
    let plain = Server::start().await;
    let (status, body) = call_with(plain.addr, Some(KEY), Method::GET, path, None).await;
    assert_eq!((status, body), (404, Value::Null), "the router's own 404");
}

/// The documented (method, path) pairs of docs/server-api.openapi.json.
fn documented() -> BTreeSet<(String, String)> {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/server-api.openapi.json"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "an OpenAPI 3 document"
    );
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                routes.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_openapi_description_documents_exactly_the_real_routes() {
    let real: BTreeSet<(String, String)> = gateway::server_api::routes()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let documented = documented();
    assert_eq!(
        documented, real,
        "docs/server-api.openapi.json vs the router's routes"
    );

    // Every documented route reaches a handler on the real router: never 405, and a 404 only
    // as a handler's `not_found` (the router's own 404 has no body).
    let server = start().await;
    for (method, path) in &documented {
        let path = path
            .replace("{room}", "probe-room")
            .replace("{user}", "probe-user");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let body = (method != Method::GET).then(|| json!({}));
        let (status, answer) = call_with(server.addr, Some(KEY), method.clone(), &path, body).await;
        assert_ne!(status, 405, "{method} {path}");
        if status == 404 {
            assert_eq!(
                answer["error"]["code"], "not_found",
                "{method} {path}: the router's 404"
            );
        }
    }
}

/// The lines of docs/server-api.md's example (the block marked to be run by this file).
fn documented_example() -> String {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/server-api.md");
    let doc = std::fs::read_to_string(file).unwrap();
    let marker = "<!-- run as written by gateway/tests/integration/server_api.rs -->\n```\n";
    let start = doc.find(marker).expect("a marked example") + marker.len();
    let end = start + doc[start..].find("```").expect("the example's end");
    doc[start..end].to_string()
}

/// Runs the documented example with bash against `addr`, in `dir`; its JSON answers.
async fn run_example(addr: SocketAddr, dir: &std::path::Path) -> Vec<Value> {
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &documented_example()])
        .current_dir(dir)
        .env("GATEWAY", format!("http://{addr}"))
        .output()
        .await
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .map(|v| v.expect("JSON answers"))
        .collect()
}

#[tokio::test]
async fn the_documented_example_runs_as_written() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("keys/app"), format!("{KEY}\n")).unwrap();
    let keys = dir.join("keys");
    let server = Server::start_with(|c| c.api_keys_dir = Some(keys)).await;
    let first = run_example(server.addr, &dir).await;
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first[0], json!({"seq": 1}));
    assert_eq!(first[1]["seq"], 2);
    // Again: the room exists (conflict), the message is not published twice.
    let again = run_example(server.addr, &dir).await;
    assert_eq!(again[0]["error"]["code"], "conflict");
    assert_eq!(again[1], first[1]);
    let stored = await_read(
        server.addr,
        "/server/v1/rooms/announcements/messages",
        |b| !seqs(b).is_empty(),
    )
    .await;
    assert_eq!(seqs(&stored), [2]);
}
