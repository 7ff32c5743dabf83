//! Hostile input not covered by `auth.rs` and `bad_input.rs`: JWT algorithm confusion and
//! claim checks, cross-site WebSocket hijacking, fragmented and oversized frames, room ids
//! with path tricks, impersonation through payload fields, and private-room data probed
//! through every API path and every command.

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::Message;

use crate::rooms::{ack, call_or_silence, code, get_json, roomy};
use crate::support::*;

const RSA_PRIVATE: &str = include_str!("fixtures/test-only-rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("fixtures/test-only-rsa-public.pem");

fn b64(bytes: &[u8]) -> String {
    // base64url without padding, by hand: the test needs no extra dependency for it.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn unsigned(header: Value, claims: &proto::auth::Claims) -> String {
    format!(
        "{}.{}.",
        b64(header.to_string().as_bytes()),
        b64(serde_json::to_string(claims).unwrap().as_bytes())
    )
}

async fn status_of(addr: std::net::SocketAddr, tok: &str) -> u16 {
    match try_connect_url(&format!("ws://{addr}/ws?token={tok}")).await {
        Ok(_) => 101,
        Err(r) => r.status,
    }
}

#[tokio::test]
async fn rs256_server_refuses_alg_none_and_hs256_signed_with_its_public_key() {
    let dir = temp_dir();
    let key_path = dir.join("public.pem");
    std::fs::write(&key_path, RSA_PUBLIC).unwrap();
    let server = Server::start_with(|c| c.jwt_public_key = Some(key_path.clone())).await;
    let claims = proto::auth::claims("eve", "Eve", 3600);
    // positive control: a real RS256 token is accepted
    let good = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(status_of(server.addr, &good).await, 101);
    let mut cases = vec![
        // HS/RS confusion: HMAC keyed with the server's own public key
        (
            "hs256 with the public key",
            proto::auth::sign_hs256(RSA_PUBLIC.as_bytes(), &claims),
        ),
        ("hs256 dev key", token("eve")),
    ];
    for alg in ["none", "None", "NONE", "nOnE"] {
        cases.push((
            "alg none",
            unsigned(json!({"alg": alg, "typ": "JWT"}), &claims),
        ));
    }
    // the good token with its signature stripped, or with its payload swapped
    let parts: Vec<&str> = good.split('.').collect();
    cases.push(("signature stripped", format!("{}.{}.", parts[0], parts[1])));
    let forged = proto::auth::claims("root", "root", 3600);
    cases.push((
        "payload swapped",
        format!(
            "{}.{}.{}",
            parts[0],
            b64(serde_json::to_string(&forged).unwrap().as_bytes()),
            parts[2]
        ),
    ));
    for (what, tok) in cases {
        assert_eq!(status_of(server.addr, &tok).await, 401, "{what}");
        let (status, body) = get_json(&server, "/api/rooms", &tok).await;
        assert_eq!(status, 401, "{what} over HTTP: {body}");
    }
    server.stop().await;
}

#[tokio::test]
async fn issuer_audience_and_nbf_are_enforced_on_every_entry_point() {
    let server = Server::start_with(|c| {
        c.jwt_secret = Some(TEST_SECRET.into());
        c.jwt_issuer = Some("https://idp.example".into());
        c.jwt_audience = Some("chat".into());
    })
    .await;
    let sign = |f: &dyn Fn(&mut proto::auth::Claims)| {
        let mut c = proto::auth::claims("u", "U", 3600);
        c.iss = Some("https://idp.example".into());
        c.aud = Some("chat".into());
        f(&mut c);
        proto::auth::sign_hs256(TEST_SECRET.as_bytes(), &c)
    };
    assert_eq!(status_of(server.addr, &sign(&|_| {})).await, 101);
    let cases: Vec<(&str, String)> = vec![
        (
            "wrong iss",
            sign(&|c| c.iss = Some("https://evil.example".into())),
        ),
        ("no iss", sign(&|c| c.iss = None)),
        ("wrong aud", sign(&|c| c.aud = Some("other".into()))),
        ("no aud", sign(&|c| c.aud = None)),
        (
            "future nbf",
            sign(&|c| c.nbf = Some(proto::auth::now_s() + 3600)),
        ),
        ("expired", sign(&|c| c.exp = proto::auth::now_s() - 3600)),
        ("empty sub", sign(&|c| c.sub = String::new())),
        ("huge sub", sign(&|c| c.sub = "s".repeat(200))),
        (
            "huge but signed",
            sign(&|c| c.name = Some("n".repeat(9000))),
        ),
    ];
    for (what, tok) in cases {
        assert_eq!(status_of(server.addr, &tok).await, 401, "{what}");
        for path in ["/api/rooms", "/api/rooms/lobby/messages"] {
            let (status, _) = get_json(&server, path, &tok).await;
            assert_eq!(status, 401, "{what}: {path}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn cross_site_origins_are_refused_403_with_a_json_body() {
    let server = Server::start_with(|c| {
        c.allowed_origins = Some(vec!["https://chat.example".into()]);
    })
    .await;
    for origin in [
        "https://evil.example",
        "null",
        "https://chat.example.evil.example",
        "http://chat.example",
        "https://chat.example:8443",
        "https://chat.example/",
    ] {
        let mut req = format!("ws://{}/ws?token={}", server.addr, token("u"))
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 403, "{origin}");
                let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], "forbidden", "{origin}");
            }
            other => panic!("{origin}: expected 403, got {:?}", other.map(|_| ())),
        }
    }
    server.stop().await;
}

fn fragment(opcode: OpCode, fin: bool, payload: &[u8]) -> Message {
    let header = FrameHeader {
        is_final: fin,
        opcode,
        ..FrameHeader::default()
    };
    Message::Frame(Frame::from_payload(header, payload.to_vec().into()))
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let server = Server::start().await;
    let mut c = Client::connect(&server, "frag").await;
    c.join("frags").await;
    let text = json!({"type": "message", "room": "frags", "content": "héllo wörld", "ref": "f1"})
        .to_string();
    let bytes = text.as_bytes();
    // split inside a multi-byte character too
    let cut1 = text.find('é').unwrap() + 1;
    let cut2 = cut1 + 10;
    c.send_raw(fragment(OpCode::Data(Data::Text), false, &bytes[..cut1]))
        .await;
    // a ping between fragments is allowed by RFC 6455
    c.send_raw(Message::Ping(b"mid".to_vec().into())).await;
    c.send_raw(fragment(
        OpCode::Data(Data::Continue),
        false,
        &bytes[cut1..cut2],
    ))
    .await;
    c.send_raw(fragment(OpCode::Data(Data::Continue), true, &bytes[cut2..]))
        .await;
    let a = c.recv_where(|f| f["ref"] == "f1").await;
    assert_eq!(a["type"], "ack", "{a}");
    assert_eq!(c.recv_type("message").await["content"], "héllo wörld");
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_fragmented_message_closes_1009() {
    let server = Server::start().await;
    let mut c = Client::connect(&server, "bigfrag").await;
    // five 16 KiB fragments: each is small, the message is over 64 KiB
    let chunk = vec![b' '; 16 * 1024];
    c.send_raw(fragment(
        OpCode::Data(Data::Text),
        false,
        b"{\"type\":\"ping\",\"pad\":\"",
    ))
    .await;
    for _ in 0..5 {
        // the server may close before the last fragment; a failed send is fine then
        let _ =
            c.ws.send(fragment(OpCode::Data(Data::Continue), false, &chunk))
                .await;
    }
    let _ =
        c.ws.send(fragment(OpCode::Data(Data::Continue), true, b"\"}"))
            .await;
    assert_eq!(c.expect_close().await, 1009);
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_split_across_fragments_closes_1007() {
    let server = Server::start().await;
    let mut c = Client::connect(&server, "badutf").await;
    // "é" is C3 A9: the first fragment ends mid-character, the next does not complete it
    c.send_raw(fragment(
        OpCode::Data(Data::Text),
        false,
        b"{\"type\":\"ping\",\"x\":\"\xc3",
    ))
    .await;
    let _ =
        c.ws.send(fragment(OpCode::Data(Data::Continue), true, b"\x28\"}"))
            .await;
    assert_eq!(c.expect_close().await, 1007);
    server.stop().await;
}

const TRICKY_ROOMS: &[&str] = &[
    "..",
    "..%2F..%2Fetc",
    "%2e%2e",
    "%2E%2E%2Fsecret",
    "Lobby",
    "LOBBY",
    "lobby%00",
    "lobby%20",
    "l%C3%B6bby",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", // 65
];

#[tokio::test]
async fn room_ids_with_path_tricks_are_refused_everywhere() {
    let server = Server::start().await;
    // the lobby exists, so a trick that normalized to it would be noticed
    let mut own = Client::connect(&server, "own").await;
    own.join("lobby").await;
    own.say("lobby", "inside").await;
    assert_eq!(TRICKY_ROOMS.last().unwrap().len(), 65);
    for room in TRICKY_ROOMS {
        match try_connect_url(&format!(
            "ws://{}/ws/room/{room}?token={}",
            server.addr,
            token("eve")
        ))
        .await
        {
            Ok(_) => panic!("/ws/room/{room} was upgraded"),
            Err(r) => assert!(
                r.status == 400 || r.status == 404,
                "/ws/room/{room}: {}",
                r.status
            ),
        }
        for path in [
            format!("/api/rooms/{room}/messages"),
            format!("/api/rooms/{room}/pins"),
            format!("/api/rooms/{room}/receipts"),
            format!("/api/rooms/{room}/members"),
            format!("/api/messages?room={room}&page=1"),
        ] {
            let (status, body) = get_json(&server, &path, &token("eve")).await;
            assert!(status == 400 || status == 404, "{path}: {status} {body}");
            assert!(!body.to_string().contains("inside"), "{path} leaked");
        }
    }
    // and over the socket: every room-carrying command refuses them as invalid
    let mut eve = Client::connect(&server, "eve").await;
    for room in [
        "../lobby",
        "Lobby",
        "lobby/",
        "lobby\u{0}",
        &"a".repeat(65),
        "",
    ] {
        for cmd in ["join", "leave", "typing", "create_room"] {
            let e = eve.call(json!({"type": cmd, "room": room})).await;
            assert_eq!(code(&e), "invalid", "{cmd} {room:?}: {e}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn identity_fields_in_payloads_are_ignored() {
    let server = Server::start_with(roomy).await;
    let mut ann = Client::connect(&server, "ann").await;
    let mut bob = Client::connect(&server, "bob").await;
    bob.join("imp").await; // bob creates the room: ann is a plain member
    ann.join("imp").await;
    let bobs = bob.say("imp", "bob's words").await["id"].clone();
    let spoof = json!({"id": "bob", "name": "BOB"});
    // a message, a read marker and typing all carry the token's user
    ack(&ann
        .call(json!({"type": "message", "room": "imp", "content": "x", "user": spoof, "sub": "bob", "from": "bob"}))
        .await);
    let m = bob
        .recv_where(|f| f["type"] == "message" && f["content"] == "x")
        .await;
    assert_eq!(m["user"]["id"], "ann");
    ann.send(json!({"type": "read", "room": "imp", "seq": 1, "user": "bob"}))
        .await;
    let r = bob.recv_type("receipt").await;
    assert_eq!(
        r["user"]["id"].as_str().or(r["user"].as_str()),
        Some("ann"),
        "{r}"
    );
    ann.send(json!({"type": "typing", "room": "imp", "user": spoof}))
        .await;
    let t = bob.recv_type("typing").await;
    assert_eq!(t["user"]["id"], "ann");
    // claiming to be the author does not let ann edit or delete bob's message
    let e = ann
        .call(json!({"type": "edit", "room": "imp", "id": bobs, "content": "mine now", "user": spoof}))
        .await;
    assert_eq!(code(&e), "forbidden", "{e}");
    let e = ann
        .call(json!({"type": "delete", "room": "imp", "id": bobs, "user": spoof, "by": "bob"}))
        .await;
    assert_eq!(code(&e), "forbidden", "{e}");
    // a created room belongs to its creator, whatever the payload says
    ack(&ann
        .call(json!({"type": "create_room", "room": "annsroom", "owner": "bob", "user": spoof}))
        .await);
    let (_, members) = get_json(&server, "/api/rooms/annsroom/members", &token("ann")).await;
    let owner: Vec<&Value> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "owner")
        .collect();
    assert_eq!(owner.len(), 1, "{members}");
    assert_eq!(
        owner[0]["user"]
            .as_str()
            .or(owner[0]["id"].as_str())
            .or(owner[0]["user"]["id"].as_str()),
        Some("ann"),
        "{members}"
    );
    server.stop().await;
}

#[tokio::test]
async fn private_room_data_is_out_of_reach_of_non_members() {
    let server = Server::start_with(roomy).await;
    let mut own = Client::connect(&server, "own").await;
    ack(&own
        .call(json!({"type": "create_room", "room": "vault", "visibility": "private", "topic": "t-classified"}))
        .await);
    own.join("vault").await;
    let secret = own.say("vault", "classified").await;
    let id = secret["id"].clone();
    ack(&own
        .call(json!({"type": "pin", "room": "vault", "id": id}))
        .await);
    let leak = |v: &Value| v.to_string().contains("classified");

    // HTTP: every path, every paging form, token in header and in query
    let eve = token("eve");
    for p in [
        "/api/rooms/vault/messages".to_string(),
        "/api/rooms/vault/messages?after=0".into(),
        "/api/rooms/vault/messages?before=999999&limit=100".into(),
        "/api/rooms/vault/pins".into(),
        "/api/rooms/vault/receipts".into(),
        "/api/rooms/vault/members".into(),
        "/api/messages?room=vault&page=1".into(),
        "/api/messages?room=vault&page=2".into(),
    ] {
        let (status, body) = get_json(&server, &p, &eve).await;
        assert_eq!(status, 403, "{p}: {body}");
        assert!(!leak(&body), "{p}: {body}");
        let sep = if p.contains('?') { '&' } else { '?' };
        let r = http()
            .get(server.url(&format!("{p}{sep}token={eve}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{p} with ?token=");
        let r = http().get(server.url(&p)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{p} without a token");
    }
    let (_, rooms) = get_json(&server, "/api/rooms", &eve).await;
    assert!(!rooms.to_string().contains("vault"), "{rooms}");

    // /ws/room/vault: upgraded (auth is fine) but the join is refused, nothing replayed
    let ws = try_connect_url(&format!("ws://{}/ws/room/vault?token={eve}", server.addr)).await;
    if let Ok(ws) = ws {
        let mut c = Client::from_ws(ws, "eve-auto");
        c.hello = c.recv_type("hello").await;
        let f = c
            .recv_where(|f| f["type"] == "error" || f["type"] == "joined")
            .await;
        assert_eq!(f["type"], "error", "{f}");
        assert!(!leak(&f));
        c.assert_none_before_pong(|f| leak(f) || f["type"] == "message")
            .await;
    }

    // Every command, as a non-member: refused, and nothing of the room comes back.
    let mut e = Client::connect(&server, "eve").await;
    let cmds = vec![
        json!({"type": "join", "room": "vault"}),
        json!({"type": "join", "room": "vault", "since": 0}),
        json!({"type": "leave", "room": "vault"}),
        json!({"type": "message", "room": "vault", "content": "hi"}),
        json!({"type": "edit", "room": "vault", "id": id, "content": "x"}),
        json!({"type": "delete", "room": "vault", "id": id}),
        json!({"type": "read", "room": "vault", "seq": 1}),
        json!({"type": "pin", "room": "vault", "id": id}),
        json!({"type": "unpin", "room": "vault", "id": id}),
        json!({"type": "create_room", "room": "vault"}),
        json!({"type": "update_room", "room": "vault", "visibility": "public"}),
        json!({"type": "delete_room", "room": "vault"}),
        json!({"type": "add_member", "room": "vault", "user": "eve"}),
        json!({"type": "remove_member", "room": "vault", "user": "own"}),
        json!({"type": "kick", "room": "vault", "user": "own"}),
        json!({"type": "ban", "room": "vault", "user": "own"}),
        json!({"type": "unban", "room": "vault", "user": "eve"}),
        json!({"type": "mute", "room": "vault", "user": "own"}),
        json!({"type": "unmute", "room": "vault", "user": "eve"}),
        json!({"type": "set_role", "room": "vault", "user": "eve", "role": "admin"}),
    ];
    for cmd in cmds {
        let a = call_or_silence(&mut e, cmd.clone()).await;
        if let Some(a) = &a {
            assert_eq!(a["type"], "error", "{cmd} answered {a}");
            assert!(
                ["forbidden", "not_found", "conflict", "invalid"].contains(&code(a)),
                "{cmd}: {a}"
            );
            assert!(!leak(a), "{cmd}: {a}");
        }
    }
    for cmd in [
        json!({"type": "typing", "room": "vault"}),
        json!({"type": "stop_typing", "room": "vault"}),
    ] {
        if let Some(a) = call_or_silence(&mut e, cmd.clone()).await {
            assert_eq!(a["type"], "error", "{cmd}: {a}");
        }
    }
    let rooms = e.call(json!({"type": "list_rooms"})).await;
    assert!(!rooms.to_string().contains("vault"), "{rooms}");
    e.assert_none_before_pong(|f| leak(f) || f["type"] == "message")
        .await;
    // the room is untouched: still private, eve no member, the owner saw nothing of eve
    let (_, members) = get_json(&server, "/api/rooms/vault/members", &token("own")).await;
    assert!(!members.to_string().contains("\"eve\""), "{members}");
    own.assert_none_before_pong(|f| f.to_string().contains("eve"))
        .await;
    let (status, _) = get_json(&server, "/api/rooms/vault/messages", &eve).await;
    assert_eq!(status, 403, "still private");
    server.stop().await;
}
