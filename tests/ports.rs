//! Each port serves what it says: webhooks on the HTTP port, `/metrics` `/livez` `/readyz` on the
//! metrics port when there is one (on the HTTP port otherwise), and gRPC reflection only when
//! switched on — the real server on 127.0.0.1:0 against the emulator.

mod common;

use std::{net::SocketAddr, time::Duration};

use clerk_grpc_auth::{
    secret::Secret,
    server::{AuthServer, Listeners, ServerConfig, WebhookConfig},
};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_stream::StreamExt;
use tonic::{transport::Channel, Code};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    ServerReflectionRequest,
};

const SECRET: &str = "whsec_dGVzdHRlc3R0ZXN0dGVzdHRlc3R0ZXN0dGVzdA==";

struct Ports {
    grpc: SocketAddr,
    http: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    _clerk: clerk_grpc_auth::emulator::Emulator,
    _stop: oneshot::Sender<()>,
}

/// A server with webhooks on, on the ports asked for.
async fn serve(http: bool, metrics: bool, adjust: impl FnOnce(&mut ServerConfig)) -> Ports {
    let clerk = clerk_grpc_auth::emulator::Emulator::start_local()
        .await
        .unwrap();
    let mut config = common::config_for(&clerk);
    config.webhook = Some(WebhookConfig {
        signing_secret: Secret::new(SECRET),
        tolerance: Duration::from_secs(300),
    });
    adjust(&mut config);
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let grpc = bind().await;
    let http = if http { Some(bind().await) } else { None };
    let metrics = if metrics { Some(bind().await) } else { None };
    let addr = |l: &Option<TcpListener>| l.as_ref().map(|l| l.local_addr().unwrap());
    let (grpc_addr, http_addr, metrics_addr) =
        (grpc.local_addr().unwrap(), addr(&http), addr(&metrics));
    let server = AuthServer::build(config).unwrap();
    let keys = server.verifier().keys().clone();
    let events = server.events().await.unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server.serve_on(
        Listeners {
            grpc,
            http,
            metrics,
        },
        events,
        async move {
            let _ = rx.await;
        },
    ));
    keys.ready().await;
    Ports {
        grpc: grpc_addr,
        http: http_addr,
        metrics: metrics_addr,
        _clerk: clerk,
        _stop: tx,
    }
}

async fn get(addr: SocketAddr, path: &str) -> u16 {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// An unsigned delivery: refused by the webhook handler (400), or 404 where there is none.
async fn post_webhook(addr: SocketAddr) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{addr}/webhooks/clerk"))
        .body("{}")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn with_a_metrics_port_the_webhook_port_serves_webhooks_only() {
    let p = serve(true, true, |_| {}).await;
    let (http, metrics) = (p.http.unwrap(), p.metrics.unwrap());
    for path in ["/metrics", "/livez", "/readyz"] {
        assert_eq!(get(http, path).await, 404, "{path} on the webhook port");
        assert_eq!(get(metrics, path).await, 200, "{path} on the metrics port");
    }
    assert_eq!(post_webhook(http).await, 400, "the webhook handler answers");
    assert_eq!(
        post_webhook(metrics).await,
        404,
        "no webhooks on the metrics port"
    );
}

#[tokio::test]
async fn without_a_metrics_port_the_http_port_serves_both_as_before() {
    let p = serve(true, false, |_| {}).await;
    let http = p.http.unwrap();
    for path in ["/metrics", "/livez", "/readyz"] {
        assert_eq!(get(http, path).await, 200, "{path}");
    }
    assert_eq!(post_webhook(http).await, 400);
}

#[tokio::test]
async fn a_metrics_port_alone_serves_metrics() {
    let p = serve(false, true, |c| c.webhook = None).await;
    let metrics = p.metrics.unwrap();
    assert_eq!(get(metrics, "/metrics").await, 200);
    assert_eq!(get(metrics, "/readyz").await, 200);
    assert_eq!(post_webhook(metrics).await, 404);
}

async fn list_services(grpc: SocketAddr) -> Result<Vec<String>, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let answer = answers.next().await.expect("an answer")?;
    match answer.message_response {
        Some(
            tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
                l,
            ),
        ) => Ok(l.service.into_iter().map(|s| s.name).collect()),
        other => panic!("{other:?}"),
    }
}

/// Waits (on the health Watch stream) until the AuthService is SERVING.
async fn serving(grpc: SocketAddr) {
    let channel = Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: clerk_grpc_auth::server::SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    while let Some(msg) = stream.next().await {
        if msg.unwrap().status == serving {
            return;
        }
    }
    panic!("health stream ended before SERVING");
}

#[tokio::test]
async fn reflection_can_be_switched_off_while_health_still_answers() {
    let on = serve(false, false, |_| {}).await;
    let services = list_services(on.grpc).await.unwrap();
    assert!(
        services
            .iter()
            .any(|s| s == clerk_grpc_auth::server::SERVICE_NAME),
        "{services:?}"
    );

    let off = serve(false, false, |c| c.reflection = false).await;
    let e = list_services(off.grpc).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    // v1alpha too.
    let channel = Channel::from_shared(format!("http://{}", off.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
        channel,
    )
    .server_reflection_info(tokio_stream::iter([
        tonic_reflection::pb::v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
        },
    ]))
    .await
    .map(|_| ())
    .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    serving(off.grpc).await;
}
