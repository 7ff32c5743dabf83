//! Every bad input gets its error, and the connection keeps working.

use crate::support::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn each_bad_input_gets_its_error_and_the_connection_survives() {
    let server = Server::start_with(|c| c.max_content_chars = 100).await;
    let mut c = Client::connect(&server, "ann").await;
    c.join("lobby").await;
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed json", "{not json".into(), "invalid"),
        ("not an object", "[1,2,3]".into(), "invalid"),
        ("unknown type", json!({"type": "warp", "ref": 1}).to_string(), "invalid"),
        ("missing field", json!({"type": "join", "ref": 2}).to_string(), "invalid"),
        ("bad room id", json!({"type": "join", "room": "../etc", "ref": 3}).to_string(), "invalid"),
        ("wrong field type", json!({"type": "read", "room": "lobby", "seq": "x", "ref": 4}).to_string(), "invalid"),
        ("empty content", json!({"type": "message", "room": "lobby", "content": "  ", "ref": 5}).to_string(), "invalid"),
        ("content too long", json!({"type": "message", "room": "lobby", "content": "x".repeat(101), "ref": 6}).to_string(), "too_large"),
        ("not joined, no such room", json!({"type": "message", "room": "elsewhere", "content": "hi", "ref": 7}).to_string(), "not_found"),
        ("unknown message", json!({"type": "delete", "room": "lobby", "id": "12345", "ref": 8}).to_string(), "not_found"),
        ("leave a room not joined", json!({"type": "leave", "room": "nowhere", "ref": 9}).to_string(), "not_found"),
        ("join twice", json!({"type": "join", "room": "lobby", "ref": 10}).to_string(), "conflict"),
        ("huge client_msg_id", json!({"type": "message", "room": "lobby", "content": "x", "client_msg_id": "c".repeat(65), "ref": 11}).to_string(), "invalid"),
    ];
    for (what, frame, code) in cases {
        c.send_raw(Message::text(frame.clone())).await;
        let e = c.recv_type("error").await;
        assert_eq!(e["code"], code, "{what}: {e}");
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        let sent: serde_json::Value = serde_json::from_str(&frame).unwrap_or(json!({}));
        assert_eq!(
            e["ref"],
            sent.get("ref").cloned().unwrap_or(serde_json::Value::Null),
            "{what}: ref echoed"
        );
        // still usable
        let pong = c.call(json!({"type": "ping"})).await;
        assert_eq!(pong["type"], "pong", "{what}");
    }
    // the user id in a payload is ignored: identity comes only from the token
    let ack = c
        .call(
            json!({"type": "message", "room": "lobby", "content": "me", "user": {"id": "mallory"}}),
        )
        .await;
    assert_eq!(ack["type"], "ack");
    let m = c.recv_type("message").await;
    assert_eq!(m["user"]["id"], "ann");
    server.stop().await;
}

#[tokio::test]
async fn oversized_frame_closes_1009() {
    let server = Server::start().await;
    let mut c = Client::connect(&server, "ann").await;
    let big = json!({"type": "ping", "pad": "x".repeat(70 * 1024)}).to_string();
    c.send_raw(Message::text(big)).await;
    assert_eq!(c.expect_close().await, 1009);
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_closes_1007() {
    let server = Server::start().await;
    let mut c = Client::connect(&server, "ann").await;
    // tungstenite refuses to build invalid text frames, so send raw frame bytes.
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    c.send_raw(Message::Frame(Frame::from_payload(
        header,
        vec![0xff, 0xfe, 0x80].into(),
    )))
    .await;
    assert_eq!(c.expect_close().await, 1007);
    server.stop().await;
}

#[tokio::test]
async fn binary_frames_are_read_as_json() {
    let server = Server::start().await;
    let mut c = Client::connect(&server, "ann").await;
    c.send_raw(Message::binary(br#"{"type":"ping","ref":"b"}"#.to_vec()))
        .await;
    let p = c.recv_type("pong").await;
    assert_eq!(p["ref"], "b");
    server.stop().await;
}
