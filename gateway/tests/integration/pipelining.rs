//! Commands a client sends together (several frames in one TCP write): each is answered, in
//! order, and answers are never held back waiting for frames that have not arrived.

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::support::*;

/// Commands sent together, fewer than the default rate limit's burst (40) with the join.
const BURST: usize = 30;

fn message(room: &str, n: usize) -> Value {
    json!({"type": "message", "room": room, "content": format!("m{n}"), "ref": format!("r{n}")})
}

/// Queues `commands` and writes them with one flush: one TCP write.
async fn send_together(c: &mut Client, commands: impl IntoIterator<Item = Value>) {
    for v in commands {
        c.ws.feed(Message::text(v.to_string())).await.expect("feed");
    }
    c.ws.flush().await.expect("flush");
}

/// The answers carrying a ref, in the order they arrive, until `n` of them.
async fn answers(c: &mut Client, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = c.recv().await;
        if v.get("ref").is_some_and(|r| !r.is_null()) {
            got.push(v);
        }
    }
    got
}

fn assert_acks_in_order(acks: &[Value]) {
    for (n, ack) in acks.iter().enumerate() {
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["ref"], format!("r{n}"), "in the order sent: {ack}");
    }
    let seqs: Vec<u64> = acks.iter().map(|a| a["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}

#[tokio::test]
async fn a_burst_of_commands_in_one_write_gets_every_ack_in_order() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    ann.join("burst").await;
    // Within the default burst of the per-connection rate limit (40, the join included).
    send_together(&mut ann, (0..BURST).map(|n| message("burst", n))).await;
    assert_acks_in_order(&answers(&mut ann, BURST).await);
    server.stop().await;
}

#[tokio::test]
async fn a_burst_longer_than_the_smallest_queue_is_answered_in_full() {
    // 16 is the smallest queue a node allows; the burst's acks and the room's copies of its
    // messages for the sender together are nearly four times that.
    let server = Server::start_with(|c| c.outbound_queue = 16).await;
    let mut ann = Client::connect(&server, "ann").await;
    ann.join("small-queue").await;
    send_together(&mut ann, (0..BURST).map(|n| message("small-queue", n))).await;
    assert_acks_in_order(&answers(&mut ann, BURST).await);
    // Still open (not closed as too slow), and nothing was refused.
    ann.assert_none_before_pong(|v| v["type"] == "error").await;
    server.stop().await;
}

#[tokio::test]
async fn the_answers_before_a_close_in_the_same_write_are_sent_before_the_close_frame() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    ann.join("closing").await;
    for n in 0..5 {
        ann.ws
            .feed(Message::text(message("closing", n).to_string()))
            .await
            .unwrap();
    }
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    ann.ws.feed(Message::Close(Some(bye))).await.unwrap();
    ann.ws.flush().await.unwrap();
    assert_acks_in_order(&answers(&mut ann, 5).await);
    assert_eq!(ann.expect_close().await, 1000);
    server.stop().await;
}

/// A client text frame as it goes on the wire (masked, as clients must).
fn client_frame(text: &str) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let len = text.len();
    let mut out = vec![0x81];
    if len < 126 {
        out.push(0x80 | len as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

async fn write_raw(c: &mut Client, bytes: &[u8]) {
    let MaybeTlsStream::Plain(tcp) = c.ws.get_mut() else {
        panic!("plain TCP expected");
    };
    tcp.write_all(bytes).await.expect("write");
    tcp.flush().await.expect("flush");
}

#[tokio::test]
async fn an_answer_does_not_wait_for_a_frame_that_came_in_part() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    ann.join("split").await;
    // A whole frame and the start of the next in one write: the first is answered while the
    // second is still incomplete.
    let first = client_frame(&message("split", 0).to_string());
    let second = client_frame(&message("split", 1).to_string());
    let (head, tail) = second.split_at(second.len() / 2);
    write_raw(&mut ann, &[first.as_slice(), head].concat()).await;
    let ack = answers(&mut ann, 1).await;
    assert_eq!(ack[0]["ref"], "r0", "{ack:?}");
    // The rest of the second frame completes it.
    write_raw(&mut ann, tail).await;
    let ack = answers(&mut ann, 1).await;
    assert_eq!(ack[0]["ref"], "r1", "{ack:?}");
    assert_eq!(ack[0]["type"], "ack");
    server.stop().await;
}
