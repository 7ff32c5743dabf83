//! A connection whose token expires: `token_expiring` ahead of time, `refresh {token}` with a
//! new token, else closed with 1008 at `exp`. Short-lived tokens (seconds); users on both
//! nodes in scaled mode.

use serde_json::{json, Value};

use crate::support::*;

/// Seconds ahead of `exp` the tests' servers warn.
const AHEAD: u64 = 2;

async fn start() -> Server {
    Server::start_with(|c| c.token_expiring_seconds = AHEAD).await
}

/// A dev-key token for `user` that expires `ttl_s` seconds from now, and its `exp`.
fn token_for(user: &str, ttl_s: u64) -> (String, u64) {
    let mut claims = proto::auth::claims(user, &user.to_uppercase(), 0);
    claims.exp = proto::auth::now_s() + ttl_s;
    let token = proto::auth::sign_hs256(proto::auth::DEV_SECRET, &claims);
    (token, claims.exp)
}

/// Connects `user` with a token that expires in `ttl_s` seconds; returns the client and `exp`.
async fn connect_expiring(server: &Server, user: &str, ttl_s: u64) -> (Client, u64) {
    let (token, exp) = token_for(user, ttl_s);
    let c = Client::connect_with_token(server.addr_for(user), user, &token).await;
    (c, exp)
}

/// `expires_at` as the server writes the instant `exp` (Unix seconds).
fn instant(exp: u64) -> Value {
    serde_json::to_value(proto::Timestamp(exp as i64 * 1000)).unwrap()
}

/// Waits for `token_expiring` about `exp`: not before `exp - AHEAD`, with the seconds left.
async fn warned(c: &mut Client, exp: u64) {
    let ev = c.recv_type("token_expiring").await;
    let now = proto::auth::now_s();
    assert!(now >= exp - AHEAD, "{}: warned too early: {ev}", c.user);
    assert_eq!(ev["expires_at"], instant(exp), "{}", c.user);
    let left = ev["expires_in_s"].as_u64().unwrap();
    assert!((1..=AHEAD).contains(&left), "{}: {ev}", c.user);
}

/// Waits for the close at `exp`: 1008, "token expired", not before `exp`.
async fn closed_at(c: &mut Client, exp: u64) {
    let (code, reason) = c.expect_close_frame().await;
    assert_eq!(
        (code, reason.as_str()),
        (1008, "token expired"),
        "{}",
        c.user
    );
    assert!(proto::auth::now_s() >= exp, "{}: closed before exp", c.user);
}

#[tokio::test]
async fn without_a_refresh_a_connection_is_warned_then_closed_at_its_tokens_exp() {
    let server = start().await;
    let (mut alice, alice_exp) = connect_expiring(&server, "alice", 4).await;
    let (mut bob, bob_exp) = connect_expiring(&server, "bob", 5).await;
    alice.join("expiring").await;
    bob.join("expiring").await;
    let both = async {
        tokio::join!(
            async {
                warned(&mut alice, alice_exp).await;
                closed_at(&mut alice, alice_exp).await;
            },
            async {
                warned(&mut bob, bob_exp).await;
                closed_at(&mut bob, bob_exp).await;
            }
        )
    };
    both.await;
}

/// Refreshes when warned, with a token good until `new_ttl_s` from then; returns its `exp`.
async fn refresh_when_warned(c: &mut Client, exp: u64, new_ttl_s: u64) -> u64 {
    warned(c, exp).await;
    let (token, new_exp) = token_for(&c.user, new_ttl_s);
    let ack = c.call(json!({"type": "refresh", "token": token})).await;
    assert_eq!(ack["type"], "ack", "{}: {ack}", c.user);
    assert!(
        ack.get("seq").is_none(),
        "a refresh publishes nothing: {ack}"
    );
    new_exp
}

#[tokio::test]
async fn a_refresh_keeps_the_connection_until_the_new_tokens_exp() {
    let server = start().await;
    let refreshed = |mut c: Client, exp: u64| async move {
        let new_exp = refresh_when_warned(&mut c, exp, 6).await;
        // Its warning comes after the old exp: the connection outlived the old token.
        warned(&mut c, new_exp).await;
        assert!(proto::auth::now_s() > exp);
        assert_eq!(c.call(json!({"type": "ping"})).await["type"], "pong");
        closed_at(&mut c, new_exp).await;
    };
    let (alice, alice_exp) = connect_expiring(&server, "alice", 3).await;
    let (bob, bob_exp) = connect_expiring(&server, "bob", 3).await;
    tokio::join!(refreshed(alice, alice_exp), refreshed(bob, bob_exp));
}

#[tokio::test]
async fn a_refresh_must_be_a_valid_unexpired_token_of_the_same_user_and_standing() {
    let server = start().await;
    let mut alice = Client::connect(&server, "alice").await;
    let mut expired = proto::auth::claims("alice", "Alice", 0);
    expired.exp = proto::auth::now_s() - 3600;
    // Within the verifier's clock-skew leeway, but past exp: it would be closed at once.
    let mut just_expired = proto::auth::claims("alice", "Alice", 0);
    just_expired.exp = proto::auth::now_s() - 5;
    let sign = |c| proto::auth::sign_hs256(proto::auth::DEV_SECRET, &c);
    let cases = [
        ("another user", token("bob"), "forbidden"),
        ("another standing", admin_token("alice"), "forbidden"),
        ("expired", sign(expired), "unauthorized"),
        ("just expired", sign(just_expired), "unauthorized"),
        (
            "wrong key",
            proto::auth::sign_hs256(
                b"not-the-dev-key-0123456789abcdef",
                &proto::auth::claims("alice", "A", 60),
            ),
            "unauthorized",
        ),
        ("garbage", "not-a-jwt".into(), "unauthorized"),
    ];
    for (what, token, code) in cases {
        let v = alice.call(json!({"type": "refresh", "token": token})).await;
        assert_eq!(
            (v["type"].as_str(), v["code"].as_str()),
            (Some("error"), Some(code)),
            "{what}: {v}"
        );
    }
    let v = alice.call(json!({"type": "refresh"})).await;
    assert_eq!(v["code"], "invalid", "{v}");
    let v = alice
        .call(json!({"type": "refresh", "token": token("alice")}))
        .await;
    assert_eq!(v["type"], "ack", "{v}");
    // Refused refreshes changed nothing: the connection goes on.
    alice.join("after-refresh").await;
}
