//! Token keys beyond one secret: a JWKS served by the test itself (RS256, ES256, EdDSA; kid
//! rotation; the refresh rate bound), a keys directory (several keys by `kid` at once) and
//! secrets given as files. Every refusal is a 401 before the upgrade.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::{Json, Router};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::support::*;

const RSA_PRIVATE: &str = include_str!("fixtures/test-only-rsa-private.pem");
const RSA_PUBLIC: &str = include_str!("fixtures/test-only-rsa-public.pem");
const EC_PRIVATE: &str = include_str!("fixtures/test-only-ec-p256-private.pem");
const EC_PUBLIC: &str = include_str!("fixtures/test-only-ec-p256-public.pem");
const ED_PRIVATE: &str = include_str!("fixtures/test-only-ed25519-private.pem");

/// A signing key of the test's identity provider.
struct TestKey {
    kid: String,
    alg: Algorithm,
    private: EncodingKey,
}

impl TestKey {
    fn rsa(kid: &str) -> Self {
        let private = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        Self::new(kid, Algorithm::RS256, private)
    }

    fn ec(kid: &str) -> Self {
        let private = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        Self::new(kid, Algorithm::ES256, private)
    }

    fn ed(kid: &str) -> Self {
        let private = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
        Self::new(kid, Algorithm::EdDSA, private)
    }

    fn new(kid: &str, alg: Algorithm, private: EncodingKey) -> Self {
        Self {
            kid: kid.into(),
            alg,
            private,
        }
    }

    /// The public half as a JWK, as an identity provider publishes it.
    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.private, self.alg).unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        jwk
    }

    /// A token for `user` with this key, its `kid` header saying `kid`.
    fn token_as(&self, kid: &str, user: &str) -> String {
        let header = Header {
            kid: Some(kid.into()),
            ..Header::new(self.alg)
        };
        let claims = proto::auth::claims(user, user, 3600);
        jsonwebtoken::encode(&header, &claims, &self.private).unwrap()
    }

    fn token(&self, user: &str) -> String {
        self.token_as(&self.kid.clone(), user)
    }
}

/// An identity provider's JWKS endpoint on port 0, counting the requests it gets.
struct Idp {
    url: String,
    keys: Arc<Mutex<Vec<Jwk>>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Idp {
    async fn start(keys: &[&TestKey]) -> Idp {
        let keys = Arc::new(Mutex::new(keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (k, h) = (keys.clone(), hits.clone());
        let app = Router::new().route(
            "/.well-known/jwks.json",
            get(move || async move {
                h.fetch_add(1, Ordering::SeqCst);
                Json(JwkSet {
                    keys: k.lock().unwrap().clone(),
                })
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Idp {
            url,
            keys,
            hits,
            task,
        }
    }

    /// The provider starts publishing `key` (a rotation's first step).
    fn publish(&self, key: &TestKey) {
        self.keys.lock().unwrap().push(key.jwk());
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Each key's token connects (its user in `hello`).
async fn each_connects(server: &Server, keys: &[&TestKey]) {
    for key in keys {
        let user = format!("user-{}", key.kid);
        let status = upgrade_status(server, &key.token(&user), &user).await;
        assert_eq!(status, 101, "{}", key.kid);
    }
}

/// 101 when the upgrade is accepted (and `hello` names `user`), else the refusal's status
/// (and its body must be an `unauthorized` error when it is 401).
async fn upgrade_status(server: &Server, token: &str, user: &str) -> u16 {
    match try_connect_url(&format!("ws://{}/ws?token={token}", server.addr)).await {
        Ok(ws) => {
            let mut c = Client::from_ws(ws, user);
            let hello = c.recv_type("hello").await;
            assert_eq!(hello["user"]["id"], user);
            101
        }
        Err(r) => {
            if r.status == 401 {
                assert_eq!(r.body["error"]["code"], "unauthorized", "{:?}", r.body);
            }
            r.status
        }
    }
}

/// Nodes of the server: each fetches the JWKS once at start (the test's tokens then go to the
/// first node only).
fn nodes(server: &Server) -> usize {
    1 + usize::from(server.other.is_some())
}

#[tokio::test]
async fn jwks_keys_of_each_algorithm_verify_and_unknown_kids_get_401() {
    let (rsa, ec, ed) = (
        TestKey::rsa("rsa-1"),
        TestKey::ec("ec-1"),
        TestKey::ed("ed-1"),
    );
    let idp = Idp::start(&[&rsa, &ec, &ed]).await;
    let url = idp.url.clone();
    let server = Server::start_with(|c| c.jwt_jwks_url = Some(url)).await;
    assert_eq!(idp.hits(), nodes(&server), "fetched once at start");
    assert!(!server.node.verifier.is_dev());

    each_connects(&server, &[&rsa, &ec, &ed]).await;
    // A known kid with another key's signature, a kid nobody published, no kid at all, and
    // the development key: all refused before the upgrade.
    assert_eq!(
        upgrade_status(&server, &ed.token_as("rsa-1", "u"), "u").await,
        401
    );
    assert_eq!(
        upgrade_status(&server, &rsa.token_as("rsa-9", "u"), "u").await,
        401
    );
    assert_eq!(upgrade_status(&server, &token("u"), "u").await, 401);
    // Only the unknown kid cost a refresh.
    assert_eq!(idp.hits(), 1 + nodes(&server));
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_in_kid_is_accepted_after_one_refresh_and_refreshes_are_rate_limited() {
    let (old, new, newer) = (
        TestKey::rsa("2024-06"),
        TestKey::ec("2024-09"),
        TestKey::ed("2024-12"),
    );
    let idp = Idp::start(&[&old]).await;
    let url = idp.url.clone();
    let server = Server::start_with(|c| c.jwt_jwks_url = Some(url)).await;
    assert_eq!(upgrade_status(&server, &old.token("ann"), "ann").await, 101);
    assert_eq!(idp.hits(), nodes(&server));

    // The provider rotates: its new key appears in the JWKS and signs new tokens. The first
    // such token refreshes the JWKS once; old tokens keep working.
    idp.publish(&new);
    assert_eq!(upgrade_status(&server, &new.token("bob"), "bob").await, 101);
    assert_eq!(
        idp.hits(),
        1 + nodes(&server),
        "one refresh for the new kid"
    );
    assert_eq!(upgrade_status(&server, &old.token("ann"), "ann").await, 101);
    assert_eq!(upgrade_status(&server, &new.token("cyd"), "cyd").await, 101);
    assert_eq!(idp.hits(), 1 + nodes(&server), "known kids never fetch");

    // A flood of made-up kids, concurrently: every one refused, none reaches the provider
    // within the refresh interval.
    let attempts = (0..20).map(|i| {
        let token = old.token_as(&format!("forged-{i}"), "mallory");
        let server = &server;
        async move { upgrade_status(server, &token, "mallory").await }
    });
    let statuses = futures_util::future::join_all(attempts).await;
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(
        idp.hits(),
        1 + nodes(&server),
        "unknown kids are rate limited"
    );
    // Within the same interval even a real new key waits for the periodic refresh.
    idp.publish(&newer);
    assert_eq!(
        upgrade_status(&server, &newer.token("dan"), "dan").await,
        401
    );
    assert_eq!(idp.hits(), 1 + nodes(&server));
    server.stop().await;
}

#[tokio::test]
async fn a_keys_directory_holds_several_keys_by_kid() {
    let dir = temp_dir().join("jwt-keys");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("old.pem"), RSA_PUBLIC).unwrap();
    std::fs::write(dir.join("new.pem"), EC_PUBLIC).unwrap();
    let secret = "a-shared-secret-by-kid-0123456789-0123456789";
    std::fs::write(dir.join("hs.secret"), format!("{secret}\n")).unwrap();
    let keys = dir.clone();
    let server = Server::start_with(|c| c.jwt_keys_dir = Some(keys)).await;
    let (old, new) = (TestKey::rsa("old"), TestKey::ec("new"));
    let hs = TestKey::new(
        "hs",
        Algorithm::HS256,
        EncodingKey::from_secret(secret.as_bytes()),
    );
    each_connects(&server, &[&old, &new, &hs]).await;
    assert_eq!(
        upgrade_status(&server, &new.token_as("old", "u"), "u").await,
        401
    );
    assert_eq!(
        upgrade_status(&server, &old.token_as("gone", "u"), "u").await,
        401
    );
    server.stop().await;
}

#[tokio::test]
async fn secrets_may_be_given_as_files() {
    let dir = temp_dir();
    let secret = "jwt-secret-from-a-mounted-file-0123456789";
    std::fs::write(dir.join("jwt"), format!("{secret}\n")).unwrap();
    let file = dir.join("jwt");
    let server = Server::start_with(|c| c.jwt_secret_file = Some(file)).await;
    let good = proto::auth::sign_hs256(secret.as_bytes(), &proto::auth::claims("fay", "Fay", 60));
    assert_eq!(upgrade_status(&server, &good, "fay").await, 101);
    assert_eq!(
        upgrade_status(&server, &token("fay"), "fay").await,
        401,
        "dev key"
    );
    server.stop().await;

    // The value and its file at once is a configuration error.
    let mut config = gateway::config::Config::for_tests();
    config.jwt_secret = Some(secret.into());
    config.jwt_secret_file = Some(dir.join("jwt"));
    let err = gateway::build_node(config).await.err().expect("refused");
    assert!(err.to_string().contains("CHAT_JWT_SECRET_FILE"), "{err}");
}

#[tokio::test]
async fn history_service_verifies_tokens_with_the_jwks_too() {
    use crate::cluster::procs;
    let ec = TestKey::ec("ec-1");
    let idp = Idp::start(&[&ec]).await;
    let (_child, addr, _redis) =
        procs::spawn_history_with(&[("CHAT_JWT_JWKS_URL", idp.url.clone())]).await;
    procs::wait_ready(addr).await;
    let rooms = |token: String| async move {
        http()
            .get(format!("http://{addr}/api/rooms"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(rooms(ec.token("gus")).await, 200);
    assert_eq!(rooms(ec.token_as("ec-2", "gus")).await, 401);
    assert_eq!(rooms(token("gus")).await, 401, "no development key");
    assert_eq!(idp.hits(), 2, "start, then one refresh for the unknown kid");
}
