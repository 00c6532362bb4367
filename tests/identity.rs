//! Identity queries end to end: the real AuthService (gRPC + HTTP port) against the emulator's
//! Backend API and its Svix-signed webhooks, and two replicas sharing revocations through the
//! real Redis on 127.0.0.1:6379.

mod common;

use std::{net::SocketAddr, time::Duration};

use clerk_grpc_auth::{
    clerk::{
        api::BackendApiConfig, budget::BudgetConfig, directory::DirectoryConfig,
        machines::MachineConfig, svix::SvixVerifier,
    },
    emulator::{
        Emulator, MachineTokenKind, MachineTokenSpec, MemberPatch, MembershipSpec, OrgSpec,
        OrganizationPatch, TokenSpec, UserSpec,
    },
    pb::{
        auth_service_client::AuthServiceClient, GetOrganizationRequest, GetSessionRequest,
        GetUserRequest, ListOrganizationMembersRequest, ListOrganizationMembershipsRequest,
        ListSessionsRequest, RevokeSessionRequest, VerifyTokenRequest, WhoAmIRequest,
    },
    secret::Secret,
    server::{
        access::{parse_oauth_scopes, AccessConfig},
        events::{Events, RedisConfig},
        AuthServer, IdentityConfig, ServerConfig, WebhookConfig,
    },
    token::identity::TokenType,
};
use common::reason;
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{transport::Channel, Code, Request, Status};
use tonic_types::StatusExt;

const SECRET: &str = "whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdA==";

/// One AuthService replica with identity queries, webhooks on its HTTP port, optional Redis.
struct Replica {
    client: AuthServiceClient<Channel>,
    grpc: SocketAddr,
    http: SocketAddr,
    events: Events,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Default)]
struct Setup {
    /// Trusted machines: allowlisted, and their tokens scoped to AuthService's machine id.
    allowlist: Vec<String>,
    /// Further access settings (allowlist entries added here are not scoped).
    access: AccessConfig,
    /// Give AuthService no machine id.
    no_machine_id: bool,
    redis_prefix: Option<String>,
    directory: DirectoryConfig,
    /// Revocation TTL and capacity (default: the server's).
    revocations: Option<(Duration, u64)>,
    /// The Backend API budget (default: the server's).
    budget: Option<BudgetConfig>,
}

async fn replica(clerk: &Emulator, setup: &Setup) -> Replica {
    let mut config: ServerConfig = common::config_for(clerk);
    let api: url::Url = clerk.url().parse().unwrap();
    config.machine = Some(MachineConfig::new(
        api.clone(),
        Some(Secret::new(clerk.secret_key())),
        None,
    ));
    let mut backend = BackendApiConfig::new(api, Secret::new(clerk.secret_key()));
    backend.retry_budget = Duration::from_secs(3);
    config.identity = Some(IdentityConfig {
        backend,
        directory: setup.directory.clone(),
    });
    let auth_service = clerk.create_machine("auth-service");
    config.access = setup.access.clone();
    if !setup.no_machine_id {
        config.access.machine_id = Some(auth_service.id.clone());
    }
    for m in &setup.allowlist {
        if m.starts_with("mch_") {
            assert!(clerk.allow(m, &auth_service.id));
        }
        config.access.allowlist.push(m.clone());
    }
    config.webhook = Some(WebhookConfig {
        signing_secret: Secret::new(SECRET),
        tolerance: Duration::from_secs(300),
    });
    config.redis = setup.redis_prefix.as_ref().map(|p| RedisConfig {
        url: "redis://127.0.0.1:6379".into(),
        prefix: p.clone(),
    });
    if let Some(b) = &setup.budget {
        config.budget = b.clone();
    }
    if let Some((ttl, capacity)) = setup.revocations {
        config.revocation_ttl = ttl;
        config.revocation_capacity = capacity;
    }
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let server = AuthServer::build(config).unwrap();
    let keys = server.verifier().keys().clone();
    let events = server.events().await.expect("Redis on 127.0.0.1:6379");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(
        server.serve_with_events(grpc, Some(http), events.clone(), async move {
            let _ = rx.await;
        }),
    );
    keys.ready().await;
    events.subscribed().await;
    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Replica {
        client: AuthServiceClient::new(channel),
        grpc: grpc_addr,
        http: http_addr,
        events,
        stop: Some(tx),
    }
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn user_token(clerk: &Emulator, user: &str, session: &str) -> String {
    clerk.mint(&TokenSpec {
        user_id: Some(user.into()),
        session_id: Some(session.into()),
        expires_in: Some(600),
        ..TokenSpec::default()
    })
}

async fn get_user(
    r: &Replica,
    token: &str,
    user: &str,
) -> Result<clerk_grpc_auth::pb::User, Status> {
    r.client
        .clone()
        .get_user(with_token(
            GetUserRequest {
                user_id: user.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn verify(r: &Replica, token: &str, online: bool) -> Result<(), Status> {
    r.client
        .clone()
        .verify_token(VerifyTokenRequest {
            token: token.into(),
            check_session_online: online,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn each_rpc_answers_from_the_emulator() {
    let clerk = Emulator::start_local().await.unwrap();
    let admin = clerk.create_machine("admin");
    let r = replica(
        &clerk,
        &Setup {
            allowlist: vec![admin.id.clone()],
            ..Setup::default()
        },
    )
    .await;
    let ada = clerk.create_user(&UserSpec {
        first_name: Some("Ada".into()),
        last_name: Some("Lovelace".into()),
        email: Some("ada@example.com".into()),
        ..UserSpec::default()
    });
    for i in 0..25 {
        clerk
            .add_membership(&MembershipSpec {
                user_id: ada.clone(),
                org_id: format!("org_{i:02}"),
                role: Some("admin".into()),
                permissions: vec!["org:orders:read".into()],
                ..MembershipSpec::default()
            })
            .await;
    }
    let session = clerk.create_session(&ada);
    let token = user_token(&clerk, &ada, &session);

    // WhoAmI: the identity and the profile.
    let me = r
        .client
        .clone()
        .who_am_i(with_token(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.identity.unwrap().user_id, ada);
    let user = me.user.unwrap();
    assert_eq!(
        (
            user.first_name.as_str(),
            user.primary_email_address.as_str()
        ),
        ("Ada", "ada@example.com")
    );
    assert!(user.email_addresses[0].verified);

    // GetUser on itself.
    assert_eq!(
        get_user(&r, &token, &ada).await.unwrap().last_name,
        "Lovelace"
    );

    // Memberships, paged 10 at a time.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = r
            .client
            .clone()
            .list_organization_memberships(with_token(
                ListOrganizationMembershipsRequest {
                    user_id: ada.clone(),
                    page_size: 10,
                    page_token: page_token.clone(),
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_count, 25);
        seen.extend(page.memberships.into_iter().map(|m| {
            assert_eq!(m.role, "org:admin");
            m.organization.unwrap().id
        }));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 25);
    assert_eq!(seen[0], "org_00");
    assert_eq!(seen[24], "org_24");

    // GetSession on its own session.
    let s = r
        .client
        .clone()
        .get_session(with_token(
            GetSessionRequest {
                session_id: session.clone(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.status.as_str(), s.user_id.as_str()),
        ("active", ada.as_str())
    );

    // RevokeSession by the allowlisted machine: Clerk revokes it, its tokens are refused.
    verify(&r, &token, false).await.unwrap();
    let m2m = clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        subject: Some(admin.id.clone()),
        ..MachineTokenSpec::default()
    });
    let revoked = r
        .client
        .clone()
        .revoke_session(with_token(
            RevokeSessionRequest {
                session_id: session.clone(),
            },
            &m2m,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.status, "revoked");
    let status = verify(&r, &token, false).await.unwrap_err();
    assert_eq!(reason(&status), "SESSION_REVOKED");

    // Unknown ids and malformed ids.
    let status = get_user(&r, &m2m, "user_doesNotExist").await;
    // The machine is allowlisted: it learns the user does not exist.
    assert_eq!(status.unwrap_err().code(), Code::NotFound);
    let status = get_user(&r, &m2m, "user_../../v1/jwks").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// `GET /emulator/stats`, as a user would read it with curl.
async fn emulator_stats(clerk: &Emulator) -> serde_json::Value {
    let resp = reqwest::get(format!("{}/emulator/stats", clerk.url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn emulator_stats_count_each_endpoint_and_reset() {
    let clerk = Emulator::start_local().await.unwrap();
    let r = replica(&clerk, &Setup::default()).await;
    // Started: the keys were fetched once, from the Backend API JWKS.
    let stats = emulator_stats(&clerk).await;
    assert_eq!(stats["requests"]["GET /v1/jwks"], 1, "{stats}");
    assert_eq!(stats["jwks_requests"], 1, "{stats}");

    // A reset answers what it cleared, then everything is zero.
    let http = reqwest::Client::new();
    let cleared: serde_json::Value = http
        .post(format!("{}/emulator/stats/reset", clerk.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cleared, stats);
    assert_eq!(
        emulator_stats(&clerk).await,
        serde_json::json!({"jwks_requests": 0, "bapi_requests": 0, "requests": {}})
    );

    // Ten GetUser through AuthService: one Backend API request, to the user endpoint.
    let grace = clerk.create_user(&UserSpec {
        first_name: Some("Grace".into()),
        ..UserSpec::default()
    });
    let token = user_token(&clerk, &grace, &clerk.create_session(&grace));
    for _ in 0..10 {
        assert_eq!(
            get_user(&r, &token, &grace).await.unwrap().first_name,
            "Grace"
        );
    }
    assert_eq!(
        emulator_stats(&clerk).await,
        serde_json::json!({
            "jwks_requests": 0,
            "bapi_requests": 1,
            "requests": {"GET /v1/users/{user_id}": 1},
        }),
        "ten GetUser, one Backend API request (the emulator's control routes are not counted)"
    );
    assert_eq!(clerk.requests("GET /v1/users/{user_id}"), 1);

    // Hostile paths and methods make no keys of their own: only route templates do.
    let url = clerk.url();
    let long = "u".repeat(4000);
    let mut paths = vec![
        "/v1/users/..%2F..".to_owned(),
        "/v1/users/%00".to_owned(),
        format!("/v1/users/{long}"),
        format!("/v1/users/{long}/organization_memberships"),
        "/v1/users/a/b/c".to_owned(),
        format!("/{long}"),
        "/v1/jwks/extra".to_owned(),
    ];
    paths.extend((0..50).map(|i| format!("/v1/users/user_{i}")));
    paths.extend((0..50).map(|i| format!("/nowhere/{i}")));
    for p in &paths {
        http.get(format!("{url}{p}")).send().await.unwrap();
    }
    let odd = reqwest::Method::from_bytes(b"FROBNICATE").unwrap();
    for i in 0..5 {
        http.request(odd.clone(), format!("{url}/v1/users/user_{i}"))
            .send()
            .await
            .unwrap();
    }
    // A JWKS fetch, answered with an injected failure, counts as a JWKS request.
    clerk.set_jwks_failure(Some(503));
    let resp = http
        .get(format!("{url}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    clerk.set_jwks_failure(None);
    let stats = clerk.stats();
    let keys: Vec<&str> = stats.requests.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "GET /.well-known/jwks.json",
            "GET /v1/users/{user_id}",
            "GET /v1/users/{user_id}/organization_memberships",
            "GET <unmatched>",
            "OTHER /v1/users/{user_id}",
        ]
    );
    assert_eq!(stats.get("GET /v1/users/{user_id}"), 1 + 3 + 50);
    assert_eq!(stats.get("GET <unmatched>"), 53);
    assert_eq!(stats.get("OTHER /v1/users/{user_id}"), 5);
    // The totals are the sums of their routes; unmatched paths feed neither.
    assert_eq!(stats.jwks_requests, 1);
    assert_eq!(stats.bapi_requests, 1 + 3 + 50 + 1 + 5);
    assert_eq!(
        serde_json::to_value(&stats).unwrap(),
        emulator_stats(&clerk).await
    );

    // After a reset the waiters count again from zero.
    assert_eq!(clerk.reset_stats(), stats);
    assert_eq!(clerk.jwks_requests(), 0);
    assert_eq!(clerk.bapi_requests(), 0);
    let waiting = clerk.wait_jwks_requests(1);
    http.get(format!("{url}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiter saw the request");
    assert_eq!(clerk.requests("GET /.well-known/jwks.json"), 1);
}

#[tokio::test]
async fn caches_are_counted_at_the_emulator_and_webhooks_invalidate_them() {
    let clerk = Emulator::start_local().await.unwrap();
    let r = replica(&clerk, &Setup::default()).await;
    clerk.set_webhook(Some((&format!("http://{}/webhooks/clerk", r.http), SECRET)));
    let grace = clerk.create_user(&UserSpec {
        first_name: Some("Grace".into()),
        ..UserSpec::default()
    });
    let token = user_token(&clerk, &grace, &clerk.create_session(&grace));

    let before = clerk.bapi_requests();
    for _ in 0..10 {
        assert_eq!(
            get_user(&r, &token, &grace).await.unwrap().first_name,
            "Grace"
        );
    }
    assert_eq!(
        clerk.bapi_requests() - before,
        1,
        "ten GetUser, one Backend API request"
    );

    // user.updated → the next GetUser asks Clerk again and sees the change.
    assert!(clerk.rename_user(&grace, "Admiral").await);
    assert_eq!(
        get_user(&r, &token, &grace).await.unwrap().first_name,
        "Admiral"
    );
    assert_eq!(clerk.bapi_requests() - before, 2);

    // organizationMembership.created → memberships re-read.
    let list = |r: &Replica| {
        let mut c = r.client.clone();
        let req = with_token(
            ListOrganizationMembershipsRequest {
                user_id: grace.clone(),
                ..Default::default()
            },
            &token,
        );
        async move {
            c.list_organization_memberships(req)
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(list(&r).await.total_count, 0);
    clerk
        .add_membership(&MembershipSpec {
            user_id: grace.clone(),
            org_id: "org_navy".into(),
            ..MembershipSpec::default()
        })
        .await;
    assert_eq!(list(&r).await.total_count, 1);
}

#[tokio::test]
async fn a_session_revoked_webhook_refuses_the_sessions_unexpired_tokens() {
    let clerk = Emulator::start_local().await.unwrap();
    let r = replica(&clerk, &Setup::default()).await;
    clerk.set_webhook(Some((&format!("http://{}/webhooks/clerk", r.http), SECRET)));
    let user = clerk.create_user(&UserSpec::default());
    let session = clerk.create_session(&user);
    let token = user_token(&clerk, &user, &session);
    let other = user_token(&clerk, &user, &clerk.create_session(&user));
    // Verified (and cached) before the revocation.
    verify(&r, &token, false).await.unwrap();
    assert!(clerk.set_session_status(&session, "revoked").await);
    let status = verify(&r, &token, false).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "SESSION_REVOKED");
    // A freshly minted token of the same session too; other sessions are untouched.
    let again = user_token(&clerk, &user, &session);
    assert_eq!(
        reason(&verify(&r, &again, false).await.unwrap_err()),
        "SESSION_REVOKED"
    );
    verify(&r, &other, false).await.unwrap();

    // session.ended and session.removed revoke as well.
    for status in ["ended", "removed"] {
        let s = clerk.create_session(&user);
        let t = user_token(&clerk, &user, &s);
        verify(&r, &t, false).await.unwrap();
        assert!(clerk.set_session_status(&s, status).await);
        assert_eq!(
            reason(&verify(&r, &t, false).await.unwrap_err()),
            "SESSION_REVOKED",
            "{status}"
        );
    }
}

#[tokio::test]
async fn online_session_check_sees_a_revocation_without_a_webhook() {
    let clerk = Emulator::start_local().await.unwrap();
    let r = replica(
        &clerk,
        &Setup {
            directory: DirectoryConfig {
                session_ttl: Duration::from_millis(100),
                ..DirectoryConfig::default()
            },
            ..Setup::default()
        },
    )
    .await;
    let user = clerk.create_user(&UserSpec::default());
    let session = clerk.create_session(&user);
    let token = user_token(&clerk, &user, &session);
    verify(&r, &token, true).await.unwrap();
    // No webhook target: only the online check can notice.
    assert!(clerk.set_session_status(&session, "revoked").await);
    verify(&r, &token, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        reason(&verify(&r, &token, true).await.unwrap_err()),
        "SESSION_REVOKED"
    );
    // Remembered: now refused without the online check too.
    assert_eq!(
        reason(&verify(&r, &token, false).await.unwrap_err()),
        "SESSION_REVOKED"
    );
}

async fn post_webhook(addr: SocketAddr, id: &str, ts: i64, sig: &str, body: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{addr}/webhooks/clerk"))
        .header("svix-id", id)
        .header("svix-timestamp", ts.to_string())
        .header("svix-signature", sig)
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn bad_signatures_and_replays_are_rejected() {
    let clerk = Emulator::start_local().await.unwrap();
    let r = replica(&clerk, &Setup::default()).await;
    let signer = SvixVerifier::new(&Secret::new(SECRET), Duration::from_secs(300)).unwrap();
    let user = clerk.create_user(&UserSpec::default());
    let session = clerk.create_session(&user);
    let token = user_token(&clerk, &user, &session);
    let body = format!(r#"{{"type":"session.revoked","data":{{"id":"{session}"}}}}"#);
    let now = common::now();
    let applied = r.events.applied();

    // Wrong secret, tampered body, stale timestamp: refused, nothing applied.
    let wrong = SvixVerifier::new(
        &Secret::new("whsec_b3RoZXJvdGhlcm90aGVyb3RoZXJvdGhlcm90aGVy"),
        Duration::from_secs(300),
    )
    .unwrap();
    assert_eq!(
        post_webhook(
            r.http,
            "msg_1",
            now,
            &wrong.sign("msg_1", now, body.as_bytes()),
            &body
        )
        .await,
        400
    );
    let sig = signer.sign("msg_1", now, body.as_bytes());
    assert_eq!(
        post_webhook(
            r.http,
            "msg_1",
            now,
            &sig,
            &body.replace("revoked", "created")
        )
        .await,
        400
    );
    let old = now - 3600;
    let old_sig = signer.sign("msg_2", old, body.as_bytes());
    assert_eq!(
        post_webhook(r.http, "msg_2", old, &old_sig, &body).await,
        400
    );
    assert_eq!(post_webhook(r.http, "", now, &sig, &body).await, 400);
    assert_eq!(r.events.applied(), applied);
    verify(&r, &token, false).await.unwrap();

    // The genuine delivery applies once; a redelivery of the same id is acknowledged only.
    assert_eq!(post_webhook(r.http, "msg_1", now, &sig, &body).await, 200);
    assert_eq!(r.events.applied(), applied + 1);
    assert_eq!(post_webhook(r.http, "msg_1", now, &sig, &body).await, 200);
    assert_eq!(r.events.applied(), applied + 1);
    assert_eq!(
        reason(&verify(&r, &token, false).await.unwrap_err()),
        "SESSION_REVOKED"
    );
}

#[tokio::test]
async fn rate_limits_and_outages_of_the_backend_api() {
    let clerk = Emulator::start_local().await.unwrap();
    let setup = Setup {
        directory: DirectoryConfig {
            user_ttl: Duration::from_millis(200),
            ..DirectoryConfig::default()
        },
        ..Setup::default()
    };
    let r = replica(&clerk, &setup).await;
    let user = clerk.create_user(&UserSpec {
        first_name: Some("Kay".into()),
        ..UserSpec::default()
    });
    let token = user_token(&clerk, &user, &clerk.create_session(&user));
    // The token is verified before the faults (its session token needs no Backend API).
    verify(&r, &token, false).await.unwrap();

    // 429 with a Retry-After beyond the retry budget: RESOURCE_EXHAUSTED at once, one request.
    clerk.set_bapi_failure(Some((429, Some(30))));
    let before = clerk.bapi_requests();
    let status = get_user(&r, &token, &user).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status), "RATE_LIMITED");
    assert_eq!(
        status.get_details_retry_info().unwrap().retry_delay,
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        clerk.bapi_requests() - before,
        1,
        "no retry before Retry-After"
    );
    // Until Retry-After has passed this replica does not ask Clerk, even once it has healed.
    clerk.set_bapi_failure(None);
    let status = get_user(&r, &token, &user).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let left = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(left <= Duration::from_secs(30) && left > Duration::from_secs(20));
    assert_eq!(clerk.bapi_requests() - before, 1, "asked while suspended");
    drop(r);
    let r = replica(&clerk, &setup).await;

    // Another replica; 429 with Retry-After: 1, healed 300 ms later: the one retry (after Retry-After) succeeds.
    clerk.set_bapi_failure(Some((429, Some(1))));
    let before = clerk.bapi_requests();
    let healer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        clerk.set_bapi_failure(None);
    };
    let (got, ()) = tokio::join!(get_user(&r, &token, &user), healer);
    assert_eq!(got.unwrap().first_name, "Kay");
    assert_eq!(
        clerk.bapi_requests() - before,
        2,
        "first 429, then one retry after Retry-After"
    );

    // 503 past the retries: stale-if-error serves the cached profile…
    tokio::time::sleep(Duration::from_millis(250)).await; // past the 200 ms TTL
    clerk.set_bapi_failure(Some((503, None)));
    let before = clerk.bapi_requests();
    assert_eq!(get_user(&r, &token, &user).await.unwrap().first_name, "Kay");
    assert_eq!(
        clerk.bapi_requests() - before,
        3,
        "first attempt and two retries"
    );
    // …but a user never fetched is UNAVAILABLE.
    let other = clerk.create_user(&UserSpec::default());
    let other_token = user_token(&clerk, &other, &clerk.create_session(&other));
    let status = get_user(&r, &other_token, &other).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "BACKEND_API_UNAVAILABLE");
    clerk.set_bapi_failure(None);
}

/// One identity query by `token` (empty: none): `Ok`, or the code and reason.
async fn ask(r: &Replica, rpc: &str, token: &str, target: &str) -> Result<(), (Code, String)> {
    fn req<T>(msg: T, token: &str) -> Request<T> {
        if token.is_empty() {
            Request::new(msg)
        } else {
            with_token(msg, token)
        }
    }
    let mut c = r.client.clone();
    let got = match rpc {
        "WhoAmI" => c.who_am_i(req(WhoAmIRequest {}, token)).await.map(|_| ()),
        "GetUser" => c
            .get_user(req(
                GetUserRequest {
                    user_id: target.into(),
                },
                token,
            ))
            .await
            .map(|_| ()),
        "ListOrganizationMemberships" => c
            .list_organization_memberships(req(
                ListOrganizationMembershipsRequest {
                    user_id: target.into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(|_| ()),
        "GetSession" => c
            .get_session(req(
                GetSessionRequest {
                    session_id: target.into(),
                },
                token,
            ))
            .await
            .map(|_| ()),
        "ListSessions" => c
            .list_sessions(req(
                ListSessionsRequest {
                    user_id: target.into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(|_| ()),
        "RevokeSession" => c
            .revoke_session(req(
                RevokeSessionRequest {
                    session_id: target.into(),
                },
                token,
            ))
            .await
            .map(|_| ()),
        "GetOrganization" => c
            .get_organization(req(
                GetOrganizationRequest {
                    organization_id: target.into(),
                },
                token,
            ))
            .await
            .map(|_| ()),
        "ListOrganizationMembers" => c
            .list_organization_members(req(
                ListOrganizationMembersRequest {
                    organization_id: target.into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(|_| ()),
        other => panic!("no RPC {other}"),
    };
    got.map_err(|s| (s.code(), reason(&s)))
}

type Want = Result<(), (Code, &'static str)>;
const OK: Want = Ok(());
const fn no(code: Code, reason: &'static str) -> Want {
    Err((code, reason))
}

async fn check_cases(r: &Replica, cases: &[(&str, &str, &str, &str, Want)]) {
    for (name, rpc, token, target, want) in cases {
        let got = ask(r, rpc, token, target).await;
        let want = want.map_err(|(c, r)| (c, r.to_owned()));
        assert_eq!(got, want, "{name}: {rpc}");
    }
}

#[tokio::test]
async fn who_may_ask() {
    let clerk = Emulator::start_local().await.unwrap();
    let trusted = clerk.create_machine("trusted");
    let stranger = clerk.create_machine("stranger");
    // Allowlisted, but its tokens are made to call service B only (never scoped to us).
    let replayer = clerk.create_machine("machine-a");
    let service_b = clerk.create_machine("service-b");
    assert!(clerk.allow(&replayer.id, &service_b.id));
    let r = replica(
        &clerk,
        &Setup {
            allowlist: vec![trusted.id.clone()],
            access: AccessConfig {
                allowlist: vec![replayer.id.clone()],
                ..AccessConfig::default()
            },
            ..Setup::default()
        },
    )
    .await;
    let alice = clerk.create_user(&UserSpec::default());
    let bob = clerk.create_user(&UserSpec::default());
    let alice_session = clerk.create_session(&alice);
    let alice_other = clerk.create_session(&alice);
    let bob_session = clerk.create_session(&bob);
    let alice_token = user_token(&clerk, &alice, &alice_session);
    let alice_pending = clerk.mint(&TokenSpec {
        user_id: Some(alice.clone()),
        session_id: Some(alice_session.clone()),
        session_status: Some("pending".into()),
        expires_in: Some(600),
        ..TokenSpec::default()
    });
    let m2m = |m: &str, jwt: bool| {
        clerk.mint_machine(&MachineTokenSpec {
            kind: MachineTokenKind::M2m,
            subject: Some(m.into()),
            jwt,
            ..MachineTokenSpec::default()
        })
    };
    let trusted_token = m2m(&trusted.id, false);
    let trusted_jwt = m2m(&trusted.id, true);
    let stranger_token = m2m(&stranger.id, false);
    // The token machine A made to call B, replayed by B against AuthService.
    let replayed = m2m(&replayer.id, false);
    let replayed_jwt = m2m(&replayer.id, true);
    let alice_key = clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::ApiKey,
        subject: Some(alice.clone()),
        ..MachineTokenSpec::default()
    });
    let alice_oauth = clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::Oauth,
        subject: Some(alice.clone()),
        scopes: vec!["email".into()],
        ..MachineTokenSpec::default()
    });
    use Code::{PermissionDenied as Denied, Unauthenticated as Unauth};
    let cases: Vec<(&str, &str, &str, &str, Want)> = vec![
        (
            "no token",
            "GetUser",
            "",
            &alice,
            no(Unauth, "TOKEN_MISSING"),
        ),
        (
            "garbage token",
            "GetUser",
            "nope",
            &alice,
            no(Unauth, "TOKEN_INVALID"),
        ),
        ("user reads itself", "GetUser", &alice_token, &alice, OK),
        (
            "user, own memberships",
            "ListOrganizationMemberships",
            &alice_token,
            &alice,
            OK,
        ),
        ("user, WhoAmI", "WhoAmI", &alice_token, "", OK),
        (
            "user reads another",
            "GetUser",
            &alice_token,
            &bob,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "user, another's memberships",
            "ListOrganizationMemberships",
            &alice_token,
            &bob,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        ("trusted machine", "GetUser", &trusted_token, &bob, OK),
        ("trusted machine (JWT)", "GetUser", &trusted_jwt, &bob, OK),
        ("trusted machine, WhoAmI", "WhoAmI", &trusted_token, "", OK),
        (
            "machine not allowlisted",
            "GetUser",
            &stranger_token,
            &bob,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "B replays A's token",
            "GetUser",
            &replayed,
            &bob,
            no(Denied, "MACHINE_NOT_ALLOWED"),
        ),
        (
            "B replays A's JWT",
            "GetUser",
            &replayed_jwt,
            &bob,
            no(Denied, "MACHINE_NOT_ALLOWED"),
        ),
        (
            "B replays A's token, WhoAmI",
            "WhoAmI",
            &replayed,
            "",
            no(Denied, "MACHINE_NOT_ALLOWED"),
        ),
        (
            "B replays A's token, revoke",
            "RevokeSession",
            &replayed,
            &bob_session,
            no(Denied, "MACHINE_NOT_ALLOWED"),
        ),
        (
            "B replays A's token, session",
            "GetSession",
            &replayed,
            &bob_session,
            no(Denied, "MACHINE_NOT_ALLOWED"),
        ),
        // By default neither API keys nor OAuth tokens speak for their user, and they are not
        // even verified (no Backend API call).
        (
            "user-owned API key, itself",
            "GetUser",
            &alice_key,
            &alice,
            no(Unauth, "TOKEN_TYPE_MISMATCH"),
        ),
        (
            "OAuth token, WhoAmI",
            "WhoAmI",
            &alice_oauth,
            "",
            no(Unauth, "TOKEN_TYPE_MISMATCH"),
        ),
        (
            "OAuth token, own session",
            "GetSession",
            &alice_oauth,
            &alice_session,
            no(Unauth, "TOKEN_TYPE_MISMATCH"),
        ),
        // Sessions: own yes, someone else's no (whether or not it exists).
        (
            "own session",
            "GetSession",
            &alice_token,
            &alice_session,
            OK,
        ),
        (
            "another's session",
            "GetSession",
            &alice_token,
            &bob_session,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "made-up session",
            "GetSession",
            &alice_token,
            "sess_doesNotExist",
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "trusted reads a session",
            "GetSession",
            &trusted_token,
            &bob_session,
            OK,
        ),
        // Revoking: trusted machines anyone's, a user its own (the others with a fresh
        // second factor, which this token does not show).
        (
            "user revokes another's session",
            "RevokeSession",
            &alice_token,
            &bob_session,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "user revokes a made-up session",
            "RevokeSession",
            &alice_token,
            "sess_doesNotExist",
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "user revokes its other session, no fresh factor",
            "RevokeSession",
            &alice_token,
            &alice_other,
            no(Denied, "REVERIFICATION_REQUIRED"),
        ),
        (
            "user lists its sessions",
            "ListSessions",
            &alice_token,
            &alice,
            OK,
        ),
        (
            "user lists another's sessions",
            "ListSessions",
            &alice_token,
            &bob,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "trusted lists anyone's sessions",
            "ListSessions",
            &trusted_token,
            &bob,
            OK,
        ),
        (
            "stranger lists sessions",
            "ListSessions",
            &stranger_token,
            &bob,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "B replays A's token, list sessions",
            "ListSessions",
            &replayed,
            &bob,
            no(Denied, "MACHINE_NOT_ALLOWED"),
        ),
        (
            "OAuth token, list sessions",
            "ListSessions",
            &alice_oauth,
            &alice,
            no(Unauth, "TOKEN_TYPE_MISMATCH"),
        ),
        (
            "no token, list sessions",
            "ListSessions",
            "",
            &alice,
            no(Unauth, "TOKEN_MISSING"),
        ),
        (
            "user-owned API key, list sessions",
            "ListSessions",
            &alice_key,
            &alice,
            no(Unauth, "TOKEN_TYPE_MISMATCH"),
        ),
        (
            "pending session, list sessions",
            "ListSessions",
            &alice_pending,
            &alice,
            no(Unauth, "SESSION_PENDING"),
        ),
        (
            "pending session, revoke its other session",
            "RevokeSession",
            &alice_pending,
            &alice_other,
            no(Unauth, "SESSION_PENDING"),
        ),
        (
            "pending session, revoke itself",
            "RevokeSession",
            &alice_pending,
            &alice_session,
            no(Unauth, "SESSION_PENDING"),
        ),
        (
            "stranger revokes",
            "RevokeSession",
            &stranger_token,
            &bob_session,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "trusted revokes",
            "RevokeSession",
            &trusted_token,
            &bob_session,
            OK,
        ),
    ];
    let before = clerk.bapi_requests();
    check_cases(&r, &cases[16..19]).await;
    assert_eq!(
        clerk.bapi_requests(),
        before,
        "token types not let in cost no Backend API call"
    );
    check_cases(&r, &cases).await;
}

#[tokio::test]
async fn without_a_machine_id_no_machine_is_trusted() {
    let clerk = Emulator::start_local().await.unwrap();
    let trusted = clerk.create_machine("trusted");
    let r = replica(
        &clerk,
        &Setup {
            allowlist: vec![trusted.id.clone()],
            no_machine_id: true,
            ..Setup::default()
        },
    )
    .await;
    let bob = clerk.create_user(&UserSpec::default());
    let token = clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        subject: Some(trusted.id.clone()),
        ..MachineTokenSpec::default()
    });
    // Refused as a token type, before any verification (an opaque M2M token costs nothing).
    let before = clerk.bapi_requests();
    let got = ask(&r, "GetUser", &token, &bob).await.unwrap_err();
    assert_eq!(got, (Code::Unauthenticated, "TOKEN_TYPE_MISMATCH".into()));
    assert_eq!(clerk.bapi_requests(), before);
}

#[tokio::test]
async fn oauth_tokens_and_api_keys_get_what_they_were_granted() {
    let clerk = Emulator::start_local().await.unwrap();
    let r = replica(
        &clerk,
        &Setup {
            access: AccessConfig {
                caller_types: vec![TokenType::OauthToken, TokenType::ApiKey],
                oauth_scopes: parse_oauth_scopes("WhoAmI=profile;GetUser=profile email").unwrap(),
                ..AccessConfig::default()
            },
            ..Setup::default()
        },
    )
    .await;
    let alice = clerk.create_user(&UserSpec::default());
    let bob = clerk.create_user(&UserSpec::default());
    let alice_session = clerk.create_session(&alice);
    let oauth = |scopes: &[&str], jwt: bool| {
        clerk.mint_machine(&MachineTokenSpec {
            kind: MachineTokenKind::Oauth,
            subject: Some(alice.clone()),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            jwt,
            ..MachineTokenSpec::default()
        })
    };
    let email = oauth(&["email"], false);
    let profile = oauth(&["profile"], false);
    let both = oauth(&["profile", "email"], false);
    let both_jwt = oauth(&["profile", "email"], true);
    let key = |owner: &str| {
        clerk.mint_machine(&MachineTokenSpec {
            kind: MachineTokenKind::ApiKey,
            subject: Some(owner.into()),
            ..MachineTokenSpec::default()
        })
    };
    let alice_key = key(&alice);
    let org_key = key("org_2acmeACMEacmeACMEacmeACME");
    use Code::PermissionDenied as Denied;
    let cases: Vec<(&str, &str, &str, &str, Want)> = vec![
        (
            "email only, WhoAmI",
            "WhoAmI",
            &email,
            "",
            no(Denied, "SCOPE_REQUIRED"),
        ),
        ("profile, WhoAmI", "WhoAmI", &profile, "", OK),
        (
            "profile, GetUser (needs email too)",
            "GetUser",
            &profile,
            &alice,
            no(Denied, "SCOPE_REQUIRED"),
        ),
        ("profile+email, GetUser", "GetUser", &both, &alice, OK),
        (
            "profile+email JWT, GetUser",
            "GetUser",
            &both_jwt,
            &alice,
            OK,
        ),
        (
            "profile+email, another user",
            "GetUser",
            &both,
            &bob,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        // No scopes configured for these: OAuth tokens may not use them.
        (
            "OAuth, a session of its user",
            "GetSession",
            &both,
            &alice_session,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "OAuth, memberships",
            "ListOrganizationMemberships",
            &both,
            &alice,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "OAuth, revoke",
            "RevokeSession",
            &both,
            &alice_session,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        ("user API key, itself", "GetUser", &alice_key, &alice, OK),
        ("user API key, WhoAmI", "WhoAmI", &alice_key, "", OK),
        (
            "user API key, own session",
            "GetSession",
            &alice_key,
            &alice_session,
            OK,
        ),
        (
            "user API key, another",
            "GetUser",
            &alice_key,
            &bob,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "organization API key",
            "WhoAmI",
            &org_key,
            "",
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "user API key, own sessions",
            "ListSessions",
            &alice_key,
            &alice,
            OK,
        ),
        (
            "user API key, another's sessions",
            "ListSessions",
            &alice_key,
            &bob,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        // An API key can never show a fresh factor (no `fva`) and is no session of its own:
        // under the default policy it revokes nothing.
        (
            "user API key, revoke a session of its user",
            "RevokeSession",
            &alice_key,
            &alice_session,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "organization API key, sessions",
            "ListSessions",
            &org_key,
            &alice,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
        (
            "OAuth, sessions (no scope configured)",
            "ListSessions",
            &both,
            &alice,
            no(Denied, "CALLER_NOT_ALLOWED"),
        ),
    ];
    check_cases(&r, &cases).await;
}

#[tokio::test]
async fn a_get_session_flood_costs_clerk_the_callers_burst_and_no_more() {
    let clerk = Emulator::start_local().await.unwrap();
    let r = replica(
        &clerk,
        &Setup {
            budget: Some(BudgetConfig {
                caller_calls_per_sec: 0.001,
                caller_burst: 20,
                ..BudgetConfig::default()
            }),
            ..Setup::default()
        },
    )
    .await;
    let alice = clerk.create_user(&UserSpec::default());
    let bob = clerk.create_user(&UserSpec::default());
    let alice_session = clerk.create_session(&alice);
    let bob_session = clerk.create_session(&bob);
    let alice_token = user_token(&clerk, &alice, &alice_session);
    let bob_token = user_token(&clerk, &bob, &bob_session);

    // The same missing id five times, and someone else's session five times: Clerk is asked
    // once for each; every ask is charged to alice (10 of her 20).
    let before = clerk.bapi_requests();
    for _ in 0..5 {
        for id in ["sess_doesNotExist", bob_session.as_str()] {
            let got = ask(&r, "GetSession", &alice_token, id).await.unwrap_err();
            assert_eq!(got, (Code::PermissionDenied, "CALLER_NOT_ALLOWED".into()));
        }
    }
    assert_eq!(clerk.bapi_requests() - before, 2, "refusals are remembered");

    // 3 000 random ids: Clerk sees at most what is left of alice's burst; the rest are refused
    // with RESOURCE_EXHAUSTED without a request.
    let before = clerk.bapi_requests();
    let mut exhausted = 0;
    for i in 0..3000 {
        match ask(&r, "GetSession", &alice_token, &format!("sess_random{i}")).await {
            Err((Code::ResourceExhausted, _)) => exhausted += 1,
            Err((Code::PermissionDenied, _)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let spent = clerk.bapi_requests() - before;
    assert!(
        spent <= 10,
        "{spent} Backend API requests for one caller's flood"
    );
    assert!(exhausted >= 2990, "{exhausted} refused as exhausted");
    // Out of budget, a known refusal and an unknown id look the same: no existence oracle.
    for id in [bob_session.as_str(), "sess_doesNotExist", "sess_neverAsked"] {
        assert_eq!(
            ask(&r, "GetSession", &alice_token, id).await.unwrap_err().0,
            Code::ResourceExhausted,
            "{id}"
        );
    }
    // Alice's spent budget does not fail the online checks of her own tokens (those are the
    // service's cost, not hers).
    r.client
        .clone()
        .verify_token(VerifyTokenRequest {
            token: alice_token.clone(),
            check_session_online: true,
            ..Default::default()
        })
        .await
        .expect("an online check is not charged to the token's user");
    // … and bob, another caller, is still served.
    assert_eq!(
        ask(&r, "GetSession", &bob_token, &bob_session).await,
        Ok(())
    );
    assert_eq!(ask(&r, "GetUser", &bob_token, &bob).await, Ok(()));
}

#[tokio::test]
async fn replicas_share_revocations_through_redis() {
    let clerk = Emulator::start_local().await.unwrap();
    let prefix = format!("clerk-auth-test-{}", rand::random::<u64>());
    let setup = Setup {
        redis_prefix: Some(prefix.clone()),
        ..Setup::default()
    };
    let one = replica(&clerk, &setup).await;
    let two = replica(&clerk, &setup).await;
    // The webhook reaches replica one only.
    clerk.set_webhook(Some((
        &format!("http://{}/webhooks/clerk", one.http),
        SECRET,
    )));
    let user = clerk.create_user(&UserSpec::default());
    let session = clerk.create_session(&user);
    let token = user_token(&clerk, &user, &session);
    verify(&two, &token, false).await.unwrap();
    let applied = two.events.applied();
    assert!(clerk.set_session_status(&session, "revoked").await);
    // Replica two applies it from the Redis channel.
    tokio::time::timeout(
        Duration::from_secs(10),
        two.events.wait_applied(applied + 1),
    )
    .await
    .expect("replica two received the revocation");
    assert_eq!(
        reason(&verify(&two, &token, false).await.unwrap_err()),
        "SESSION_REVOKED"
    );
    // A replica started later learns it from the stored key.
    let three = replica(&clerk, &setup).await;
    assert_eq!(
        reason(&verify(&three, &token, false).await.unwrap_err()),
        "SESSION_REVOKED"
    );

    // Clean up this test's keys.
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:revoked:{session}"))
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A fixed token for outgoing calls.
#[derive(Clone)]
struct Static(String);

impl clerk_grpc_auth::credentials::TokenSource for Static {
    fn token(&self) -> futures::future::BoxFuture<'_, Result<String, Status>> {
        Box::pin(std::future::ready(Ok(self.0.clone())))
    }
}

#[tokio::test]
async fn layers_following_revocations_refuse_at_once() {
    use clerk_grpc_auth::layer::{
        watch_revocations_with, CallerCredentials, DelegatedConfig, DelegatedVerifier,
    };
    let clerk = Emulator::start_local().await.unwrap();
    // WatchRevocations is for allowlisted callers: the layers follow as this machine.
    let follower = clerk.create_machine("follower");
    let r = replica(
        &clerk,
        &Setup {
            allowlist: vec![follower.id.clone()],
            ..Setup::default()
        },
    )
    .await;
    let credentials = Static(clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        subject: Some(follower.id.clone()),
        ..MachineTokenSpec::default()
    }));
    clerk.set_webhook(Some((&format!("http://{}/webhooks/clerk", r.http), SECRET)));
    let user = clerk.create_user(&UserSpec::default());
    let session = clerk.create_session(&user);
    let token = user_token(&clerk, &user, &session);

    // A delegated verifier (10 s verdict cache) and an in-process one, both following.
    let delegated = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![format!("http://{}", r.grpc)],
        credentials: Some(CallerCredentials::new(credentials.clone())),
        ..DelegatedConfig::default()
    })
    .unwrap();
    let delegated_feed = delegated.watch_revocations();
    let server = AuthServer::build(common::config_for(&clerk)).unwrap();
    let local = server.verifier().clone();
    let _refresher = local.keys().spawn_refresher();
    local.keys().ready().await;
    let channel = Channel::from_shared(format!("http://{}", r.grpc))
        .unwrap()
        .connect_lazy();
    let local_feed =
        watch_revocations_with(channel, local.revocations().clone(), credentials.clone());
    delegated_feed.connected().await;
    local_feed.connected().await;

    let req = clerk_grpc_auth::VerifyRequest {
        token: &token,
        ..Default::default()
    };
    delegated.verify(&req).await.unwrap();
    local.verify(&req).await.unwrap();
    assert!(clerk.set_session_status(&session, "revoked").await);
    delegated_feed.wait_received(1).await;
    local_feed.wait_received(1).await;
    let e = delegated.verify(&req).await.unwrap_err();
    assert_eq!(
        e.reason_str(),
        "SESSION_REVOKED",
        "delegated: the cached verdict is not served"
    );
    assert_eq!(
        delegated.stats().rpcs,
        1,
        "refused without asking AuthService again"
    );
    let e = local.verify(&req).await.unwrap_err();
    assert_eq!(e.reason_str(), "SESSION_REVOKED");

    // A subscriber that connects later gets the revocations AuthService remembers.
    let late = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![format!("http://{}", r.grpc)],
        credentials: Some(CallerCredentials::new(credentials)),
        ..DelegatedConfig::default()
    })
    .unwrap();
    let late_feed = late.watch_revocations();
    late_feed.wait_received(1).await;
    assert!(late.revocations().is_revoked(&session));
}

#[tokio::test]
async fn metrics_livez_and_readyz_on_the_http_port() {
    let clerk = Emulator::start_local().await.unwrap();
    let r = replica(&clerk, &Setup::default()).await;
    let user = clerk.create_user(&UserSpec::default());
    let token = user_token(&clerk, &user, &clerk.create_session(&user));
    verify(&r, &token, false).await.unwrap();
    verify(&r, &token, false).await.unwrap();
    let _ = verify(&r, "garbage", false).await.unwrap_err();
    get_user(&r, &token, &user).await.unwrap();
    get_user(&r, &token, &user).await.unwrap();

    let http = reqwest::Client::new();
    let get = |path: &str| {
        let url = format!("http://{}{path}", r.http);
        let http = http.clone();
        async move {
            let resp = http.get(url).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    assert_eq!(get("/livez").await.0, 200);
    assert_eq!(get("/readyz").await.0, 200);
    let (status, text) = get("/metrics").await;
    assert_eq!(status, 200);
    let value = |needle: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("{needle} missing in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value(r#"clerk_auth_decisions_total{method="VerifyToken",outcome="allowed",reason="OK"}"#),
        2.0
    );
    assert_eq!(
        value(
            r#"clerk_auth_decisions_total{method="VerifyToken",outcome="unauthenticated",reason="TOKEN_INVALID"}"#
        ),
        1.0
    );
    assert_eq!(
        value(r#"clerk_auth_decisions_total{method="GetUser",outcome="allowed",reason="OK"}"#),
        2.0
    );
    // The second VerifyToken and the second GetUser's caller check (other accepted types,
    // another verdict) come from the verdict cache.
    assert_eq!(value("clerk_auth_verdict_cache_hits_total"), 2.0);
    assert_eq!(value("clerk_auth_full_verifications_total"), 2.0);
    assert_eq!(value("clerk_auth_jwks_fetches_total"), 1.0);
    assert_eq!(value("clerk_auth_identity_cache_hits_total"), 1.0);
    assert_eq!(value("clerk_auth_identity_cache_misses_total"), 1.0);
    assert!(value("clerk_auth_backend_api_requests_total") >= 1.0);
    assert!(value("clerk_auth_key_set_age_seconds") >= 0.0);
    assert_eq!(value("clerk_auth_keys_usable"), 1.0);
    assert!(
        text.contains("clerk_auth_decision_duration_seconds_bucket{le="),
        "{text}"
    );
}

/// `/metrics` of `r` as text, and the value of the first line starting with `needle`.
async fn metric(r: &Replica, needle: &str) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", r.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(needle))
        .unwrap_or_else(|| panic!("{needle} missing in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn at_a_small_capacity_no_new_revocation_is_lost_and_the_oldest_are_evicted() {
    let clerk = Emulator::start_local().await.unwrap();
    let setup = Setup {
        revocations: Some((Duration::from_secs(86_400), 10)),
        ..Setup::default()
    };
    let r = replica(&clerk, &setup).await;
    clerk.set_webhook(Some((&format!("http://{}/webhooks/clerk", r.http), SECRET)));
    let user = clerk.create_user(&UserSpec::default());
    let mut tokens = Vec::new();
    // 100 sign-outs (`session.ended`), one after the other, into a set of 10.
    for i in 0..100 {
        let session = clerk.create_session(&user);
        let token = user_token(&clerk, &user, &session);
        assert!(clerk.set_session_status(&session, "ended").await);
        assert_eq!(
            reason(&verify(&r, &token, false).await.unwrap_err()),
            "SESSION_REVOKED",
            "revocation {i} is honoured at once"
        );
        tokens.push(token);
    }
    // The newest ten are still refused; the 90 oldest were evicted, oldest first.
    for (i, t) in tokens.iter().enumerate() {
        let v = verify(&r, t, false).await;
        if i < 90 {
            v.unwrap_or_else(|e| panic!("revocation {i} should have been evicted: {e:?}"));
        } else {
            assert_eq!(reason(&v.unwrap_err()), "SESSION_REVOKED", "{i}");
        }
    }
    assert_eq!(
        metric(&r, "clerk_auth_revocations_evicted_total").await,
        90.0
    );
    assert_eq!(metric(&r, "clerk_auth_revocations ").await, 10.0);
    assert_eq!(
        metric(&r, "clerk_auth_revocations_refused_total").await,
        0.0
    );

    // A webhook naming something that cannot be a session id is refused and counted.
    assert_eq!(
        clerk
            .send_webhook("session.ended", serde_json::json!({"id": "sess_../../x"}))
            .await,
        Some(200)
    );
    assert_eq!(
        metric(&r, "clerk_auth_revocations_refused_total").await,
        1.0
    );
    assert_eq!(metric(&r, "clerk_auth_revocations ").await, 10.0);
}

#[tokio::test]
async fn a_revocation_expires_after_its_ttl() {
    let clerk = Emulator::start_local().await.unwrap();
    let setup = Setup {
        revocations: Some((Duration::from_secs(1), 10)),
        ..Setup::default()
    };
    let r = replica(&clerk, &setup).await;
    clerk.set_webhook(Some((&format!("http://{}/webhooks/clerk", r.http), SECRET)));
    let user = clerk.create_user(&UserSpec::default());
    let session = clerk.create_session(&user);
    let token = user_token(&clerk, &user, &session);
    assert!(clerk.set_session_status(&session, "revoked").await);
    assert_eq!(
        reason(&verify(&r, &token, false).await.unwrap_err()),
        "SESSION_REVOKED"
    );
    // Past the TTL no token of the session can still be valid (here one is, to show the
    // entry is gone): accepted again. Polled with a deadline; the sweep then drops it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while verify(&r, &token, false).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revocation never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while metric(&r, "clerk_auth_revocations ").await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweep never purged the revocation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&r, "clerk_auth_revocations_evicted_total").await,
        0.0
    );
}

#[tokio::test]
async fn a_hostile_subject_never_reaches_a_backend_api_url() {
    let clerk = Emulator::start_local().await.unwrap();
    // API keys let in as callers, so that the key is verified and its subject judged.
    let r = replica(
        &clerk,
        &Setup {
            access: AccessConfig {
                caller_types: vec![TokenType::ApiKey],
                ..AccessConfig::default()
            },
            ..Setup::default()
        },
    )
    .await;
    let victim = clerk.create_user(&UserSpec::default());
    let session = clerk.create_session(&victim);
    // An API key whose subject climbs from /v1/users/… to the victim's session.
    let key = clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::ApiKey,
        subject: Some(format!("user_x/../../sessions/{session}")),
        ..MachineTokenSpec::default()
    });
    let before = clerk.bapi_requests();
    let status = r
        .client
        .clone()
        .who_am_i(with_token(WhoAmIRequest {}, &key))
        .await
        .unwrap_err();
    // Not a user id: the key speaks for nobody.
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(&status), "CALLER_NOT_ALLOWED");
    assert_eq!(
        clerk.bapi_requests(),
        before + 1,
        "only the key's own verification reached Clerk; no user or session was fetched"
    );
}

#[tokio::test]
async fn the_emulator_lists_a_users_sessions_as_clerk_does() {
    let clerk = Emulator::start_local().await.unwrap();
    let url = clerk.url();
    let http = reqwest::Client::new();
    let new_session = |user: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let s: serde_json::Value = http
                .post(format!("{url}/emulator/sessions"))
                .json(&serde_json::json!({ "user_id": user }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            s["id"].as_str().unwrap().to_owned()
        }
    };
    let mine = [
        new_session("user_lister").await,
        new_session("user_lister").await,
        new_session("user_lister").await,
    ];
    let other = new_session("user_other").await;
    let revoked = http
        .post(format!("{url}/v1/sessions/{}/revoke", mine[1]))
        .bearer_auth(clerk.secret_key())
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let list = |query: &str| {
        let http = http.clone();
        let (url, key) = (url.clone(), clerk.secret_key().to_owned());
        let query = query.to_owned();
        async move {
            let resp = http
                .get(format!("{url}/v1/sessions?{query}"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        let items = v.get("data").unwrap_or(v).as_array().unwrap().clone();
        items
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };

    // Paginated (as Clerk's SDK asks): the user's own sessions only, with the total.
    let (status, all) = list("user_id=user_lister&paginated=true").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["total_count"], 3);
    let mut got = ids(&all);
    got.sort();
    let mut want = mine.to_vec();
    want.sort();
    assert_eq!(got, want);
    assert!(!got.contains(&other));
    // Without `paginated`, a bare array of the same sessions.
    let (_, bare) = list("user_id=user_lister").await;
    assert!(bare.is_array());
    assert_eq!(ids(&bare), ids(&all));
    // The status filter.
    let (_, active) = list("user_id=user_lister&status=active&paginated=true").await;
    assert_eq!(active["total_count"], 2);
    assert!(!ids(&active).contains(&mine[1]));
    let (_, gone) = list("user_id=user_lister&status=revoked&paginated=true").await;
    assert_eq!(ids(&gone), [mine[1].clone()]);
    // Pages: never overlapping, together the whole list, the total on each.
    let (_, first) = list("user_id=user_lister&limit=2&paginated=true").await;
    let (_, second) = list("user_id=user_lister&limit=2&offset=2&paginated=true").await;
    assert_eq!(first["total_count"], 3);
    assert_eq!(second["total_count"], 3);
    let paged: Vec<String> = ids(&first).into_iter().chain(ids(&second)).collect();
    assert_eq!(paged, ids(&all));
    let (_, past) = list("user_id=user_lister&offset=9&paginated=true").await;
    assert_eq!(ids(&past), Vec::<String>::new());
    // An unknown user has no sessions.
    let (status, none) = list("user_id=user_nobody&paginated=true").await;
    assert_eq!((status, none["total_count"].as_u64()), (200, Some(0)));

    // Refused with Clerk's 422 shape: no subject, or a value outside its range.
    for (query, param) in [
        ("paginated=true", "form_param_missing"),
        (
            "user_id=user_lister&status=bogus",
            "form_param_value_invalid",
        ),
        (
            "user_id=user_lister&status=ACTIVE",
            "form_param_value_invalid",
        ),
        ("user_id=user_lister&limit=0", "form_param_value_invalid"),
        ("user_id=user_lister&limit=501", "form_param_value_invalid"),
        ("user_id=user_lister&limit=-1", "form_param_value_invalid"),
        ("user_id=user_lister&limit=1.5", "form_param_value_invalid"),
        (
            "user_id=user_lister&limit=99999999999999999999",
            "form_param_value_invalid",
        ),
        (
            "user_id=user_lister&offset=%2B1",
            "form_param_value_invalid",
        ),
        (
            "user_id=user_lister&paginated=yes",
            "form_param_value_invalid",
        ),
    ] {
        let (status, body) = list(query).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["errors"][0]["code"], param, "{query}");
    }
    // Without the secret key: Clerk's 401, nothing listed.
    let resp = http
        .get(format!("{url}/v1/sessions?user_id=user_lister"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Every call counted under its route: eight lists, ten refusals, one without the key.
    assert_eq!(clerk.requests("GET /v1/sessions"), 8 + 10 + 1);
}

async fn list_sessions(
    r: &Replica,
    token: &str,
    user: &str,
    status: &str,
    page_size: i32,
    page_token: &str,
) -> Result<clerk_grpc_auth::pb::ListSessionsResponse, Status> {
    r.client
        .clone()
        .list_sessions(with_token(
            ListSessionsRequest {
                user_id: user.into(),
                status: status.into(),
                page_size,
                page_token: page_token.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn revoke(
    r: &Replica,
    token: &str,
    session: &str,
) -> Result<clerk_grpc_auth::pb::Session, Status> {
    r.client
        .clone()
        .revoke_session(with_token(
            RevokeSessionRequest {
                session_id: session.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

/// The "signed-in devices" screen: a user lists its sessions, is refused signing out another
/// device until its token shows a fresh second factor, then does, and that session's tokens
/// are refused at once by this replica, a second one (through Redis) and a layer following
/// WatchRevocations; signing itself out needs no factor.
#[tokio::test]
async fn a_user_lists_its_sessions_and_signs_out_other_devices() {
    use clerk_grpc_auth::layer::watch_revocations_with;
    let clerk = Emulator::start_local().await.unwrap();
    let follower = clerk.create_machine("follower");
    let prefix = format!("clerk-auth-test-{}", rand::random::<u64>());
    let setup = Setup {
        allowlist: vec![follower.id.clone()],
        redis_prefix: Some(prefix.clone()),
        ..Setup::default()
    };
    let one = replica(&clerk, &setup).await;
    let two = replica(&clerk, &setup).await;
    let alice = clerk.create_user(&UserSpec::default());
    let bob = clerk.create_user(&UserSpec::default());
    let laptop = clerk.create_session(&alice);
    let phone = clerk.create_session(&alice);
    let tablet = clerk.create_session(&alice);
    let bobs = clerk.create_session(&bob);
    let token = |session: &str, fva: Option<[i64; 2]>| {
        clerk.mint(&TokenSpec {
            user_id: Some(alice.clone()),
            session_id: Some(session.into()),
            expires_in: Some(600),
            fva,
            ..TokenSpec::default()
        })
    };
    let on_laptop = token(&laptop, None);
    let on_phone = token(&phone, None);

    // The list: newest first, the asking session marked, paged with our tokens.
    let before = clerk.bapi_requests();
    let all = list_sessions(&one, &on_laptop, &alice, "", 0, "")
        .await
        .unwrap();
    let ids: Vec<&str> = all.sessions.iter().map(|s| s.id.as_str()).collect();
    let mut expected = vec![laptop.as_str(), phone.as_str(), tablet.as_str()];
    expected.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "alice's three sessions, not bob's");
    assert_eq!(all.total_count, 3);
    assert_eq!(all.next_page_token, "");
    let current: Vec<&str> = all
        .sessions
        .iter()
        .filter(|s| s.is_current)
        .map(|s| s.id.as_str())
        .collect();
    assert_eq!(current, [laptop.as_str()]);
    let activity = all.sessions[0].latest_activity.as_ref().expect("device");
    assert_eq!(activity.browser_name, "Chrome");
    // Ten identical queries cost Clerk one request.
    for _ in 0..9 {
        list_sessions(&one, &on_laptop, &alice, "", 0, "")
            .await
            .unwrap();
    }
    assert_eq!(clerk.bapi_requests(), before + 1);
    let first = list_sessions(&one, &on_laptop, &alice, "", 2, "")
        .await
        .unwrap();
    assert_eq!(first.sessions.len(), 2);
    assert_eq!(first.next_page_token, "o2");
    let second = list_sessions(&one, &on_laptop, &alice, "", 2, &first.next_page_token)
        .await
        .unwrap();
    assert_eq!(second.sessions.len(), 1);
    assert_eq!(second.next_page_token, "");
    let paged: Vec<&str> = first
        .sessions
        .iter()
        .chain(&second.sessions)
        .map(|s| s.id.as_str())
        .collect();
    assert_eq!(paged, ids, "pages follow the one order");
    // Hostile shapes are refused before anything is asked.
    let before = clerk.bapi_requests();
    for (status, size, page) in [
        ("bogus", 0, ""),
        ("Active", 0, ""),
        ("active&user_id=user_x", 0, ""),
        ("", 101, ""),
        ("", -1, ""),
        ("", 0, "o+2"),
        ("", 0, "o02"),
        ("", 0, "o 2"),
        ("", 0, "2"),
        ("", 0, "o99999999999999999999"),
        ("", 0, "o10001"),
    ] {
        let e = list_sessions(&one, &on_laptop, &alice, status, size, page)
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{status:?} {size} {page:?}"
        );
    }
    for user in ["user_x/../../users", "USER_1", "", "sess_1"] {
        let e = list_sessions(&one, &on_laptop, user, "", 0, "")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{user:?}");
    }
    assert_eq!(
        clerk.bapi_requests(),
        before,
        "no request for a refused query"
    );
    let e = list_sessions(&one, &on_laptop, &bob, "", 0, "")
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "CALLER_NOT_ALLOWED");

    // Another device: refused without a fresh second factor, with Clerk's hint …
    for fva in [None, Some([1, 30]), Some([1, 10])] {
        let e = revoke(&one, &token(&laptop, fva), &phone)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{fva:?}");
        let info = e.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "REVERIFICATION_REQUIRED");
        assert_eq!(info.metadata["level"], "second_factor");
        assert_eq!(info.metadata["after_minutes"], "10");
    }
    // … and nobody else's session, however fresh the factor.
    let fresh = token(&laptop, Some([30, 2]));
    assert_eq!(
        reason(&revoke(&one, &fresh, &bobs).await.unwrap_err()),
        "CALLER_NOT_ALLOWED"
    );
    verify(&one, &on_phone, false).await.unwrap();
    verify(&two, &on_phone, false).await.unwrap();

    // A layer following the revocation feed.
    let credentials = Static(clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        subject: Some(follower.id.clone()),
        ..MachineTokenSpec::default()
    }));
    let server = AuthServer::build(common::config_for(&clerk)).unwrap();
    let layer = server.verifier().clone();
    let _refresher = layer.keys().spawn_refresher();
    layer.keys().ready().await;
    let channel = Channel::from_shared(format!("http://{}", one.grpc))
        .unwrap()
        .connect_lazy();
    let feed = watch_revocations_with(channel, layer.revocations().clone(), credentials);
    feed.connected().await;
    let phone_req = clerk_grpc_auth::VerifyRequest {
        token: &on_phone,
        ..Default::default()
    };
    layer.verify(&phone_req).await.unwrap();

    // With the factor fresh: revoked, and refused at once everywhere.
    let applied = two.events.applied();
    let revoked = revoke(&one, &fresh, &phone).await.unwrap();
    assert_eq!(revoked.status, "revoked");
    assert_eq!(
        reason(&verify(&one, &on_phone, false).await.unwrap_err()),
        "SESSION_REVOKED"
    );
    feed.wait_received(1).await;
    assert_eq!(
        layer.verify(&phone_req).await.unwrap_err().reason_str(),
        "SESSION_REVOKED"
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        two.events.wait_applied(applied + 1),
    )
    .await
    .expect("replica two received the revocation");
    assert_eq!(
        reason(&verify(&two, &on_phone, false).await.unwrap_err()),
        "SESSION_REVOKED"
    );
    // The cached list shows it at once (the revocation dropped it).
    let active = list_sessions(&one, &on_laptop, &alice, "active", 0, "")
        .await
        .unwrap();
    let mut left: Vec<&str> = active.sessions.iter().map(|s| s.id.as_str()).collect();
    left.sort();
    let mut want = vec![laptop.as_str(), tablet.as_str()];
    want.sort();
    assert_eq!(left, want);

    // Signing out needs no factor; the token is refused then.
    revoke(&one, &on_laptop, &laptop).await.unwrap();
    assert_eq!(
        reason(&verify(&one, &on_laptop, false).await.unwrap_err()),
        "SESSION_REVOKED"
    );

    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for s in [&phone, &laptop] {
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}:revoked:{s}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

async fn members(
    r: &Replica,
    token: &str,
    org: &str,
    roles: &[&str],
    page_size: i32,
    page_token: &str,
) -> Result<clerk_grpc_auth::pb::ListOrganizationMembersResponse, Status> {
    r.client
        .clone()
        .list_organization_members(with_token(
            ListOrganizationMembersRequest {
                organization_id: org.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                page_size,
                page_token: page_token.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn organization(
    r: &Replica,
    token: &str,
    org: &str,
) -> Result<clerk_grpc_auth::pb::OrganizationProfile, Status> {
    r.client
        .clone()
        .get_organization(with_token(
            GetOrganizationRequest {
                organization_id: org.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

/// A session token whose active organization is `org` with `role` (permissions: the custom
/// ones, as Clerk puts them in tokens — never the system ones).
fn org_token(clerk: &Emulator, user: &str, org: &str, role: &str, permissions: &[&str]) -> String {
    let session = clerk.create_session(user);
    clerk.mint(&TokenSpec {
        user_id: Some(user.into()),
        session_id: Some(session),
        org: Some(OrgSpec {
            id: Some(org.into()),
            slug: None,
            role: Some(role.into()),
            permissions: permissions.iter().map(|p| p.to_string()).collect(),
        }),
        expires_in: Some(600),
        ..TokenSpec::default()
    })
}

/// Organizations for tenants: who may read an organization's profile and members (the
/// matrix), what it costs Clerk, hostile request shapes, and webhooks changing what is
/// answered at once.
#[tokio::test]
async fn an_organization_admin_lists_its_members_and_others_are_refused() {
    const ACME: &str = "org_2acmeACMEacmeACMEacmeACME";
    const GLOBEX: &str = "org_2globexGLOBEXglobexGLOBEX";
    let clerk = Emulator::start_local().await.unwrap();
    let trusted = clerk.create_machine("trusted");
    let stranger = clerk.create_machine("stranger");
    let replayer = clerk.create_machine("machine-a");
    let service_b = clerk.create_machine("service-b");
    assert!(clerk.allow(&replayer.id, &service_b.id));
    let r = replica(
        &clerk,
        &Setup {
            allowlist: vec![trusted.id.clone()],
            access: AccessConfig {
                allowlist: vec![replayer.id.clone()],
                // Let OAuth tokens and API keys in, so that they are verified and refused
                // by the organization rule itself.
                caller_types: vec![TokenType::OauthToken, TokenType::ApiKey],
                oauth_scopes: parse_oauth_scopes("WhoAmI=profile").unwrap(),
                ..AccessConfig::default()
            },
            ..Setup::default()
        },
    )
    .await;
    clerk.set_webhook(Some((&format!("http://{}/webhooks/clerk", r.http), SECRET)));
    let person = |first: &str| {
        clerk.create_user(&UserSpec {
            first_name: Some(first.into()),
            email: Some(format!("{}@example.com", first.to_lowercase())),
            ..UserSpec::default()
        })
    };
    let (ada, max, gus, eve) = (person("Ada"), person("Max"), person("Gus"), person("Eve"));
    let join = |user: &str, org: &str, role: &str, permissions: &[&str]| MembershipSpec {
        user_id: user.into(),
        org_id: org.into(),
        org_name: Some(if org == ACME { "Acme" } else { "Globex" }.into()),
        org_slug: Some(if org == ACME { "acme" } else { "globex" }.into()),
        role: Some(role.into()),
        permissions: permissions.iter().map(|p| p.to_string()).collect(),
    };
    clerk.add_membership(&join(&ada, ACME, "admin", &[])).await;
    clerk.add_membership(&join(&max, ACME, "member", &[])).await;
    // A custom role without Clerk's system permission to read members.
    clerk
        .add_membership(&join(&gus, ACME, "viewer", &["org:reports:read"]))
        .await;
    clerk
        .add_membership(&join(&eve, GLOBEX, "admin", &[]))
        .await;

    let admin = org_token(&clerk, &ada, ACME, "org:admin", &[]);
    let member = org_token(&clerk, &max, ACME, "org:member", &[]);
    let viewer = org_token(&clerk, &gus, ACME, "org:viewer", &["org:reports:read"]);
    // A token claiming the system permission (Clerk never issues one): not believed.
    let claims_sys = org_token(
        &clerk,
        &gus,
        ACME,
        "org:viewer",
        &["org:sys_memberships:read"],
    );
    let other_admin = org_token(&clerk, &eve, GLOBEX, "org:admin", &[]);
    // Ada, with no organization active.
    let no_org = user_token(&clerk, &ada, &clerk.create_session(&ada));
    let pending = clerk.mint(&TokenSpec {
        user_id: Some(ada.clone()),
        session_id: Some(clerk.create_session(&ada)),
        session_status: Some("pending".into()),
        org: Some(OrgSpec {
            id: Some(ACME.into()),
            role: Some("org:admin".into()),
            ..OrgSpec::default()
        }),
        expires_in: Some(600),
        ..TokenSpec::default()
    });
    let m2m = |m: &str| {
        clerk.mint_machine(&MachineTokenSpec {
            kind: MachineTokenKind::M2m,
            subject: Some(m.into()),
            ..MachineTokenSpec::default()
        })
    };
    let (trusted_token, stranger_token, replayed) =
        (m2m(&trusted.id), m2m(&stranger.id), m2m(&replayer.id));
    let key = |owner: &str| {
        clerk.mint_machine(&MachineTokenSpec {
            kind: MachineTokenKind::ApiKey,
            subject: Some(owner.into()),
            ..MachineTokenSpec::default()
        })
    };
    let (ada_key, acme_key) = (key(&ada), key(ACME));
    let ada_oauth = clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::Oauth,
        subject: Some(ada.clone()),
        scopes: vec!["profile".into()],
        ..MachineTokenSpec::default()
    });

    use Code::{PermissionDenied as Denied, Unauthenticated as Unauth};
    for rpc in ["GetOrganization", "ListOrganizationMembers"] {
        let cases: Vec<(&str, &str, &str, &str, Want)> = vec![
            ("admin, its active org", rpc, &admin, ACME, OK),
            (
                "member (Clerk's org:member reads members)",
                rpc,
                &member,
                ACME,
                OK,
            ),
            (
                "member without org:sys_memberships:read",
                rpc,
                &viewer,
                ACME,
                no(Denied, "ORG_PERMISSION_REQUIRED"),
            ),
            (
                "a token claiming the system permission",
                rpc,
                &claims_sys,
                ACME,
                no(Denied, "ORG_PERMISSION_REQUIRED"),
            ),
            (
                "admin of another organization",
                rpc,
                &other_admin,
                ACME,
                no(Denied, "CALLER_NOT_ALLOWED"),
            ),
            (
                "admin, an organization not active in its token",
                rpc,
                &admin,
                GLOBEX,
                no(Denied, "CALLER_NOT_ALLOWED"),
            ),
            (
                "admin, a made-up organization",
                rpc,
                &admin,
                "org_doesNotExist",
                no(Denied, "CALLER_NOT_ALLOWED"),
            ),
            (
                "no organization active",
                rpc,
                &no_org,
                ACME,
                no(Denied, "CALLER_NOT_ALLOWED"),
            ),
            (
                "pending session",
                rpc,
                &pending,
                ACME,
                no(Unauth, "SESSION_PENDING"),
            ),
            ("trusted machine", rpc, &trusted_token, ACME, OK),
            (
                "machine not allowlisted",
                rpc,
                &stranger_token,
                ACME,
                no(Denied, "CALLER_NOT_ALLOWED"),
            ),
            (
                "B replays A's token",
                rpc,
                &replayed,
                ACME,
                no(Denied, "MACHINE_NOT_ALLOWED"),
            ),
            (
                "user-owned API key",
                rpc,
                &ada_key,
                ACME,
                no(Denied, "CALLER_NOT_ALLOWED"),
            ),
            (
                "the organization's own API key",
                rpc,
                &acme_key,
                ACME,
                no(Denied, "CALLER_NOT_ALLOWED"),
            ),
            (
                "OAuth token",
                rpc,
                &ada_oauth,
                ACME,
                no(Denied, "CALLER_NOT_ALLOWED"),
            ),
            ("no token", rpc, "", ACME, no(Unauth, "TOKEN_MISSING")),
            (
                "garbage token",
                rpc,
                "nope",
                ACME,
                no(Unauth, "TOKEN_INVALID"),
            ),
            (
                "trusted machine, a made-up organization",
                rpc,
                &trusted_token,
                "org_doesNotExist",
                no(Code::NotFound, "RESOURCE_NOT_FOUND"),
            ),
        ];
        check_cases(&r, &cases).await;
    }
    // What the refusal names: the permission the policy asks.
    let refused = members(&r, &viewer, ACME, &[], 0, "").await.unwrap_err();
    let info = refused.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata.get("permission").map(String::as_str),
        Some("org:sys_memberships:read")
    );

    // The admin's view: the profile with its member count, the members newest first, paged,
    // with what the organization may see of each.
    let org = organization(&r, &admin, ACME).await.unwrap();
    assert_eq!(
        (org.id.as_str(), org.name.as_str(), org.slug.as_str()),
        (ACME, "Acme", "acme")
    );
    assert_eq!(org.members_count, 3);
    let first = members(&r, &admin, ACME, &[], 2, "").await.unwrap();
    assert_eq!(first.total_count, 3);
    assert_eq!(first.next_page_token, "o2");
    let rest = members(&r, &admin, ACME, &[], 2, "o2").await.unwrap();
    assert!(rest.next_page_token.is_empty());
    let everyone: Vec<_> = first.members.iter().chain(&rest.members).collect();
    let mut ids: Vec<&str> = everyone
        .iter()
        .map(|m| m.user.as_ref().unwrap().user_id.as_str())
        .collect();
    // Newest first (Clerk's order); the pages neither overlap nor leave anyone out.
    let created: Vec<i64> = everyone
        .iter()
        .map(|m| m.created_at.as_ref().unwrap().seconds)
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "{created:?}");
    ids.sort();
    let mut want = [gus.as_str(), max.as_str(), ada.as_str()];
    want.sort();
    assert_eq!(ids, want);
    let ada_row = *everyone
        .iter()
        .find(|m| m.user.as_ref().unwrap().user_id == ada)
        .unwrap();
    let ada_user = ada_row.user.as_ref().unwrap();
    assert_eq!(
        (
            ada_row.role.as_str(),
            ada_user.first_name.as_str(),
            ada_user.identifier.as_str()
        ),
        ("org:admin", "Ada", "ada@example.com")
    );
    assert!(ada_row
        .permissions
        .contains(&"org:sys_memberships:manage".to_owned()));
    // A role filter, in any order, is one query.
    let admins = members(&r, &admin, ACME, &["org:admin"], 0, "")
        .await
        .unwrap();
    assert_eq!(admins.total_count, 1);
    let two_roles = members(&r, &admin, ACME, &["org:viewer", "org:admin"], 0, "")
        .await
        .unwrap();
    assert_eq!(two_roles.total_count, 2);
    let before = clerk.bapi_requests();
    let same = members(&r, &admin, ACME, &["org:admin", "org:viewer"], 0, "")
        .await
        .unwrap();
    assert_eq!(same.members.len(), 2);
    assert_eq!(
        clerk.bapi_requests(),
        before,
        "the same filter, another order: cached"
    );

    // Ten identical queries cost Clerk one request, each kind.
    let stats_url = format!("{}/emulator/stats/reset", clerk.url());
    reqwest::Client::new()
        .post(&stats_url)
        .send()
        .await
        .unwrap();
    let fresh = org_token(&clerk, &eve, GLOBEX, "org:admin", &[]);
    for _ in 0..10 {
        organization(&r, &fresh, GLOBEX).await.unwrap();
        members(&r, &fresh, GLOBEX, &[], 10, "").await.unwrap();
    }
    let stats = emulator_stats(&clerk).await;
    let requests = &stats["requests"];
    assert_eq!(
        requests["GET /v1/organizations/{organization_id}"], 1,
        "{stats}"
    );
    assert_eq!(
        requests["GET /v1/organizations/{organization_id}/memberships"], 1,
        "{stats}"
    );
    // Eve's memberships (for the system permission): once too.
    assert_eq!(
        requests["GET /v1/users/{user_id}/organization_memberships"], 1,
        "{stats}"
    );

    // Hostile shapes: refused before any Backend API request or authorization.
    let before = clerk.bapi_requests();
    let bad_orgs = [
        "",
        "org_",
        "acme",
        "org_x/../../users/user_1",
        "org_x%2F..",
        "org_x?limit=1",
        "org_x y",
        "ORG_x",
        "user_2acme",
    ];
    for org in bad_orgs {
        for rpc in ["GetOrganization", "ListOrganizationMembers"] {
            let got = ask(&r, rpc, &admin, org).await;
            assert_eq!(
                got,
                Err((Code::InvalidArgument, "INVALID_REQUEST".into())),
                "{rpc} {org:?}"
            );
        }
    }
    let eleven: Vec<String> = (1..=11).map(|n| format!("org:r{n}")).collect();
    let eleven: Vec<&str> = eleven.iter().map(String::as_str).collect();
    let bad_roles: [&[&str]; 9] = [
        &["admin"],
        &["org:Admin"],
        &["ORG:admin"],
        &["org:admin&role=org:member"],
        &["org:admin", "org:admin"],
        &["org:ad min"],
        &["org:"],
        &["org:a:b"],
        &eleven,
    ];
    for roles in bad_roles {
        let got = members(&r, &admin, ACME, roles, 0, "").await.unwrap_err();
        assert_eq!(got.code(), Code::InvalidArgument, "{roles:?}");
    }
    for (size, page_token) in [
        (101, ""),
        (-1, ""),
        (0, "o-1"),
        (0, "o05"),
        (0, "o+5"),
        (0, "5"),
        (0, "o100001"),
        (0, "o9999999999"),
    ] {
        let got = members(&r, &admin, ACME, &[], size, page_token)
            .await
            .unwrap_err();
        assert_eq!(got.code(), Code::InvalidArgument, "{size} {page_token:?}");
    }
    assert_eq!(
        clerk.bapi_requests(),
        before,
        "hostile shapes cost Clerk nothing"
    );

    // Webhooks change what is answered at once: a rename, a demotion, a removal.
    assert!(
        clerk
            .update_organization(
                ACME,
                &OrganizationPatch {
                    name: Some("Acme Corp".into()),
                    ..OrganizationPatch::default()
                },
            )
            .await
    );
    assert_eq!(
        organization(&r, &admin, ACME).await.unwrap().name,
        "Acme Corp"
    );
    // Max becomes a viewer: Clerk takes the system permission away, so the same token is
    // refused at once, and the admin sees the new role.
    assert!(
        clerk
            .update_member(
                ACME,
                &max,
                &MemberPatch {
                    role: Some("viewer".into()),
                    ..MemberPatch::default()
                },
            )
            .await
    );
    let got = members(&r, &member, ACME, &[], 0, "").await.unwrap_err();
    assert_eq!(reason(&got), "ORG_PERMISSION_REQUIRED");
    let viewers = members(&r, &admin, ACME, &["org:viewer"], 0, "")
        .await
        .unwrap();
    assert_eq!(viewers.total_count, 2);
    // Gus leaves: gone from the list and from the count; his token is refused like a
    // stranger's.
    assert!(clerk.remove_member(ACME, &gus).await);
    let left = members(&r, &admin, ACME, &[], 0, "").await.unwrap();
    assert_eq!(left.total_count, 2);
    assert!(left
        .members
        .iter()
        .all(|m| m.user.as_ref().unwrap().user_id != gus));
    assert_eq!(
        organization(&r, &admin, ACME).await.unwrap().members_count,
        2
    );
    let got = members(&r, &claims_sys, ACME, &[], 0, "")
        .await
        .unwrap_err();
    assert_eq!(reason(&got), "CALLER_NOT_ALLOWED");

    // Ada renames herself: the roster shows it at once (user.updated drops the member pages
    // of the organizations in her cached memberships).
    let roster = members(&r, &admin, ACME, &["org:admin"], 0, "")
        .await
        .unwrap();
    assert_eq!(roster.members[0].user.as_ref().unwrap().first_name, "Ada");
    assert!(clerk.rename_user(&ada, "Augusta").await);
    let roster = members(&r, &admin, ACME, &["org:admin"], 0, "")
        .await
        .unwrap();
    assert_eq!(
        roster.members[0].user.as_ref().unwrap().first_name,
        "Augusta"
    );

    // A roster dropped by a webhook is never served again, not even stale while Clerk
    // fails: Max leaves, then Clerk goes down.
    assert!(clerk.remove_member(ACME, &max).await);
    clerk.set_bapi_failure(Some((503, None)));
    let got = members(&r, &admin, ACME, &[], 0, "").await.unwrap_err();
    assert_eq!(got.code(), Code::Unavailable, "{got:?}");
    let got = organization(&r, &admin, ACME).await.unwrap_err();
    assert_eq!(got.code(), Code::Unavailable, "{got:?}");
    clerk.set_bapi_failure(None);
    let left = members(&r, &admin, ACME, &[], 0, "").await.unwrap();
    assert_eq!(left.total_count, 1);
}

/// The emulator's organization endpoints over HTTP, as Clerk's SDK calls them: by id or slug,
/// `include_members_count`, members newest first with `role` repeated, Clerk's 422 for a
/// value out of range, 404 and 401; and the roles' system permissions.
#[tokio::test]
async fn the_emulator_serves_organizations_as_clerk_does() {
    let clerk = Emulator::start_local().await.unwrap();
    let (url, key) = (clerk.url().to_owned(), clerk.secret_key().to_owned());
    let http = reqwest::Client::new();
    let org = "org_2emuEMUemuEMUemuEMUemuEMU";
    let users: Vec<String> = ["admin", "member", "viewer"]
        .iter()
        .map(|_| clerk.create_user(&UserSpec::default()))
        .collect();
    for (user, role) in users.iter().zip(["admin", "member", "viewer"]) {
        clerk
            .add_membership(&MembershipSpec {
                user_id: user.clone(),
                org_id: org.into(),
                org_slug: Some("emu".into()),
                role: Some(role.into()),
                ..MembershipSpec::default()
            })
            .await;
    }
    let get = |path: String, auth: bool| {
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        async move {
            let mut req = http.get(format!("{url}{path}"));
            if auth {
                req = req.bearer_auth(key);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, o) = get(
        format!("/v1/organizations/{org}?include_members_count=true"),
        true,
    )
    .await;
    assert_eq!((status, o["members_count"].as_u64()), (200, Some(3)));
    let (status, o) = get("/v1/organizations/emu".into(), true).await;
    assert_eq!((status, o["id"].as_str()), (200, Some(org)));
    assert!(o.get("members_count").is_none(), "only when asked");
    let path = format!("/v1/organizations/{org}/memberships?role=org:admin&role=org:viewer");
    let (status, page) = get(path, true).await;
    assert_eq!((status, page["total_count"].as_u64()), (200, Some(2)));
    let perms = |role: &str| {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["role"] == role)
            .map(|m| m["permissions"].clone())
    };
    assert!(perms("org:admin")
        .unwrap()
        .as_array()
        .unwrap()
        .contains(&"org:sys_memberships:read".into()));
    assert_eq!(perms("org:viewer"), Some(serde_json::json!([])));
    for bad in [
        "limit=0",
        "limit=501",
        "limit=-1",
        "limit=1.5",
        "offset=x",
        "limit=+5",
    ] {
        let (status, e) = get(format!("/v1/organizations/{org}/memberships?{bad}"), true).await;
        assert_eq!(status, 422, "{bad}");
        assert_eq!(e["errors"][0]["code"], "form_param_value_invalid", "{bad}");
        let (status, _) = get(
            format!("/v1/users/{}/organization_memberships?{bad}", users[0]),
            true,
        )
        .await;
        assert_eq!(status, 422, "{bad}");
    }
    let (status, _) = get("/v1/organizations/org_missing/memberships".into(), true).await;
    assert_eq!(status, 404);
    let (status, _) = get(format!("/v1/organizations/{org}"), false).await;
    assert_eq!(status, 401);
}
