//! Benchmarks: in-process verification of distinct tokens (no cache can hide the RSA work), a
//! verdict-cache hit, raw RSA-2048 verification for reference, and a VerifyToken round trip
//! over loopback gRPC.
//!
//! Run with `cargo bench -p clerk-grpc-auth-bench --bench verify`. Compare
//! `verify/core_distinct_tokens` with `openssl speed -seconds 5 rsa2048` (its verify/s) on the
//! same machine.

use std::{sync::Arc, time::Duration};

use clerk_grpc_auth::{
    emulator::{SigningKey, TokenSpec},
    pb::{auth_service_client::AuthServiceClient, VerifyTokenRequest},
    server::{AuthServer, ServerConfig},
    token::{
        check::{Validation, Verifier, VerifyOptions},
        keys::{Alg, KeySet},
    },
    verify::jwks::{KeySource, KeyStore, KeyStoreConfig},
    TokenVerifier, TokenVerifierConfig, VerifyRequest,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};

const DISTINCT: usize = 4096;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct Fixture {
    key: SigningKey,
    keys: KeySet,
    tokens: Vec<String>,
}

fn fixture() -> Fixture {
    let key = SigningKey::generate().unwrap();
    let jwks = serde_json::to_vec(&json!({ "keys": [key.jwk()] })).unwrap();
    let keys = KeySet::from_jwks_json(&jwks).unwrap().0;
    let header = json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT", "cat": "cl_B7d4PD111AAA"});
    let spec = TokenSpec {
        org: Some(clerk_grpc_auth::emulator::OrgSpec {
            id: Some("org_2bench".into()),
            slug: Some("bench".into()),
            role: Some("admin".into()),
            permissions: vec!["org:invoices:read".into(), "org:invoices:write".into()],
        }),
        azp: Some("https://app.example".into()),
        expires_in: Some(3600),
        ..TokenSpec::default()
    };
    let tokens = (0..DISTINCT)
        .map(|_| {
            let claims = Value::Object(spec.claims("https://clerk.bench.example", now()));
            key.sign_jwt(&header, &claims, Alg::RS256)
        })
        .collect();
    Fixture { key, keys, tokens }
}

fn bench_verify(c: &mut Criterion) {
    let f = fixture();
    let verifier = Verifier::new(Validation {
        authorized_parties: vec!["https://app.example".into()],
        ..Validation::default()
    });
    let opts = VerifyOptions::default();
    let now_ms = now() * 1000;

    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(8));

    // Raw RSA-2048 PKCS#1 v1.5 SHA-256 verification of one token's signature: the floor.
    let t0 = &f.tokens[0];
    let (input, sig) = t0.rsplit_once('.').unwrap();
    let sig =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap();
    let jwk = f.key.jwk();
    let b64 = |s: &str| {
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s).unwrap()
    };
    let raw = aws_lc_rs::signature::RsaPublicKeyComponents {
        n: b64(jwk["n"].as_str().unwrap()),
        e: b64(jwk["e"].as_str().unwrap()),
    }
    .to_parsed_public_key(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256)
    .unwrap();
    g.bench_function("raw_rsa2048_sha256", |b| {
        b.iter(|| raw.verify_sig(input.as_bytes(), &sig).unwrap())
    });

    // The verifier core on distinct tokens: decode, checks, RSA, claims, identity.
    let mut i = 0;
    g.bench_function("core_distinct_tokens", |b| {
        b.iter(|| {
            i = (i + 1) % DISTINCT;
            verifier
                .verify(&f.tokens[i], &f.keys, &opts, now_ms)
                .unwrap()
        })
    });

    let mut k = 0;
    g.bench_function("decode_only", |b| {
        b.iter(|| {
            k = (k + 1) % DISTINCT;
            clerk_grpc_auth::token::check::Decoded::parse(&f.tokens[k]).unwrap()
        })
    });

    // For comparison: off-the-shelf jsonwebtoken (aws-lc-rs backend) on the same tokens.
    let jwt_key = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap(),
        jwk["e"].as_str().unwrap(),
    )
    .unwrap();
    let mut jwt_validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    jwt_validation.leeway = 5;
    jwt_validation.validate_aud = false;
    let mut m = 0;
    g.bench_function("jsonwebtoken_distinct_tokens", |b| {
        b.iter(|| {
            m = (m + 1) % DISTINCT;
            jsonwebtoken::decode::<Value>(&f.tokens[m], &jwt_key, &jwt_validation).unwrap()
        })
    });

    // The full in-process path (key store + verifier), cache disabled.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();
    let store = KeyStore::new(
        KeySource::Static(Arc::new(f.keys.clone())),
        KeyStoreConfig::default(),
        http,
    );
    let mk = |capacity| {
        TokenVerifier::new(
            TokenVerifierConfig {
                validation: verifier.validation().clone(),
                cache_capacity: capacity,
            },
            store.clone(),
        )
    };
    let uncached = mk(0);
    let mut j = 0;
    g.bench_function("token_verifier_distinct_tokens_no_cache", |b| {
        b.iter(|| {
            j = (j + 1) % DISTINCT;
            rt.block_on(uncached.verify(&VerifyRequest {
                token: &f.tokens[j],
                ..Default::default()
            }))
            .unwrap()
        })
    });

    // A verdict-cache hit.
    let cached = mk(100_000);
    let hot = VerifyRequest {
        token: &f.tokens[1],
        ..Default::default()
    };
    rt.block_on(cached.verify(&hot)).unwrap();
    g.bench_function("token_verifier_cache_hit", |b| {
        b.iter(|| rt.block_on(cached.verify(&hot)).unwrap())
    });
    g.finish();
}

fn bench_roundtrip(c: &mut Criterion) {
    let f = fixture();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = |cache_capacity| {
        let keys = f.keys.clone();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut config = ServerConfig::new(KeySource::Static(Arc::new(keys)));
            config.verifier.cache_capacity = cache_capacity;
            let server = AuthServer::build(config).unwrap();
            tokio::spawn(server.serve(listener, std::future::pending()));
            AuthServiceClient::connect(format!("http://{addr}"))
                .await
                .unwrap()
        })
    };
    let mut client = start(100_000);
    let mut uncached = start(0);
    let tokens = f.tokens.clone();
    let mut g = c.benchmark_group("grpc");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(8));
    let hot = tokens[0].clone();
    g.bench_function("verify_token_roundtrip_cache_hit", |b| {
        b.iter(|| {
            rt.block_on(client.verify_token(VerifyTokenRequest {
                token: hot.clone(),
                ..Default::default()
            }))
            .unwrap()
        })
    });
    let mut i = 0;
    g.bench_function("verify_token_roundtrip_distinct_tokens_no_cache", |b| {
        b.iter(|| {
            i = (i + 1) % DISTINCT;
            rt.block_on(uncached.verify_token(VerifyTokenRequest {
                token: tokens[i].clone(),
                ..Default::default()
            }))
            .unwrap()
        })
    });
    g.finish();
}

mod harness {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(benches, bench_verify, bench_roundtrip);
}
criterion_main!(harness::benches);
