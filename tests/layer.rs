//! The auth layer on a real tonic server (the examples' Orders service on 127.0.0.1:0), against
//! the emulator over real HTTP and, in delegated mode, a real AuthService over real gRPC.

mod common;
#[path = "../examples/common/orders.rs"]
mod orders;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clerk_grpc_auth::{
    client::{forward_token, BearerToken, CredentialsLayer, TokenSource},
    emulator::{OrgSpec, TokenSpec},
    layer::{AuthInterceptor, AuthLayer, DelegatedConfig, DelegatedVerifier, TokenSources},
    policy::{Policy, Rule},
    server::Server,
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
async fn local_verifier(h: &Harness) -> (TokenVerifier, clerk_grpc_auth::jwks::RefresherGuard) {
    let server = Server::build(config_for(&h.clerk)).unwrap();
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
                format!("theme=dark; __session={t}; other=1")
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
                .watch_orders(with_cred(WatchOrdersRequest { interval_ms: 5 }, cred))
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
    let server = Server::build(config_for(&clerk)).unwrap();
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
            WatchOrdersRequest { interval_ms: 50 },
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
        .sign(&header, &claims, clerk_grpc_auth::keys::Alg::RS256);
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
