//! Messages, acks, ordering, typing, edits, deletes, idempotency, notices.

use std::collections::HashSet;

use crate::support::*;
use serde_json::json;

#[tokio::test]
async fn sender_gets_ack_and_its_own_message() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    ann.join("lobby").await;
    let ack = ann.say("lobby", "hello").await;
    let msg = ann.recv_type("message").await;
    assert_eq!(msg["content"], "hello");
    assert_eq!(msg["user"], json!({"id": "ann", "name": "ANN"}));
    assert_eq!(msg["id"], ack["id"]);
    assert_eq!(msg["seq"], ack["seq"]);
    assert_eq!(msg["ts"], ack["ts"]);
    assert!(ack["id"].is_string(), "ids are decimal strings");
    assert!(ack["ts"].as_str().unwrap().ends_with('Z'));
    server.stop().await;
}

#[tokio::test]
async fn rooms_are_isolated() {
    let server = Server::start().await;
    let mut a1 = Client::connect(&server, "a1").await;
    let mut a2 = Client::connect(&server, "a2").await;
    let mut b1 = Client::connect(&server, "b1").await;
    let mut b2 = Client::connect(&server, "b2").await;
    a1.join("room-a").await;
    a2.join("room-a").await;
    b1.join("room-b").await;
    b2.join("room-b").await;
    a1.say("room-a", "for a").await;
    b1.say("room-b", "for b").await;
    assert_eq!(a2.recv_type("message").await["content"], "for a");
    assert_eq!(b2.recv_type("message").await["content"], "for b");
    // nothing of the other room arrived first or in between
    a2.assert_none_before_pong(|f| f["room"] == "room-b").await;
    b2.assert_none_before_pong(|f| f["room"] == "room-a").await;
    server.stop().await;
}

#[tokio::test]
async fn seq_is_gapless_and_ordered_with_concurrent_senders() {
    let server = Server::start_with(|c| c.messages_per_s = 1000).await;
    let mut watcher = Client::connect(&server, "watcher").await;
    // The first join creates the room (its `room_created` is seq 1).
    let base = watcher.join("busy").await["seq"].as_u64().unwrap();
    let mut senders = Vec::new();
    for i in 0..4 {
        let mut c = Client::connect(&server, &format!("s{i}")).await;
        c.join("busy").await;
        senders.push(c);
    }
    const EACH: usize = 25;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for n in 0..EACH {
                    seqs.push(
                        c.say("busy", &format!("{} {n}", c.user)).await["seq"]
                            .as_u64()
                            .unwrap(),
                    );
                }
                seqs
            })
        })
        .collect();
    let mut acked = HashSet::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one sender's seqs increase"
        );
        acked.extend(seqs);
    }
    let total = 4 * EACH as u64;
    assert_eq!(
        acked,
        (base + 1..=base + total).collect(),
        "acked seqs are exactly the next N"
    );
    let mut seen = Vec::new();
    while seen.len() < total as usize {
        let m = watcher.recv_type("message").await;
        seen.push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(
        seen,
        (base + 1..=base + total).collect::<Vec<_>>(),
        "delivered in seq order without gaps"
    );
    server.stop().await;
}

#[tokio::test]
async fn typing_goes_to_others_only_and_expires() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    let mut bob = Client::connect(&server, "bob").await;
    ann.join("t").await;
    bob.join("t").await;
    ann.send(json!({"type": "typing", "room": "t"})).await;
    let t = bob.recv_type("typing").await;
    assert_eq!(t["user"]["id"], "ann");
    assert_eq!(t["room"], "t");
    // expires by itself after 5 s without a repeat
    let started = std::time::Instant::now();
    let stop = bob.recv_type("stop_typing").await;
    assert_eq!(stop["user"]["id"], "ann");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(4),
        "not before the TTL"
    );
    // the typist never saw its own typing
    ann.assert_none_before_pong(|f| f["type"] == "typing" || f["type"] == "stop_typing")
        .await;
    // explicit stop_typing is relayed too
    ann.send(json!({"type": "typing", "room": "t"})).await;
    bob.recv_type("typing").await;
    ann.send(json!({"type": "stop_typing", "room": "t"})).await;
    assert_eq!(bob.recv_type("stop_typing").await["user"]["id"], "ann");
    server.stop().await;
}

#[tokio::test]
async fn edit_and_delete_by_author_only() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    let mut bob = Client::connect(&server, "bob").await;
    ann.join("e").await;
    bob.join("e").await;
    let id = ann.say("e", "frist").await["id"].clone();
    let r = bob
        .call(json!({"type": "edit", "room": "e", "id": id, "content": "hijack"}))
        .await;
    assert_eq!(r["code"], "forbidden");
    let r = ann
        .call(json!({"type": "edit", "room": "e", "id": id, "content": "first"}))
        .await;
    assert_eq!(r["type"], "ack", "{r}");
    let ed = bob.recv_type("message_edited").await;
    assert_eq!(
        (ed["id"].clone(), ed["content"].clone()),
        (id.clone(), json!("first"))
    );
    assert!(ed["seq"].as_u64().unwrap() > 1, "edits are stored events");
    let r = bob
        .call(json!({"type": "delete", "room": "e", "id": id}))
        .await;
    assert_eq!(r["code"], "forbidden");
    let r = ann
        .call(json!({"type": "delete", "room": "e", "id": id}))
        .await;
    assert_eq!(r["type"], "ack");
    let del = bob.recv_type("message_deleted").await;
    assert_eq!(del["by"]["id"], "ann");
    let r = ann
        .call(json!({"type": "edit", "room": "e", "id": id, "content": "again"}))
        .await;
    assert_eq!(r["code"], "not_found", "a deleted message cannot be edited");
    server.stop().await;
}

#[tokio::test]
async fn client_msg_id_makes_sends_idempotent() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    let mut bob = Client::connect(&server, "bob").await;
    ann.join("i").await;
    bob.join("i").await;
    let send = json!({"type": "message", "room": "i", "content": "once", "client_msg_id": "c-1"});
    let a1 = ann.call(send.clone()).await;
    let a2 = ann.call(send).await;
    assert_eq!(a1["type"], "ack");
    assert_eq!(
        (a1["id"].clone(), a1["seq"].clone(), a1["ts"].clone()),
        (a2["id"].clone(), a2["seq"].clone(), a2["ts"].clone())
    );
    let m = bob.recv_type("message").await;
    assert_eq!(m["client_msg_id"], "c-1");
    bob.assert_none_before_pong(|f| f["type"] == "message")
        .await;
    server.stop().await;
}

#[tokio::test]
async fn admin_notice_reaches_every_connection() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    let mut bob = Client::connect(&server, "bob").await;
    let r = http()
        .post(server.url("/api/admin/notice"))
        .bearer_auth(token("ann"))
        .json(&json!({"content": "hi all"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "not an admin");
    let r = http()
        .post(server.url("/api/admin/notice"))
        .bearer_auth(admin_token("root"))
        .json(&json!({"content": "maintenance at 5"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for c in [&mut ann, &mut bob] {
        let n = c.recv_type("notice").await;
        assert_eq!(n["content"], "maintenance at 5");
        assert!(n["ts"].is_string());
    }
    server.stop().await;
}
