//! The auth layer on a real tonic server (the examples' Orders service on 127.0.0.1:0), against
//! the emulator over real HTTP and, in delegated mode, a real AuthService over real gRPC.

mod common;
#[path = "../examples/common/orders.rs"]
mod orders;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clerk_grpc_auth::{
    authz::policy::{Policy, Rule},
    credentials::{BearerToken, CredentialsLayer, TokenSource},
    emulator::{MachineTokenKind, MachineTokenSpec, OrgSpec, TokenSpec, UserSpec},
    layer::forward_token,
    layer::{
        AuthInterceptor, AuthLayer, CallerCredentials, DelegatedConfig, DelegatedVerifier,
        TokenSources,
    },
    server::AuthServer,
    TokenVerifier,
};
use common::{config_for, reason, Harness};
use orders::pb::{
    orders_client::OrdersClient, orders_server::OrdersServer, DeleteOrderRequest,
    ListOrdersRequest, PingRequest, WatchOrdersRequest,
};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{metadata::MetadataValue, transport::Channel, Code, Request, Status};
use tonic_types::StatusExt;

/// The test policy: the examples' rules written as TOML, plus a role requirement on
/// `WatchOrders` (so the table can exercise roles).
const POLICY: &str = r#"
[default]
access = "authenticated"

[methods."/examples.orders.v1.Orders/Ping"]
access = "public"

[methods."/examples.orders.v1.Orders/DeleteOrder"]
require = [{ permission = "org:orders:delete" }]

[methods."/examples.orders.v1.Orders/WatchOrders"]
require = [{ role = "admin" }]
"#;

const CUSTOM_KEY: &str = "x-clerk-token";
const USER: &str = "user_2layerTEST";
const ORG: &str = "org_2layerTEST";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    InProcess,
    Delegated,
}

/// An Orders server behind the layer, on 127.0.0.1:0.
struct Orders {
    addr: SocketAddr,
    client: OrdersClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
}

impl Orders {
    async fn start(layer: AuthLayer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(orders::serve(listener, layer, async move {
            let _ = rx.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            addr,
            client: OrdersClient::new(channel),
            stop: Some(tx),
        }
    }
}

impl Drop for Orders {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// An in-process verifier of its own (key store loaded from the emulator).
async fn local_verifier(
    h: &Harness,
) -> (TokenVerifier, clerk_grpc_auth::verify::jwks::RefresherGuard) {
    let server = AuthServer::build(config_for(&h.clerk)).unwrap();
    let verifier = server.verifier().clone();
    let guard = verifier.keys().spawn_refresher();
    verifier.keys().ready().await;
    (verifier, guard)
}

fn delegated(h: &Harness, adjust: impl FnOnce(&mut DelegatedConfig)) -> DelegatedVerifier {
    let mut config = DelegatedConfig {
        endpoints: vec![format!("http://{}", h.addr)],
        ..DelegatedConfig::default()
    };
    adjust(&mut config);
    DelegatedVerifier::new(config).unwrap()
}

fn sources() -> TokenSources {
    TokenSources::default()
        .with_metadata_key(CUSTOM_KEY)
        .unwrap()
}

fn policy() -> Policy {
    Policy::from_toml(POLICY, "tests/layer.rs").unwrap()
}

fn spec(role: &str, permissions: &[&str]) -> TokenSpec {
    TokenSpec {
        user_id: Some(USER.into()),
        org: Some(OrgSpec {
            id: Some(ORG.into()),
            slug: Some("layer".into()),
            role: Some(role.into()),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
        }),
        expires_in: Some(600),
        ..TokenSpec::default()
    }
}

#[derive(Clone, Copy)]
enum Cred<'a> {
    None,
    Bearer(&'a str),
    Cookie(&'a str),
    Custom(&'a str),
    RawAuthorization(&'a str),
}

fn with_cred<T>(msg: T, cred: Cred<'_>) -> Request<T> {
    let mut req = Request::new(msg);
    let md = req.metadata_mut();
    match cred {
        Cred::None => {}
        Cred::Bearer(t) => {
            md.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Cred::Cookie(t) => {
            md.insert(
                "cookie",
                format!("theme=dark; __session={t}; other=1; __client_uat=1")
                    .parse()
                    .unwrap(),
            );
        }
        Cred::Custom(t) => {
            md.insert(CUSTOM_KEY, t.parse().unwrap());
        }
        Cred::RawAuthorization(v) => {
            md.insert("authorization", MetadataValue::try_from(v).unwrap());
        }
    }
    req
}

#[derive(Clone, Copy, Debug)]
enum Call {
    Ping,
    List,
    Delete,
    Watch,
}

/// Calls `call`; on success returns the caller's (user_id, org_id) as the handler saw them.
async fn call(
    client: &OrdersClient<Channel>,
    call: Call,
    cred: Cred<'_>,
) -> Result<(String, String), Status> {
    let mut c = client.clone();
    let caller = match call {
        Call::Ping => {
            c.ping(with_cred(PingRequest {}, cred)).await?;
            return Ok((String::new(), String::new()));
        }
        Call::List => {
            c.list_orders(with_cred(ListOrdersRequest {}, cred))
                .await?
                .into_inner()
                .caller
        }
        Call::Delete => {
            c.delete_order(with_cred(
                DeleteOrderRequest {
                    order_id: "ord_1".into(),
                },
                cred,
            ))
            .await?
            .into_inner()
            .caller
        }
        Call::Watch => {
            let mut stream = c
                .watch_orders(with_cred(
                    WatchOrdersRequest {
                        interval_ms: 5,
                        ..Default::default()
                    },
                    cred,
                ))
                .await?
                .into_inner();
            stream.message().await?.expect("one event").caller
        }
    };
    let caller = caller.expect("caller");
    Ok((caller.user_id, caller.org_id))
}

enum Want {
    Caller,
    Public,
    Refused(Code, &'static str),
}

/// The same table against both modes.
async fn table(mode: Mode) {
    let h = Harness::start().await;
    let (local, _guard) = local_verifier(&h).await;
    let layer = match mode {
        Mode::InProcess => AuthLayer::in_process(local, policy()),
        Mode::Delegated => AuthLayer::delegated(delegated(&h, |_| {}), policy()),
    }
    .token_sources(sources());
    let svc = Orders::start(layer).await;

    let member = h.mint(&spec("member", &["org:orders:read"]));
    let deleter = h.mint(&spec("member", &[orders::DELETE_PERMISSION]));
    let admin = h.mint(&spec("admin", &[]));
    let expired = h.mint(&TokenSpec {
        expires_in: Some(-60),
        ..spec("member", &[])
    });
    let pending = h.mint(&TokenSpec {
        session_status: Some("pending".into()),
        ..spec("member", &[])
    });
    // One signature character changed (never the last, whose low bits may be padding).
    let sig_at = member.rfind('.').unwrap() + 10;
    let mut tampered = member.clone().into_bytes();
    tampered[sig_at] = if tampered[sig_at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();

    use Call::*;
    use Cred::*;
    let cases: Vec<(&str, Call, Cred<'_>, Want)> = vec![
        ("valid token", List, Bearer(&member), Want::Caller),
        (
            "valid token, v2 permission",
            Delete,
            Bearer(&deleter),
            Want::Caller,
        ),
        ("role check passes", Watch, Bearer(&admin), Want::Caller),
        (
            "expired",
            List,
            Bearer(&expired),
            Want::Refused(Code::Unauthenticated, "TOKEN_EXPIRED"),
        ),
        (
            "no token",
            List,
            None,
            Want::Refused(Code::Unauthenticated, "TOKEN_MISSING"),
        ),
        (
            "wrong permission",
            Delete,
            Bearer(&member),
            Want::Refused(Code::PermissionDenied, "ORG_PERMISSION_REQUIRED"),
        ),
        (
            "role check fails",
            Watch,
            Bearer(&member),
            Want::Refused(Code::PermissionDenied, "ORG_ROLE_REQUIRED"),
        ),
        (
            "pending session",
            List,
            Bearer(&pending),
            Want::Refused(Code::Unauthenticated, "SESSION_PENDING"),
        ),
        ("public method, no token", Ping, None, Want::Public),
        (
            "public method, garbage token not read",
            Ping,
            RawAuthorization("Basic Zm9vOmJhcg=="),
            Want::Public,
        ),
        ("cookie token", List, Cookie(&member), Want::Caller),
        ("custom metadata key", List, Custom(&member), Want::Caller),
        (
            "malformed authorization header",
            List,
            RawAuthorization("Basic Zm9vOmJhcg=="),
            Want::Refused(Code::Unauthenticated, "TOKEN_INVALID"),
        ),
        (
            "not a JWT",
            List,
            Bearer("not-a-jwt"),
            Want::Refused(Code::Unauthenticated, "TOKEN_INVALID"),
        ),
        (
            "tampered",
            List,
            Bearer(&tampered),
            Want::Refused(Code::Unauthenticated, "TOKEN_INVALID_SIGNATURE"),
        ),
        (
            "no token on a denied method",
            Delete,
            None,
            Want::Refused(Code::Unauthenticated, "TOKEN_MISSING"),
        ),
    ];
    for (name, method, cred, want) in cases {
        let got = call(&svc.client, method, cred).await;
        match (want, got) {
            (Want::Caller, Ok((user, org))) => {
                assert_eq!(
                    (user.as_str(), org.as_str()),
                    (USER, ORG),
                    "{mode:?} {name}"
                );
            }
            (Want::Public, Ok(_)) => {}
            (Want::Refused(code, r), Err(status)) => {
                assert_eq!(status.code(), code, "{mode:?} {name}: {status:?}");
                assert_eq!(reason(&status), r, "{mode:?} {name}");
                if let Bearer(t) | Cookie(t) | Custom(t) = cred {
                    assert!(
                        !status.message().contains(t),
                        "{name}: message echoes the token"
                    );
                }
            }
            (_, got) => panic!("{mode:?} {name}: unexpected {got:?}"),
        }
    }

    // A denial says what was required.
    let status = call(&svc.client, Delete, Bearer(&member))
        .await
        .unwrap_err();
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.metadata["permission"], orders::DELETE_PERMISSION);
}

#[tokio::test]
async fn table_in_process() {
    table(Mode::InProcess).await;
}

#[tokio::test]
async fn table_delegated() {
    table(Mode::Delegated).await;
}

/// Calls the AuthService answered: counted at the server, not at the client.
fn served(h: &Harness) -> u64 {
    let s = h.verifier.stats();
    s.cache_hits + s.full_verifications
}

#[tokio::test]
async fn delegated_repeated_tokens_come_from_the_verdict_cache() {
    let h = Harness::start().await;
    let d = delegated(&h, |_| {});
    let svc = Orders::start(AuthLayer::delegated(d.clone(), policy())).await;
    let token = h.mint(&spec("member", &[]));
    let before = served(&h);
    for _ in 0..20 {
        call(&svc.client, Call::List, Cred::Bearer(&token))
            .await
            .unwrap();
    }
    assert_eq!(served(&h) - before, 1, "one VerifyToken for 20 calls");
    let stats = d.stats();
    assert_eq!((stats.rpcs, stats.cache_hits), (1, 19));
    // Another token is another verdict.
    let other = h.mint(&spec("member", &[]));
    call(&svc.client, Call::List, Cred::Bearer(&other))
        .await
        .unwrap();
    assert_eq!(served(&h) - before, 2);
}

#[tokio::test]
async fn delegated_cache_entries_end_at_max_age_and_at_expiry() {
    let h = Harness::start().await;
    let d = delegated(&h, |c| c.max_age = Duration::from_millis(300));
    let svc = Orders::start(AuthLayer::delegated(d.clone(), policy())).await;

    // max_age: a long-lived token is asked again after 300 ms.
    let token = h.mint(&spec("member", &[]));
    call(&svc.client, Call::List, Cred::Bearer(&token))
        .await
        .unwrap();
    call(&svc.client, Call::List, Cred::Bearer(&token))
        .await
        .unwrap();
    assert_eq!(d.stats().rpcs, 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    call(&svc.client, Call::List, Cred::Bearer(&token))
        .await
        .unwrap();
    assert_eq!(d.stats().rpcs, 2, "max_age elapsed: asked again");

    // exp: a token expiring in 1 s is not served from the cache past its exp, even though
    // max_age (10 s by default) has not elapsed.
    let d = delegated(&h, |_| {});
    let svc = Orders::start(AuthLayer::delegated(d.clone(), policy())).await;
    let exp = common::now() + 1;
    let short = h.mint(&TokenSpec {
        expires_in: Some(1),
        ..spec("member", &[])
    });
    call(&svc.client, Call::List, Cred::Bearer(&short))
        .await
        .unwrap();
    assert_eq!(d.stats().rpcs, 1);
    while common::now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // AuthService still accepts it within its clock skew; the point is that it was asked.
    let _ = call(&svc.client, Call::List, Cred::Bearer(&short)).await;
    assert_eq!(d.stats().rpcs, 2, "past exp: not from the cache");
}

#[tokio::test]
async fn delegated_concurrent_identical_misses_make_one_rpc() {
    let h = Harness::start().await;
    let d = delegated(&h, |_| {});
    let svc = Orders::start(AuthLayer::delegated(d.clone(), policy())).await;
    let token = h.mint(&spec("member", &[]));
    let before = served(&h);
    let calls = (0..50).map(|_| {
        let client = svc.client.clone();
        let token = token.clone();
        tokio::spawn(async move { call(&client, Call::List, Cred::Bearer(&token)).await })
    });
    for r in futures::future::join_all(calls).await {
        r.unwrap().unwrap();
    }
    assert_eq!(
        served(&h) - before,
        1,
        "50 concurrent misses, one VerifyToken"
    );
    assert_eq!(d.stats().rpcs, 1);
}

#[tokio::test]
async fn delegated_fails_closed_while_auth_service_is_down_and_recovers() {
    let h = Harness::start().await;
    let addr = h.addr;
    let d = delegated(&h, |_| {});
    let svc = Orders::start(AuthLayer::delegated(d.clone(), policy())).await;
    let spec = spec("member", &[]);
    let before = h.mint(&spec);
    call(&svc.client, Call::List, Cred::Bearer(&before))
        .await
        .unwrap();

    // Stop the AuthService (the emulator keeps running).
    let clerk = {
        let mut h = h;
        let clerk = std::mem::replace(
            &mut h.clerk,
            clerk_grpc_auth::emulator::Emulator::start_local()
                .await
                .unwrap(),
        );
        h.stop().await;
        clerk
    };
    for _ in 0..3 {
        let fresh = clerk.mint(&spec);
        let status = call(&svc.client, Call::List, Cred::Bearer(&fresh))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason(&status), "AUTH_SERVICE_UNAVAILABLE");
    }
    // Public methods do not need AuthService.
    call(&svc.client, Call::Ping, Cred::None).await.unwrap();

    // AuthService back on the same address: the layer recovers without a restart.
    let listener = TcpListener::bind(addr).await.unwrap();
    let server = AuthServer::build(config_for(&clerk)).unwrap();
    let keys = server.verifier().keys().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = rx.await;
    }));
    keys.ready().await;
    let fresh = clerk.mint(&spec);
    let mut recovered = false;
    // The channel reconnects with back-off; each attempt is a real call that must either
    // succeed or fail closed.
    for _ in 0..100 {
        match call(&svc.client, Call::List, Cred::Bearer(&fresh)).await {
            Ok((user, _)) => {
                assert_eq!(user, USER);
                recovered = true;
                break;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        recovered,
        "the layer did not recover after AuthService returned"
    );
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn hybrid_falls_back_to_in_process_verification() {
    let h = Harness::start().await;
    let (local, _guard) = local_verifier(&h).await;
    // An endpoint where nothing listens.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let d = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![format!("http://{dead_addr}")],
        fallback: Some(local),
        ..DelegatedConfig::default()
    })
    .unwrap();
    let svc = Orders::start(AuthLayer::delegated(d.clone(), policy())).await;
    let token = h.mint(&spec("member", &[]));
    let (user, org) = call(&svc.client, Call::List, Cred::Bearer(&token))
        .await
        .unwrap();
    assert_eq!((user.as_str(), org.as_str()), (USER, ORG));
    assert_eq!(d.stats().fallbacks, 1);
    // The fallback's verdicts are real verdicts: a bad token is still refused.
    let expired = h.mint(&TokenSpec {
        expires_in: Some(-60),
        ..spec("member", &[])
    });
    let status = call(&svc.client, Call::List, Cred::Bearer(&expired))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "TOKEN_EXPIRED");
    // Without the fallback, the same outage fails closed.
    let closed = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![format!("http://{dead_addr}")],
        ..DelegatedConfig::default()
    })
    .unwrap();
    let svc = Orders::start(AuthLayer::delegated(closed, policy())).await;
    let status = call(&svc.client, Call::List, Cred::Bearer(&token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test]
async fn streams_end_with_unauthenticated_when_the_token_expires() {
    let h = Harness::start().await;
    let (local, _guard) = local_verifier(&h).await;
    let layer = AuthLayer::in_process(local, policy()).end_streams_at_expiry(true);
    let svc = Orders::start(layer).await;
    let token = h.mint(&TokenSpec {
        expires_in: Some(2),
        ..spec("admin", &[])
    });
    let exp = h.verify(&token).await.unwrap().expires_at.unwrap().seconds;
    let mut stream = svc
        .client
        .clone()
        .watch_orders(with_cred(
            WatchOrdersRequest {
                interval_ms: 50,
                ..Default::default()
            },
            Cred::Bearer(&token),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut events = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(e)) => {
                assert_eq!(e.caller.unwrap().user_id, USER);
                events += 1;
            }
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert!(events > 0, "events flowed before expiry");
    assert_eq!(end.code(), Code::Unauthenticated);
    assert_eq!(end.message(), "token expired");
    assert!(
        common::now() >= exp,
        "the stream ended before the token expired"
    );
}

#[tokio::test]
async fn interceptor_verifies_in_process_and_fails_closed_on_an_unknown_kid() {
    let h = Harness::start().await;
    let (local, _guard) = local_verifier(&h).await;
    let interceptor = AuthInterceptor::new(local.clone(), Rule::authenticated());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(OrdersServer::with_interceptor(
                orders::OrdersService,
                interceptor,
            ))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let client = OrdersClient::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let token = h.mint(&spec("member", &[]));
    let (user, _) = call(&client, Call::List, Cred::Bearer(&token))
        .await
        .unwrap();
    assert_eq!(user, USER);
    let status = call(&client, Call::List, Cred::None).await.unwrap_err();
    assert_eq!(reason(&status), "TOKEN_MISSING");

    // Rotation: the new kid is not loaded yet. The first call fails closed (UNAVAILABLE,
    // retry) and starts the refetch; once the key store has the new key, the retry passes.
    let generation = local.keys().generation();
    let fetches = h.clerk.jwks_requests();
    h.clerk.rotate().await.unwrap();
    let rotated = h.mint(&spec("member", &[]));
    let status = call(&client, Call::List, Cred::Bearer(&rotated))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status), "JWK_KID_MISMATCH");
    h.clerk.wait_jwks_requests(fetches + 1).await;
    let mut changes = local.keys().serving();
    while local.keys().generation() == generation {
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .ok();
    }
    let (user, _) = call(&client, Call::List, Cred::Bearer(&rotated))
        .await
        .unwrap();
    assert_eq!(user, USER);

    // A kid Clerk never issued: fails closed at once, then — after the refetch (the cooldown
    // allows none right now, so it is suppressed) — is refused as UNAUTHENTICATED.
    let mut header = h.clerk.session_header();
    header["kid"] = "ins_neverIssued".into();
    let claims =
        serde_json::Value::Object(spec("member", &[]).claims("https://clerk.test", common::now()));
    let forged = h
        .clerk
        .sign(&header, &claims, clerk_grpc_auth::token::keys::Alg::RS256);
    let status = call(&client, Call::List, Cred::Bearer(&forged))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(&status), "JWK_KID_MISMATCH");
}

struct CountingSource {
    token: String,
    calls: std::sync::atomic::AtomicUsize,
}

impl TokenSource for CountingSource {
    fn token(&self) -> futures::future::BoxFuture<'_, Result<String, Status>> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async move { Ok(self.token.clone()) })
    }
}

#[tokio::test]
async fn client_credentials_static_async_and_forwarded() {
    let h = Harness::start().await;
    let (local, _guard) = local_verifier(&h).await;
    let svc = Orders::start(AuthLayer::in_process(local, policy())).await;
    let token = h.mint(&spec("member", &[]));
    let channel = Channel::from_shared(format!("http://{}", svc.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // Static token interceptor.
    let mut c = OrdersClient::with_interceptor(channel.clone(), BearerToken::new(&token).unwrap());
    let r = c
        .list_orders(ListOrdersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.caller.unwrap().user_id, USER);

    // Async token source behind a tower layer.
    let src = Arc::new(CountingSource {
        token: token.clone(),
        calls: Default::default(),
    });
    let svc_with_creds = tower::ServiceBuilder::new()
        .layer(CredentialsLayer::new(src.clone()))
        .service(channel.clone());
    let mut c = OrdersClient::new(svc_with_creds);
    for _ in 0..3 {
        let r = c
            .list_orders(ListOrdersRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.caller.unwrap().user_id, USER);
    }
    assert_eq!(src.calls.load(std::sync::atomic::Ordering::Relaxed), 3);

    // A failing source fails the call with its status, unsent.
    struct Failing;
    impl TokenSource for Failing {
        fn token(&self) -> futures::future::BoxFuture<'_, Result<String, Status>> {
            Box::pin(async { Err(Status::unavailable("token source down")) })
        }
    }
    let mut c = OrdersClient::new(
        tower::ServiceBuilder::new()
            .layer(CredentialsLayer::new(Failing))
            .service(channel.clone()),
    );
    let status = c.list_orders(ListOrdersRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "token source down");

    // Forwarding: a verified incoming request's token goes onto the outgoing one.
    let mut incoming = Request::new(());
    let verified =
        clerk_grpc_auth::layer::AuthInterceptor::new(h.verifier.clone(), Rule::authenticated());
    let mut verified = verified;
    incoming
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let incoming = tonic::service::Interceptor::call(&mut verified, incoming).unwrap();
    let mut outgoing = Request::new(ListOrdersRequest {});
    forward_token(&incoming, &mut outgoing).unwrap();
    let header = outgoing.metadata().get("authorization").unwrap();
    assert!(header.is_sensitive());
    let r = OrdersClient::new(channel.clone())
        .list_orders(outgoing)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.caller.unwrap().user_id, USER);
    // Nothing verified → nothing to forward.
    let err = forward_token(&Request::new(()), &mut Request::new(())).unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// A `:path` that is not exactly `/pkg.Service/Method` is refused before the policy is looked
/// up (grpc-go's CVE-2026-33186: a `:path` without its leading slash fell to a looser rule).
/// Sent over real HTTP/2 with the raw path, against a policy whose default is public.
#[tokio::test]
async fn malformed_method_paths_are_refused_before_the_policy() {
    let h = Harness::start().await;
    let (local, _guard) = local_verifier(&h).await;
    let policy = Policy::public().method(
        "/examples.orders.v1.Orders/DeleteOrder",
        Rule::authenticated().require(clerk_grpc_auth::authz::Check::permission(
            orders::DELETE_PERMISSION,
        )),
    );
    let server = Orders::start(AuthLayer::in_process(local, policy)).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let raw = |path: &'static str| {
        let channel = channel.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            grpc.unary(
                Request::new(DeleteOrderRequest {
                    order_id: "ord_1".into(),
                }),
                path.parse::<http::uri::PathAndQuery>().expect(path),
                tonic_prost::ProstCodec::<DeleteOrderRequest, orders::pb::DeleteOrderResponse>::default(),
            )
            .await
        }
    };
    // http ≥ 1.4 cannot even represent a path without its leading slash: hyper/h2 reset such
    // a stream before any service sees it. The layer refuses it anyway (below, `*`).
    assert!("examples.orders.v1.Orders/DeleteOrder"
        .parse::<http::uri::PathAndQuery>()
        .is_err());
    for path in [
        "//examples.orders.v1.Orders/DeleteOrder",
        "/examples.orders.v1.Orders/DeleteOrder/",
        "/examples.orders.v1.Orders//DeleteOrder",
        "/Examples.orders.v1.Orders/DeleteOrder",
        "/examples.orders.v1.Orders/deleteorder",
        "/examples.orders.v1.Orders/Delete%4Frder",
    ] {
        let e = raw(path).await.expect_err(path);
        assert_eq!(e.code(), Code::InvalidArgument, "{path}: {e:?}");
        assert_eq!(reason(&e), "PATH_NOT_CANONICAL", "{path}");
    }
    // The exact path gets its rule; other methods the public default.
    let e = raw("/examples.orders.v1.Orders/DeleteOrder")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(reason(&e), "TOKEN_MISSING");
    let mut client = server.client.clone();
    client.ping(PingRequest {}).await.unwrap();

    // What http can represent without a leading slash (`*`, the authority form) never
    // reaches the handler.
    let (local, _guard2) = local_verifier(&h).await;
    let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = called.clone();
    let mut svc = tower::Layer::layer(
        &AuthLayer::in_process(local, Policy::public()),
        tower::service_fn(move |_req: http::Request<tonic::body::Body>| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            async {
                Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
            }
        }),
    );
    for uri in ["*", "http://h"] {
        let req = http::Request::builder()
            .uri(uri)
            .body(tonic::body::Body::empty())
            .unwrap();
        let res = tower::ServiceExt::oneshot(&mut svc, req).await.unwrap();
        let status = Status::from_header_map(res.headers()).expect("a gRPC status");
        assert_eq!(status.code(), Code::InvalidArgument, "{uri}");
        assert_eq!(reason(&status), "PATH_NOT_CANONICAL");
    }
    assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
}

// === Streams end when their token does ===

/// A policy for the stream tests: every method for any session token or API key.
fn stream_policy() -> Policy {
    use clerk_grpc_auth::token::identity::TokenType;
    Policy::with_default(
        Rule::authenticated().token_types([TokenType::SessionToken, TokenType::ApiKey]),
    )
}

/// Seconds since the epoch, with a fraction.
fn now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The `exp` AuthService reads in `token`.
async fn exp_of(h: &Harness, token: &str) -> f64 {
    h.verify(token).await.unwrap().expires_at.unwrap().seconds as f64
}

/// Opens `WatchOrders` and reads until the stream ends — failing (instead of hanging) if it
/// has not within `bound`. Returns the events read, the final status and when it came.
async fn watch_until_end(
    client: &OrdersClient<Channel>,
    req: WatchOrdersRequest,
    token: &str,
    bound: Duration,
) -> (u64, Status, f64) {
    let read = async {
        let mut stream = match client
            .clone()
            .watch_orders(with_cred(req, Cred::Bearer(token)))
            .await
        {
            Ok(s) => s.into_inner(),
            Err(status) => return (0, status),
        };
        let mut events = 0;
        loop {
            match stream.message().await {
                Ok(Some(_)) => events += 1,
                Ok(None) => panic!("the stream ended without a status after {events} events"),
                Err(status) => return (events, status),
            }
        }
    };
    let (events, status) = tokio::time::timeout(bound, read)
        .await
        .unwrap_or_else(|_| panic!("the stream was still open after {bound:?}"));
    (events, status, now_f64())
}

#[tokio::test]
async fn an_always_ready_stream_ends_at_the_tokens_exp() {
    let h = Harness::start().await;
    let (local, _guard) = local_verifier(&h).await;
    let layer = AuthLayer::in_process(local, stream_policy()).end_streams_at_expiry(true);
    let svc = Orders::start(layer).await;
    let token = h.mint(&TokenSpec {
        expires_in: Some(2),
        ..spec("admin", &[])
    });
    let exp = exp_of(&h, &token).await;
    let burst = WatchOrdersRequest {
        burst: true,
        ..Default::default()
    };
    let (events, end, at) =
        watch_until_end(&svc.client, burst, &token, Duration::from_secs(10)).await;
    assert!(events > 0, "events flowed before expiry");
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert_eq!(reason(&end), "TOKEN_EXPIRED");
    assert!(at >= exp, "ended before the token expired");
    assert!(at < exp + 3.0, "ended {}s after exp", at - exp);
}

#[tokio::test]
async fn a_slow_handler_still_ends_at_the_tokens_exp() {
    let h = Harness::start().await;
    let (local, _guard) = local_verifier(&h).await;
    let layer = AuthLayer::in_process(local, stream_policy()).end_streams_at_expiry(true);
    let svc = Orders::start(layer).await;
    let slow = |answer_after_ms| WatchOrdersRequest {
        interval_ms: 50,
        answer_after_ms,
        ..Default::default()
    };
    // Answers 3 s into a 4 s token: the stream gets the last second, not 4 s more.
    let late = h.mint(&TokenSpec {
        expires_in: Some(4),
        ..spec("admin", &[])
    });
    // Answers after the token expired: the call ends at exp without waiting for it.
    let later = h.mint(&TokenSpec {
        expires_in: Some(2),
        ..spec("admin", &[])
    });
    let (late_exp, later_exp) = (exp_of(&h, &late).await, exp_of(&h, &later).await);
    let bound = Duration::from_secs(15);
    let (late_end, later_end) = tokio::join!(
        watch_until_end(&svc.client, slow(3000), &late, bound),
        watch_until_end(&svc.client, slow(5000), &later, bound),
    );
    for ((_, end, at), exp) in [(late_end, late_exp), (later_end, later_exp)] {
        assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
        assert!(at >= exp, "ended before the token expired");
        assert!(
            at < exp + 2.0,
            "ended {}s after exp: the handler's delay was added",
            at - exp
        );
        assert_eq!(reason(&end), "TOKEN_EXPIRED");
    }
}

#[tokio::test]
async fn a_client_stream_is_cut_at_the_tokens_exp() {
    let h = Harness::start().await;
    let (local, _guard) = local_verifier(&h).await;
    let layer = AuthLayer::in_process(local, stream_policy()).end_streams_at_expiry(true);
    let svc = Orders::start(layer).await;
    let token = h.mint(&TokenSpec {
        expires_in: Some(2),
        ..spec("admin", &[])
    });
    let exp = exp_of(&h, &token).await;
    // The client never stops sending.
    let orders = tokio_stream::StreamExt::throttle(
        tokio_stream::iter((0u64..).map(|i| orders::pb::Order {
            id: format!("ord_{i}"),
            description: String::new(),
        })),
        Duration::from_millis(20),
    );
    let mut client = svc.client.clone();
    let placed = client.place_orders(with_cred(orders, Cred::Bearer(&token)));
    let end = tokio::time::timeout(Duration::from_secs(10), placed)
        .await
        .expect("the client stream still fed the handler 10 s later")
        .expect_err("the call ended with a status");
    let at = now_f64();
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert_eq!(reason(&end), "TOKEN_EXPIRED");
    assert!(at >= exp, "ended before the token expired");
    assert!(at < exp + 3.0, "ended {}s after exp", at - exp);
}

/// An AuthService whose allowlisted machine may follow `WatchRevocations` and call
/// `RevokeSession` (its tokens scoped to AuthService's machine id), with identity queries and
/// machine tokens (verdicts reused for 200 ms). Returns the harness and that machine's token.
async fn trusted_harness() -> (Harness, String) {
    use clerk_grpc_auth::{
        clerk::{api::BackendApiConfig, directory::DirectoryConfig, machines::MachineConfig},
        secret::Secret,
        server::IdentityConfig,
    };
    let mut follower = None;
    let h = Harness::start_with(|clerk, config| {
        let machine = clerk.create_machine("layer-follower").id;
        let auth_service = clerk.create_machine("auth-service").id;
        assert!(clerk.allow(&machine, &auth_service));
        config.access.machine_id = Some(auth_service);
        config.access.allowlist = vec![machine.clone()];
        let api: url::Url = clerk.url().parse().unwrap();
        let mut m = MachineConfig::new(api.clone(), Some(Secret::new(clerk.secret_key())), None);
        m.max_age = Duration::from_millis(200);
        config.machine = Some(m);
        config.identity = Some(IdentityConfig {
            backend: BackendApiConfig::new(api, Secret::new(clerk.secret_key())),
            directory: DirectoryConfig::default(),
        });
        follower = Some(machine);
    })
    .await;
    let m2m = h.clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        subject: follower,
        ..MachineTokenSpec::default()
    });
    (h, m2m)
}

async fn a_revoked_session_ends_its_streams_at_once(mode: Mode) {
    let (h, m2m) = trusted_harness().await;
    let (local, _guard) = local_verifier(&h).await;
    let (layer, feed) = match mode {
        Mode::InProcess => {
            let channel = Channel::from_shared(format!("http://{}", h.addr))
                .unwrap()
                .connect_lazy();
            let feed = clerk_grpc_auth::layer::watch_revocations_with(
                channel,
                local.revocations().clone(),
                BearerSource(m2m.clone()),
            );
            (AuthLayer::in_process(local, stream_policy()), feed)
        }
        Mode::Delegated => {
            let d = delegated(&h, |c| {
                c.credentials = Some(CallerCredentials::new(BearerSource(m2m.clone())));
            });
            let feed = d.watch_revocations();
            (AuthLayer::delegated(d, stream_policy()), feed)
        }
    };
    feed.connected().await;
    let svc = Orders::start(layer.end_streams_at_expiry(true)).await;
    let user = h.clerk.create_user(&UserSpec::default());
    let session = h.clerk.create_session(&user);
    let token = h.mint(&TokenSpec {
        user_id: Some(user.clone()),
        session_id: Some(session.clone()),
        expires_in: Some(600),
        ..TokenSpec::default()
    });
    let mut stream = svc
        .client
        .clone()
        .watch_orders(with_cred(
            WatchOrdersRequest {
                interval_ms: 20,
                ..Default::default()
            },
            Cred::Bearer(&token),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some(), "events flow");
    let mut revoke = Request::new(clerk_grpc_auth::pb::RevokeSessionRequest {
        session_id: session.clone(),
    });
    revoke
        .metadata_mut()
        .insert("authorization", format!("Bearer {m2m}").parse().unwrap());
    h.client.clone().revoke_session(revoke).await.unwrap();
    // Within a bound far below the token's 600 s: the feed's notification ends it.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{mode:?}: the revoked session's stream is still open"));
    assert_eq!(end.code(), Code::Unauthenticated, "{mode:?}: {end:?}");
    assert_eq!(reason(&end), "SESSION_REVOKED", "{mode:?}");
    // A new call is refused the same way.
    let status = call(&svc.client, Call::List, Cred::Bearer(&token))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "SESSION_REVOKED", "{mode:?}");
}

#[tokio::test]
async fn a_revoked_session_ends_its_streams_at_once_in_process() {
    a_revoked_session_ends_its_streams_at_once(Mode::InProcess).await;
}

#[tokio::test]
async fn a_revoked_session_ends_its_streams_at_once_delegated() {
    a_revoked_session_ends_its_streams_at_once(Mode::Delegated).await;
}

#[tokio::test]
async fn a_revoked_api_key_ends_its_streams_within_the_reverification_interval() {
    let h = Harness::start().await;
    // The in-process verifier with the same machine settings (200 ms verdicts).
    let server = AuthServer::build(h_config(&h)).unwrap();
    let local = server.verifier().clone();
    let _guard = local.keys().spawn_refresher();
    local.keys().ready().await;
    let layer = AuthLayer::in_process(local, stream_policy())
        .end_streams_at_expiry(true)
        .reverify_streams_every(Duration::from_millis(300));
    let svc = Orders::start(layer).await;
    let key = h.clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::ApiKey,
        subject: Some(USER.into()),
        ..MachineTokenSpec::default()
    });
    let mut stream = svc
        .client
        .clone()
        .watch_orders(with_cred(
            WatchOrdersRequest {
                interval_ms: 20,
                ..Default::default()
            },
            Cred::Bearer(&key),
        ))
        .await
        .unwrap()
        .into_inner();
    // Streams past several re-verifications while the key is good.
    let mut events = 0;
    while events < 40 {
        stream.message().await.unwrap().expect("an event");
        events += 1;
    }
    assert!(h.clerk.revoke(&key));
    // Interval (300 ms) + verdict age (200 ms), with room to spare; the old ten-year deadline
    // never ends it.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the revoked key's stream is still open");
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert_eq!(reason(&end), "TOKEN_REVOKED");
    let status = call(&svc.client, Call::List, Cred::Bearer(&key))
        .await
        .unwrap_err();
    assert_eq!(reason(&status), "TOKEN_REVOKED");
}

/// The harness's configuration for its emulator, with its machine settings (200 ms verdicts).
fn h_config(h: &Harness) -> clerk_grpc_auth::server::ServerConfig {
    use clerk_grpc_auth::{clerk::machines::MachineConfig, secret::Secret};
    let mut config = config_for(&h.clerk);
    let api: url::Url = h.clerk.url().parse().unwrap();
    let mut m = MachineConfig::new(api, Some(Secret::new(h.clerk.secret_key())), None);
    m.max_age = Duration::from_millis(200);
    config.machine = Some(m);
    config
}

/// A fixed token (the trusted machine's).
#[derive(Clone)]
struct BearerSource(String);

impl TokenSource for BearerSource {
    fn token(&self) -> futures::future::BoxFuture<'_, Result<String, Status>> {
        Box::pin(std::future::ready(Ok(self.0.clone())))
    }
}
