//! What the auth layer adds per call over an unprotected echo service (the tower service the
//! layer wraps answers at once, so the difference is the layer's own cost):
//!
//! * `echo_bare` — the echo service alone (the baseline);
//! * `in_process_distinct_tokens` — in-process, warm keys, every token new (verdict cache off):
//!   one full verification per call; compare with `raw_rsa2048_sha256`;
//! * `in_process_cache_hit` — in-process, a token seen before;
//! * `delegated_cache_hit` — delegated, the verdict in the layer's cache;
//! * `delegated_miss` — delegated, every token new: one `VerifyToken` to a real AuthService on
//!   loopback (its cache off too, so it verifies the signature).
//!
//! Run with `cargo bench -p clerk-grpc-auth-bench --bench layer`.

use std::{convert::Infallible, sync::Arc, time::Duration};

use clerk_grpc_auth::{
    authz::policy::Policy,
    emulator::{OrgSpec, SigningKey, TokenSpec},
    layer::{AuthLayer, DelegatedConfig, DelegatedVerifier},
    server::{AuthServer, ServerConfig},
    token::keys::{Alg, KeySet},
    verify::jwks::{KeySource, KeyStore, KeyStoreConfig},
    TokenVerifier, TokenVerifierConfig,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};
use tower::{Layer, Service, ServiceExt};

const DISTINCT: usize = 4096;
const PATH: &str = "/examples.orders.v1.Orders/ListOrders";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn request(token: &str) -> http::Request<tonic::body::Body> {
    http::Request::builder()
        .method("POST")
        .uri(PATH)
        .header("content-type", "application/grpc")
        .header("authorization", format!("Bearer {token}"))
        .body(tonic::body::Body::default())
        .unwrap()
}

#[derive(Clone)]
struct Echo;

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(tonic::body::Body::default())))
    }
}

fn bench_layer(c: &mut Criterion) {
    let key = SigningKey::generate().unwrap();
    let jwks = serde_json::to_vec(&json!({ "keys": [key.jwk()] })).unwrap();
    let keys = Arc::new(KeySet::from_jwks_json(&jwks).unwrap().0);
    let header = json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT", "cat": "cl_B7d4PD111AAA"});
    let spec = TokenSpec {
        org: Some(OrgSpec {
            id: Some("org_2bench".into()),
            slug: Some("bench".into()),
            role: Some("admin".into()),
            permissions: vec!["org:orders:read".into()],
        }),
        expires_in: Some(3600),
        ..TokenSpec::default()
    };
    let tokens: Vec<String> = (0..DISTINCT)
        .map(|_| {
            let claims = Value::Object(spec.claims("https://clerk.bench.example", now()));
            key.sign_jwt(&header, &claims, Alg::RS256)
        })
        .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = KeyStore::new(
        KeySource::Static(keys.clone()),
        KeyStoreConfig::default(),
        reqwest::Client::new(),
    );
    let verifier = |capacity| {
        TokenVerifier::new(
            TokenVerifierConfig {
                cache_capacity: capacity,
                ..TokenVerifierConfig::default()
            },
            store.clone(),
        )
    };

    // A real AuthService on loopback for the delegated cases (verdict cache off).
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = ServerConfig::new(KeySource::Static(keys.clone()));
        config.verifier.cache_capacity = 0;
        let server = AuthServer::build(config).unwrap();
        tokio::spawn(server.serve(listener, std::future::pending()));
        addr
    });
    let delegated = |capacity| {
        let _guard = rt.enter();
        DelegatedVerifier::new(DelegatedConfig {
            endpoints: vec![format!("http://{addr}")],
            cache_capacity: capacity,
            deadline: Duration::from_secs(2),
            ..DelegatedConfig::default()
        })
        .unwrap()
    };

    let mut g = c.benchmark_group("layer");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(6));

    let (input, sig) = tokens[0].rsplit_once('.').unwrap();
    let b64 = |s: &str| {
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s).unwrap()
    };
    let sig = b64(sig);
    let jwk = key.jwk();
    let raw = aws_lc_rs::signature::RsaPublicKeyComponents {
        n: b64(jwk["n"].as_str().unwrap()),
        e: b64(jwk["e"].as_str().unwrap()),
    }
    .to_parsed_public_key(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256)
    .unwrap();
    g.bench_function("raw_rsa2048_sha256", |b| {
        b.iter(|| raw.verify_sig(input.as_bytes(), &sig).unwrap())
    });

    g.bench_function("echo_bare", |b| {
        b.iter(|| rt.block_on(Echo.oneshot(request(&tokens[0]))).unwrap())
    });

    let cases: [(&str, AuthLayer, bool); 4] = [
        (
            "in_process_distinct_tokens",
            AuthLayer::in_process(verifier(0), Policy::authenticated()),
            true,
        ),
        (
            "in_process_cache_hit",
            AuthLayer::in_process(verifier(100_000), Policy::authenticated()),
            false,
        ),
        (
            "delegated_cache_hit",
            AuthLayer::delegated(delegated(100_000), Policy::authenticated()),
            false,
        ),
        (
            "delegated_miss",
            AuthLayer::delegated(delegated(0), Policy::authenticated()),
            true,
        ),
    ];
    for (name, layer, distinct) in cases {
        let svc = layer.layer(Echo);
        // Warm: keys, connection, the hot token's verdict.
        let res = rt
            .block_on(svc.clone().oneshot(request(&tokens[1])))
            .unwrap();
        assert!(
            res.headers().get("grpc-status").is_none(),
            "{name}: warm-up call refused: {:?}",
            res.headers()
        );
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                let t = if distinct {
                    i = (i + 1) % DISTINCT;
                    &tokens[i]
                } else {
                    &tokens[1]
                };
                let res = rt.block_on(svc.clone().oneshot(request(t))).unwrap();
                debug_assert!(res.headers().get("grpc-status").is_none());
                res
            })
        });
    }
    g.finish();
}

mod harness {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(benches, bench_layer);
}
criterion_main!(harness::benches);
