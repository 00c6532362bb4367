//! Key loading, refresh, outages and floods, counted at the emulator.

mod common;

use std::{sync::Arc, time::Duration};

use clerk_grpc_auth::{
    emulator::{Emulator, JwksFault, SigningKey, TokenSpec},
    secret::Secret,
    server::ServerConfig,
    token::keys::{Alg, KeySet, VerifyingKey},
    verify::jwks::KeySource,
};
use common::{assert_rejected, now, Harness};
use futures::{stream, StreamExt};
use serde_json::json;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn a_thousand_known_kid_verifications_cost_only_the_startup_fetch() {
    let h = Harness::start_with(|_, c| c.verifier.cache_capacity = 0).await;
    let tokens: Vec<String> = (0..1000).map(|_| h.mint(&TokenSpec::default())).collect();
    let ok = stream::iter(tokens.iter())
        .map(|t| h.verify(t))
        .buffer_unordered(32)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    assert_eq!(ok, 1000);
    assert_eq!(h.verifier.stats().full_verifications, 1000);
    assert_eq!(h.clerk.jwks_requests(), 1, "only the startup fetch");
}

#[tokio::test]
async fn a_flood_of_unknown_kids_costs_at_most_one_fetch_per_cooldown() {
    let cooldown = Duration::from_secs(120);
    let h = Harness::start_with(|_, c| c.key_store.unknown_kid_cooldown = cooldown).await;
    let claims = serde_json::Value::Object(TokenSpec::default().claims(&h.clerk.url(), now()));
    // Random kids, signed by the real key (the kid is what the attacker controls).
    let tokens: Vec<String> = (0..1000)
        .map(|i| {
            h.clerk.sign(
                &json!({"alg": "RS256", "typ": "JWT", "kid": format!("ins_flood{i}")}),
                &claims,
                Alg::RS256,
            )
        })
        .collect();
    let started = tokio::time::Instant::now();
    let results: Vec<_> = stream::iter(tokens.iter())
        .map(|t| h.verify(t))
        .buffer_unordered(64)
        .collect()
        .await;
    for (r, t) in results.into_iter().zip(&tokens) {
        // Order differs, but every result is the same rejection.
        assert_rejected(r, Code::Unauthenticated, "JWK_KID_MISMATCH", t);
    }
    assert!(
        started.elapsed() < cooldown,
        "the flood outlasted the cooldown"
    );
    assert!(
        h.clerk.jwks_requests() <= 2,
        "startup + at most one refetch, got {}",
        h.clerk.jwks_requests()
    );
    // The same bogus kids again: negative cache, no fetch.
    let again = h.verify(&tokens[0]).await;
    assert_rejected(again, Code::Unauthenticated, "JWK_KID_MISMATCH", &tokens[0]);
    assert!(h.clerk.jwks_requests() <= 2);
    let before = h.verifier.keys().stats();
    assert!(before.unknown_kid_refetches <= 1, "{before:?}");
    for t in &tokens[1..101] {
        let _ = h.verify(t).await;
    }
    let after = h.verifier.keys().stats();
    assert_eq!(
        after.unknown_kid_suppressed - before.unknown_kid_suppressed,
        100
    );
    assert_eq!(after.fetches, before.fetches);
}

#[tokio::test]
async fn keys_are_still_served_when_the_jwks_endpoint_fails_after_startup() {
    let h = Harness::start_with(|_, c| {
        c.key_store.refresh_interval = Duration::from_millis(100);
        c.key_store.retry_min = Duration::from_millis(50);
        c.key_store.retry_max = Duration::from_millis(100);
    })
    .await;
    h.clerk.set_jwks_failure(Some(503));
    let before = h.clerk.jwks_requests();
    // Two failed refreshes have happened once the emulator has seen two more requests.
    h.clerk.wait_jwks_requests(before + 2).await;
    assert!(h.verifier.keys().stats().fetch_failures >= 1);
    let t = h.mint(&TokenSpec::default());
    h.verify(&t).await.expect("last good keys still verify");
    assert_eq!(h.health_status().await, ServingStatus::Serving);
}

#[tokio::test]
async fn past_the_stale_bound_health_turns_not_serving_and_calls_are_unavailable() {
    let h = Harness::start_with(|_, c| {
        c.key_store.refresh_interval = Duration::from_millis(100);
        c.key_store.retry_min = Duration::from_millis(50);
        c.key_store.retry_max = Duration::from_millis(100);
        c.key_store.max_stale = Duration::from_millis(600);
    })
    .await;
    let t = h.mint(&TokenSpec::default());
    h.verify(&t).await.expect("valid while fresh");
    h.clerk.set_jwks_failure(Some(500));
    h.wait_health(ServingStatus::NotServing).await;
    assert_rejected(
        h.verify(&t).await,
        Code::Unavailable,
        "JWK_REMOTE_FAILED_TO_LOAD",
        &t,
    );
    // Clerk comes back: keys reload and the cached verdict is usable again.
    h.clerk.set_jwks_failure(None);
    h.wait_health(ServingStatus::Serving).await;
    h.verify(&t).await.expect("valid again");
}

#[tokio::test]
async fn not_serving_before_the_first_load() {
    let clerk = Emulator::start_local().await.unwrap();
    clerk.set_jwks_failure(Some(503));
    let mut config = common::config_for(&clerk);
    config.key_store.retry_min = Duration::from_millis(50);
    config.key_store.retry_max = Duration::from_millis(200);
    let h = Harness::start_server(clerk, config).await;
    h.clerk.wait_jwks_requests(1).await;
    assert_eq!(h.health_status().await, ServingStatus::NotServing);
    let t = h.mint(&TokenSpec::default());
    assert_rejected(
        h.verify(&t).await,
        Code::Unavailable,
        "JWK_REMOTE_FAILED_TO_LOAD",
        &t,
    );
    h.clerk.set_jwks_failure(None);
    h.wait_health(ServingStatus::Serving).await;
    h.verify(&t).await.expect("valid once keys are loaded");
}

#[tokio::test]
async fn a_wrong_secret_key_is_reported_as_secret_key_invalid() {
    let clerk = Emulator::start_local().await.unwrap();
    let config = ServerConfig::new(KeySource::Remote {
        url: format!("{}/v1/jwks", clerk.url()).parse().unwrap(),
        bearer: Some(Secret::new("sk_test_wrong")),
    });
    let h = Harness::start_server(clerk, config).await;
    h.clerk.wait_jwks_requests(1).await;
    let t = h.mint(&TokenSpec::default());
    // The first fetch may still be in flight; the verdict is unavailable either way, and once
    // the answer is in, the reason is the secret key.
    loop {
        let r = h.verify(&t).await.unwrap_err();
        assert_eq!(r.code(), Code::Unavailable);
        if common::reason(&r) == "SECRET_KEY_INVALID" {
            break;
        }
        h.clerk
            .wait_jwks_requests(h.clerk.jwks_requests() + 1)
            .await;
    }
    assert_eq!(h.health_status().await, ServingStatus::NotServing);
}

#[tokio::test]
async fn networkless_pem_key_needs_no_jwks_and_ignores_kid() {
    let clerk = Emulator::start_local().await.unwrap();
    let jwk = clerk.current_key().jwk();
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .unwrap()
    };
    let key = VerifyingKey::from_components(
        None,
        Some(Alg::RS256),
        &b64(jwk["n"].as_str().unwrap()),
        &b64(jwk["e"].as_str().unwrap()),
    )
    .unwrap();
    let config = ServerConfig::new(KeySource::Static(Arc::new(KeySet::single(key))));
    let h = Harness::start_server(clerk, config).await;
    h.wait_health(ServingStatus::Serving).await;
    let t = h.mint(&TokenSpec::default());
    h.verify(&t).await.expect("valid");
    let claims = serde_json::Value::Object(TokenSpec::default().claims(&h.clerk.url(), now()));
    let any_kid = h.clerk.sign(
        &json!({"alg": "RS256", "typ": "JWT", "kid": "whatever"}),
        &claims,
        Alg::RS256,
    );
    h.verify(&any_kid)
        .await
        .expect("kid is not compared in networkless mode");
    let stranger = SigningKey::generate().unwrap();
    let foreign = stranger.sign_jwt(
        &json!({"alg": "RS256", "typ": "JWT", "kid": h.clerk.kid()}),
        &claims,
        Alg::RS256,
    );
    assert_rejected(
        h.verify(&foreign).await,
        Code::Unauthenticated,
        "TOKEN_INVALID_SIGNATURE",
        &foreign,
    );
    assert_eq!(
        h.clerk.jwks_requests(),
        0,
        "networkless mode fetches nothing"
    );
}

#[tokio::test]
async fn public_jwks_url_without_a_secret_key() {
    let clerk = Emulator::start_local().await.unwrap();
    let config = ServerConfig::new(KeySource::Remote {
        url: format!("{}/.well-known/jwks.json", clerk.url())
            .parse()
            .unwrap(),
        bearer: None,
    });
    let h = Harness::start_server(clerk, config).await;
    h.wait_health(ServingStatus::Serving).await;
    h.verify(&h.mint(&TokenSpec::default()))
        .await
        .expect("valid");
    assert_eq!(h.clerk.jwks_requests(), 1);
}

#[tokio::test]
async fn graceful_stop_ends_the_refresher() {
    let h =
        Harness::start_with(|_, c| c.key_store.refresh_interval = Duration::from_millis(50)).await;
    h.clerk.wait_jwks_requests(3).await;
    let keys = h.verifier.keys().clone();
    h.stop().await;
    let after = keys.stats().fetches;
    // The refresher is gone: a wait of several refresh intervals adds no fetch.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(keys.stats().fetches, after);
}

/// The next JWKS request answers 429 with this `Retry-After`; the ones after it succeed.
fn one_429(retry_after: &str) -> Option<JwksFault> {
    Some(JwksFault {
        status: Some(429),
        retry_after: Some(retry_after.into()),
        times: Some(1),
        ..JwksFault::default()
    })
}

#[tokio::test]
async fn a_jwks_429_within_the_budget_is_waited_out_by_one_fetch_for_all_callers() {
    // No cooldown, so that the second rotation below refetches too (still single-flight).
    let h = Harness::start_with(|_, c| c.key_store.unknown_kid_cooldown = Duration::ZERO).await;
    assert_eq!(h.clerk.jwks_requests(), 1, "the startup fetch");
    h.clerk.rotate().await.unwrap();
    h.clerk.set_jwks_fault(one_429("1"));
    let tokens: Vec<String> = (0..20).map(|_| h.mint(&TokenSpec::default())).collect();
    let results = futures::future::join_all(tokens.iter().map(|t| h.verify(t))).await;
    for r in results {
        r.expect("the new kid verifies once the Retry-After has passed");
    }
    assert_eq!(
        h.clerk.jwks_requests(),
        3,
        "startup, the 429, and one request after its Retry-After, for all 20 callers"
    );
    assert_eq!(h.verifier.keys().stats().unknown_kid_refetches, 1);

    // A Retry-After that cannot be read counts as 1 s: waited out as well.
    h.clerk.rotate().await.unwrap();
    h.clerk.set_jwks_fault(one_429("-3"));
    let t = h.mint(&TokenSpec::default());
    h.verify(&t).await.expect("verified after the default wait");
    assert_eq!(h.clerk.jwks_requests(), 5);
}

#[tokio::test]
async fn a_jwks_429_beyond_the_budget_is_refused_at_once_and_not_re_asked() {
    // No cooldown: only the Retry-After keeps an unknown kid from asking again.
    let h = Harness::start_with(|_, c| c.key_store.unknown_kid_cooldown = Duration::ZERO).await;
    let old = h.mint(&TokenSpec::default());
    h.clerk.rotate().await.unwrap();
    h.clerk.set_jwks_fault(one_429("30"));
    let tokens: Vec<String> = (0..20).map(|_| h.mint(&TokenSpec::default())).collect();
    // Far less than the Retry-After: nobody waits it out.
    let results = tokio::time::timeout(
        Duration::from_secs(15),
        futures::future::join_all(tokens.iter().map(|t| h.verify(t))),
    )
    .await
    .expect("refused without waiting 30 s");
    for (r, t) in results.into_iter().zip(&tokens) {
        assert_rejected(r, Code::Unavailable, "JWK_REMOTE_FAILED_TO_LOAD", t);
    }
    assert_eq!(h.clerk.jwks_requests(), 2, "Clerk was asked once");
    // The emulator would answer now, but Clerk asked for 30 s: still refused, not re-asked.
    assert_rejected(
        h.verify(&tokens[0]).await,
        Code::Unavailable,
        "JWK_REMOTE_FAILED_TO_LOAD",
        &tokens[0],
    );
    assert_eq!(h.clerk.jwks_requests(), 2);
    // Tokens of the loaded key are untouched.
    h.verify(&old).await.expect("the loaded key still verifies");
}

#[tokio::test]
async fn the_refresher_honours_a_jwks_retry_after() {
    let h = Harness::start_with(|_, c| {
        c.key_store.refresh_interval = Duration::from_millis(50);
        c.key_store.retry_min = Duration::from_millis(20);
        c.key_store.retry_max = Duration::from_millis(50);
    })
    .await;
    let old = h.mint(&TokenSpec::default());
    // Every request now answers 429 Retry-After: 30.
    h.clerk.set_jwks_fault(Some(JwksFault {
        status: Some(429),
        retry_after: Some("30".into()),
        ..JwksFault::default()
    }));
    let before = h.clerk.jwks_requests();
    h.clerk.wait_jwks_requests(before + 1).await;
    // Without the Retry-After the refresher would be back within 50 ms, a dozen times here.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        h.clerk.jwks_requests(),
        before + 1,
        "asked once, then waited"
    );
    h.verify(&old)
        .await
        .expect("the last good keys still verify");
}
