//! The public HTTP API (docs/protocol.md), on a real socket (an in-process service on port 0).

use history_service::store::{Ban, Store};
use proto::rooms::{Role, Visibility};
use reqwest::StatusCode;
use serde_json::Value;

use crate::support::*;

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn get(url: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let body = resp.text().await.unwrap();
    let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, json)
}

/// Asserts the error shape `{"error":{"code":..,"message":..}}` and returns the code.
fn error_code(body: &Value) -> &str {
    let e = &body["error"];
    assert!(e["message"].is_string(), "error without message: {body}");
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only `error`: {body}"
    );
    e["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error without code: {body}"))
}

/// A service with rooms: `pub` (public, owner ann), `priv` (private: ann owner, bob member),
/// and `ban` (public, eve banned). Returns the service and the three room ids.
async fn setup() -> (Service, proto::RoomId, proto::RoomId, proto::RoomId) {
    let svc = Service::start(Some("internal-secret")).await;
    let s = &svc.store;
    let public = room("pub");
    let private = room("priv");
    let banned = room("ban");
    s.create_room(&room_info(&public, Visibility::Public), &user("ann"))
        .await
        .unwrap();
    s.create_room(&room_info(&private, Visibility::Private), &user("ann"))
        .await
        .unwrap();
    s.put_member(&private, &user("bob"), Role::Member)
        .await
        .unwrap();
    s.create_room(&room_info(&banned, Visibility::Public), &user("ann"))
        .await
        .unwrap();
    s.put_ban(
        &banned,
        &Ban {
            user: user("eve"),
            by: user("ann"),
            reason: None,
            until: None,
            at: t(1),
        },
    )
    .await
    .unwrap();
    (svc, public, private, banned)
}

#[tokio::test]
async fn unauthenticated_requests_get_401_with_the_error_shape() {
    let (svc, public, _, _) = setup().await;
    let url = svc.url(&format!("/api/rooms/{public}/messages"));
    let (status, body) = get(&url, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "unauthorized");

    let mut expired = proto::auth::claims("ann", "Ann", 0);
    expired.exp = proto::auth::now_s() - 3600;
    let expired = proto::auth::sign_hs256(proto::auth::DEV_SECRET, &expired);
    let wrong_key =
        proto::auth::sign_hs256(b"some other key", &proto::auth::claims("ann", "Ann", 600));
    for bad in ["garbage", expired.as_str(), wrong_key.as_str()] {
        let (status, body) = get(&url, Some(bad)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(error_code(&body), "unauthorized");
    }
    // Every route authenticates, also with bad parameters (a stranger learns nothing).
    for path in [
        "/api/rooms".to_owned(),
        format!("/api/rooms/{public}/pins"),
        format!("/api/rooms/{public}/receipts"),
        format!("/api/rooms/{public}/members"),
        format!("/api/messages?room={public}"),
        "/api/rooms/NOT%20A%20ROOM/messages?limit=0".to_owned(),
    ] {
        let (status, _) = get(&svc.url(&path), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    // `?token=` works like the header.
    let (status, body) = get(&format!("{url}?token={}", token("zed")), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    svc.stop().await;
}

#[tokio::test]
async fn private_rooms_are_for_members_and_bans_apply() {
    let (svc, public, private, banned) = setup().await;
    let paths = |r: &proto::RoomId| {
        [
            format!("/api/rooms/{r}/messages"),
            format!("/api/rooms/{r}/pins"),
            format!("/api/rooms/{r}/receipts"),
            format!("/api/rooms/{r}/members"),
            format!("/api/messages?room={r}&page=1"),
        ]
    };
    for path in paths(&private) {
        let (status, body) = get(&svc.url(&path), Some(&token("zed"))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert_eq!(error_code(&body), "forbidden");
        for ok in [token("bob"), token("ann"), admin_token("root")] {
            let (status, body) = get(&svc.url(&path), Some(&ok)).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
        }
    }
    for path in paths(&banned) {
        let (status, body) = get(&svc.url(&path), Some(&token("eve"))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert_eq!(error_code(&body), "banned");
    }
    for path in paths(&public) {
        let (status, _) = get(&svc.url(&path), Some(&token("zed"))).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    // Unknown rooms and bad ids.
    let (status, body) = get(&svc.url("/api/rooms/nope/messages"), Some(&token("zed"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");
    let (status, body) = get(&svc.url("/api/rooms/Bad%20Id/pins"), Some(&token("zed"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "invalid");

    // The listing: public and restricted rooms, private ones only to members.
    let listed = |body: &Value| -> Vec<String> {
        body["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, body) = get(&svc.url("/api/rooms"), Some(&token("zed"))).await;
    assert_eq!(status, StatusCode::OK);
    let ids = listed(&body);
    assert!(
        ids.contains(&public.to_string()) && !ids.contains(&private.to_string()),
        "{ids:?}"
    );
    let (_, body) = get(&svc.url("/api/rooms"), Some(&token("bob"))).await;
    assert!(listed(&body).contains(&private.to_string()));
    let row = body["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == private.as_str())
        .unwrap();
    assert_eq!(row["member_count"], 2);
    assert_eq!(row["visibility"], "private");
    assert_eq!(row["online_count"], 0);
    // Each row carries the caller's role: "my rooms" come from the server.
    let role_in = |body: &Value, room: &proto::RoomId| {
        body["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == room.as_str())
            .unwrap_or_else(|| panic!("{room} not listed: {body}"))["role"]
            .clone()
    };
    assert_eq!(role_in(&body, &private), "member");
    assert_eq!(
        role_in(&body, &public),
        Value::Null,
        "bob is no member of {public}"
    );
    let (_, body) = get(&svc.url("/api/rooms"), Some(&token("ann"))).await;
    assert_eq!(role_in(&body, &private), "owner");
    assert_eq!(role_in(&body, &public), "owner");
    svc.stop().await;
}

#[tokio::test]
async fn bans_are_listed_to_the_room_moderators_only() {
    let (svc, _, _, banned) = setup().await;
    let s = &svc.store;
    s.put_member(&banned, &user("adam"), Role::Admin)
        .await
        .unwrap();
    s.put_member(&banned, &user("mia"), Role::Member)
        .await
        .unwrap();
    // A ban that ran out is not listed: there is nothing left to lift.
    s.put_ban(
        &banned,
        &Ban {
            user: user("old"),
            by: user("ann"),
            reason: Some("spam".into()),
            until: Some(t(2)),
            at: t(1),
        },
    )
    .await
    .unwrap();
    let url = svc.url(&format!("/api/rooms/{banned}/bans"));
    for who in [token("ann"), token("adam"), admin_token("root")] {
        let (status, body) = get(&url, Some(&who)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let users: Vec<&str> = body["bans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["user"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(users, ["eve"], "{body}");
        assert_eq!(body["bans"][0]["by"]["id"], "ann");
    }
    for (who, code) in [
        ("mia", "forbidden"),
        ("zed", "forbidden"),
        ("eve", "banned"),
    ] {
        let (status, body) = get(&url, Some(&token(who))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{who}: {body}");
        assert_eq!(error_code(&body), code, "{who}");
    }
    let (status, _) = get(&url, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = get(&svc.url("/api/rooms/nope/bans"), Some(&token("ann"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    svc.stop().await;
}

#[tokio::test]
async fn messages_page_by_cursor_and_by_number() {
    let (svc, public, _, _) = setup().await;
    let s = &svc.store;
    // 120 messages at odd seqs 1..=239 (seqs have gaps), one of them deleted.
    let events: Vec<_> = (0..120).map(|i| msg(&public, 2 * i + 1, "ann")).collect();
    s.apply(&events).await.unwrap();
    s.apply(&[delete(&public, mid(&public, 101), 500, "ann")])
        .await
        .unwrap();
    let tok = token("zed");
    let base = svc.url(&format!("/api/rooms/{public}/messages"));
    let seqs = |body: &Value| -> Vec<u64> {
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };

    // Default: the newest 50, newest first, with the cursor of the next older page.
    let (status, body) = get(&base, Some(&tok)).await;
    assert_eq!(status, StatusCode::OK);
    let first = seqs(&body);
    assert_eq!(first.len(), 50);
    assert_eq!(first[0], 239);
    assert!(first.windows(2).all(|w| w[0] > w[1]));
    assert_eq!(body["next_before"], *first.last().unwrap());
    assert!(body["next_after"].is_null());
    let m = &body["messages"][0];
    assert!(m["id"].is_string(), "ids are decimal strings: {m}");
    assert_eq!(m["room"], public.as_str());
    assert_eq!(m["user"]["id"], "ann");
    assert_eq!(m["content"], "message 239");
    assert!(m["ts"].as_str().unwrap().ends_with('Z'));

    // Walk back to the end: every message once, the last cursor null.
    let mut all = first.clone();
    let mut cursor = body["next_before"].as_u64();
    let mut pages = 1;
    while let Some(before) = cursor {
        let (status, body) = get(&format!("{base}?before={before}&limit=50"), Some(&tok)).await;
        assert_eq!(status, StatusCode::OK);
        all.extend(seqs(&body));
        cursor = body["next_before"].as_u64();
        pages += 1;
    }
    assert_eq!(pages, 3);
    assert_eq!(all, (0..120).rev().map(|i| 2 * i + 1).collect::<Vec<u64>>());

    // A tombstone: deleted, no content.
    let (_, body) = get(&format!("{base}?before=102&limit=1"), Some(&tok)).await;
    let m = &body["messages"][0];
    assert_eq!(
        (m["seq"].as_u64(), m["deleted"].as_bool()),
        (Some(101), Some(true))
    );
    assert!(m.get("content").is_none(), "{m}");

    // Forwards: oldest first with next_after; null once caught up.
    let (_, body) = get(&format!("{base}?after=0&limit=40"), Some(&tok)).await;
    assert_eq!(
        seqs(&body),
        (0..40).map(|i| 2 * i + 1).collect::<Vec<u64>>()
    );
    assert_eq!(body["next_after"], 79);
    assert!(body["next_before"].is_null());
    let (_, body) = get(&format!("{base}?after=200&limit=100"), Some(&tok)).await;
    assert_eq!(seqs(&body).len(), 20);
    assert!(body["next_after"].is_null());

    // Bad parameters are 400 invalid.
    for q in [
        "limit=0",
        "limit=101",
        "limit=x",
        "before=-1",
        "before=5&after=3",
    ] {
        let (status, body) = get(&format!("{base}?{q}"), Some(&tok)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(error_code(&body), "invalid");
    }

    // Pages of 50 by number: 50, 50, 20, then empty.
    let by_page = |n: u32| svc.url(&format!("/api/messages?room={public}&page={n}"));
    let mut numbered = Vec::new();
    for (n, len) in [(1, 50), (2, 50), (3, 20), (4, 0)] {
        let (status, body) = get(&by_page(n), Some(&tok)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["page"], n);
        assert_eq!(seqs(&body).len(), len, "page {n}");
        numbered.extend(seqs(&body));
    }
    assert_eq!(numbered, all);
    let (status, _) = get(
        &svc.url(&format!("/api/messages?room={public}&page=0")),
        Some(&tok),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = get(&svc.url("/api/messages"), Some(&tok)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    svc.stop().await;
}

#[tokio::test]
async fn pins_receipts_and_members() {
    let (svc, _, private, _) = setup().await;
    let s = &svc.store;
    s.apply(&[
        msg(&private, 1, "ann"),
        msg(&private, 2, "bob"),
        pin(&private, 1, 3, "ann"),
        pin(&private, 2, 4, "bob"),
        receipt(&private, "bob", 2),
        receipt(&private, "ann", 1),
    ])
    .await
    .unwrap();
    s.set_mute(&private, "bob", Some(t(10_000)), true)
        .await
        .unwrap();
    let tok = token("bob");

    let (status, body) = get(&svc.url(&format!("/api/rooms/{private}/pins")), Some(&tok)).await;
    assert_eq!(status, StatusCode::OK);
    let pins = body["pins"].as_array().unwrap();
    assert_eq!(pins.len(), 2);
    assert_eq!(pins[0]["message"]["seq"], 2, "most recently pinned first");
    assert_eq!(pins[0]["by"]["id"], "bob");
    assert!(pins[0]["pinned_at"].is_string());

    let (status, body) = get(
        &svc.url(&format!("/api/rooms/{private}/receipts")),
        Some(&tok),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut markers: Vec<(String, u64)> = body["markers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert!(m["at"].is_string(), "{m}");
            (
                m["user"].as_str().unwrap().to_owned(),
                m["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    markers.sort();
    assert_eq!(markers, vec![("ann".into(), 1), ("bob".into(), 2)]);

    let (status, body) = get(
        &svc.url(&format!("/api/rooms/{private}/members")),
        Some(&tok),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let members = body["members"].as_array().unwrap();
    let find = |id: &str| {
        members
            .iter()
            .find(|m| m["user"]["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(find("ann")["role"], "owner");
    assert_eq!(find("bob")["role"], "member");
    assert_eq!(find("bob")["muted_until"], t(10_000).to_string());
    assert!(find("ann").get("muted_until").is_none());
    assert!(find("ann")["joined_at"].is_string());
    svc.stop().await;
}

#[tokio::test]
async fn health_metrics_and_the_internal_token() {
    let (svc, public, _, _) = setup().await;
    let (status, _) = get(&svc.url("/healthz"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = get(&svc.url("/readyz"), None).await;
    assert_eq!(status, StatusCode::OK);
    let resp = client().get(svc.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));

    // The internal API wants its token.
    let url = svc.url("/internal/v1/rooms");
    let resp = client()
        .post(&url)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(error_code(&body), "unauthorized");
    let resp = client()
        .post(&url)
        .header(history_service::internal::TOKEN_HEADER, "internal-secret")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let rooms: Value = resp.json().await.unwrap();
    assert!(rooms
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r[0]["id"] == public.as_str()));
    // A body it cannot read is 400 invalid, in the same shape.
    let resp = client()
        .post(svc.url("/internal/v1/room_state"))
        .header(history_service::internal::TOKEN_HEADER, "internal-secret")
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body("{\"room\": \"NOT VALID\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(error_code(&body), "invalid");
    svc.stop().await;
}
