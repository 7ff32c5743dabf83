//! Authentication happens before the upgrade; refusals are HTTP 401/403 with a JSON body.

use crate::support::*;
use serde_json::json;

async fn refused(server: &Server, query: &str) -> Refused {
    try_connect_url(&format!("ws://{}/ws{query}", server.addr))
        .await
        .expect_err("upgrade must be refused")
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_before_upgrade() {
    let server = Server::start().await;
    let mut expired = proto::auth::claims("u", "u", 0);
    expired.exp = proto::auth::now_s() - 3600;
    let mut future_nbf = proto::auth::claims("u", "u", 3600);
    future_nbf.nbf = Some(proto::auth::now_s() + 3600);
    let cases = [
        ("missing", String::new()),
        ("garbage", "?token=not-a-jwt".into()),
        (
            "wrong key",
            format!(
                "?token={}",
                proto::auth::sign_hs256(b"wrong", &proto::auth::claims("u", "u", 60))
            ),
        ),
        (
            "expired",
            format!(
                "?token={}",
                proto::auth::sign_hs256(proto::auth::DEV_SECRET, &expired)
            ),
        ),
        (
            "future nbf",
            format!(
                "?token={}",
                proto::auth::sign_hs256(proto::auth::DEV_SECRET, &future_nbf)
            ),
        ),
        // header {"alg":"none"}, payload {"sub":"u","exp":9999999999}, no signature
        (
            "alg none",
            "?token=eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiZXhwIjo5OTk5OTk5OTk5fQ."
                .into(),
        ),
        ("huge", format!("?token={}", "a".repeat(9000))),
    ];
    for (what, q) in cases {
        let r = refused(&server, &q).await;
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(
            r.body["error"]["code"], "unauthorized",
            "{what}: {:?}",
            r.body
        );
        assert!(r.body["error"]["message"].is_string(), "{what}");
    }
    server.stop().await;
}

#[tokio::test]
async fn token_may_come_from_header_or_cookie() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = Server::start().await;
    for (name, value) in [
        ("authorization", format!("Bearer {}", token("hdr"))),
        (
            "cookie",
            format!("theme=dark; chat_token={}", token("cookie")),
        ),
    ] {
        let mut req = format!("ws://{}/ws", server.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(name, value.parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect(name);
        use futures_util::StreamExt;
        let hello = ws.next().await.unwrap().unwrap();
        let hello: serde_json::Value = serde_json::from_str(hello.to_text().unwrap()).unwrap();
        assert_eq!(hello["type"], "hello");
        assert!(hello["user"]["id"] == "hdr" || hello["user"]["id"] == "cookie");
    }
    server.stop().await;
}

#[tokio::test]
async fn hello_carries_identity_and_limits() {
    let server = Server::start().await;
    let c = Client::connect(&server, "ann").await;
    assert_eq!(c.hello["user"], json!({"id": "ann", "name": "ANN"}));
    assert_eq!(c.hello["heartbeat_s"], 25);
    assert_eq!(c.hello["limits"]["max_frame_bytes"], 65536);
    assert!(c.hello["limits"]["max_content_chars"].as_u64().unwrap() > 0);
    assert!(c.hello["session_id"].is_string());
    assert!(c.hello["node"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn origin_outside_the_allowlist_gets_403() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server =
        Server::start_with(|c| c.allowed_origins = Some(vec!["https://chat.example".into()])).await;
    let url = format!("ws://{}/ws?token={}", server.addr, token("u"));
    let mut req = url.clone().into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "https://chat.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn dev_token_endpoint_exists_only_with_the_dev_key() {
    let dev = Server::start().await;
    let r = http()
        .post(dev.url("/api/dev/token"))
        .json(&json!({"name": "Ann Lee"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let t = body["token"].as_str().unwrap();
    let id = dev.node.verifier.verify(t).await.unwrap();
    assert_eq!(id.user.name, "Ann Lee");
    let r = http()
        .post(dev.url("/api/dev/token"))
        .json(&json!({"name": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    dev.stop().await;

    let real = Server::start_with(|c| c.jwt_secret = Some(TEST_SECRET.into())).await;
    let r = http()
        .post(real.url("/api/dev/token"))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // and dev-key tokens are refused there
    let refused = try_connect_url(&format!("ws://{}/ws?token={}", real.addr, token("x"))).await;
    assert_eq!(refused.expect_err("refused").status, 401);
    real.stop().await;
}
