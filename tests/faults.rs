//! Fault injection, driven by the emulator: a Clerk whose JWKS hangs, crawls, or answers
//! garbage and keys of the wrong type or size; a key rotation in the middle of load; Backend
//! API 429 storms, and a 429 on any one of the Backend API's paths (identity queries, machine
//! tokens, the M2M token source) holding back the others; an AuthService restarted while the
//! delegated layer is under load.
//!
//! Each test states the outcome it expects: the last good keys keep serving within the stale
//! bound, Clerk's traffic is not amplified, calls fail closed where there is no basis to
//! decide, and everything recovers without a restart.

mod common;
#[path = "../examples/common/orders.rs"]
mod orders;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use clerk_grpc_auth::{
    clerk::{
        api::{BackendApi, BackendApiConfig, ClerkApi},
        budget::BudgetConfig,
        directory::DirectoryConfig,
        machines::MachineConfig,
    },
    credentials::m2m::{M2mTokenSource, M2mTokenSourceConfig},
    emulator::{Emulator, JwksFault, MachineTokenKind, MachineTokenSpec, TokenSpec, UserSpec},
    layer::{AuthLayer, DelegatedConfig, DelegatedVerifier},
    pb::{GetUserRequest, TokenType, VerifyTokenRequest},
    secret::Secret,
    server::{AuthServer, IdentityConfig},
    token::keys::{Alg, MAX_JWKS_KEYS},
    verify::jwks::MAX_JWKS_BYTES,
};
use common::{assert_rejected, config_for, now, reason, Harness};
use futures::{stream, StreamExt};
use orders::pb::{orders_client::OrdersClient, ListOrdersRequest};
use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, sync::watch, task::JoinHandle};
use tonic::{transport::Channel, Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

fn hang() -> Option<JwksFault> {
    Some(JwksFault {
        hang: true,
        ..JwksFault::default()
    })
}

fn body(b: impl Into<String>) -> Option<JwksFault> {
    Some(JwksFault {
        body: Some(b.into()),
        ..JwksFault::default()
    })
}

/// Tokens signed by the emulator's real key under a `kid` no JWKS holds.
fn unknown_kid_tokens(h: &Harness, n: usize, prefix: &str) -> Vec<String> {
    let claims = serde_json::Value::Object(TokenSpec::default().claims(&h.clerk.url(), now()));
    (0..n)
        .map(|i| {
            h.clerk.sign(
                &json!({"alg": "RS256", "typ": "JWT", "kid": format!("ins_{prefix}{i}")}),
                &claims,
                Alg::RS256,
            )
        })
        .collect()
}

#[tokio::test]
async fn a_jwks_that_never_answers_times_out_while_the_hot_path_keeps_serving() {
    let h = Harness::start_with(|_, c| {
        // The refresher stays out of the way: only unknown kids ask Clerk here.
        c.key_store.refresh_interval = Duration::from_secs(3600);
        c.key_store.fetch_timeout = Duration::from_millis(300);
        c.verifier.cache_capacity = 0;
    })
    .await;
    let known = h.mint(&TokenSpec::default());
    let unknown = unknown_kid_tokens(&h, 200, "hang");
    h.clerk.set_jwks_fault(hang());
    let before = h.clerk.jwks_requests();

    // 200 unknown kids at once: one refetch, which Clerk holds; everyone else joins it.
    let flood = tokio::spawn({
        let client = h.client.clone();
        let unknown = unknown.clone();
        async move {
            stream::iter(unknown)
                .map(|t| {
                    let mut c = client.clone();
                    async move {
                        c.verify_token(VerifyTokenRequest {
                            token: t,
                            ..Default::default()
                        })
                        .await
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await
        }
    });
    h.clerk.wait_jwks_requests(before + 1).await;
    // While Clerk holds that request, known keys verify without waiting for it.
    for _ in 0..20 {
        h.verify(&known).await.expect("the hot path does not wait");
    }
    assert_eq!(h.health_status().await, ServingStatus::Serving);

    // The held request times out: no basis to decide those kids, so they fail closed.
    for r in flood.await.unwrap() {
        let status = r.expect_err("an unknown kid is never accepted");
        assert!(
            matches!(
                (status.code(), reason(&status).as_str()),
                (Code::Unavailable, "JWK_REMOTE_FAILED_TO_LOAD")
                    | (Code::Unauthenticated, "JWK_KID_MISMATCH")
            ),
            "{status:?}"
        );
    }
    assert_eq!(
        h.clerk.jwks_requests(),
        before + 1,
        "200 unknown kids, one request to Clerk"
    );
    assert_eq!(h.verifier.keys().stats().fetch_failures, 1);
    h.verify(&known)
        .await
        .expect("the last good keys still serve");

    // Healed: the next fetch succeeds; nothing was restarted.
    h.clerk.set_jwks_fault(None);
    h.verifier
        .keys()
        .refresh()
        .await
        .expect("refresh after heal");
    h.verify(&known).await.unwrap();
    assert_eq!(h.health_status().await, ServingStatus::Serving);
}

#[tokio::test]
async fn a_jwks_that_never_answers_at_startup_fails_closed_then_recovers() {
    let clerk = Emulator::start_local().await.unwrap();
    clerk.set_jwks_fault(hang());
    let mut config = config_for(&clerk);
    config.key_store.fetch_timeout = Duration::from_millis(200);
    config.key_store.retry_min = Duration::from_millis(50);
    config.key_store.retry_max = Duration::from_millis(100);
    let h = Harness::start_server(clerk, config).await;
    // Two requests: the first timed out and the refresher retried.
    h.clerk.wait_jwks_requests(2).await;
    assert_eq!(h.health_status().await, ServingStatus::NotServing);
    let t = h.mint(&TokenSpec::default());
    assert_rejected(
        h.verify(&t).await,
        Code::Unavailable,
        "JWK_REMOTE_FAILED_TO_LOAD",
        &t,
    );
    // Retries back off: after the second failure, a third request waits its turn.
    let stats = h.verifier.keys().stats();
    assert_eq!(stats.fetches, h.clerk.jwks_requests());

    h.clerk.set_jwks_fault(None);
    h.wait_health(ServingStatus::Serving).await;
    h.verify(&t).await.expect("verifies once Clerk answers");
}

#[tokio::test]
async fn stopping_the_emulator_releases_requests_held_by_a_hang() {
    let clerk = Emulator::start_local().await.unwrap();
    clerk.set_jwks_fault(hang());
    let url = format!("{}/.well-known/jwks.json", clerk.url());
    let held = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
    clerk.wait_jwks_requests(1).await;
    tokio::time::timeout(Duration::from_secs(10), clerk.shutdown())
        .await
        .expect("shutdown waited on a held request");
    // Released, the held request is answered (with the keys) rather than left hanging.
    assert_eq!(held.await.unwrap().unwrap(), 200);
}

#[tokio::test]
async fn a_slow_jwks_is_asked_once_and_verification_goes_on_meanwhile() {
    let clerk = Emulator::start_local().await.unwrap();
    clerk.set_jwks_fault(Some(JwksFault {
        delay_ms: Some(400),
        ..JwksFault::default()
    }));
    let config = config_for(&clerk);
    let h = Harness::start_server(clerk, config).await;
    h.wait_health(ServingStatus::Serving).await;
    assert_eq!(h.clerk.jwks_requests(), 1, "a slow answer is not re-asked");
    assert_eq!(h.verifier.keys().stats().fetch_failures, 0);

    // A slow refresh in flight: 100 verifications meanwhile all succeed.
    let t = h.mint(&TokenSpec::default());
    let keys = h.verifier.keys().clone();
    let refresh = tokio::spawn(async move { keys.refresh().await });
    h.clerk.wait_jwks_requests(2).await;
    let ok = stream::iter(0..100)
        .map(|_| h.verify(&t))
        .buffer_unordered(16)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    assert_eq!(ok, 100);
    refresh.await.unwrap().expect("the slow refresh succeeds");
    assert_eq!(h.clerk.jwks_requests(), 2);
}

/// A JWK with an RSA modulus of `bits` bits.
fn rsa_jwk(kid: &str, bits: usize) -> serde_json::Value {
    let mut n = vec![0xA5u8; bits / 8];
    n[0] = 0xC1;
    let last = n.len() - 1;
    n[last] |= 1;
    json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
           "n": URL_SAFE_NO_PAD.encode(&n), "e": "AQAB"})
}

fn ec_jwk(kid: &str) -> serde_json::Value {
    json!({"kty": "EC", "kid": kid, "crv": "P-256", "use": "sig",
           "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
           "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"})
}

fn hostile_bodies(real: &serde_json::Value) -> Vec<(&'static str, String)> {
    let mut deep = "[".repeat(10_000);
    deep.push_str(&"]".repeat(10_000));
    let many: Vec<_> = (0..=MAX_JWKS_KEYS)
        .map(|i| rsa_jwk(&format!("k{i}"), 2048))
        .collect();
    vec![
        ("HTML from a proxy", "<html>502 Bad Gateway</html>".into()),
        ("empty body", String::new()),
        ("keys not an array", r#"{"keys":"x"}"#.into()),
        ("no keys", r#"{"keys":[]}"#.into()),
        ("no keys field", "{}".into()),
        ("nested 10 000 deep", deep),
        ("EC key only", json!({"keys": [ec_jwk("ec1")]}).to_string()),
        (
            "symmetric key only",
            json!({"keys": [{"kty": "oct", "kid": "hs", "k": "c2VjcmV0"}]}).to_string(),
        ),
        (
            "RSA-1024 only",
            json!({"keys": [rsa_jwk("weak", 1024)]}).to_string(),
        ),
        (
            "RSA-9000 only",
            json!({"keys": [rsa_jwk("huge", 9000)]}).to_string(),
        ),
        (
            "exponent 2",
            json!({"keys": [{"kty": "RSA", "kid": "e2", "n": real["n"], "e": "Ag"}]}).to_string(),
        ),
        (
            "encryption key",
            json!({"keys": [{"kty": "RSA", "kid": "enc", "use": "enc",
                             "n": real["n"], "e": "AQAB"}]})
            .to_string(),
        ),
        (
            "too many keys",
            json!({"keys": many, "note": "one over the limit"}).to_string(),
        ),
        (
            "over the size limit",
            json!({"keys": [real], "pad": "x".repeat(MAX_JWKS_BYTES)}).to_string(),
        ),
    ]
}

#[tokio::test]
async fn garbage_and_hostile_jwks_are_refused_and_the_last_good_keys_kept() {
    let h = Harness::start_with(|_, c| {
        c.key_store.refresh_interval = Duration::from_secs(3600);
    })
    .await;
    let t = h.mint(&TokenSpec::default());
    let kid = h.clerk.kid();
    let real = h.clerk.current_key().jwk();
    for (what, b) in hostile_bodies(&real) {
        h.clerk.set_jwks_fault(body(b));
        let failures = h.verifier.keys().stats().fetch_failures;
        assert!(
            h.verifier.keys().refresh().await.is_err(),
            "{what}: accepted"
        );
        assert_eq!(
            h.verifier.keys().stats().fetch_failures,
            failures + 1,
            "{what}"
        );
        assert_eq!(h.verifier.keys().kids(), vec![kid.clone()], "{what}");
        h.verify(&t)
            .await
            .unwrap_or_else(|e| panic!("{what}: last good keys lost: {e:?}"));
        assert_eq!(h.health_status().await, ServingStatus::Serving, "{what}");
    }

    // A document mixing the real key with unusable ones: the real key is used, the others
    // skipped, and a token naming a skipped kid is a kid mismatch (never verified with it).
    let mixed = json!({"keys": [ec_jwk("ec1"), rsa_jwk("weak", 1024), real,
                                {"kty": "oct", "kid": "hs", "k": "c2VjcmV0"}]});
    h.clerk.set_jwks_fault(body(mixed.to_string()));
    h.verifier.keys().refresh().await.expect("one usable key");
    assert_eq!(h.verifier.keys().kids(), vec![kid.clone()]);
    h.verify(&t).await.expect("the real key verifies");
    let claims = serde_json::Value::Object(TokenSpec::default().claims(&h.clerk.url(), now()));
    for skipped in ["weak", "ec1", "hs"] {
        let alg = if skipped == "hs" { "HS256" } else { "RS256" };
        let forged = h.clerk.sign(
            &json!({"alg": alg, "typ": "JWT", "kid": skipped}),
            &claims,
            Alg::RS256,
        );
        let status = h.verify(&forged).await.expect_err(skipped);
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "{skipped}: {status:?}"
        );
    }
}

#[tokio::test]
async fn garbage_jwks_at_startup_is_not_serving_and_fails_closed() {
    let clerk = Emulator::start_local().await.unwrap();
    clerk.set_jwks_fault(body(json!({"keys": [ec_jwk("ec1")]}).to_string()));
    let mut config = config_for(&clerk);
    config.key_store.retry_min = Duration::from_millis(50);
    config.key_store.retry_max = Duration::from_millis(100);
    let h = Harness::start_server(clerk, config).await;
    h.clerk.wait_jwks_requests(2).await;
    assert_eq!(h.health_status().await, ServingStatus::NotServing);
    let t = h.mint(&TokenSpec::default());
    let status = h.verify(&t).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    h.clerk.set_jwks_fault(None);
    h.wait_health(ServingStatus::Serving).await;
    h.verify(&t).await.unwrap();
}

#[tokio::test]
async fn rotation_in_the_middle_of_load_costs_one_refetch_and_no_failures() {
    let h = Arc::new(
        Harness::start_with(|_, c| {
            c.key_store.refresh_interval = Duration::from_secs(3600);
            c.verifier.cache_capacity = 0;
        })
        .await,
    );
    let old: Arc<Vec<String>> = Arc::new((0..32).map(|_| h.mint(&TokenSpec::default())).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = watch::channel(0u64);
    let done_tx = Arc::new(done_tx);
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<JoinHandle<()>> = (0..8)
        .map(|w| {
            let (h, old, stop, done, failures) = (
                h.clone(),
                old.clone(),
                stop.clone(),
                done_tx.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = h.verify(&old[i % old.len()]).await {
                        failures.lock().unwrap().push(e);
                    }
                    done.send_modify(|n| *n += 1);
                    i += 8;
                }
            })
        })
        .collect();
    let mut rx = done_rx.clone();
    rx.wait_for(|n| *n >= 500).await.unwrap();

    // Rotate under load; new-kid tokens arrive 20 at a time while the old ones keep flowing.
    h.clerk.rotate().await.unwrap();
    let fresh: Vec<String> = (0..200).map(|_| h.mint(&TokenSpec::default())).collect();
    let ok = stream::iter(fresh.iter())
        .map(|t| h.verify(t))
        .buffer_unordered(20)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    let at_rotation_end = *done_rx.borrow();
    let mut rx = done_rx.clone();
    rx.wait_for(|n| *n >= at_rotation_end + 500).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(ok, 200, "every new-kid token verified");
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "old-key tokens failed during the rotation: {:?}",
        &failures[..failures.len().min(3)]
    );
    assert_eq!(h.clerk.jwks_requests(), 2, "startup + exactly one refetch");
    assert_eq!(h.verifier.keys().stats().unknown_kid_refetches, 1);
}

/// A server with identity queries and machine tokens on the emulator's Backend API.
async fn with_backend_api(retry_budget: Duration) -> Harness {
    Harness::start_with(|clerk, c| {
        let api: url::Url = clerk.url().parse().unwrap();
        c.machine = Some(MachineConfig::new(
            api.clone(),
            Some(Secret::new(clerk.secret_key())),
            None,
        ));
        let mut backend = BackendApiConfig::new(api, Secret::new(clerk.secret_key()));
        backend.retry_budget = retry_budget;
        c.identity = Some(IdentityConfig {
            backend,
            directory: DirectoryConfig::default(),
        });
    })
    .await
}

/// GetUser on oneself.
async fn get_self(h: &Harness, user: &str, token: &str) -> Result<String, tonic::Status> {
    let mut req = Request::new(GetUserRequest {
        user_id: user.into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut c = clerk_grpc_auth::pb::auth_service_client::AuthServiceClient::new(
        Channel::from_shared(format!("http://{}", h.addr))
            .unwrap()
            .connect_lazy(),
    );
    c.get_user(req).await.map(|r| r.into_inner().id)
}

fn users_with_tokens(h: &Harness, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|_| {
            let user = h.clerk.create_user(&UserSpec::default());
            let session = h.clerk.create_session(&user);
            let token = h.mint(&TokenSpec {
                user_id: Some(user.clone()),
                session_id: Some(session),
                expires_in: Some(600),
                ..TokenSpec::default()
            });
            (user, token)
        })
        .collect()
}

#[tokio::test]
async fn a_backend_api_429_storm_is_not_amplified() {
    let h = with_backend_api(Duration::from_secs(2)).await;
    let users = users_with_tokens(&h, 240);
    let machine: Vec<String> = (0..200)
        .map(|_| {
            h.clerk.mint_machine(&MachineTokenSpec {
                kind: MachineTokenKind::M2m,
                ..MachineTokenSpec::default()
            })
        })
        .collect();
    h.clerk.set_bapi_failure(Some((429, Some(30))));
    let before = h.clerk.bapi_requests();

    // First wave, 40 identity queries at once: each reaches Clerk at most once (no retry:
    // Retry-After is beyond the budget), and all are RESOURCE_EXHAUSTED with RetryInfo.
    let wave = |range: std::ops::Range<usize>| {
        let h = &h;
        let users = &users;
        stream::iter(range)
            .map(move |i| get_self(h, &users[i].0, &users[i].1))
            .buffer_unordered(40)
            .collect::<Vec<_>>()
    };
    for r in wave(0..40).await {
        let status = r.expect_err("rate limited");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason(&status), "RATE_LIMITED");
        let delay = status
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .unwrap();
        assert!(delay <= Duration::from_secs(30) && delay > Duration::ZERO);
    }
    let first = h.clerk.bapi_requests() - before;
    assert!((1..=40).contains(&first), "{first} requests for 40 calls");

    // Second wave, 200 more: Clerk said 429; nobody asks again before Retry-After.
    for r in wave(40..240).await {
        assert_eq!(r.unwrap_err().code(), Code::ResourceExhausted);
    }
    // Opaque machine tokens during the same storm: one 429 suspends them too.
    let machine_results: Vec<_> = stream::iter(machine.iter())
        .map(|t| {
            h.verify_req(VerifyTokenRequest {
                token: t.clone(),
                accepted_token_types: vec![TokenType::M2mToken as i32],
                ..Default::default()
            })
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in machine_results {
        assert_eq!(r.unwrap_err().code(), Code::ResourceExhausted);
    }
    let total = h.clerk.bapi_requests() - before;
    assert_eq!(
        total, first,
        "after the identity queries' 429, neither they nor machine tokens asked Clerk again"
    );
    assert_eq!(h.verifier.machine().unwrap().stats().clerk_429s, 0);
    assert_eq!(h.verifier.machine().unwrap().stats().api_calls, 0);

    // Session tokens need no Backend API: unaffected by the storm.
    h.verify(&users[0].1).await.expect("session tokens verify");
}

#[tokio::test]
async fn a_machine_token_429_holds_back_identity_queries() {
    let h = with_backend_api(Duration::from_secs(2)).await;
    let users = users_with_tokens(&h, 20);
    let mt = h.clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        ..MachineTokenSpec::default()
    });
    // One machine-token verification is answered 429, Retry-After 30 s (beyond the identity
    // queries' 2 s retry budget) …
    h.clerk.set_bapi_failure(Some((429, Some(30))));
    let before = h.clerk.bapi_requests();
    let status = h
        .verify_req(VerifyTokenRequest {
            token: mt.clone(),
            accepted_token_types: vec![TokenType::M2mToken as i32],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(h.clerk.bapi_requests(), before + 1);
    // … then Clerk heals, but the Retry-After stands for every path: 20 identity queries
    // are refused at once without a single request.
    h.clerk.set_bapi_failure(None);
    let results: Vec<_> = stream::iter(users.iter())
        .map(|(u, t)| get_self(&h, u, t))
        .buffer_unordered(20)
        .collect()
        .await;
    for r in results {
        let status = r.expect_err("held back by the machine path's 429");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason(&status), "RATE_LIMITED");
    }
    assert_eq!(
        h.clerk.bapi_requests(),
        before + 1,
        "no identity query reached Clerk"
    );
    // Session tokens need no Backend API: unaffected.
    h.verify(&users[0].1).await.expect("session tokens verify");
}

/// The three paths that call the Backend API through one [`ClerkApi`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BapiPath {
    /// `GetUser` (identity queries, `GET /v1/users/…`).
    Identity,
    /// An opaque M2M token verified through AuthService (`POST /m2m_tokens/verify`).
    Machine,
    /// The outgoing M2M token source (`POST /m2m_tokens`).
    M2mSource,
}

/// A 429 answered on `first` holds back every other path of the same client: with Clerk
/// healed meanwhile, none of them reaches the emulator while the `Retry-After` runs, and each
/// fails as documented — `RESOURCE_EXHAUSTED` / `RATE_LIMITED` with a `RetryInfo` no longer
/// than Clerk's `Retry-After`.
async fn a_429_on_one_path_holds_back_the_others(first: BapiPath) {
    let h = with_backend_api(Duration::from_secs(2)).await;
    let users = users_with_tokens(&h, 1);
    let machine_token = h.clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        ..MachineTokenSpec::default()
    });
    let a = h.clerk.create_machine("a");
    // The server's own client: identity queries and machine tokens already go through it,
    // and the token source is built on it too.
    let api: ClerkApi = h.verifier.machine().unwrap().client().clone();
    let source = M2mTokenSource::new(
        M2mTokenSourceConfig::new(h.clerk.url().parse().unwrap(), Secret::new(&a.secret_key)),
        &api,
    );
    let call = |path: BapiPath| {
        let (h, users, machine_token, source) = (&h, &users, &machine_token, &source);
        async move {
            match path {
                BapiPath::Identity => get_self(h, &users[0].0, &users[0].1).await.map(drop),
                BapiPath::Machine => h
                    .verify_req(VerifyTokenRequest {
                        token: machine_token.clone(),
                        accepted_token_types: vec![TokenType::M2mToken as i32],
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                BapiPath::M2mSource => source.get().await.map(drop),
            }
        }
    };
    let rate_limited = |path: BapiPath, status: tonic::Status| {
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{path:?}: {status:?}"
        );
        assert_eq!(reason(&status), "RATE_LIMITED", "{path:?}");
        let delay = status
            .get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .unwrap_or_else(|| panic!("{path:?}: no RetryInfo in {status:?}"));
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_secs(30),
            "{path:?}: {delay:?}"
        );
    };

    // Clerk answers the first path 429 with Retry-After 30 s (beyond the identity path's 2 s
    // retry budget: no retry) …
    h.clerk.set_bapi_failure(Some((429, Some(30))));
    let before = h.clerk.bapi_requests();
    rate_limited(first, call(first).await.expect_err("answered 429"));
    assert_eq!(
        h.clerk.bapi_requests(),
        before + 1,
        "{first:?}: one request"
    );
    assert_eq!(api.stats().rate_limited, 1);

    // … then heals: anything that reached it now would succeed. The other paths are refused
    // at once, without a request.
    h.clerk.set_bapi_failure(None);
    let others = [BapiPath::Identity, BapiPath::Machine, BapiPath::M2mSource]
        .into_iter()
        .filter(|p| *p != first);
    for path in others {
        rate_limited(
            path,
            call(path).await.expect_err("held back by the Retry-After"),
        );
    }
    assert_eq!(
        h.clerk.bapi_requests(),
        before + 1,
        "after {first:?}'s 429, no other path reached Clerk"
    );
    assert_eq!(
        api.stats().requests,
        1,
        "one request sent through the client"
    );
    assert_eq!(source.created(), 0);
    // Session tokens need no Backend API: unaffected.
    h.verify(&users[0].1).await.expect("session tokens verify");
}

#[tokio::test]
async fn an_identity_query_429_holds_back_machine_tokens_and_the_m2m_source() {
    a_429_on_one_path_holds_back_the_others(BapiPath::Identity).await;
}

#[tokio::test]
async fn a_machine_verification_429_holds_back_identity_queries_and_the_m2m_source() {
    a_429_on_one_path_holds_back_the_others(BapiPath::Machine).await;
}

#[tokio::test]
async fn an_m2m_token_creation_429_holds_back_identity_queries_and_machine_tokens() {
    a_429_on_one_path_holds_back_the_others(BapiPath::M2mSource).await;
}

#[tokio::test]
async fn during_a_short_retry_after_queries_wait_it_out_instead_of_asking() {
    let clerk = Emulator::start_local().await.unwrap();
    let users: Vec<String> = (0..10)
        .map(|_| clerk.create_user(&UserSpec::default()))
        .collect();
    let mut config = BackendApiConfig::new(
        clerk.url().parse().unwrap(),
        Secret::new(clerk.secret_key()),
    );
    config.retry_budget = Duration::from_secs(3);
    let api = BackendApi::new(
        config,
        &ClerkApi::with_http(reqwest::Client::new(), BudgetConfig::default()),
    );
    let get = |user: String| {
        let api = api.clone();
        async move {
            api.get::<serde_json::Value>(&format!("users/{user}"))
                .await
                .map(|u| u["id"].as_str().unwrap_or_default().to_owned())
        }
    };
    clerk.set_bapi_failure(Some((429, Some(1))));
    let before = clerk.bapi_requests();
    let first = tokio::spawn(get(users[0].clone()));
    // The 429 has been read (the counter is the client's own signal).
    while api.stats().rate_limited == 0 {
        tokio::task::yield_now().await;
    }
    // Nine more during the one-second suspension: they wait it out instead of asking. An
    // absence of requests can only be watched over a window: 300 ms of it.
    let rest: Vec<_> = users[1..]
        .iter()
        .cloned()
        .map(|u| tokio::spawn(get(u)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        clerk.bapi_requests() - before,
        1,
        "asked during the suspension"
    );
    clerk.set_bapi_failure(None);
    for (r, u) in rest.into_iter().zip(&users[1..]) {
        assert_eq!(&r.await.unwrap().unwrap(), u);
    }
    assert_eq!(
        first.await.unwrap().unwrap(),
        users[0],
        "retried after Retry-After"
    );
    assert_eq!(
        clerk.bapi_requests() - before,
        1 + 10,
        "one 429, then one request per user"
    );
    assert_eq!(api.stats().rate_limited, 1);
}

/// An AuthService on `listener`; returns its stop switch and task.
fn start_auth(
    clerk: &Emulator,
    listener: TcpListener,
) -> (
    oneshot::Sender<()>,
    JoinHandle<Result<(), clerk_grpc_auth::server::ServerError>>,
    clerk_grpc_auth::verify::jwks::KeyStore,
) {
    let server = AuthServer::build(config_for(clerk)).unwrap();
    let keys = server.verifier().keys().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = rx.await;
    }));
    (tx, task, keys)
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    unavailable: u64,
    other: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_service_restarted_under_delegated_load_fails_closed_and_recovers() {
    const USER: &str = "user_2restartLOAD";
    let clerk = Emulator::start_local().await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth_addr: SocketAddr = listener.local_addr().unwrap();
    let (stop_auth, auth_task, keys) = start_auth(&clerk, listener);
    keys.ready().await;

    let delegated = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![format!("http://{auth_addr}")],
        ..DelegatedConfig::default()
    })
    .unwrap();
    let orders_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let orders_addr = orders_listener.local_addr().unwrap();
    let (stop_orders, orders_stop) = oneshot::channel::<()>();
    tokio::spawn(orders::serve(
        orders_listener,
        AuthLayer::delegated(delegated.clone(), orders::policy()),
        async move {
            let _ = orders_stop.await;
        },
    ));
    let client = OrdersClient::new(
        Channel::from_shared(format!("http://{orders_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );

    // Distinct tokens, so that every call needs AuthService (no verdict-cache hits).
    let spec = TokenSpec {
        user_id: Some(USER.into()),
        expires_in: Some(600),
        ..TokenSpec::default()
    };
    let tokens: Arc<Vec<String>> = Arc::new((0..3000).map(|_| clerk.mint(&spec)).collect());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (calls_tx, calls) = watch::channel(0u64);
    let calls_tx = Arc::new(calls_tx);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<JoinHandle<()>> = (0..8)
        .map(|w| {
            let (client, tokens, tally, calls_tx, stop) = (
                client.clone(),
                tokens.clone(),
                tally.clone(),
                calls_tx.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let mut req = Request::new(ListOrdersRequest {});
                    let t = &tokens[i % tokens.len()];
                    req.metadata_mut()
                        .insert("authorization", format!("Bearer {t}").parse().unwrap());
                    let r = client.clone().list_orders(req).await;
                    {
                        let mut tally = tally.lock().unwrap();
                        match r {
                            Ok(resp) => {
                                let caller = resp.into_inner().caller.unwrap_or_default();
                                if caller.user_id == USER {
                                    tally.ok += 1;
                                } else {
                                    tally.other.push(format!("wrong caller {caller:?}"));
                                }
                            }
                            // Fail-closed: AuthService unreachable, or — while the restarted
                            // one is loading its keys — its own UNAVAILABLE passed through.
                            Err(s)
                                if s.code() == Code::Unavailable
                                    && matches!(
                                        reason(&s).as_str(),
                                        "AUTH_SERVICE_UNAVAILABLE" | "JWK_REMOTE_FAILED_TO_LOAD"
                                    ) =>
                            {
                                tally.unavailable += 1
                            }
                            Err(s) => tally.other.push(format!("{s:?}")),
                        }
                    }
                    calls_tx.send_modify(|n| *n += 1);
                    i += 8;
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let wait_calls = |n: u64| {
        let mut rx = calls.clone();
        async move {
            let at = *rx.borrow();
            rx.wait_for(|c| *c >= at + n).await.unwrap();
        }
    };
    let snapshot = |t: &Mutex<Tally>| {
        let t = t.lock().unwrap();
        (t.ok, t.unavailable)
    };

    wait_calls(300).await;
    let (ok_before, _) = snapshot(&tally);
    assert!(ok_before >= 300 - 8, "healthy phase: {ok_before} ok");

    // AuthService goes away (draining the calls in flight).
    let _ = stop_auth.send(());
    auth_task.await.unwrap().unwrap();
    let (ok_at_stop, unavailable_at_stop) = snapshot(&tally);
    wait_calls(300).await;
    let (ok_down, unavailable_down) = snapshot(&tally);
    assert!(
        unavailable_down - unavailable_at_stop >= 300 - 8,
        "down: {} unavailable",
        unavailable_down - unavailable_at_stop
    );
    assert!(
        ok_down - ok_at_stop <= 8,
        "down: {} allowed without AuthService",
        ok_down - ok_at_stop
    );

    // Back on the same address: the layer recovers by itself.
    let listener = TcpListener::bind(auth_addr).await.unwrap();
    let (stop_auth, auth_task, keys) = start_auth(&clerk, listener);
    keys.ready().await;
    let recovered = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (ok, _) = snapshot(&tally);
            if ok >= ok_down + 300 {
                break;
            }
            wait_calls(50).await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert!(recovered.is_ok(), "no recovery: {:?}", snapshot(&tally));
    let other = std::mem::take(&mut tally.lock().unwrap().other);
    assert!(
        other.is_empty(),
        "outcomes other than allowed or fail-closed: {:?}",
        &other[..other.len().min(3)]
    );
    let total = *calls.borrow();
    assert!(
        delegated.stats().rpcs <= total,
        "more VerifyToken calls ({}) than requests ({total})",
        delegated.stats().rpcs
    );
    let _ = stop_auth.send(());
    auth_task.await.unwrap().unwrap();
    let _ = stop_orders.send(());
}
