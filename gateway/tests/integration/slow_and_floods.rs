//! Slow consumers are cut off without stalling their room; floods are rate limited.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

/// Two clients stop reading in a busy room: both are cut off with 1013 while the others keep
/// receiving. One then reads its socket up to the close frame; the other never reads again, so
/// even its close frame stays unwritten: its session ends `writer::CLOSE_GRACE` (10 s) after
/// the cut-off instead of holding its socket and room membership forever.
#[tokio::test]
async fn a_client_that_never_reads_is_closed_1013_and_others_keep_receiving() {
    let server = Server::start_with(|c| {
        c.outbound_queue = 16;
        // 400 × 16 KB outgrows the kernel's socket buffers (up to 4 MiB on loopback).
        c.max_content_chars = 16_000;
        c.messages_per_s = 100_000;
        c.burst = 100_000;
    })
    .await;
    // The slow clients: a small receive buffer, and they do not read after joining.
    let slow_ws = not_reading(&server, "slow").await;
    let _stuck = not_reading(&server, "stuck").await; // held, never read
    let mut reader = Client::connect(&server, "reader").await;
    reader.join("firehose").await;
    let mut sender = Client::connect(&server, "sender").await;
    sender.join("firehose").await;
    // Everyone is in; nothing older than this stays queued for the checks below.
    reader
        .skip_until(|f| f["type"] == "online_users" && f["count"] == 4)
        .await;
    // The counter is process-wide (other tests' servers add to it): count from here.
    let closes_before = slow_consumer_closes(&server).await;

    const N: usize = 400;
    let body = "y".repeat(16_000);
    let send_all = async {
        for _ in 0..N {
            sender.say("firehose", &body).await;
        }
    };
    let read_all = async {
        let mut got = 0;
        while got < N {
            if reader.recv().await["type"] == "message" {
                got += 1;
            }
        }
        got
    };
    // The slow client is told why: once the server has counted both as slow consumers, it
    // reads its socket up to the close frame, while the others still talk.
    let mut slow = Client::from_ws(slow_ws, "slow");
    let slow_close = async {
        // as long as the whole send may take (the cut-off comes about two thirds through)
        let deadline = tokio::time::Instant::now() + 6 * WAIT;
        while slow_consumer_closes(&server).await < closes_before + 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the slow clients were never cut off"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slow.expect_close().await
    };
    let ((), got, code) = tokio::join!(send_all, read_all, slow_close);
    assert_eq!(got, N, "the reading client got every message");
    assert_eq!(code, 1013);
    // The stuck session is gone, its membership with it (the read panics if it never happens).
    reader
        .recv_where_within(gateway::writer::CLOSE_GRACE + WAIT, |f| {
            f["type"] == "online_users" && f["count"] == 2
        })
        .await;
    server.stop().await;
}

/// A client with a small receive buffer that has joined `firehose` (from the upgrade URL) and
/// reads nothing until the test says so.
async fn not_reading(
    server: &Server,
    user: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(server.addr).await.unwrap();
    let url = format!(
        "ws://{}/ws/room/firehose?token={}",
        server.addr,
        token(user)
    );
    let (ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    ws
}

/// `chat_slow_consumer_closes_total` as the server's metrics show it (0 before the first).
async fn slow_consumer_closes(server: &Server) -> u64 {
    let metrics = http()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("chat_slow_consumer_closes_total "))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[tokio::test]
async fn flooding_gets_rate_limited_with_retry_after() {
    let server = Server::start_with(|c| {
        c.messages_per_s = 5;
        c.burst = 5;
    })
    .await;
    let mut c = Client::connect(&server, "flood").await;
    for i in 0..20 {
        c.send(json!({"type": "ping", "ref": i})).await;
    }
    let mut pongs = 0;
    let mut limited = None;
    for _ in 0..20 {
        let f = c.recv().await;
        match f["type"].as_str().unwrap() {
            "pong" => pongs += 1,
            "error" => {
                assert_eq!(f["code"], "rate_limited", "{f}");
                limited = Some(f["retry_after_ms"].as_u64().expect("retry_after_ms"));
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        (5..20).contains(&pongs),
        "burst admitted, rest refused: {pongs}"
    );
    let wait = limited.expect("some were limited");
    assert!(wait > 0 && wait <= 1000, "{wait}");
    tokio::time::sleep(Duration::from_millis(wait + 50)).await; // waiting out the advertised retry_after_ms is the behaviour under test
    let p = c.call(json!({"type": "ping"})).await;
    assert_eq!(p["type"], "pong", "admitted again after retry_after_ms");
    server.stop().await;
}
