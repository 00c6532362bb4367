//! The delegated layer against a FAKE AuthService: a real tonic server on 127.0.0.1:0
//! implementing the generated `AuthService` trait, answering `VerifyToken` with "valid" and
//! identities that cannot be used. Driven through the real layer in front of the Orders example
//! service: each is refused (never reaching the handler), never cached, shared by no coalesced
//! waiter as a success, and never sent to the hybrid fallback.

mod common;
#[path = "../examples/common/orders.rs"]
mod orders;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use clerk_grpc_auth::{
    emulator::{Emulator, TokenSpec},
    layer::{AuthLayer, DelegatedConfig, DelegatedVerifier},
    pb::{
        self,
        auth_service_server::{AuthService, AuthServiceServer},
    },
    server::AuthServer,
};
use common::reason;
use orders::pb::{orders_client::OrdersClient, ListOrdersRequest};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{transport::Channel, Code, Request, Response, Status};

/// What the fake answers for a token.
#[derive(Clone)]
enum Answer {
    /// "valid", with this identity.
    Valid(Box<pb::Identity>),
    /// A response without an identity.
    NoIdentity,
    /// An error status.
    Error(Code),
}

/// The fake AuthService: answers `VerifyToken` from a table, counts the calls per token.
#[derive(Clone, Default)]
struct Fake {
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    /// Calls wait until this is open (to gather coalesced waiters).
    gate: Option<Arc<tokio::sync::watch::Receiver<bool>>>,
    arrived: Arc<AtomicUsize>,
}

impl Fake {
    fn set(&self, token: &str, answer: Answer) {
        self.answers
            .lock()
            .unwrap()
            .insert(token.to_owned(), answer);
    }

    fn calls(&self, token: &str) -> usize {
        self.calls.lock().unwrap().get(token).copied().unwrap_or(0)
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the fake"))
}

#[tonic::async_trait]
impl AuthService for Fake {
    async fn verify_token(
        &self,
        request: Request<pb::VerifyTokenRequest>,
    ) -> Result<Response<pb::VerifyTokenResponse>, Status> {
        let token = request.into_inner().token;
        *self.calls.lock().unwrap().entry(token.clone()).or_default() += 1;
        self.arrived.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            let mut gate = (**gate).clone();
            gate.wait_for(|open| *open).await.unwrap();
        }
        let answer = self.answers.lock().unwrap().get(&token).cloned();
        match answer {
            Some(Answer::Valid(identity)) => Ok(Response::new(pb::VerifyTokenResponse {
                identity: Some(*identity),
                cache_for: None,
            })),
            Some(Answer::NoIdentity) => Ok(Response::new(pb::VerifyTokenResponse::default())),
            Some(Answer::Error(code)) => Err(Status::new(code, "fake")),
            None => Err(Status::unauthenticated("unknown to the fake")),
        }
    }

    async fn who_am_i(
        &self,
        _: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        unimplemented()
    }

    async fn get_user(&self, _: Request<pb::GetUserRequest>) -> Result<Response<pb::User>, Status> {
        unimplemented()
    }

    async fn list_organization_memberships(
        &self,
        _: Request<pb::ListOrganizationMembershipsRequest>,
    ) -> Result<Response<pb::ListOrganizationMembershipsResponse>, Status> {
        unimplemented()
    }

    async fn get_session(
        &self,
        _: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        unimplemented()
    }

    async fn list_sessions(
        &self,
        _: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        unimplemented()
    }

    async fn revoke_session(
        &self,
        _: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        unimplemented()
    }

    async fn get_organization(
        &self,
        _: Request<pb::GetOrganizationRequest>,
    ) -> Result<Response<pb::OrganizationProfile>, Status> {
        unimplemented()
    }

    async fn list_organization_members(
        &self,
        _: Request<pb::ListOrganizationMembersRequest>,
    ) -> Result<Response<pb::ListOrganizationMembersResponse>, Status> {
        unimplemented()
    }

    type WatchRevocationsStream =
        futures::stream::BoxStream<'static, Result<pb::Revocation, Status>>;

    async fn watch_revocations(
        &self,
        _: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        unimplemented()
    }
}

/// A server on 127.0.0.1:0 until the sender is dropped.
async fn spawn<F>(
    serve: impl FnOnce(TcpListener, oneshot::Receiver<()>) -> F,
) -> (SocketAddr, oneshot::Sender<()>)
where
    F: std::future::Future<Output: Send> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(serve(listener, rx));
    (addr, tx)
}

/// The fake AuthService on 127.0.0.1:0.
async fn start_fake(fake: Fake) -> (SocketAddr, oneshot::Sender<()>) {
    spawn(|listener, stop| {
        tonic::transport::Server::builder()
            .add_service(AuthServiceServer::new(fake))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async move {
                    let _ = stop.await;
                },
            )
    })
    .await
}

/// Orders behind the delegated layer (default policy: session tokens only), on 127.0.0.1:0.
async fn start_orders(verifier: DelegatedVerifier) -> (OrdersClient<Channel>, oneshot::Sender<()>) {
    let layer = AuthLayer::delegated(verifier, orders::policy());
    let (addr, stop) = spawn(|listener, stop| {
        orders::serve(listener, layer, async move {
            let _ = stop.await;
        })
    })
    .await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (OrdersClient::new(channel), stop)
}

fn verifier(fake: SocketAddr, adjust: impl FnOnce(&mut DelegatedConfig)) -> DelegatedVerifier {
    let mut config = DelegatedConfig {
        endpoints: vec![format!("http://{fake}")],
        ..DelegatedConfig::default()
    };
    adjust(&mut config);
    DelegatedVerifier::new(config).unwrap()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn ts(secs: f64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs as i64,
        nanos: 0,
    })
}

/// A well-formed session identity, as AuthService would answer.
fn session(user: &str) -> pb::Identity {
    pb::Identity {
        token_type: pb::TokenType::SessionToken as i32,
        user_id: user.into(),
        session_id: "sess_fake".into(),
        session_status: pb::SessionStatus::Active as i32,
        issued_at: ts(now() - 10.0),
        expires_at: ts(now() + 600.0),
        claims_version: 2,
        ..pb::Identity::default()
    }
}

async fn list_orders(
    client: &mut OrdersClient<Channel>,
    token: &str,
) -> Result<orders::pb::ListOrdersResponse, Status> {
    let mut req = Request::new(ListOrdersRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.list_orders(req).await.map(Response::into_inner)
}

#[tokio::test]
async fn malformed_answers_are_refused_and_never_cached() {
    let fake = Fake::default();
    let (fake_addr, _fake_stop) = start_fake(fake.clone()).await;
    let verifier = verifier(fake_addr, |_| {});
    let (mut client, _stop) = start_orders(verifier.clone()).await;

    // Control: a well-formed answer passes, to the handler.
    fake.set("good", Answer::Valid(Box::new(session("user_good"))));
    let res = list_orders(&mut client, "good").await.unwrap();
    assert_eq!(res.caller.unwrap().user_id, "user_good");

    let m2m = pb::Identity {
        token_type: pb::TokenType::M2mToken as i32,
        machine: Some(pb::Machine {
            subject: "mch_fake".into(),
            machine_id: "mch_fake".into(),
            scopes: vec!["mch_orders".into()],
            ..pb::Machine::default()
        }),
        expires_at: ts(now() + 600.0),
        ..pb::Identity::default()
    };
    let cases: Vec<(&str, Answer, Code, &str)> = vec![
        (
            "empty",
            Answer::Valid(Box::default()),
            Code::Unavailable,
            "AUTH_SERVICE_UNAVAILABLE",
        ),
        (
            "no-identity",
            Answer::NoIdentity,
            Code::Unavailable,
            "AUTH_SERVICE_UNAVAILABLE",
        ),
        (
            "no-expiry",
            Answer::Valid(Box::new(pb::Identity {
                expires_at: None,
                ..session("user_a")
            })),
            Code::Unavailable,
            "AUTH_SERVICE_UNAVAILABLE",
        ),
        (
            "expired",
            Answer::Valid(Box::new(pb::Identity {
                expires_at: ts(now() - 3600.0),
                ..session("user_a")
            })),
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
        ),
        (
            "m2m-on-session-rule",
            Answer::Valid(Box::new(m2m)),
            Code::Unavailable,
            "AUTH_SERVICE_UNAVAILABLE",
        ),
        (
            "no-user-id",
            Answer::Valid(Box::new(pb::Identity {
                user_id: String::new(),
                ..session("user_a")
            })),
            Code::Unavailable,
            "AUTH_SERVICE_UNAVAILABLE",
        ),
        (
            "unknown-type",
            Answer::Valid(Box::new(pb::Identity {
                token_type: 42,
                ..session("user_a")
            })),
            Code::Unavailable,
            "AUTH_SERVICE_UNAVAILABLE",
        ),
        (
            "pending",
            Answer::Valid(Box::new(pb::Identity {
                session_status: pb::SessionStatus::Pending as i32,
                ..session("user_a")
            })),
            Code::Unavailable,
            "AUTH_SERVICE_UNAVAILABLE",
        ),
    ];
    let mut malformed = 0;
    for (token, answer, code, want) in cases {
        fake.set(token, answer);
        let status = list_orders(&mut client, token).await.expect_err(token);
        assert_eq!(status.code(), code, "{token}: {status:?}");
        assert_eq!(reason(&status), want, "{token}");
        if code == Code::Unavailable {
            malformed += 1;
        }
        // Not cached: the same token asks again, and a sound answer now passes.
        fake.set(token, Answer::Valid(Box::new(session("user_fixed"))));
        let res = list_orders(&mut client, token)
            .await
            .unwrap_or_else(|e| panic!("{token}: {e:?}"));
        assert_eq!(res.caller.unwrap().user_id, "user_fixed", "{token}");
        assert_eq!(fake.calls(token), 2, "{token}");
    }
    let stats = verifier.stats();
    assert_eq!(stats.malformed_answers, malformed);
    assert_eq!(stats.cache_hits, 0);
}

#[tokio::test]
async fn coalesced_waiters_share_the_refusal_not_a_pass() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let fake = Fake {
        gate: Some(Arc::new(gate)),
        ..Fake::default()
    };
    fake.set("shared", Answer::Valid(Box::default()));
    let (fake_addr, _fake_stop) = start_fake(fake.clone()).await;
    let verifier = verifier(fake_addr, |c| {
        c.deadline = std::time::Duration::from_secs(30)
    });
    let (client, _stop) = start_orders(verifier.clone()).await;
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { list_orders(&mut client, "shared").await })
        })
        .collect();
    // The first call is at the fake: the others are waiting on it (or on their own call).
    while fake.arrived.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    open.send(true).unwrap();
    for c in calls {
        let status = c.await.unwrap().expect_err("a malformed answer passed");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(reason(&status), "AUTH_SERVICE_UNAVAILABLE");
    }
    // Nothing stuck: the next call asks again and a sound answer passes.
    let before = fake.calls("shared");
    fake.set("shared", Answer::Valid(Box::new(session("user_after"))));
    let mut client = client.clone();
    let res = list_orders(&mut client, "shared").await.unwrap();
    assert_eq!(res.caller.unwrap().user_id, "user_after");
    assert_eq!(fake.calls("shared"), before + 1);
}

#[tokio::test]
async fn a_malformed_answer_does_not_fall_back_in_process() {
    // A real in-process fallback that would accept the real token.
    let clerk = Emulator::start_local().await.unwrap();
    let server = AuthServer::build(common::config_for(&clerk)).unwrap();
    let local = server.verifier().clone();
    let _refresher = local.keys().spawn_refresher();
    local.keys().ready().await;
    let token = clerk.mint(&TokenSpec {
        user_id: Some("user_real".into()),
        expires_in: Some(600),
        ..TokenSpec::default()
    });

    let fake = Fake::default();
    let (fake_addr, _fake_stop) = start_fake(fake.clone()).await;
    let verifier = verifier(fake_addr, |c| {
        c.fallback = Some(local);
        c.cache_capacity = 0;
    });
    let (mut client, _stop) = start_orders(verifier.clone()).await;

    // Control: AuthService unable to answer → the fallback verifies.
    fake.set(&token, Answer::Error(Code::Unavailable));
    let res = list_orders(&mut client, &token).await.unwrap();
    assert_eq!(res.caller.unwrap().user_id, "user_real");
    assert_eq!(verifier.stats().fallbacks, 1);

    // A malformed answer: refused, the fallback not asked.
    fake.set(
        &token,
        Answer::Valid(Box::new(pb::Identity {
            user_id: String::new(),
            ..session("user_real")
        })),
    );
    let status = list_orders(&mut client, &token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(reason(&status), "AUTH_SERVICE_UNAVAILABLE");
    let stats = verifier.stats();
    assert_eq!((stats.fallbacks, stats.malformed_answers), (1, 1));
}
