//! A stop is not held by what is idle: the real AuthService (gRPC and HTTP port, a grace period
//! of ten minutes) against the emulator, with a stream or an idle connection open when the
//! shutdown begins. Each test passes only if the serve future completes long before the grace
//! period (the guard is a failure bound, not a timing assertion).

mod common;

use std::{net::SocketAddr, time::Duration};

use clerk_grpc_auth::{
    clerk::{api::BackendApiConfig, directory::DirectoryConfig, machines::MachineConfig},
    emulator::{Emulator, MachineTokenKind, MachineTokenSpec, UserSpec},
    pb::{auth_service_client::AuthServiceClient, GetUserRequest, User, WatchRevocationsRequest},
    secret::Secret,
    server::{AuthServer, IdentityConfig, Listeners, ServerError, WebhookConfig},
};
use common::reason;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::{transport::Channel, Code, Request, Status};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// Far longer than any test may take: a stop that waits it out fails the guard.
const GRACE: Duration = Duration::from_secs(600);

struct Running {
    clerk: Emulator,
    grpc: SocketAddr,
    http: SocketAddr,
    machine: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

/// AuthService with identity queries (machine `machine` allowlisted), webhooks on its HTTP
/// port, and a grace period of [`GRACE`].
async fn start() -> Running {
    let clerk = Emulator::start_local().await.unwrap();
    let machine = clerk.create_machine("revocation-follower").id;
    let mut config = common::config_for(&clerk);
    let api: url::Url = clerk.url().parse().unwrap();
    config.machine = Some(MachineConfig::new(
        api.clone(),
        Some(Secret::new(clerk.secret_key())),
        None,
    ));
    config.identity = Some(IdentityConfig {
        backend: BackendApiConfig::new(api, Secret::new(clerk.secret_key())),
        directory: DirectoryConfig::default(),
    });
    let auth_service = clerk.create_machine("auth-service").id;
    assert!(clerk.allow(&machine, &auth_service));
    config.access.machine_id = Some(auth_service);
    config.access.allowlist = vec![machine.clone()];
    config.webhook = Some(WebhookConfig {
        signing_secret: Secret::new("whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdA=="),
        tolerance: Duration::from_secs(300),
    });
    config.shutdown_grace = GRACE;
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let server = AuthServer::build(config).unwrap();
    let keys = server.verifier().keys().clone();
    let events = server.events().await.unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let listeners = Listeners {
        grpc,
        http: Some(http),
        metrics: None,
    };
    let task = tokio::spawn(server.serve_on(listeners, events.clone(), async move {
        let _ = rx.await;
    }));
    keys.ready().await;
    events.subscribed().await;
    Running {
        clerk,
        grpc: grpc_addr,
        http: http_addr,
        machine,
        stop: Some(tx),
        task,
    }
}

impl Running {
    /// A JWT M2M token of the allowlisted machine (verified offline: no Backend API request).
    fn machine_token(&self) -> String {
        self.clerk.mint_machine(&MachineTokenSpec {
            kind: MachineTokenKind::M2m,
            jwt: true,
            subject: Some(self.machine.clone()),
            expires_in: Some(600),
            ..MachineTokenSpec::default()
        })
    }

    /// A client that has made a call and stays connected (while it is held).
    async fn connected_client(&self) -> HealthClient<Channel> {
        let mut health = HealthClient::new(self.channel().await);
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        health
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Begins the shutdown; the serve future must complete, without error, long before the
    /// grace period.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        guard(self.task)
            .await
            .unwrap()
            .expect("the server stops cleanly");
    }
}

/// A failure guard, not a timing assertion: far below [`GRACE`], far above what a stop takes.
async fn guard<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the stop waited on something idle (30 s, grace 600 s)")
}

#[tokio::test]
async fn a_revocation_stream_does_not_hold_the_stop() {
    let s = start().await;
    let token = s.clerk.mint_machine(&MachineTokenSpec {
        kind: MachineTokenKind::M2m,
        jwt: true,
        subject: Some(s.machine.clone()),
        expires_in: Some(600),
        ..MachineTokenSpec::default()
    });
    let mut req = Request::new(WatchRevocationsRequest {});
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = AuthServiceClient::new(s.channel().await)
        .watch_revocations(req)
        .await
        .unwrap()
        .into_inner();
    s.stop().await;
    // The client is told to reconnect (elsewhere or later), with the reason.
    let e = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unavailable, "AUTH_SERVICE_UNAVAILABLE")
    );
}

#[tokio::test]
async fn a_health_watch_stream_does_not_hold_the_stop() {
    let s = start().await;
    let mut health = HealthClient::new(s.channel().await);
    let mut stream = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // The first status is there: the stream is open and waiting for changes.
    assert!(stream.message().await.unwrap().is_some());
    s.stop().await;
    let e: Status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue, // NOT_SERVING as the server stops
            Ok(None) => panic!("the stream ended without a status"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
}

#[tokio::test]
async fn a_grpc_connection_that_never_sent_its_preface_does_not_hold_the_stop() {
    let s = start().await;
    // Connected, nothing sent (a port probe, a stalled client).
    let idle = TcpStream::connect(s.grpc).await.unwrap();
    // Connected, part of the preface sent, then stalled.
    let mut partial = TcpStream::connect(s.grpc).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0").await.unwrap();
    // And one that made a call and stays connected.
    let _connected = s.connected_client().await;
    s.stop().await;
    drop((idle, partial));
}

#[tokio::test]
async fn an_http2_connection_that_spoke_and_went_silent_does_not_hold_the_stop() {
    let s = start().await;
    // The preface and an empty SETTINGS frame, then nothing — and nothing read: the server's
    // GOAWAY and PING go unanswered (a frozen client, a half-written one).
    let mut silent = TcpStream::connect(s.grpc).await.unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // A client that made a call and stays connected, too.
    let _connected = s.connected_client().await;
    s.stop().await;
    // And it was ended, not left behind: the server closed it.
    let mut buf = [0u8; 4096];
    loop {
        match guard(silent.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(_) => continue, // SETTINGS, GOAWAY, PING
        }
    }
}

#[tokio::test]
async fn an_idle_http_keep_alive_connection_does_not_hold_the_stop() {
    let s = start().await;
    let mut conn = TcpStream::connect(s.http).await.unwrap();
    conn.write_all(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // Read the whole answer; the connection stays open (HTTP/1.1 keep-alive).
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"\r\n\r\nok") {
        let n = guard(conn.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    s.stop().await;
    // The server closed it.
    let n = guard(conn.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "the idle connection is closed");
}

#[tokio::test]
async fn a_call_in_flight_is_answered_during_the_stop() {
    let s = start().await;
    let id = s.clerk.create_user(&UserSpec {
        first_name: Some("Ada".into()),
        ..UserSpec::default()
    });
    // Clerk is slow: the call is still waiting for it when the stop begins.
    s.clerk.set_latency(Duration::from_millis(300));
    let before = s.clerk.bapi_requests();
    let mut req = Request::new(GetUserRequest {
        user_id: id.clone(),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", s.machine_token()).parse().unwrap(),
    );
    let mut client = AuthServiceClient::new(s.channel().await);
    let call = tokio::spawn(async move { client.get_user(req).await });
    // Counted on arrival at the emulator, before its latency.
    s.clerk.wait_bapi_requests(before + 1).await;
    s.stop().await;
    let user = call.await.unwrap().expect("answered during the stop");
    assert_eq!(user.into_inner().id, id);
}

#[tokio::test]
async fn a_slow_reader_gets_the_whole_answer_and_its_trailers() {
    use prost::Message as _;

    let mut s = start().await;
    // A profile far larger than the client's flow-control window: most of the answer is still
    // unsent, waiting for the client, when the stop begins.
    let mut metadata = serde_json::Map::new();
    metadata.insert("blob".into(), "x".repeat(256 * 1024).into());
    let id = s.clerk.create_user(&UserSpec {
        public_metadata: metadata,
        ..UserSpec::default()
    });
    let tcp = TcpStream::connect(s.grpc).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!(
        "http://{}/clerk.auth.v1.AuthService/GetUser",
        s.grpc
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {}", s.machine_token()))
    .body(())
    .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    let message = GetUserRequest {
        user_id: id.clone(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    send.send_data(frame.into(), true).unwrap();
    let response = guard(response).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = guard(body.data()).await.unwrap().unwrap();
    // The stop begins with the answer part-written; then the client reads on, slowly.
    let _ = s.stop.take().unwrap().send(());
    let mut received = first.to_vec();
    body.flow_control().release_capacity(first.len()).unwrap();
    while let Some(chunk) = guard(body.data()).await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        received.extend_from_slice(&chunk);
    }
    let trailers = guard(body.trailers())
        .await
        .unwrap()
        .expect("the answer ends with its trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{trailers:?}");
    let length = u32::from_be_bytes(received[1..5].try_into().unwrap()) as usize;
    assert_eq!(received.len(), 5 + length, "the whole message");
    let user = User::decode(&received[5..]).unwrap();
    assert_eq!(user.id, id);
    guard(s.task)
        .await
        .unwrap()
        .expect("the server stops cleanly");
}
