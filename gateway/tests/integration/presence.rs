//! Join/leave notices, online users, room listing.

use crate::support::*;
use serde_json::json;

#[tokio::test]
async fn join_leave_and_online_users() {
    let server = Server::start().await;
    let mut ann = Client::connect(&server, "ann").await;
    let joined = ann.join("p").await;
    assert_eq!(joined["online"], json!([{"id": "ann", "name": "ANN"}]));
    assert_eq!(joined["room"]["id"], "p");
    assert_eq!(joined["recovered"], false);

    let mut bob = Client::connect(&server, "bob").await;
    let joined = bob.join("p").await;
    assert_eq!(joined["online"].as_array().unwrap().len(), 2);
    let j = ann.recv_type("join").await;
    assert_eq!(j["user"]["id"], "bob");
    let o = ann
        .recv_where(|f| f["type"] == "online_users" && f["count"] == 2)
        .await;
    assert_eq!(o["users"].as_array().unwrap().len(), 2);

    // a second connection of bob does not announce him again; leaving one keeps him online
    let mut bob2 = Client::connect(&server, "bob").await;
    bob2.join("p").await;
    let left = bob2.call(json!({"type": "leave", "room": "p"})).await;
    assert_eq!(left["type"], "left");
    ann.assert_none_before_pong(|f| f["type"] == "join" || f["type"] == "leave")
        .await;

    // bob's last connection leaving the room is announced
    drop(bob);
    let l = ann.recv_type("leave").await;
    assert_eq!(l["user"]["id"], "bob");
    let o = ann
        .recv_where(|f| f["type"] == "online_users" && f["count"] == 1)
        .await;
    assert_eq!(o["users"], json!([{"id": "ann", "name": "ANN"}]));

    let rooms = ann.call(json!({"type": "list_rooms"})).await;
    assert_eq!(rooms["type"], "rooms");
    let p = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "p")
        .cloned()
        .unwrap();
    assert_eq!(p["online_count"], 1);
    assert_eq!(p["visibility"], "public");
    server.stop().await;
}

#[tokio::test]
async fn ws_room_path_joins_after_hello() {
    let server = Server::start().await;
    let mut ann = Client::connect_path(&server, "ann", "/ws/room/direct").await;
    let j = ann.recv_type("joined").await;
    assert_eq!(j["room"]["id"], "direct");
    ann.say("direct", "works").await;
    server.stop().await;
}
