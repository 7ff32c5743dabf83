//! Rooms, membership and moderation: the authorization matrix (every room command × every role
//! × every visibility, against one table), bans and mutes (eviction, rejoin, expiry), room
//! deletion, `room_full`, private rooms over HTTP, and room state across a restart.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::support::*;

/// Limits out of the way: the matrix sends thousands of commands over few connections.
pub fn roomy(c: &mut gateway::config::Config) {
    c.messages_per_s = 100_000;
    c.burst = 100_000;
    c.max_rooms_per_connection = 10_000;
    c.max_connections_per_user = 1_000;
}

/// A client of `user`; a global admin when `admin`.
pub async fn connect_as(server: &Server, user: &str, admin: bool) -> Client {
    if !admin {
        return Client::connect(server, user).await;
    }
    let url = format!("ws://{}/ws?token={}", server.addr, admin_token(user));
    let ws = try_connect_url(&url).await.expect("upgrade accepted");
    let mut c = Client::from_ws(ws, user);
    c.hello = c.recv_type("hello").await;
    c
}

/// Status and JSON body of an authenticated GET.
pub async fn get_json(server: &Server, path: &str, tok: &str) -> (u16, Value) {
    let r = http()
        .get(server.url(path))
        .bearer_auth(tok)
        .send()
        .await
        .expect("http request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Sends a command, then a ping: the command's answer (if any) arrives before the pong, so
/// this returns the answer or None for a command that answers nothing (`typing`).
pub async fn call_or_silence(c: &mut Client, mut v: Value) -> Option<Value> {
    let r = format!("q{}", rand_u64());
    let p = format!("p{}", rand_u64());
    v["ref"] = json!(r);
    c.send(v).await;
    c.send(json!({"type": "ping", "ref": p})).await;
    let f = c
        .recv_where(|f| f["ref"] == json!(r) || (f["type"] == "pong" && f["ref"] == json!(p)))
        .await;
    if f["ref"] == json!(r) {
        // the pong follows; take it so it does not linger
        c.recv_where(|f| f["type"] == "pong" && f["ref"] == json!(p))
            .await;
        Some(f)
    } else {
        None
    }
}

pub fn ack(v: &Value) -> &Value {
    assert_eq!(v["type"], "ack", "{v}");
    v
}

pub fn code(v: &Value) -> &str {
    assert_eq!(v["type"], "error", "{v}");
    v["code"].as_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The matrix

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cmd {
    CreateRoom,
    UpdateRoom,
    DeleteRoom,
    AddMember,
    RemoveMember,
    Kick,
    Ban,
    Unban,
    Mute,
    Unmute,
    SetRole,
    Pin,
    Unpin,
    DeleteOthers,
    Message,
    Typing,
    Join,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Owner,
    Admin,
    Member,
    NonMember,
    Banned,
    Muted,
    GlobalAdmin,
}

const WHO: [Who; 7] = [
    Who::Owner,
    Who::Admin,
    Who::Member,
    Who::NonMember,
    Who::Banned,
    Who::Muted,
    Who::GlobalAdmin,
];
const VIS: [&str; 3] = ["public", "private", "restricted"];

/// One cell: the outcome in a public, a private and a restricted room.
type Cell = [&'static str; 3];
const OK: Cell = ["ok", "ok", "ok"];
const NO: Cell = ["forbidden", "forbidden", "forbidden"];
const BAN: Cell = ["banned", "banned", "banned"];
const MUTED: Cell = ["muted", "muted", "muted"];
/// Public: anyone who joins may post; private: members only; restricted: readers may not post.
const PUB_ONLY: Cell = ["ok", "forbidden", "forbidden"];
/// Public and restricted: anyone may join; private: members only.
const NOT_PRIVATE: Cell = ["ok", "forbidden", "ok"];

/// The permission table as documented in docs/permissions.md ("ok" = ack/joined and the
/// event reaches the room; otherwise the exact error code).
#[rustfmt::skip]
const MATRIX: &[(Cmd, [Cell; 7])] = &[
    //                   owner admin member non-member   banned muted  global admin
    (Cmd::CreateRoom,   [OK,   OK,   OK,    OK,          OK,    OK,    OK]),
    (Cmd::UpdateRoom,   [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::DeleteRoom,   [OK,   NO,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::AddMember,    [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::RemoveMember, [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::Kick,         [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::Ban,          [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::Unban,        [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::Mute,         [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::Unmute,       [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::SetRole,      [OK,   NO,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::Pin,          [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::Unpin,        [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::DeleteOthers, [OK,   OK,   NO,    NO,          BAN,   NO,    OK]),
    (Cmd::Message,      [OK,   OK,   OK,    PUB_ONLY,    BAN,   MUTED, OK]),
    (Cmd::Typing,       [OK,   OK,   OK,    PUB_ONLY,    BAN,   MUTED, OK]),
    (Cmd::Join,         [OK,   OK,   OK,    NOT_PRIVATE, BAN,   OK,    OK]),
];

fn user_of(who: Who) -> &'static str {
    match who {
        Who::Owner => "own",
        Who::Admin => "adm",
        Who::Member => "mem",
        Who::NonMember => "out",
        Who::Banned => "bnd",
        Who::Muted => "mut",
        Who::GlobalAdmin => "gad",
    }
}

/// The event the room sees when the command succeeds (None: nothing to watch for).
fn event_of(cmd: Cmd) -> Option<&'static str> {
    Some(match cmd {
        Cmd::CreateRoom | Cmd::Join => return None,
        Cmd::UpdateRoom => "room_updated",
        Cmd::DeleteRoom => "room_deleted",
        Cmd::AddMember => "member_added",
        Cmd::RemoveMember | Cmd::Kick => "member_removed",
        Cmd::Ban => "banned",
        Cmd::Unban => "unbanned",
        Cmd::Mute => "muted",
        Cmd::Unmute => "unmuted",
        Cmd::SetRole => "member_updated",
        Cmd::Pin => "pinned",
        Cmd::Unpin => "unpinned",
        Cmd::DeleteOthers => "message_deleted",
        Cmd::Message => "message",
        Cmd::Typing => "typing",
    })
}

/// Sends one setup command as the owner and returns the seq its ack carries.
async fn setup(own: &mut Client, command: Value) -> u64 {
    ack(&own.call(command).await)["seq"].as_u64().expect("seq")
}

/// Runs one cell on a fresh room and returns a description of any mismatch.
async fn cell(server: &Server, n: usize, cmd: Cmd, who: Who, vis: &str) -> Option<String> {
    let room = format!("mx-{vis}-{n}");
    let mut own = Client::connect(server, "own").await;
    ack(&own
        .call(json!({"type": "create_room", "room": room, "name": "Matrix", "visibility": vis}))
        .await);
    own.join(&room).await;
    let add = |user: &'static str, role: &'static str| json!({"type": "add_member", "room": room, "user": user, "role": role});
    // Every setup step is a stored event; `last` is the highest seq among them.
    let mut last = 0;
    let (a, t) = (add("adm", "admin"), add("tgt", "member"));
    last = last.max(setup(&mut own, a).await);
    last = last.max(setup(&mut own, t).await);
    match who {
        Who::Member => last = last.max(setup(&mut own, add("mem", "member")).await),
        Who::Muted => {
            last = last.max(setup(&mut own, add("mut", "member")).await);
            let mute = json!({"type": "mute", "room": room, "user": "mut"});
            last = last.max(setup(&mut own, mute).await);
        }
        Who::Banned => {
            let ban = json!({"type": "ban", "room": room, "user": "bnd"});
            last = last.max(setup(&mut own, ban).await);
        }
        _ => {}
    }
    // what the command acts on
    let mut tgt_client = None;
    let mut msg_id = Value::Null;
    match cmd {
        Cmd::DeleteOthers => {
            let mut t = Client::connect(server, "tgt").await;
            t.join(&room).await;
            let said = t.say(&room, "by tgt").await;
            msg_id = said["id"].clone();
            last = last.max(said["seq"].as_u64().expect("seq"));
            tgt_client = Some(t);
        }
        Cmd::Pin | Cmd::Unpin => {
            let said = own.say(&room, "pin me").await;
            msg_id = said["id"].clone();
            last = last.max(said["seq"].as_u64().expect("seq"));
            if cmd == Cmd::Unpin {
                let pin = json!({"type": "pin", "room": room, "id": msg_id});
                last = last.max(setup(&mut own, pin).await);
            }
        }
        Cmd::Unban => {
            let ban = json!({"type": "ban", "room": room, "user": "tgt"});
            last = last.max(setup(&mut own, ban).await);
        }
        Cmd::Unmute => {
            let mute = json!({"type": "mute", "room": room, "user": "tgt"});
            last = last.max(setup(&mut own, mute).await);
        }
        _ => {}
    }
    // Forget the setup's events: the owner's connection now watches for the command's. The
    // events are awaited, not a ping: in scaled mode they come back through Redis, after the
    // acks, so a pong can overtake them.
    let room_id = room.clone();
    own.skip_until(move |f| f["room"] == json!(room_id) && f["seq"].as_u64() == Some(last))
        .await;
    // the acting connection; the owner's own connection watches the room
    let user = user_of(who);
    let fresh = who != Who::Owner || cmd == Cmd::Join;
    let mut actor = if fresh {
        Some(connect_as(server, user, who == Who::GlobalAdmin).await)
    } else {
        None
    };
    if matches!(cmd, Cmd::Message | Cmd::Typing) {
        if let Some(a) = actor.as_mut() {
            // may be refused (banned, private); the command's answer is what is checked
            let _ = a.call(json!({"type": "join", "room": room})).await;
        }
    }
    let frame = match cmd {
        Cmd::CreateRoom => {
            json!({"type": "create_room", "room": format!("{room}-new"), "name": "New", "visibility": vis})
        }
        Cmd::UpdateRoom => json!({"type": "update_room", "room": room, "topic": "changed"}),
        Cmd::DeleteRoom => json!({"type": "delete_room", "room": room}),
        Cmd::AddMember => json!({"type": "add_member", "room": room, "user": "newbie"}),
        Cmd::RemoveMember => {
            json!({"type": "remove_member", "room": room, "user": "tgt", "reason": "r"})
        }
        Cmd::Kick => json!({"type": "kick", "room": room, "user": "tgt"}),
        Cmd::Ban => json!({"type": "ban", "room": room, "user": "tgt", "reason": "spam"}),
        Cmd::Unban => json!({"type": "unban", "room": room, "user": "tgt"}),
        Cmd::Mute => json!({"type": "mute", "room": room, "user": "tgt"}),
        Cmd::Unmute => json!({"type": "unmute", "room": room, "user": "tgt"}),
        Cmd::SetRole => json!({"type": "set_role", "room": room, "user": "tgt", "role": "admin"}),
        Cmd::Pin => json!({"type": "pin", "room": room, "id": msg_id}),
        Cmd::Unpin => json!({"type": "unpin", "room": room, "id": msg_id}),
        Cmd::DeleteOthers => json!({"type": "delete", "room": room, "id": msg_id}),
        Cmd::Message => json!({"type": "message", "room": room, "content": "hi"}),
        Cmd::Typing => json!({"type": "typing", "room": room}),
        Cmd::Join => json!({"type": "join", "room": room}),
    };
    let answer = call_or_silence(actor.as_mut().unwrap_or(&mut own), frame).await;
    let row = MATRIX.iter().find(|(c, _)| *c == cmd).expect("row").1;
    let want = row[WHO.iter().position(|w| *w == who).unwrap()]
        [VIS.iter().position(|v| *v == vis).unwrap()];
    let got = match &answer {
        None => "ok".to_string(),
        Some(a) if a["type"] == "ack" || a["type"] == "joined" => "ok".to_string(),
        Some(a) if a["type"] == "error" => a["code"].as_str().unwrap_or("?").to_string(),
        Some(a) => format!("unexpected {a}"),
    };
    let what = format!("{cmd:?} by {who:?} in {vis}");
    if got != want {
        return Some(format!("{what}: want {want}, got {got} ({answer:?})"));
    }
    // The effect: the room sees the event on success, and nothing on refusal.
    let watched = event_of(cmd).filter(|_| !(cmd == Cmd::Typing && who == Who::Owner));
    if let Some(ev) = watched {
        if want == "ok" {
            let f = own.recv_type(ev).await;
            if cmd != Cmd::Typing {
                let seq = f["seq"].as_u64().unwrap_or(0);
                let acked = answer
                    .as_ref()
                    .map_or(0, |a| a["seq"].as_u64().unwrap_or(0));
                if seq == 0 || seq != acked {
                    return Some(format!("{what}: event {f} does not carry the ack's seq"));
                }
            }
        } else {
            own.assert_none_before_pong(|f| f["type"] == ev && f["room"] == json!(room))
                .await;
        }
    }
    drop(tgt_client);
    None
}

#[tokio::test]
async fn authorization_matrix() {
    let server = Server::start_with(roomy).await;
    let mut mismatches = Vec::new();
    let mut cells = 0;
    for (n, (cmd, _)) in MATRIX.iter().enumerate() {
        for (w, who) in WHO.iter().enumerate() {
            // the three visibilities of a cell run concurrently
            let runs = VIS
                .iter()
                .map(|vis| cell(&server, n * 10 + w, *cmd, *who, vis));
            for m in join_all(runs).await {
                cells += 1;
                mismatches.extend(m);
            }
        }
    }
    assert_eq!(cells, 17 * 7 * 3);
    assert!(
        mismatches.is_empty(),
        "{} of {cells} cells differ from the table:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    server.stop().await;
}

/// Rules the matrix does not cover: rank between moderators, roles, unknown rooms and users.
#[tokio::test]
async fn moderation_edges() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    let mut adm = Client::connect(&server, "adm").await;
    let mut mem = Client::connect(&server, "mem").await;
    ack(&own
        .call(json!({"type": "create_room", "room": "edge", "visibility": "restricted"}))
        .await);
    let taken = own
        .call(json!({"type": "create_room", "room": "edge", "visibility": "public"}))
        .await;
    assert_eq!(code(&taken), "conflict");
    for (user, role) in [("adm", "admin"), ("adm2", "admin"), ("mem", "member")] {
        ack(&own
            .call(json!({"type": "add_member", "room": "edge", "user": user, "role": role}))
            .await);
    }
    let table: &[(&str, Value, &str)] = &[
        // nobody acts on the owner; admins do not act on admins
        (
            "adm",
            json!({"type": "kick", "room": "edge", "user": "own"}),
            "forbidden",
        ),
        (
            "adm",
            json!({"type": "ban", "room": "edge", "user": "own"}),
            "forbidden",
        ),
        (
            "adm",
            json!({"type": "mute", "room": "edge", "user": "own"}),
            "forbidden",
        ),
        (
            "adm",
            json!({"type": "ban", "room": "edge", "user": "adm2"}),
            "forbidden",
        ),
        (
            "adm",
            json!({"type": "remove_member", "room": "edge", "user": "adm2"}),
            "forbidden",
        ),
        (
            "adm",
            json!({"type": "ban", "room": "edge", "user": "adm"}),
            "forbidden",
        ),
        // only the owner makes admins
        (
            "adm",
            json!({"type": "add_member", "room": "edge", "user": "x", "role": "admin"}),
            "forbidden",
        ),
        (
            "own",
            json!({"type": "set_role", "room": "edge", "user": "mem", "role": "owner"}),
            "invalid",
        ),
        (
            "own",
            json!({"type": "add_member", "room": "edge", "user": "x", "role": "owner"}),
            "invalid",
        ),
        (
            "own",
            json!({"type": "add_member", "room": "edge", "user": "mem"}),
            "conflict",
        ),
        (
            "own",
            json!({"type": "set_role", "room": "edge", "user": "nobody", "role": "admin"}),
            "not_found",
        ),
        (
            "own",
            json!({"type": "mute", "room": "edge", "user": "nobody"}),
            "not_found",
        ),
        (
            "own",
            json!({"type": "unban", "room": "edge", "user": "mem"}),
            "not_found",
        ),
        (
            "own",
            json!({"type": "ban", "room": "edge", "user": "mem", "duration_s": 0}),
            "invalid",
        ),
        (
            "own",
            json!({"type": "kick", "room": "nowhere", "user": "mem"}),
            "not_found",
        ),
        (
            "own",
            json!({"type": "update_room", "room": "nowhere", "topic": "t"}),
            "not_found",
        ),
        (
            "own",
            json!({"type": "update_room", "room": "edge", "max_members": 0}),
            "invalid",
        ),
        (
            "mem",
            json!({"type": "pin", "room": "edge", "id": "1"}),
            "forbidden",
        ),
    ];
    for (user, frame, want) in table {
        let c = match *user {
            "own" => &mut own,
            "adm" => &mut adm,
            _ => &mut mem,
        };
        let got = c.call(frame.clone()).await;
        assert_eq!(code(&got), *want, "{user}: {frame} → {got}");
    }
    // admins do act on members; the owner acts on admins
    ack(&adm
        .call(json!({"type": "mute", "room": "edge", "user": "mem", "duration_s": 60}))
        .await);
    ack(&own
        .call(json!({"type": "set_role", "room": "edge", "user": "adm2", "role": "member"}))
        .await);
    ack(&adm
        .call(json!({"type": "kick", "room": "edge", "user": "adm2"}))
        .await);
    // members_can_pin lets members pin (restricted room: members post)
    mem.join("edge").await;
    ack(&adm
        .call(json!({"type": "unmute", "room": "edge", "user": "mem"}))
        .await);
    let id = mem.say("edge", "pin-worthy").await["id"].clone();
    let refused = mem
        .call(json!({"type": "pin", "room": "edge", "id": id}))
        .await;
    assert_eq!(code(&refused), "forbidden");
    ack(&own
        .call(json!({"type": "update_room", "room": "edge", "members_can_pin": true}))
        .await);
    ack(&mem
        .call(json!({"type": "pin", "room": "edge", "id": id}))
        .await);
    let u = own.call(json!({"type": "list_rooms"})).await;
    assert!(u["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == "edge"));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bans, mutes, deletion, capacity

#[tokio::test]
async fn ban_evicts_every_connection_at_once_and_blocks_rejoin() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("hall").await;
    let mut bob1 = Client::connect(&server, "bob").await;
    let mut bob2 = Client::connect(&server, "bob").await;
    bob1.join("hall").await;
    bob2.join("hall").await;
    // Skips the count of 1 from own's join: the later wait for 1 must not find it.
    own.skip_until(|f| f["type"] == "online_users" && f["count"] == 2)
        .await;

    let a = ack(&own
        .call(json!({"type": "ban", "room": "hall", "user": "bob", "reason": "spam"}))
        .await)
    .clone();
    for bob in [&mut bob1, &mut bob2] {
        let b = bob.recv_type("banned").await;
        assert_eq!(b["user"]["id"], "bob");
        assert_eq!(b["reason"], "spam");
        assert_eq!(b["seq"], a["seq"]);
    }
    // out of the room at once: nothing of the room reaches them any more
    own.say("hall", "after the ban").await;
    for bob in [&mut bob1, &mut bob2] {
        bob.assert_none_before_pong(|f| f["type"] == "message")
            .await;
        for frame in [
            json!({"type": "message", "room": "hall", "content": "let me in"}),
            json!({"type": "typing", "room": "hall"}),
            json!({"type": "join", "room": "hall"}),
            json!({"type": "pin", "room": "hall", "id": "1"}),
        ] {
            let e = bob.call(frame.clone()).await;
            assert_eq!(code(&e), "banned", "{frame} → {e}");
        }
        let e = bob
            .call(json!({"type": "read", "room": "hall", "seq": 1}))
            .await;
        assert_eq!(e["type"], "error", "{e}");
    }
    // the room sees bob go offline (both of his connections were taken out)
    own.recv_where(|f| f["type"] == "online_users" && f["count"] == 1)
        .await;
    let rooms = own.call(json!({"type": "list_rooms"})).await;
    let hall = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "hall")
        .cloned()
        .unwrap();
    assert_eq!(hall["online_count"], 1, "{hall}");
    let (status, members) = get_json(&server, "/api/rooms/hall/members", &token("own")).await;
    assert_eq!(status, 200);
    assert!(
        !members["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["user"]["id"] == "bob"),
        "a ban ends the membership: {members}"
    );
    // HTTP reads are refused too
    let (status, body) = get_json(&server, "/api/rooms/hall/messages", &token("bob")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("banned"))
    );
    // a new connection cannot get in either
    let mut bob3 = Client::connect(&server, "bob").await;
    let e = bob3.call(json!({"type": "join", "room": "hall"})).await;
    assert_eq!(code(&e), "banned");

    ack(&own
        .call(json!({"type": "unban", "room": "hall", "user": "bob"}))
        .await);
    own.recv_type("unbanned").await;
    bob3.join("hall").await;
    bob3.say("hall", "back").await;
    bob1.join("hall").await;
    own.recv_where(|f| f["type"] == "online_users" && f["count"] == 2)
        .await;
    server.stop().await;
}

/// Polls `attempt` (every 50 ms) until it returns true or `within` passes.
async fn until(within: Duration, mut attempt: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if attempt().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_second_mute_and_ban_expire_by_themselves() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    let mut bob = Client::connect(&server, "bob").await;
    own.join("tmp").await;
    bob.join("tmp").await;

    let muted_at = tokio::time::Instant::now();
    ack(&own
        .call(json!({"type": "mute", "room": "tmp", "user": "bob", "duration_s": 1}))
        .await);
    let m = bob.recv_type("muted").await;
    assert!(m["until"].is_string(), "{m}");
    let e = bob
        .call(json!({"type": "message", "room": "tmp", "content": "x"}))
        .await;
    assert_eq!(code(&e), "muted");
    let e = bob.call(json!({"type": "typing", "room": "tmp"})).await;
    assert_eq!(code(&e), "muted");
    let posted = until(Duration::from_secs(5), async || {
        let v = bob
            .call(json!({"type": "message", "room": "tmp", "content": "free"}))
            .await;
        if v["type"] == "ack" {
            return true;
        }
        assert_eq!(code(&v), "muted");
        false
    })
    .await;
    assert!(posted, "the mute did not end");
    assert!(muted_at.elapsed() >= Duration::from_millis(900));
    // no event was needed to end it
    bob.assert_none_before_pong(|f| f["type"] == "unmuted")
        .await;

    let banned_at = tokio::time::Instant::now();
    ack(&own
        .call(json!({"type": "ban", "room": "tmp", "user": "bob", "duration_s": 1}))
        .await);
    bob.recv_type("banned").await;
    let e = bob.call(json!({"type": "join", "room": "tmp"})).await;
    assert_eq!(code(&e), "banned");
    let rejoined = until(Duration::from_secs(5), async || {
        let v = bob.call(json!({"type": "join", "room": "tmp"})).await;
        if v["type"] == "joined" {
            return true;
        }
        assert_eq!(code(&v), "banned");
        false
    })
    .await;
    assert!(rejoined, "the ban did not end");
    assert!(banned_at.elapsed() >= Duration::from_millis(900));
    bob.say("tmp", "hello again").await;
    server.stop().await;
}

#[tokio::test]
async fn delete_room_ends_every_members_subscription() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    ack(&own
        .call(json!({"type": "create_room", "room": "doomed", "visibility": "private"}))
        .await);
    for u in ["ann", "bob"] {
        ack(&own
            .call(json!({"type": "add_member", "room": "doomed", "user": u}))
            .await);
    }
    own.join("doomed").await;
    let mut ann = Client::connect(&server, "ann").await;
    let mut bob1 = Client::connect(&server, "bob").await;
    let mut bob2 = Client::connect(&server, "bob").await;
    for c in [&mut ann, &mut bob1, &mut bob2] {
        c.join("doomed").await;
    }
    ann.say("doomed", "last words").await;

    let mut admin = connect_as(&server, "root", true).await;
    ack(&admin
        .call(json!({"type": "delete_room", "room": "doomed"}))
        .await);
    for c in [&mut own, &mut ann, &mut bob1, &mut bob2] {
        let d = c.recv_type("room_deleted").await;
        assert_eq!(d["by"]["id"], "root");
        assert!(d["seq"].as_u64().unwrap() > 0);
    }
    for c in [&mut own, &mut ann, &mut bob1, &mut bob2] {
        let e = c
            .call(json!({"type": "message", "room": "doomed", "content": "hello?"}))
            .await;
        assert_eq!(code(&e), "not_found", "{e}");
        let e = c.call(json!({"type": "join", "room": "doomed"})).await;
        assert_eq!(code(&e), "not_found", "an id is never reused: {e}");
        let e = c.call(json!({"type": "leave", "room": "doomed"})).await;
        assert_eq!(code(&e), "not_found");
    }
    let (status, _) = get_json(&server, "/api/rooms/doomed/messages", &token("ann")).await;
    assert_eq!(status, 404);
    let (_, rooms) = get_json(&server, "/api/rooms", &token("own")).await;
    assert!(!rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == "doomed"));
    // create_room of the old id: taken
    let e = own
        .call(json!({"type": "create_room", "room": "doomed", "visibility": "public"}))
        .await;
    assert_eq!(code(&e), "conflict");
    server.stop().await;
}

#[tokio::test]
async fn room_full() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    ack(&own
        .call(json!({"type": "create_room", "room": "tiny", "visibility": "public", "max_members": 2}))
        .await);
    let mut ann = Client::connect(&server, "ann").await;
    let j = ann.join("tiny").await;
    assert_eq!(j["role"], "member");
    let mut bob = Client::connect(&server, "bob").await;
    let e = bob.call(json!({"type": "join", "room": "tiny"})).await;
    assert_eq!(code(&e), "room_full");
    let e = own
        .call(json!({"type": "add_member", "room": "tiny", "user": "bob"}))
        .await;
    assert_eq!(code(&e), "room_full");
    // members already in come back in
    let mut ann2 = Client::connect(&server, "ann").await;
    ann2.join("tiny").await;
    // leaving a public room ends a plain membership and frees the place
    ann.call(json!({"type": "leave", "room": "tiny"})).await;
    ann2.call(json!({"type": "leave", "room": "tiny"})).await;
    bob.join("tiny").await;
    // raising the limit lets more in
    ack(&own
        .call(json!({"type": "update_room", "room": "tiny", "max_members": 3}))
        .await);
    ann.join("tiny").await;

    // restricted rooms count members only: readers do not take places
    ack(&own
        .call(json!({"type": "create_room", "room": "stage", "visibility": "restricted", "max_members": 1}))
        .await);
    let j = bob.join("stage").await;
    assert!(j["role"].is_null(), "a reader is not a member: {j}");
    let e = own
        .call(json!({"type": "add_member", "room": "stage", "user": "bob"}))
        .await;
    assert_eq!(code(&e), "room_full");
    server.stop().await;
}

#[tokio::test]
async fn private_rooms_are_hidden_and_unreadable_to_non_members() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    ack(&own
        .call(
            json!({"type": "create_room", "room": "secret", "visibility": "private", "topic": "t"}),
        )
        .await);
    ack(&own
        .call(json!({"type": "create_room", "room": "stage", "visibility": "restricted"}))
        .await);
    ack(&own
        .call(json!({"type": "add_member", "room": "secret", "user": "mem"}))
        .await);
    own.join("secret").await;
    let id = own.say("secret", "classified").await["id"].clone();
    ack(&own
        .call(json!({"type": "pin", "room": "secret", "id": id}))
        .await);
    own.send(json!({"type": "read", "room": "secret", "seq": 1}))
        .await;

    let paths = [
        "/api/rooms/secret/messages",
        "/api/rooms/secret/pins",
        "/api/rooms/secret/receipts",
        "/api/rooms/secret/members",
        "/api/messages?room=secret&page=1",
    ];
    for p in paths {
        let (status, body) = get_json(&server, p, &token("out")).await;
        assert_eq!(status, 403, "{p}: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{p}");
        let (status, _) = get_json(&server, p, &token("mem")).await;
        assert_eq!(status, 200, "{p} for a member");
        let (status, _) = get_json(&server, p, &admin_token("root")).await;
        assert_eq!(status, 200, "{p} for a global admin");
    }
    let (status, _) = get_json(&server, "/api/rooms/stage/messages", &token("out")).await;
    assert_eq!(status, 200, "restricted rooms are readable by anyone");
    let (status, _) = get_json(&server, "/api/rooms/secret/messages", "garbage").await;
    assert_eq!(status, 401);

    let ids = |v: &Value| -> Vec<String> {
        v["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, listing) = get_json(&server, "/api/rooms", &token("out")).await;
    assert!(!ids(&listing).contains(&"secret".to_string()), "{listing}");
    assert!(ids(&listing).contains(&"stage".to_string()), "{listing}");
    let mut out = Client::connect(&server, "out").await;
    let listing = out.call(json!({"type": "list_rooms"})).await;
    assert!(!ids(&listing).contains(&"secret".to_string()), "{listing}");
    let e = out.call(json!({"type": "join", "room": "secret"})).await;
    assert_eq!(code(&e), "forbidden");

    let (_, listing) = get_json(&server, "/api/rooms", &token("mem")).await;
    let secret = listing["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "secret")
        .cloned()
        .expect("members see their private rooms");
    assert_eq!(secret["member_count"], 2);
    assert_eq!(secret["online_count"], 1);
    // being added shows the room at once
    ack(&own
        .call(json!({"type": "add_member", "room": "secret", "user": "out"}))
        .await);
    let added = out.recv_type("member_added").await;
    assert_eq!(added["room"], "secret");
    let listing = out.call(json!({"type": "list_rooms"})).await;
    assert!(ids(&listing).contains(&"secret".to_string()));
    out.join("secret").await;
    server.stop().await;
}

/// A restricted room made private keeps its members (and global admins) and lets its
/// readers go: they get `room_updated`, then `left`, and no more of the room.
#[tokio::test]
async fn making_a_room_private_lets_its_readers_go() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    ack(&own
        .call(json!({"type": "create_room", "room": "stage", "visibility": "restricted"}))
        .await);
    ack(&own
        .call(json!({"type": "add_member", "room": "stage", "user": "mem"}))
        .await);
    own.join("stage").await;
    let mut mem = Client::connect(&server, "mem").await;
    mem.join("stage").await;
    let mut reader = Client::connect(&server, "reader").await;
    assert!(reader.join("stage").await["role"].is_null());
    let mut root = connect_as(&server, "root", true).await;
    root.join("stage").await;

    ack(&own
        .call(json!({"type": "update_room", "room": "stage", "visibility": "private"}))
        .await);
    assert_eq!(
        reader.recv_type("room_updated").await["room"]["visibility"],
        "private"
    );
    assert_eq!(reader.recv_type("left").await["room"], "stage");
    let said = own.say("stage", "members only").await;
    for c in [&mut mem, &mut root] {
        let m = c.recv_type("message").await;
        assert_eq!(m["id"], said["id"], "{} stays in the room", c.user);
    }
    reader
        .assert_none_before_pong(|f| f["type"] == "message")
        .await;
    let e = reader
        .call(json!({"type": "read", "room": "stage", "seq": 1}))
        .await;
    assert_eq!(code(&e), "forbidden", "{e}");
    let e = reader.call(json!({"type": "join", "room": "stage"})).await;
    assert_eq!(code(&e), "forbidden", "{e}");
    server.stop().await;
}

#[tokio::test]
async fn room_state_survives_a_restart() {
    if skipped_in_scaled_mode() {
        return;
    }
    let dir = temp_dir();
    let server = Server::start_in(dir.clone(), roomy).await;
    let mut own = Client::connect(&server, "own").await;
    ack(&own
        .call(json!({"type": "create_room", "room": "vault", "name": "The Vault", "visibility": "private", "topic": "gold", "max_members": 10}))
        .await);
    for (u, r) in [("adm", "admin"), ("mem", "member"), ("mut", "member")] {
        ack(&own
            .call(json!({"type": "add_member", "room": "vault", "user": u, "role": r}))
            .await);
    }
    ack(&own
        .call(json!({"type": "mute", "room": "vault", "user": "mut"}))
        .await);
    ack(&own
        .call(json!({"type": "ban", "room": "vault", "user": "bnd"}))
        .await);
    ack(&own
        .call(json!({"type": "update_room", "room": "vault", "members_can_pin": true}))
        .await);
    drop(own);
    server.stop().await;

    let server = Server::start_in(dir, roomy).await;
    let mut mem = Client::connect(&server, "mem").await;
    let j = mem.join("vault").await;
    assert_eq!(j["role"], "member");
    assert_eq!(j["room"]["name"], "The Vault");
    assert_eq!(j["room"]["topic"], "gold");
    assert_eq!(j["room"]["visibility"], "private");
    assert_eq!(j["room"]["max_members"], 10);
    assert_eq!(j["room"]["members_can_pin"], true);
    assert_eq!(j["room"]["owner"], "own");
    let id = mem.say("vault", "still here").await["id"].clone();
    ack(&mem
        .call(json!({"type": "pin", "room": "vault", "id": id}))
        .await);
    let mut out = Client::connect(&server, "out").await;
    assert_eq!(
        code(&out.call(json!({"type": "join", "room": "vault"})).await),
        "forbidden"
    );
    let mut bnd = Client::connect(&server, "bnd").await;
    assert_eq!(
        code(&bnd.call(json!({"type": "join", "room": "vault"})).await),
        "banned"
    );
    let mut mt = Client::connect(&server, "mut").await;
    mt.join("vault").await;
    assert_eq!(
        code(
            &mt.call(json!({"type": "message", "room": "vault", "content": "x"}))
                .await
        ),
        "muted"
    );
    let mut adm = Client::connect(&server, "adm").await;
    ack(&adm
        .call(json!({"type": "update_room", "room": "vault", "topic": "silver"}))
        .await);
    assert_eq!(
        code(
            &adm.call(json!({"type": "delete_room", "room": "vault"}))
                .await
        ),
        "forbidden"
    );
    let (status, members) = get_json(&server, "/api/rooms/vault/members", &token("adm")).await;
    assert_eq!(status, 200);
    let mut roles: Vec<(String, String, bool)> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user"]["id"].as_str().unwrap().to_string(),
                m["role"].as_str().unwrap().to_string(),
                m["muted_until"].is_string(),
            )
        })
        .collect();
    roles.sort();
    assert_eq!(
        roles,
        vec![
            ("adm".into(), "admin".into(), false),
            ("mem".into(), "member".into(), false),
            ("mut".into(), "member".into(), true),
            ("own".into(), "owner".into(), false),
        ]
    );
    let (_, listing) = get_json(&server, "/api/rooms", &token("out")).await;
    assert!(!listing["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == "vault"));
    server.stop().await;
}

/// After a restart the room's seq must continue from the stored history: a message posted
/// after the restart must not reuse a stored seq (the store keeps one message per room+seq).
#[tokio::test]
async fn seq_continues_after_a_restart() {
    if skipped_in_scaled_mode() {
        return;
    }
    let dir = temp_dir();
    let server = Server::start_in(dir.clone(), roomy).await;
    let mut own = Client::connect(&server, "own").await;
    own.join("cont").await;
    let before = own.say("cont", "before").await["seq"].as_u64().unwrap();
    drop(own);
    server.stop().await;
    let server = Server::start_in(dir, roomy).await;
    let mut own = Client::connect(&server, "own").await;
    let j = own.join("cont").await;
    assert!(j["seq"].as_u64().unwrap() >= before, "{j}");
    let after = own.say("cont", "after").await["seq"].as_u64().unwrap();
    assert!(
        after > before,
        "seq {after} after a restart reuses stored seq {before}"
    );
    let (_, page) = get_json(&server, "/api/rooms/cont/messages", &token("own")).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2, "{page}");
    server.stop().await;
}
