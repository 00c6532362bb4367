//! Shared harness: a real Clerk emulator and a real AuthService, both on 127.0.0.1:0, talking
//! over real HTTP and gRPC.
#![allow(dead_code)]

use std::net::SocketAddr;

use clerk_grpc_auth::{
    emulator::{Emulator, TokenSpec},
    pb::{auth_service_client::AuthServiceClient, Identity, VerifyTokenRequest},
    secret::Secret,
    server::{AuthServer, ServerConfig, ServerError, SERVICE_NAME},
    verify::jwks::KeySource,
    TokenVerifier,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tonic::{transport::Channel, Code, Status};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_types::StatusExt;

/// An AuthService serving `config` on 127.0.0.1:0 with an HTTP port (webhooks, `/auth`,
/// `/metrics`) and no metrics port; stopped by sending on `stop` (or dropping it).
pub struct HttpServer {
    pub http: SocketAddr,
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<Result<(), ServerError>>,
}

/// Starts [`HttpServer`]; `ready`: wait until the keys are loaded (a failing JWKS never gets
/// there).
pub async fn serve_with_http(config: ServerConfig, ready: bool) -> HttpServer {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = http_listener.local_addr().unwrap();
    let server = AuthServer::build(config).unwrap();
    let keys = server.verifier().keys().clone();
    let events = server.events().await.unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve_on(
        clerk_grpc_auth::server::Listeners {
            grpc,
            http: Some(http_listener),
            metrics: None,
        },
        events,
        async move {
            let _ = rx.await;
        },
    ));
    if ready {
        keys.ready().await;
    }
    HttpServer { http, stop, task }
}

/// A running emulator + AuthService pair.
pub struct Harness {
    pub clerk: Emulator,
    pub addr: SocketAddr,
    pub client: AuthServiceClient<Channel>,
    pub health: HealthClient<Channel>,
    pub verifier: TokenVerifier,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), ServerError>>>,
}

/// The server configuration the harness uses by default: keys from the emulator's Backend API.
pub fn config_for(clerk: &Emulator) -> ServerConfig {
    ServerConfig::new(KeySource::Remote {
        url: format!("{}/v1/jwks", clerk.url()).parse().unwrap(),
        bearer: Some(Secret::new(clerk.secret_key())),
    })
}

impl Harness {
    /// Emulator + server with the default configuration, waiting until SERVING.
    pub async fn start() -> Self {
        Self::start_with(|_, _| {}).await
    }

    /// Emulator + server; `adjust` may change the configuration (or the emulator) first.
    /// Waits until SERVING.
    pub async fn start_with(adjust: impl FnOnce(&Emulator, &mut ServerConfig)) -> Self {
        let h = Self::start_unready(adjust).await;
        h.wait_health(ServingStatus::Serving).await;
        h
    }

    /// As [`Harness::start_with`], without waiting for SERVING.
    pub async fn start_unready(adjust: impl FnOnce(&Emulator, &mut ServerConfig)) -> Self {
        let clerk = Emulator::start_local().await.expect("emulator");
        let mut config = config_for(&clerk);
        adjust(&clerk, &mut config);
        Self::start_server(clerk, config).await
    }

    /// Starts the server for `clerk` with `config`.
    pub async fn start_server(clerk: Emulator, config: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = AuthServer::build(config).expect("server builds");
        let verifier = server.verifier().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        // Lazy: a TLS server (tests/tls.rs) is reached through its own TLS channel instead.
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        Self {
            clerk,
            addr,
            client: AuthServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
            verifier,
            shutdown: Some(tx),
            server: Some(task),
        }
    }

    /// Waits (on the health Watch stream, not by polling) until the AuthService reports `want`.
    pub async fn wait_health(&self, want: ServingStatus) {
        let mut stream = self
            .health
            .clone()
            .watch(HealthCheckRequest {
                service: SERVICE_NAME.into(),
            })
            .await
            .expect("watch")
            .into_inner();
        while let Some(msg) = stream.next().await {
            if msg.expect("health message").status == want as i32 {
                return;
            }
        }
        panic!("health stream ended before {want:?}");
    }

    /// One health check.
    pub async fn health_status(&self) -> ServingStatus {
        let r = self
            .health
            .clone()
            .check(HealthCheckRequest {
                service: SERVICE_NAME.into(),
            })
            .await
            .expect("check")
            .into_inner();
        ServingStatus::try_from(r.status).unwrap()
    }

    /// VerifyToken with default options.
    pub async fn verify(&self, token: &str) -> Result<Identity, Status> {
        self.verify_req(VerifyTokenRequest {
            token: token.into(),
            ..Default::default()
        })
        .await
    }

    /// VerifyToken with a full request.
    pub async fn verify_req(&self, req: VerifyTokenRequest) -> Result<Identity, Status> {
        self.client
            .clone()
            .verify_token(req)
            .await
            .map(|r| r.into_inner().identity.expect("identity in a success"))
    }

    /// Mints a token with the emulator.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        self.clerk.mint(spec)
    }

    /// Stops the server, draining calls.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.server.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The ErrorInfo reason of a status, checking its domain.
pub fn reason(status: &Status) -> String {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "clerk.auth.v1");
    info.reason
}

/// Asserts a rejection with `code` and `reason`, and that the message does not echo `token`.
#[track_caller]
pub fn assert_rejected(result: Result<Identity, Status>, code: Code, want: &str, token: &str) {
    let status = match result {
        Ok(id) => panic!("expected {want}, got an identity for {}", id.user_id),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), want, "{status:?}");
    if token.len() > 8 {
        assert!(
            !status.message().contains(token),
            "message echoes the token"
        );
        let sig = token.rsplit('.').next().unwrap_or("");
        if sig.len() > 16 {
            assert!(
                !status.message().contains(sig),
                "message echoes the signature"
            );
        }
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A TCP relay to the local Redis whose connections the test can cut and refuse.
pub struct RedisRelay {
    /// Where clients connect instead of 127.0.0.1:6379.
    pub addr: std::net::SocketAddr,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl RedisRelay {
    /// Starts relaying to the local Redis.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (held, refuse) = (connections.clone(), down.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut redis) = tokio::net::TcpStream::connect("127.0.0.1:6379").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut redis).await;
                    }
                });
                held.lock().unwrap().push(relay.abort_handle());
            }
        });
        Self {
            addr,
            down,
            connections,
            accept,
        }
    }

    /// Closes every connection made so far; new ones are relayed again.
    pub fn drop_connections(&self) {
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Closes every connection and refuses new ones until [`RedisRelay::restore`].
    pub fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        self.drop_connections();
    }

    /// Relays new connections again.
    pub fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for RedisRelay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
