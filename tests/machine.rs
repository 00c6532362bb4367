//! Machine tokens end to end: the real AuthService and the auth layer against the emulator's
//! machine endpoints over real HTTP — each type valid, expired, revoked, not accepted, unknown;
//! the Backend API down or rate-limited; caches and coalescing counted at the emulator; the
//! outgoing M2M token source.

mod common;
#[path = "../examples/common/orders.rs"]
mod orders;

use std::{sync::Arc, time::Duration};

use clerk_grpc_auth::{
    authz::policy::{ApiKeyOwner, Policy, Rule},
    clerk::{api::ClerkApi, machines::MachineConfig},
    credentials::{
        m2m::{M2mTokenSource, M2mTokenSourceConfig},
        CredentialsLayer,
    },
    emulator::{Emulator, MachineTokenKind, MachineTokenSpec},
    layer::AuthLayer,
    pb::{Identity, TokenType, VerifyTokenRequest},
    secret::Secret,
    server::{AuthServer, ServerConfig},
};
use common::{assert_rejected, reason, Harness};
use futures::StreamExt;
use orders::pb::{orders_client::OrdersClient, ListOrdersRequest};
use tokio::net::TcpListener;
use tonic::{transport::Channel, Code, Status};
use tonic_types::StatusExt;

const ALL_MACHINE: [TokenType; 3] = [
    TokenType::M2mToken,
    TokenType::ApiKey,
    TokenType::OauthToken,
];

fn machine_config(clerk: &Emulator) -> MachineConfig {
    MachineConfig::new(
        clerk.url().parse().unwrap(),
        Some(Secret::new(clerk.secret_key())),
        None,
    )
}

async fn start(adjust: impl FnOnce(&mut MachineConfig)) -> Harness {
    Harness::start_with(|clerk, config| {
        let mut m = machine_config(clerk);
        adjust(&mut m);
        config.machine = Some(m);
    })
    .await
}

async fn verify_as(
    h: &Harness,
    token: &str,
    types: &[TokenType],
    client_ip: &str,
) -> Result<Identity, Status> {
    h.verify_req(VerifyTokenRequest {
        token: token.into(),
        accepted_token_types: types.iter().map(|t| *t as i32).collect(),
        client_ip: client_ip.into(),
        ..Default::default()
    })
    .await
}

async fn verify_machine(h: &Harness, token: &str) -> Result<Identity, Status> {
    verify_as(h, token, &ALL_MACHINE, "").await
}

fn spec(kind: MachineTokenKind, jwt: bool) -> MachineTokenSpec {
    MachineTokenSpec {
        kind,
        jwt,
        ..MachineTokenSpec::default()
    }
}

#[tokio::test]
async fn each_type_verifies_into_the_right_identity() {
    let h = start(|_| {}).await;
    let a = h.clerk.create_machine("a");
    let b = h.clerk.create_machine("b");
    assert!(h.clerk.allow(&a.id, &b.id));

    for jwt in [false, true] {
        let token = h.clerk.mint_machine(&MachineTokenSpec {
            subject: Some(a.id.clone()),
            claims: serde_json::json!({"team": "infra"})
                .as_object()
                .unwrap()
                .clone(),
            ..spec(MachineTokenKind::M2m, jwt)
        });
        let id = verify_machine(&h, &token).await.unwrap();
        assert_eq!(id.token_type(), TokenType::M2mToken, "jwt={jwt}");
        let m = id.machine.unwrap();
        assert_eq!(m.subject, a.id);
        assert_eq!(m.machine_id, a.id);
        assert_eq!(m.scopes, std::slice::from_ref(&b.id), "jwt={jwt}");
        assert!(id.user_id.is_empty());
        assert!(id.token_id.starts_with("mt_"), "{}", id.token_id);
        let claims: serde_json::Value = serde_json::from_str(&id.claims_json).unwrap();
        assert_eq!(claims["team"], "infra", "jwt={jwt}");
        assert!(claims.get("sub").is_none(), "registered claims are removed");
    }

    // API keys: user- and org-owned (Clerk: userId / orgId by prefix).
    let user_key = h.clerk.mint_machine(&MachineTokenSpec {
        subject: Some("user_owner".into()),
        name: Some("ci key".into()),
        scopes: vec!["read".into()],
        ..spec(MachineTokenKind::ApiKey, false)
    });
    let id = verify_machine(&h, &user_key).await.unwrap();
    assert_eq!(id.token_type(), TokenType::ApiKey);
    assert_eq!(id.user_id, "user_owner");
    assert!(id.organization.is_none());
    let m = id.machine.unwrap();
    assert_eq!(
        (m.name.as_str(), &m.scopes[..]),
        ("ci key", &["read".to_owned()][..])
    );
    let org_key = h.clerk.mint_machine(&MachineTokenSpec {
        subject: Some("org_owner".into()),
        ..spec(MachineTokenKind::ApiKey, false)
    });
    let id = verify_machine(&h, &org_key).await.unwrap();
    assert!(id.user_id.is_empty());
    assert_eq!(id.organization.unwrap().id, "org_owner");

    // OAuth access tokens, opaque and JWT.
    for jwt in [false, true] {
        let token = h.clerk.mint_machine(&MachineTokenSpec {
            subject: Some("user_oauth".into()),
            client_id: Some("client_123".into()),
            scopes: vec!["profile".into(), "email".into()],
            ..spec(MachineTokenKind::Oauth, jwt)
        });
        let id = verify_machine(&h, &token).await.unwrap();
        assert_eq!(id.token_type(), TokenType::OauthToken, "jwt={jwt}");
        assert_eq!(id.user_id, "user_oauth");
        let m = id.machine.unwrap();
        assert_eq!(m.client_id, "client_123");
        assert_eq!(m.scopes, ["profile", "email"]);
    }
}

#[tokio::test]
async fn a_type_not_accepted_is_a_mismatch_without_a_backend_call() {
    let h = start(|_| {}).await;
    let tokens = [
        h.clerk.mint_machine(&spec(MachineTokenKind::M2m, false)),
        h.clerk.mint_machine(&spec(MachineTokenKind::M2m, true)),
        h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false)),
        h.clerk.mint_machine(&spec(MachineTokenKind::Oauth, false)),
        h.clerk.mint_machine(&spec(MachineTokenKind::Oauth, true)),
    ];
    let calls = h.clerk.bapi_requests();
    for t in &tokens {
        // Default: session tokens only.
        assert_rejected(
            h.verify(t).await,
            Code::Unauthenticated,
            "TOKEN_TYPE_MISMATCH",
            t,
        );
        // Another machine type only.
        let other = if t.starts_with("ak_") {
            TokenType::M2mToken
        } else {
            TokenType::ApiKey
        };
        assert_rejected(
            verify_as(&h, t, &[other], "").await,
            Code::Unauthenticated,
            "TOKEN_TYPE_MISMATCH",
            t,
        );
    }
    assert_eq!(
        h.clerk.bapi_requests(),
        calls,
        "no Backend API call for a refused type"
    );
    // A session token where only machine tokens are accepted.
    let session = h.mint(&Default::default());
    assert_rejected(
        verify_as(&h, &session, &ALL_MACHINE, "").await,
        Code::Unauthenticated,
        "TOKEN_TYPE_MISMATCH",
        &session,
    );
}

#[tokio::test]
async fn expired_revoked_unknown_and_malformed() {
    let h = start(|_| {}).await;
    for kind in [
        MachineTokenKind::M2m,
        MachineTokenKind::ApiKey,
        MachineTokenKind::Oauth,
    ] {
        let expired = h.clerk.mint_machine(&MachineTokenSpec {
            expires_in: Some(-10),
            ..spec(kind, false)
        });
        assert_rejected(
            verify_machine(&h, &expired).await,
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
            &expired,
        );
    }

    // JWT machine tokens: Clerk reports every failure as token-verification-failed; the
    // underlying reason travels as ErrorInfo metadata `cause`.
    for kind in [MachineTokenKind::M2m, MachineTokenKind::Oauth] {
        let expired_jwt = h.clerk.mint_machine(&MachineTokenSpec {
            expires_in: Some(-60),
            ..spec(kind, true)
        });
        let status = verify_machine(&h, &expired_jwt).await.unwrap_err();
        assert_eq!(reason(&status), "TOKEN_VERIFICATION_FAILED");
        assert_eq!(
            status.get_details_error_info().unwrap().metadata["cause"],
            "TOKEN_EXPIRED"
        );
    }

    for kind in [
        MachineTokenKind::M2m,
        MachineTokenKind::ApiKey,
        MachineTokenKind::Oauth,
    ] {
        let token = h.clerk.mint_machine(&spec(kind, false));
        assert!(h.clerk.revoke(&token));
        assert_rejected(
            verify_machine(&h, &token).await,
            Code::Unauthenticated,
            "TOKEN_REVOKED",
            &token,
        );
    }

    // Unknown opaque token: 404 → TOKEN_INVALID, then remembered (no second call).
    let unknown = "mt_doesNotExistAtAllxxxxxxxxxxxxxxxxxxxxxx";
    let calls = h.clerk.bapi_requests();
    assert_rejected(
        verify_machine(&h, unknown).await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
        unknown,
    );
    assert_rejected(
        verify_machine(&h, unknown).await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
        unknown,
    );
    assert_eq!(h.clerk.bapi_requests(), calls + 1, "negative cache");
    assert_eq!(h.verifier.machine().unwrap().stats().negative_hits, 1);

    // Unknown prefix: neither machine nor JWT.
    assert_rejected(
        verify_machine(&h, "zz_unknownPrefix").await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
        "zz_unknownPrefix",
    );
    assert_eq!(h.clerk.bapi_requests(), calls + 1);
}

/// A 4xx that says nothing about the token (408, 409, 422) is Clerk being unusable for now:
/// `UNAVAILABLE`, and not remembered — the same token verifies once Clerk answers again. A
/// real refusal (404, revoked) is still remembered.
#[tokio::test]
async fn only_real_refusals_are_remembered() {
    let h = start(|_| {}).await;
    for status in [408u16, 409, 422, 400] {
        let token = h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
        h.clerk.set_bapi_failure(Some((status, None)));
        let e = verify_machine(&h, &token).await.unwrap_err();
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (Code::Unavailable, "BACKEND_API_UNAVAILABLE"),
            "HTTP {status}"
        );
        h.clerk.set_bapi_failure(None);
        let calls = h.clerk.bapi_requests();
        verify_machine(&h, &token)
            .await
            .unwrap_or_else(|e| panic!("after HTTP {status}, the token was locked out: {e:?}"));
        assert_eq!(h.clerk.bapi_requests(), calls + 1);
    }
    // Unknown to Clerk (404): refused, and the refusal is remembered.
    let unknown = format!("ak_{:032x}", 7u128);
    verify_machine(&h, &unknown).await.unwrap_err();
    let calls = h.clerk.bapi_requests();
    verify_machine(&h, &unknown).await.unwrap_err();
    assert_eq!(h.clerk.bapi_requests(), calls, "a 404 is remembered");
}

#[tokio::test]
async fn verdicts_are_cached_and_concurrent_misses_coalesce() {
    let h = start(|m| m.max_age = Duration::from_millis(400)).await;
    let token = h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
    let calls = h.clerk.bapi_requests();
    for _ in 0..10 {
        verify_machine(&h, &token).await.unwrap();
    }
    assert_eq!(
        h.clerk.bapi_requests(),
        calls + 1,
        "10 verifications, one Backend API call"
    );

    // Revocation is seen once the verdict's max_age has passed.
    assert!(h.clerk.revoke(&token));
    verify_machine(&h, &token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_rejected(
        verify_machine(&h, &token).await,
        Code::Unauthenticated,
        "TOKEN_REVOKED",
        &token,
    );

    let fresh = h.clerk.mint_machine(&spec(MachineTokenKind::M2m, false));
    let before = h.clerk.bapi_requests();
    let calls = (0..20).map(|_| {
        let client = h.client.clone();
        let token = fresh.clone();
        tokio::spawn(async move {
            client
                .clone()
                .verify_token(VerifyTokenRequest {
                    token,
                    accepted_token_types: vec![TokenType::M2mToken as i32],
                    ..Default::default()
                })
                .await
        })
    });
    for r in futures::future::join_all(calls).await {
        r.unwrap().unwrap();
    }
    assert_eq!(
        h.clerk.bapi_requests(),
        before + 1,
        "20 concurrent misses, one call"
    );
}

#[tokio::test]
async fn backend_api_down_or_rate_limited() {
    let h = start(|_| {}).await;
    let t1 = h.clerk.mint_machine(&spec(MachineTokenKind::M2m, false));
    let t2 = h.clerk.mint_machine(&spec(MachineTokenKind::M2m, false));
    let t3 = h.clerk.mint_machine(&spec(MachineTokenKind::M2m, false));

    h.clerk.set_bapi_failure(Some((503, None)));
    assert_rejected(
        verify_machine(&h, &t1).await,
        Code::Unavailable,
        "BACKEND_API_UNAVAILABLE",
        &t1,
    );

    // 429 with Retry-After: refused at once, and no call to Clerk until it has passed.
    h.clerk.set_bapi_failure(Some((429, Some(1))));
    let status = verify_machine(&h, &t1).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMITED");
    let retry = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        retry <= Duration::from_secs(1) && retry > Duration::ZERO,
        "{retry:?}"
    );
    let calls = h.clerk.bapi_requests();
    h.clerk.set_bapi_failure(None);
    let status = verify_machine(&h, &t2).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        h.clerk.bapi_requests(),
        calls,
        "Retry-After honoured: Clerk not called"
    );
    tokio::time::sleep(retry + Duration::from_millis(50)).await;
    verify_machine(&h, &t3).await.unwrap();
    assert_eq!(h.clerk.bapi_requests(), calls + 1);
    assert_eq!(h.verifier.machine().unwrap().stats().clerk_429s, 1);
}

/// A server whose `client_ip` forwarders include one machine; returns the harness and that
/// machine's M2M token (a JWT: verifying it costs no Backend API call), scoped to AuthService's
/// machine id.
async fn start_with_forwarder(
    adjust: impl FnOnce(&mut clerk_grpc_auth::server::ServerConfig),
) -> (Harness, String) {
    start_with_forwarder_scoped(true, adjust).await
}

/// As [`start_with_forwarder`]; with `scoped == false` the forwarder's tokens are made to
/// call another service only.
async fn start_with_forwarder_scoped(
    scoped: bool,
    adjust: impl FnOnce(&mut clerk_grpc_auth::server::ServerConfig),
) -> (Harness, String) {
    let mut forwarder = None;
    let h = Harness::start_with(|clerk, config| {
        let m = clerk.create_machine("layer");
        let auth_service = clerk.create_machine("auth-service");
        let other = clerk.create_machine("service-b");
        assert!(clerk.allow(&m.id, &other.id));
        if scoped {
            assert!(clerk.allow(&m.id, &auth_service.id));
        }
        config.access.machine_id = Some(auth_service.id.clone());
        config.forwarders = vec![m.id.clone()];
        config.machine = Some(machine_config(clerk));
        adjust(config);
        forwarder = Some(m.id);
    })
    .await;
    let token = h.clerk.mint_machine(&MachineTokenSpec {
        subject: forwarder,
        ..spec(MachineTokenKind::M2m, true)
    });
    (h, token)
}

/// VerifyToken as a delegated layer sends it: the end user's token and address, the layer's
/// own token in `authorization` (when given).
async fn verify_forwarded(
    h: &Harness,
    token: &str,
    client_ip: &str,
    caller: Option<&str>,
) -> Result<Identity, Status> {
    let mut req = tonic::Request::new(VerifyTokenRequest {
        token: token.into(),
        accepted_token_types: ALL_MACHINE.iter().map(|t| *t as i32).collect(),
        client_ip: client_ip.into(),
        ..Default::default()
    });
    if let Some(c) = caller {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {c}").parse().unwrap());
    }
    h.client
        .clone()
        .verify_token(req)
        .await
        .map(|r| r.into_inner().identity.unwrap())
}

/// A random string shaped like an API key: Clerk does not know it.
fn random_api_key(i: usize) -> String {
    format!("ak_{i:04}{:032x}", rand::random::<u128>())
}

/// A forwarder's token made to call another service, replayed by that service: its
/// `client_ip` is not believed, the calls count under the caller's own address.
#[tokio::test]
async fn a_forwarders_token_for_another_service_forwards_nothing() {
    for scoped in [true, false] {
        let (h, fwd) = start_with_forwarder_scoped(scoped, |c| {
            let m = c.machine.as_mut().unwrap();
            m.per_source_burst = 1;
            m.per_source_per_sec = 0.001;
        })
        .await;
        let key = || h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
        verify_forwarded(&h, &key(), "203.0.113.7", Some(&fwd))
            .await
            .unwrap();
        let second = verify_forwarded(&h, &key(), "203.0.113.8", Some(&fwd)).await;
        if scoped {
            second.expect("another end user's address has its own bucket");
        } else {
            assert_eq!(
                second.unwrap_err().code(),
                Code::ResourceExhausted,
                "an unscoped forwarder token's client_ip must be ignored"
            );
        }
    }
}

#[tokio::test]
async fn per_source_limit_protects_the_backend_api() {
    let (h, fwd) = start_with_forwarder(|c| {
        let m = c.machine.as_mut().unwrap();
        m.per_source_burst = 3;
        m.per_source_per_sec = 0.1;
    })
    .await;
    let calls = h.clerk.bapi_requests();
    for i in 0..3 {
        let t = h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
        verify_forwarded(&h, &t, "203.0.113.7", Some(&fwd))
            .await
            .unwrap_or_else(|e| panic!("{i}: {e:?}"));
    }
    let t = h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
    let status = verify_forwarded(&h, &t, "203.0.113.7", Some(&fwd))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(h.clerk.bapi_requests(), calls + 3);
    // Another source has its own bucket.
    verify_forwarded(&h, &t, "203.0.113.8", Some(&fwd))
        .await
        .unwrap();
    // Cached verdicts cost no bucket tokens.
    verify_forwarded(&h, &t, "203.0.113.7", Some(&fwd))
        .await
        .unwrap();

    // IPv6: one /64 is one source, however many addresses it uses.
    for i in 0..3 {
        let t = h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
        verify_forwarded(&h, &t, &format!("2001:db8:7:7::{i:x}"), Some(&fwd))
            .await
            .unwrap_or_else(|e| panic!("{i}: {e:?}"));
    }
    let before = h.clerk.bapi_requests();
    for i in 0..20u32 {
        let ip = format!("2001:db8:7:7:{:x}:{:x}::1", i + 1, i * 7);
        let status = verify_forwarded(&h, &random_api_key(i as usize), &ip, Some(&fwd))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{ip}");
    }
    assert_eq!(h.clerk.bapi_requests(), before, "the /64's bucket is empty");
    // IPv4-mapped IPv6 is the IPv4 address (its bucket is empty too).
    let status = verify_forwarded(&h, &random_api_key(99), "::ffff:203.0.113.7", Some(&fwd))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // A forwarder's client_ip must be an address.
    let status = verify_forwarded(&h, &t, "not-an-ip", Some(&fwd))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn client_ip_from_a_caller_that_is_not_a_forwarder_is_ignored() {
    let (h, _fwd) = start_with_forwarder(|c| {
        let m = c.machine.as_mut().unwrap();
        m.per_source_burst = 5;
        m.per_source_per_sec = 0.01;
    })
    .await;
    // Another machine's valid token does not make its holder a forwarder.
    let other = h.clerk.create_machine("stranger");
    let other_token = h.clerk.mint_machine(&MachineTokenSpec {
        subject: Some(other.id),
        ..spec(MachineTokenKind::M2m, true)
    });
    let before = h.clerk.bapi_requests();
    let mut exhausted = 0;
    for i in 0..60 {
        // Each call names another address; none is believed: all count under 127.0.0.1.
        let caller = (i % 2 == 0).then_some(other_token.as_str());
        let ip = format!("198.51.100.{}", i + 1);
        match verify_forwarded(&h, &random_api_key(i), &ip, caller).await {
            Err(s) if s.code() == Code::ResourceExhausted => exhausted += 1,
            Err(s) => assert_eq!(reason(&s), "TOKEN_INVALID", "{s:?}"),
            Ok(id) => panic!("a random key verified: {id:?}"),
        }
    }
    assert_eq!(
        h.clerk.bapi_requests() - before,
        5,
        "one bucket (the caller's own address): its burst, no more"
    );
    assert_eq!(exhausted, 55);
}

#[tokio::test]
async fn a_strangers_flood_cannot_starve_callers_with_valid_tokens() {
    // A replica-wide budget of 20 calls with half reserved, refilled so slowly that the test
    // sees only the burst; per-source buckets large enough not to matter.
    let (h, fwd) = start_with_forwarder(|c| {
        c.budget.calls_per_sec = 0.001;
        c.budget.burst = 20;
        c.budget.reserved_share = 0.5;
        let m = c.machine.as_mut().unwrap();
        m.per_source_burst = 1_000;
    })
    .await;
    // A known-good end user: presented a valid session token from 192.0.2.10 (no Backend
    // API call) before the flood.
    let session = h.mint(&clerk_grpc_auth::emulator::TokenSpec::default());
    let mut req = tonic::Request::new(VerifyTokenRequest {
        token: session,
        client_ip: "192.0.2.10".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {fwd}").parse().unwrap());
    h.client.clone().verify_token(req).await.unwrap();

    // 600 random API keys through the layer, each from another source (IPv4 addresses and
    // IPv6 /64s), 32 at a time.
    let before = h.clerk.bapi_requests();
    let results: Vec<_> = futures::stream::iter(0..600usize)
        .map(|i| {
            let (h, fwd) = (&h, &fwd);
            async move {
                let ip = if i % 2 == 0 {
                    format!("198.18.{}.{}", (i / 256) % 256, i % 256)
                } else {
                    format!("2001:db8:{:x}:{:x}::1", i / 65_536, i % 65_536)
                };
                verify_forwarded(h, &random_api_key(i), &ip, Some(fwd)).await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let flood_calls = h.clerk.bapi_requests() - before;
    let exhausted = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    assert!(results.iter().all(|r| r.is_err()), "no random key verified");
    assert!(
        flood_calls <= 11,
        "strangers spent more than the unreserved half: {flood_calls} calls"
    );
    assert_eq!(exhausted as u64, 600 - flood_calls);

    // The known-good user's fresh API keys still reach Clerk and verify, from the reserve.
    for i in 0..8 {
        let key = h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
        let id = verify_forwarded(&h, &key, "192.0.2.10", Some(&fwd))
            .await
            .unwrap_or_else(|e| panic!("known-good key {i} refused: {e:?}"));
        assert_eq!(id.token_type(), TokenType::ApiKey);
    }
    // Strangers are still refused while the reserve lasts.
    let status = verify_forwarded(&h, &random_api_key(9_999), "198.19.9.9", Some(&fwd))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let b = h.verifier.machine().unwrap().budget().stats();
    assert!(b.refused_strangers >= 589, "{b:?}");
    assert_eq!(b.refused_known, 0, "{b:?}");
}

/// A fixed token for the delegated layer's own identity.
struct Fixed(String);

impl clerk_grpc_auth::credentials::TokenSource for Fixed {
    fn token(&self) -> futures::future::BoxFuture<'_, Result<String, Status>> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

#[tokio::test]
async fn a_delegated_layer_with_its_own_token_forwards_the_end_users_address() {
    use clerk_grpc_auth::{
        layer::{Authenticate, CallerCredentials, DelegatedConfig, DelegatedVerifier},
        VerifyRequest,
    };
    let (h, fwd) = start_with_forwarder(|c| {
        let m = c.machine.as_mut().unwrap();
        m.per_source_burst = 2;
        m.per_source_per_sec = 0.01;
    })
    .await;
    let layer = |credentials| {
        DelegatedVerifier::new(DelegatedConfig {
            endpoints: vec![format!("http://{}", h.addr)],
            deadline: Duration::from_secs(5),
            cache_capacity: 0,
            credentials,
            ..Default::default()
        })
        .unwrap()
    };
    let verify = |d: DelegatedVerifier, ip: &'static str, key: String| async move {
        let types = ALL_MACHINE;
        d.authenticate(VerifyRequest {
            token: &key,
            accepted_types: &types,
            source: Some(ip.parse().unwrap()),
            ..VerifyRequest::default()
        })
        .await
        .map(|_| ())
    };
    let with_token = layer(Some(CallerCredentials::new(Fixed(fwd))));
    let key = || h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
    // Each end user has its own bucket of 2.
    for ip in ["192.0.2.1", "192.0.2.2"] {
        verify(with_token.clone(), ip, key()).await.unwrap();
        verify(with_token.clone(), ip, key()).await.unwrap();
        let e = verify(with_token.clone(), ip, key()).await.unwrap_err();
        assert!(
            matches!(e, clerk_grpc_auth::AuthError::RateLimited { .. }),
            "{e:?}"
        );
    }
    // Without the layer's token, the end users' addresses are not believed: one bucket (the
    // layer's own address) for all.
    let without = layer(None);
    verify(without.clone(), "192.0.2.3", key()).await.unwrap();
    verify(without.clone(), "192.0.2.4", key()).await.unwrap();
    let e = verify(without.clone(), "192.0.2.5", key())
        .await
        .unwrap_err();
    assert!(
        matches!(e, clerk_grpc_auth::AuthError::RateLimited { .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn misconfiguration_is_failed_precondition() {
    // Clerk refuses the secret key used for machine tokens (the JWKS key source is fine).
    let h = Harness::start_with(|clerk, config| {
        config.machine = Some(MachineConfig::new(
            clerk.url().parse().unwrap(),
            Some(Secret::new("sk_test_wrong")),
            None,
        ));
    })
    .await;
    let t = h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
    assert_rejected(
        verify_machine(&h, &t).await,
        Code::FailedPrecondition,
        "SECRET_KEY_INVALID",
        &t,
    );

    // No secret key at all: opaque tokens cannot be verified; JWT machine tokens still can.
    let h = Harness::start().await;
    let t = h.clerk.mint_machine(&spec(MachineTokenKind::M2m, false));
    assert_rejected(
        verify_machine(&h, &t).await,
        Code::FailedPrecondition,
        "SECRET_KEY_MISSING",
        &t,
    );
    let jwt = h.clerk.mint_machine(&spec(MachineTokenKind::M2m, true));
    verify_machine(&h, &jwt).await.unwrap();
}

/// The Orders service behind an in-process layer that verifies machine tokens, with `policy`.
async fn orders_with(h: &Harness, policy: Policy) -> OrdersClient<Channel> {
    let mut config = ServerConfig::new(common::config_for(&h.clerk).key_source);
    config.machine = Some(machine_config(&h.clerk));
    let server = AuthServer::build(config).unwrap();
    let verifier = server.verifier().clone();
    let guard = verifier.keys().spawn_refresher();
    verifier.keys().ready().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _guard = guard;
        orders::serve(
            listener,
            AuthLayer::in_process(verifier, policy),
            std::future::pending(),
        )
        .await
    });
    OrdersClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

async fn list_with(
    client: &OrdersClient<Channel>,
    token: &str,
) -> Result<orders::pb::Caller, Status> {
    let mut req = tonic::Request::new(ListOrdersRequest {});
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client
        .clone()
        .list_orders(req)
        .await
        .map(|r| r.into_inner().caller.unwrap())
}

/// Clerk reads machine tokens from `Authorization` only: in the `__session` cookie, an API
/// key or an M2M JWT is refused even on a method that takes them from the header, while a
/// session token in the cookie still works beside a neighbour cookie holding non-ASCII bytes.
#[tokio::test]
async fn machine_tokens_are_never_taken_from_the_session_cookie() {
    let h = Harness::start().await;
    const LIST: &str = "/examples.orders.v1.Orders/ListOrders";
    let policy = Policy::authenticated().method(
        LIST,
        Rule::authenticated().token_types([
            TokenType::SessionToken,
            TokenType::M2mToken,
            TokenType::ApiKey,
        ]),
    );
    let client = orders_with(&h, policy).await;
    let list_cookie = |cookie: Vec<u8>| {
        let mut req = tonic::Request::new(ListOrdersRequest {});
        req.metadata_mut().insert(
            "cookie",
            tonic::metadata::MetadataValue::try_from(cookie.as_slice()).unwrap(),
        );
        let mut c = client.clone();
        async move { c.list_orders(req).await.map(|_| ()) }
    };
    let key = h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
    let m2m_jwt = h.clerk.mint_machine(&spec(MachineTokenKind::M2m, true));
    for t in [&key, &m2m_jwt] {
        // Accepted from the header …
        list_with(&client, t).await.unwrap();
        // … refused from the cookie, also as the first of two (Clerk's parser: first wins).
        for cookie in [
            format!("__session={t}; __client_uat=1"),
            format!(
                "__session={t}; __session={}; __client_uat=1",
                h.mint(&Default::default())
            ),
        ] {
            let status = list_cookie(cookie.into_bytes()).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            assert_eq!(reason(&status), "TOKEN_TYPE_MISMATCH");
        }
    }
    let session = h.mint(&Default::default());
    let mut cookie = b"theme=caf\xc3\xa9; lang=\xff; __session=".to_vec();
    cookie.extend_from_slice(session.as_bytes());
    cookie.extend_from_slice(b"; __client_uat=1");
    list_cookie(cookie)
        .await
        .expect("a non-ASCII neighbour cookie is tolerated");
}

#[tokio::test]
async fn machine_policy_in_the_layer() {
    let h = Harness::start().await;
    let a = h.clerk.create_machine("a");
    let b = h.clerk.create_machine("b");
    let stranger = h.clerk.create_machine("stranger");
    h.clerk.allow(&a.id, &b.id);
    const LIST: &str = "/examples.orders.v1.Orders/ListOrders";
    let policy = Policy::authenticated().machine_id(&b.id).method(
        LIST,
        Rule::authenticated().token_types([TokenType::M2mToken, TokenType::ApiKey]),
    );
    let client = orders_with(&h, policy).await;

    for jwt in [false, true] {
        let from_a = h.clerk.mint_machine(&MachineTokenSpec {
            subject: Some(a.id.clone()),
            ..spec(MachineTokenKind::M2m, jwt)
        });
        let caller = list_with(&client, &from_a).await.unwrap();
        assert_eq!(caller.machine_id, a.id);
        assert_eq!(caller.token_type, "TOKEN_TYPE_M2M_TOKEN");
        // A machine whose tokens do not name B is refused by policy.
        let from_stranger = h.clerk.mint_machine(&MachineTokenSpec {
            subject: Some(stranger.id.clone()),
            ..spec(MachineTokenKind::M2m, jwt)
        });
        let status = list_with(&client, &from_stranger).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(reason(&status), "MACHINE_NOT_ALLOWED");
    }
    // A session token is not accepted by this method.
    let session = h.mint(&Default::default());
    let status = list_with(&client, &session).await.unwrap_err();
    assert_eq!(reason(&status), "TOKEN_TYPE_MISMATCH");

    // Scopes and API-key ownership.
    let policy = Policy::authenticated().method(
        LIST,
        Rule::authenticated()
            .token_types([TokenType::ApiKey])
            .require_scope("orders:read")
            .api_key_owner(ApiKeyOwner::Org),
    );
    let client = orders_with(&h, policy).await;
    let key = |subject: &str, scopes: &[&str]| {
        h.clerk.mint_machine(&MachineTokenSpec {
            subject: Some(subject.into()),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            ..spec(MachineTokenKind::ApiKey, false)
        })
    };
    let caller = list_with(&client, &key("org_1", &["orders:read"]))
        .await
        .unwrap();
    assert_eq!(caller.org_id, "org_1");
    let status = list_with(&client, &key("user_1", &["orders:read"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "API_KEY_OWNER_MISMATCH");
    let status = list_with(&client, &key("org_1", &["orders:write"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "SCOPE_REQUIRED");
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["scope"],
        "orders:read"
    );
}

#[tokio::test]
async fn m2m_token_source_caches_refreshes_and_survives_a_failed_refresh() {
    let clerk = Emulator::start_local().await.unwrap();
    let a = clerk.create_machine("a");
    let mut config =
        M2mTokenSourceConfig::new(clerk.url().parse().unwrap(), Secret::new(&a.secret_key));
    config.lifetime = Some(Duration::from_secs(2));
    let source = M2mTokenSource::new(config, &ClerkApi::new().unwrap());

    // Concurrent first calls share one creation.
    let gets = (0..10).map(|_| {
        let s = source.clone();
        tokio::spawn(async move { s.get().await })
    });
    let tokens: Vec<Arc<str>> = futures::future::join_all(gets)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert!(tokens
        .iter()
        .all(|t| *t == tokens[0] && t.starts_with("mt_")));
    assert_eq!(source.created(), 1);
    assert_eq!(source.get().await.unwrap(), tokens[0], "cached");

    // Past 80 % of its lifetime, a new token replaces it.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let second = source.get().await.unwrap();
    assert_ne!(second, tokens[0]);
    assert_eq!(source.created(), 2);

    // Clerk failing while the current token is still valid: the current token is used.
    let mut config =
        M2mTokenSourceConfig::new(clerk.url().parse().unwrap(), Secret::new(&a.secret_key));
    config.lifetime = Some(Duration::from_secs(10));
    let source = M2mTokenSource::new(config, &ClerkApi::new().unwrap());
    let first = source.get().await.unwrap();
    clerk.set_bapi_failure(Some((503, None)));
    // Not due yet: no call at all.
    assert_eq!(source.get().await.unwrap(), first);
    // A source with no token yet fails with UNAVAILABLE.
    let mut config =
        M2mTokenSourceConfig::new(clerk.url().parse().unwrap(), Secret::new(&a.secret_key));
    config.lifetime = Some(Duration::from_secs(10));
    let empty = M2mTokenSource::new(config, &ClerkApi::new().unwrap());
    assert_eq!(empty.get().await.unwrap_err().code(), Code::Unavailable);
    clerk.set_bapi_failure(None);

    // A wrong machine secret key is FAILED_PRECONDITION.
    let bad = M2mTokenSource::new(
        M2mTokenSourceConfig::new(clerk.url().parse().unwrap(), Secret::new("ak_wrong")),
        &ClerkApi::new().unwrap(),
    );
    assert_eq!(
        bad.get().await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn service_a_calls_service_b_with_its_m2m_token() {
    // The machine_to_machine example's wiring, checked: B verifies A's token via AuthService.
    let h = start(|_| {}).await;
    let a = h.clerk.create_machine("a");
    let b = h.clerk.create_machine("b");
    h.clerk.allow(&a.id, &b.id);
    let verifier =
        clerk_grpc_auth::layer::DelegatedVerifier::new(clerk_grpc_auth::layer::DelegatedConfig {
            endpoints: vec![format!("http://{}", h.addr)],
            ..Default::default()
        })
        .unwrap();
    let policy = Policy::authenticated().machine_id(&b.id).method(
        "/examples.orders.v1.Orders/ListOrders",
        Rule::authenticated().token_types([TokenType::M2mToken]),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(orders::serve(
        listener,
        AuthLayer::delegated(verifier, policy),
        std::future::pending(),
    ));
    let source = M2mTokenSource::new(
        M2mTokenSourceConfig::new(h.clerk.url().parse().unwrap(), Secret::new(&a.secret_key)),
        &ClerkApi::new().unwrap(),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut client = OrdersClient::new(
        tower::ServiceBuilder::new()
            .layer(CredentialsLayer::new(source.clone()))
            .service(channel),
    );
    for _ in 0..3 {
        let caller = client
            .list_orders(ListOrdersRequest {})
            .await
            .unwrap()
            .into_inner()
            .caller
            .unwrap();
        assert_eq!(caller.machine_id, a.id);
    }
    assert_eq!(source.created(), 1);
}

#[tokio::test]
async fn a_delegated_layer_keeps_a_machine_verdict_no_longer_than_auth_service() {
    use clerk_grpc_auth::{
        layer::{Authenticate, DelegatedConfig, DelegatedVerifier},
        VerifyRequest,
    };
    let h = start(|m| m.max_age = Duration::from_secs(1)).await;
    // The layer's own bound is long: before, a verdict cached at both ends lasted both.
    let layer = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![format!("http://{}", h.addr)],
        deadline: Duration::from_secs(5),
        max_age: Duration::from_secs(30),
        ..Default::default()
    })
    .unwrap();
    let key = h.clerk.mint_machine(&spec(MachineTokenKind::ApiKey, false));
    let verify = || {
        layer.authenticate(VerifyRequest {
            token: &key,
            accepted_types: &ALL_MACHINE,
            ..VerifyRequest::default()
        })
    };
    verify().await.unwrap();
    // AuthService says how long its verdict may be kept: what is left of its own entry.
    let answer = h
        .client
        .clone()
        .verify_token(VerifyTokenRequest {
            token: key.clone(),
            accepted_token_types: ALL_MACHINE.iter().map(|t| *t as i32).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cache_for = Duration::try_from(answer.cache_for.expect("cache_for")).unwrap();
    assert!(cache_for <= Duration::from_secs(1), "{cache_for:?}");
    // A session JWT carries no bound of AuthService's.
    let jwt = h.mint(&clerk_grpc_auth::emulator::TokenSpec::default());
    let answer = h
        .client
        .clone()
        .verify_token(VerifyTokenRequest {
            token: jwt,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.identity.is_some() && answer.cache_for.is_none());

    // Revoked at Clerk: the layer refuses it once AuthService's 1 s has passed, long before
    // its own 30 s.
    assert!(h.clerk.revoke(&key));
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match verify().await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the layer refused the revoked key within AuthService's max_age");
    assert_eq!(refused.reason_str(), "TOKEN_REVOKED", "{refused:?}");
}
