//! Floods: a flooding client is limited without costing anyone else a message; a connection
//! storm past the node's limit is refused cleanly and the node keeps serving.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_is_limited_and_everyone_else_still_gets_every_message() {
    let server = Server::start_with(|c| {
        c.messages_per_s = 20;
        c.burst = 20;
    })
    .await;
    let mut readers = vec![];
    for i in 0..3 {
        let mut c = Client::connect(&server, &format!("calm{i}")).await;
        c.join("busy").await;
        readers.push(c);
    }
    let mut flooder = Client::connect(&server, "flooder").await;
    flooder.join("busy").await;

    // The flooder writes 2000 messages without waiting for anything, then reads its answers
    // until the server closes it (persistent abuse: 1008) or it has them all.
    const FLOOD: usize = 2000;
    let flood = tokio::spawn(async move {
        for i in 0..FLOOD {
            let m = json!({"type": "message", "room": "busy", "content": format!("flood {i}"), "ref": i});
            if flooder.ws.send(Message::text(m.to_string())).await.is_err() {
                break;
            }
        }
        let (mut acked, mut limited, mut close) = (0, 0, None);
        while let Ok(Some(m)) = tokio::time::timeout(WAIT, flooder.ws.next()).await {
            match m {
                Ok(Message::Text(t)) => {
                    let f: Value = serde_json::from_str(&t).unwrap();
                    match f["type"].as_str() {
                        Some("ack") => acked += 1,
                        Some("error") => {
                            assert_eq!(f["code"], "rate_limited", "{f}");
                            limited += 1;
                        }
                        _ => {}
                    }
                    if acked + limited == FLOOD {
                        break;
                    }
                }
                Ok(Message::Close(c)) => {
                    close = c.map(|c| u16::from(c.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        (acked, limited, close)
    });

    // Meanwhile the calm clients talk at a human pace, each message acked.
    let mut calm_ids = HashSet::new();
    for n in 0..10 {
        for (i, c) in readers.iter_mut().enumerate() {
            let a = c.say("busy", &format!("calm{i} says {n}")).await;
            calm_ids.insert(a["id"].as_str().unwrap().to_string());
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // a human pace, not a burst
    }
    let (acked, limited, close) = flood.await.unwrap();
    assert!(
        acked > 0 && acked < FLOOD,
        "some admitted, not all: {acked}"
    );
    // The excess is answered `rate_limited`, or (when the flood outruns the answers) the
    // flooder is closed with 1008 before those answers reach it.
    assert!(
        limited > 0 || close == Some(1008),
        "the flood was limited: {limited} rate_limited, close {close:?}"
    );
    if let Some(code) = close {
        assert_eq!(code, 1008, "persistent abuse closes with policy");
    }
    // Every calm client received every calm message and the same flood messages, once.
    let mut sets = vec![];
    for c in &mut readers {
        let mut seen = HashSet::new();
        let mut flood_seen = 0usize;
        // a ping round trip after everything was acked: all earlier frames were delivered
        let r = format!("sync{}", rand_u64());
        c.send(json!({"type": "ping", "ref": r})).await;
        loop {
            let f = c.recv().await;
            if f["type"] == "message" {
                assert!(
                    seen.insert(f["id"].as_str().unwrap().to_string()),
                    "duplicate"
                );
                if f["user"]["id"] == "flooder" {
                    flood_seen += 1;
                }
            }
            if f["type"] == "pong" && f["ref"] == json!(r) {
                break;
            }
        }
        assert!(
            calm_ids.is_subset(&seen),
            "{} missed calm messages: {} of {}",
            c.user,
            calm_ids.intersection(&seen).count(),
            calm_ids.len()
        );
        assert!(flood_seen >= acked, "{}: {flood_seen} < {acked}", c.user);
        sets.push(seen);
    }
    assert!(
        sets.windows(2).all(|w| w[0] == w[1]),
        "everyone saw the same"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_storm_past_the_limit_is_refused_cleanly() {
    const LIMIT: usize = 1000;
    const STORM: usize = 2000;
    let server = Server::start_with(|c| {
        c.max_connections = LIMIT;
        c.max_connections_per_user = STORM;
    })
    .await;
    let addr = server.addr;
    let tasks: Vec<_> = (0..STORM)
        .map(|i| {
            tokio::spawn(async move {
                let url = format!("ws://{addr}/ws?token={}", token(&format!("s{}", i % 50)));
                tokio::time::timeout(
                    Duration::from_secs(30),
                    tokio_tungstenite::connect_async(url),
                )
                .await
            })
        })
        .collect();
    let (mut open, mut refused, mut other) = (vec![], 0, vec![]);
    for t in tasks {
        match t.await.unwrap() {
            Ok(Ok((ws, _))) => open.push(ws),
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                assert_eq!(resp.status(), 503, "a refusal is 503");
                let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"]["code"], "unavailable");
                refused += 1;
            }
            Ok(Err(e)) => other.push(e.to_string()),
            Err(_) => other.push("timed out".into()),
        }
    }
    eprintln!(
        "storm: {} open, {refused} refused with 503, {} other",
        open.len(),
        other.len()
    );
    assert!(open.len() <= LIMIT, "over the limit: {}", open.len());
    assert!(
        other.is_empty(),
        "unclean refusals: {:?}",
        &other[..other.len().min(5)]
    );
    assert_eq!(open.len() + refused, STORM);
    assert_eq!(open.len(), LIMIT, "the node admits up to its limit");
    // the admitted ones work
    let mut ws = open.pop().unwrap();
    ws.send(Message::text(
        json!({"type": "ping", "ref": "alive"}).to_string(),
    ))
    .await
    .unwrap();
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            if serde_json::from_str::<Value>(&t).unwrap()["type"] == "pong" {
                break;
            }
        }
    }
    // at the limit a newcomer is refused; once sockets close it is admitted again
    let r = try_connect_url(&format!("ws://{addr}/ws?token={}", token("late"))).await;
    assert_eq!(r.err().map(|r| r.status), Some(503));
    drop(ws);
    drop(open);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match try_connect_url(&format!("ws://{addr}/ws?token={}", token("late"))).await {
            Ok(ws) => {
                let mut c = Client::from_ws(ws, "late");
                c.hello = c.recv_type("hello").await;
                c.join("after-storm").await;
                c.say("after-storm", "still serving").await;
                break;
            }
            Err(r) => {
                assert_eq!(r.status, 503);
                assert!(tokio::time::Instant::now() < deadline, "slots never freed");
                tokio::time::sleep(Duration::from_millis(50)).await; // sessions wind down
            }
        }
    }
    let r = http().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    server.stop().await;
}
