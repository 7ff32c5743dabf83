//! History through the gateway: pages by cursor and by number, tombstones, and (embedded) the
//! store surviving a restart.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::support::*;

async fn get(server: &Server, path: &str) -> Value {
    let r = http()
        .get(server.url(path))
        .bearer_auth(token("reader"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

/// Pages newest-first with `before` until `next_before` is null; returns (seq, content).
async fn all_pages(server: &Server, room: &str, limit: u32) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let path = match before {
            Some(b) => format!("/api/rooms/{room}/messages?limit={limit}&before={b}"),
            None => format!("/api/rooms/{room}/messages?limit={limit}"),
        };
        let page = get(server, &path).await;
        let msgs = page["messages"].as_array().unwrap();
        assert!(msgs.len() <= limit as usize);
        out.extend(
            msgs.iter()
                .map(|m| (m["seq"].as_u64().unwrap(), m["content"].clone())),
        );
        match page["next_before"].as_u64() {
            Some(b) => before = Some(b),
            None => return out,
        }
    }
}

/// Like [`all_pages`] once `settled` holds: history is written from the persistence stream,
/// which in scaled mode the history service reads a moment after the acks.
async fn settled_pages(
    server: &Server,
    room: &str,
    limit: u32,
    settled: impl Fn(&[(u64, Value)]) -> bool,
) -> Vec<(u64, Value)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pages = all_pages(server, room, limit).await;
        if settled(&pages) || tokio::time::Instant::now() > deadline {
            return pages;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn history_pages_cover_every_message_once_and_survive_a_restart() {
    let server = Server::start_with(|c| c.messages_per_s = 1000).await;
    let data_dir = server.data_dir.clone();
    let mut ann = Client::connect(&server, "ann").await;
    ann.join("log").await;
    let mut sent = Vec::new();
    for n in 0..57 {
        let ack = ann.say("log", &format!("m{n}")).await;
        sent.push((ack["seq"].as_u64().unwrap(), ack["id"].clone()));
    }
    // one edited, one deleted: a tombstone keeps its place
    let (_, edited) = &sent[10];
    ann.call(json!({"type": "edit", "room": "log", "id": edited, "content": "m10 (edited)"}))
        .await;
    let (deleted_seq, deleted) = &sent[20];
    ann.call(json!({"type": "delete", "room": "log", "id": deleted}))
        .await;

    let check = |pages: Vec<(u64, Value)>| {
        let seqs: Vec<u64> = pages.iter().map(|p| p.0).collect();
        let mut want: Vec<u64> = sent.iter().map(|s| s.0).collect();
        want.reverse();
        assert_eq!(seqs, want, "newest first, every message exactly once");
        let by_seq = |s: u64| pages.iter().find(|p| p.0 == s).unwrap().1.clone();
        assert_eq!(by_seq(sent[10].0), json!("m10 (edited)"));
        assert_eq!(
            by_seq(*deleted_seq),
            Value::Null,
            "tombstone has no content"
        );
    };
    // Every message, the edit and the delete applied — read in one walk through the pages
    // (a walk that began before the last batch was stored sees it only on some pages).
    let applied = |pages: &[(u64, Value)]| {
        let all = pages.len() == sent.len();
        let tombstone = pages
            .iter()
            .any(|p| p.0 == *deleted_seq && p.1 == Value::Null);
        let edited = pages
            .iter()
            .any(|p| p.0 == sent[10].0 && p.1 == json!("m10 (edited)"));
        all && tombstone && edited
    };
    check(settled_pages(&server, "log", 10, applied).await);

    // page=N: pages of 50, page 1 newest
    let p1 = get(&server, "/api/messages?room=log&page=1").await;
    let p2 = get(&server, "/api/messages?room=log&page=2").await;
    let ids: HashSet<String> = [&p1, &p2]
        .iter()
        .flat_map(|p| p["messages"].as_array().unwrap().iter())
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(p1["messages"].as_array().unwrap().len(), 50);
    assert_eq!(ids.len(), 57);

    // forwards with `after`
    let fwd = get(
        &server,
        &format!("/api/rooms/log/messages?after={}&limit=100", sent[49].0),
    )
    .await;
    let fwd: Vec<u64> = fwd["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(fwd, sent[50..].iter().map(|s| s.0).collect::<Vec<_>>());

    drop(ann);
    server.stop().await;
    if skipped_in_scaled_mode() {
        return;
    }
    let server = Server::start_in(data_dir, |c| c.messages_per_s = 1000).await;
    check(all_pages(&server, "log", 25).await);
    // and the numbering goes on after the restart
    let mut bob = Client::connect(&server, "bob").await;
    bob.join("log").await;
    let ack = bob.say("log", "after the restart").await;
    assert!(ack["seq"].as_u64().unwrap() > sent.last().unwrap().0);
    server.stop().await;
}
