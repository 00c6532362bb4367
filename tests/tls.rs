//! TLS and mTLS on the gRPC port, with certificates generated here: handshakes, SPIFFE IDs as
//! the caller's identity for the identity-query allowlist and the layer's policy, and the
//! delegated layer's TLS client.

mod common;

use std::time::Duration;

use clerk_grpc_auth::{
    clerk::{api::BackendApiConfig, directory::DirectoryConfig},
    emulator::{TokenSpec, UserSpec},
    layer::{DelegatedConfig, DelegatedVerifier},
    pb::{
        auth_service_client::AuthServiceClient, GetUserRequest, RevokeSessionRequest,
        VerifyTokenRequest,
    },
    secret::Secret,
    server::{IdentityConfig, ServerConfig, TlsConfig},
    VerifyRequest,
};
use common::Harness;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client_a: (String, String),
    client_b: (String, String),
    /// An attacker's SPIFFE ID beside the allowlisted one.
    client_two: (String, String),
}

const SPIFFE_A: &str = "spiffe://cluster.local/ns/apps/sa/billing";
const SPIFFE_B: &str = "spiffe://cluster.local/ns/apps/sa/stranger";

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |sans: Vec<SanType>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = sans;
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca_cert.pem(),
        server: leaf(vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ]),
        client_a: leaf(vec![SanType::URI(SPIFFE_A.try_into().unwrap())]),
        client_b: leaf(vec![SanType::URI(SPIFFE_B.try_into().unwrap())]),
        client_two: leaf(vec![
            SanType::URI(SPIFFE_B.try_into().unwrap()),
            SanType::URI(SPIFFE_A.try_into().unwrap()),
        ]),
    }
}

async fn start(pki: &Pki, mtls: bool) -> Harness {
    start_adjusted(pki, mtls, |_, _| {}).await
}

async fn start_adjusted(
    pki: &Pki,
    mtls: bool,
    adjust: impl FnOnce(&clerk_grpc_auth::emulator::Emulator, &mut ServerConfig) + Send + 'static,
) -> Harness {
    let tls = TlsConfig {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: mtls.then(|| pki.ca_pem.clone().into_bytes()),
        client_auth_optional: false,
    };
    Harness::start_unready(move |clerk, config| {
        config.tls = Some(tls);
        config.identity = Some(IdentityConfig {
            backend: BackendApiConfig::new(
                clerk.url().parse().unwrap(),
                Secret::new(clerk.secret_key()),
            ),
            directory: DirectoryConfig::default(),
        });
        config.access.allowlist = vec![SPIFFE_A.to_owned()];
        adjust(clerk, config);
    })
    .await
}

fn client_tls(pki: &Pki, identity: Option<&(String, String)>) -> ClientTlsConfig {
    let mut t = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        t = t.identity(Identity::from_pem(cert, key));
    }
    t
}

async fn connect(
    h: &Harness,
    tls: ClientTlsConfig,
) -> Result<AuthServiceClient<Channel>, tonic::transport::Error> {
    let channel = Channel::from_shared(format!("https://localhost:{}", h.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(AuthServiceClient::new(channel))
}

#[tokio::test]
async fn tls_handshake_and_verify_token() {
    let pki = pki();
    let h = start(&pki, false).await;
    let token = h.mint(&TokenSpec::default());
    let mut c = connect(&h, client_tls(&pki, None))
        .await
        .expect("TLS handshake");
    h.clerk.wait_jwks_requests(1).await;
    h.verifier.keys().ready().await;
    let id = c
        .verify_token(VerifyTokenRequest {
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .identity
        .unwrap();
    assert!(id.user_id.starts_with("user_"));
    // A plaintext client cannot talk to the TLS port.
    let plain = Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = AuthServiceClient::new(ch)
            .verify_token(VerifyTokenRequest {
                token,
                ..Default::default()
            })
            .await;
        assert!(r.is_err(), "plaintext call succeeded against the TLS port");
    }
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_and_spiffe_ids_are_the_peer_identity() {
    let pki = pki();
    let h = start(&pki, true).await;
    h.verifier.keys().ready().await;
    // No client certificate: the handshake (or the first call) fails.
    match connect(&h, client_tls(&pki, None)).await {
        Err(_) => {}
        Ok(mut c) => {
            let r = c.verify_token(VerifyTokenRequest::default()).await;
            assert!(r.is_err(), "a client without a certificate got an answer");
        }
    }
    let user = h.clerk.create_user(&UserSpec {
        first_name: Some("Lin".into()),
        ..UserSpec::default()
    });
    // The allowlisted SPIFFE ID may read any user without a token.
    let mut a = connect(&h, client_tls(&pki, Some(&pki.client_a)))
        .await
        .unwrap();
    let got = a
        .get_user(GetUserRequest {
            user_id: user.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.first_name, "Lin");
    // Another workload's certificate is not enough.
    let mut b = connect(&h, client_tls(&pki, Some(&pki.client_b)))
        .await
        .unwrap();
    let status = b
        .get_user(GetUserRequest {
            user_id: user.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::Unauthenticated,
        "no token, not allowlisted"
    );
    // A certificate carrying the allowlisted SPIFFE ID *and* another is no SVID: refused.
    let mut two = connect(&h, client_tls(&pki, Some(&pki.client_two)))
        .await
        .unwrap();
    let status = two
        .get_user(GetUserRequest {
            user_id: user.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::Unauthenticated,
        "two URI SANs: no peer identity"
    );
}

/// `CLERK_AUTH_REVOKE_REQUIRES_MTLS`: revoking needs the allowlisted certificate *and* a
/// trusted machine's token; either alone is refused, while reads still take either.
#[tokio::test]
async fn revoke_session_may_require_mtls_and_an_m2m_token() {
    let pki = pki();
    let machine = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let m = machine.clone();
    let h = start_adjusted(&pki, true, move |clerk, config| {
        let ops = clerk.create_machine("ops");
        let auth_service = clerk.create_machine("auth-service");
        assert!(clerk.allow(&ops.id, &auth_service.id));
        config.access.machine_id = Some(auth_service.id);
        config.access.allowlist.push(ops.id.clone());
        config.access.revoke_requires_mtls = true;
        *m.lock().unwrap() = ops.id;
    })
    .await;
    h.verifier.keys().ready().await;
    let ops = machine.lock().unwrap().clone();
    let token = h
        .clerk
        .mint_machine(&clerk_grpc_auth::emulator::MachineTokenSpec {
            kind: clerk_grpc_auth::emulator::MachineTokenKind::M2m,
            subject: Some(ops),
            jwt: true,
            ..Default::default()
        });
    let user = h.clerk.create_user(&UserSpec::default());
    let session = h.clerk.create_session(&user);
    let revoke = |token: Option<&str>| {
        let mut r = tonic::Request::new(RevokeSessionRequest {
            session_id: session.clone(),
        });
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    };
    let mut a = connect(&h, client_tls(&pki, Some(&pki.client_a)))
        .await
        .unwrap();
    let mut b = connect(&h, client_tls(&pki, Some(&pki.client_b)))
        .await
        .unwrap();
    // The certificate alone: a token is needed.
    let s = a.revoke_session(revoke(None)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    // The token from a workload without the allowlisted certificate.
    let s = b.revoke_session(revoke(Some(&token))).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert_eq!(common::reason(&s), "PEER_NOT_ALLOWED");
    // Both: revoked.
    let revoked = a
        .revoke_session(revoke(Some(&token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.id, session);
    // Reads still take the certificate alone.
    a.get_user(GetUserRequest { user_id: user }).await.unwrap();
}

#[tokio::test]
async fn delegated_layer_speaks_tls_to_auth_service() {
    let pki = pki();
    let h = start(&pki, true).await;
    h.verifier.keys().ready().await;
    let token = h.mint(&TokenSpec::default());
    let verifier = DelegatedVerifier::new(DelegatedConfig {
        endpoints: vec![format!("https://localhost:{}", h.addr.port())],
        tls: Some(client_tls(&pki, Some(&pki.client_a))),
        deadline: Duration::from_secs(5),
        ..DelegatedConfig::default()
    })
    .unwrap();
    let id = verifier
        .verify(&VerifyRequest {
            token: &token,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(id.user_id.starts_with("user_"));
}

#[test]
fn spiffe_ids_come_from_uri_sans() {
    let pki = pki();
    let der = rustls_pemfile_der(&pki.client_a.0);
    assert_eq!(clerk_grpc_auth::authz::peer::spiffe_ids(&der), [SPIFFE_A]);
    assert!(clerk_grpc_auth::authz::peer::spiffe_ids(b"not a certificate").is_empty());
    let server = rustls_pemfile_der(&pki.server.0);
    assert!(clerk_grpc_auth::authz::peer::spiffe_ids(&server).is_empty());
}

fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body).unwrap()
}

#[path = "../examples/common/orders.rs"]
mod orders;

#[tokio::test]
async fn layer_policy_can_require_a_spiffe_peer() {
    use clerk_grpc_auth::{
        authz::policy::{Policy, Rule},
        layer::AuthLayer,
    };
    use orders::pb::{orders_client::OrdersClient, orders_server::OrdersServer, ListOrdersRequest};
    let pki = pki();
    let h = start(&pki, false).await;
    h.verifier.keys().ready().await;
    let policy = Policy::authenticated().method(
        "/examples.orders.v1.Orders/ListOrders",
        Rule::authenticated().peers([SPIFFE_A]),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = TlsConfig {
        cert_pem: pki.server.0.clone().into_bytes(),
        key_pem: pki.server.1.clone().into_bytes(),
        client_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        client_auth_optional: false,
    };
    let verifier = h.verifier.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(tls.to_tonic())
            .unwrap()
            .layer(AuthLayer::in_process(verifier, policy))
            .add_service(OrdersServer::new(orders::OrdersService))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    });
    let token = h.mint(&TokenSpec::default());
    let call = |identity: &(String, String)| {
        let tls = client_tls(&pki, Some(identity));
        let token = token.clone();
        async move {
            let channel = Channel::from_shared(format!("https://localhost:{port}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut req = tonic::Request::new(ListOrdersRequest {});
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            OrdersClient::new(channel).list_orders(req).await
        }
    };
    assert!(call(&pki.client_a).await.is_ok());
    let status = call(&pki.client_b).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(common::reason(&status), "PEER_NOT_ALLOWED");
}
