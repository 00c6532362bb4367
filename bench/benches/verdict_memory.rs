//! Heap bytes one verdict-cache entry keeps, counted by the allocator (not estimated): the
//! same distinct session tokens are verified by a verifier with its cache off and by one with
//! room for all of them; the difference in live heap bytes, divided by the number of tokens,
//! is what an entry costs (key, cached identity, moka's bookkeeping). A third run reads every
//! identity's parsed claims (`Identity::claims`, what a handler may do in-process) to show that
//! the map parsed on demand is not kept by the cache.
//!
//! Run with `cargo bench -p clerk-grpc-auth-bench --bench verdict_memory`; `-- --test` runs a
//! small pass to check that it runs. `deploy/kubernetes` sizes its memory limit from the first
//! figure (see `tests/deploy.rs`).

use std::alloc::System;

use clerk_grpc_auth::{
    emulator::{OrgSpec, SigningKey, TokenSpec},
    token::keys::{Alg, KeySet},
    verify::jwks::{KeySource, KeyStore, KeyStoreConfig},
    TokenVerifier, TokenVerifierConfig, VerifyRequest,
};
use serde_json::{json, Value};

#[global_allocator]
static ALLOC: cap::Cap<System> = cap::Cap::new(System, usize::MAX);

/// Tokens per run; `--test` uses fewer.
const TOKENS: usize = 20_000;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Live heap bytes after verifying every token with a cache of `capacity` (the verifier is
/// kept alive until the count is taken), minus those before it was built.
fn retained(store: &KeyStore, tokens: &[String], capacity: u64, read_claims: bool) -> usize {
    let before = ALLOC.allocated();
    let verifier = TokenVerifier::new(
        TokenVerifierConfig {
            cache_capacity: capacity,
            ..TokenVerifierConfig::default()
        },
        store.clone(),
    );
    for t in tokens {
        let id = verifier
            .verify_now(&VerifyRequest {
                token: t,
                ..VerifyRequest::default()
            })
            .expect("a valid token");
        if read_claims {
            assert!(id.claims().contains_key("sub"));
        }
    }
    let after = ALLOC.allocated();
    assert_eq!(verifier.stats().full_verifications, tokens.len() as u64);
    drop(verifier);
    after.saturating_sub(before)
}

/// Live heap bytes per identity kept by the caller (verdict cache off): the identity's own
/// share of an entry.
fn identities(store: &KeyStore, tokens: &[String]) -> f64 {
    let verifier = TokenVerifier::new(
        TokenVerifierConfig {
            cache_capacity: 0,
            ..TokenVerifierConfig::default()
        },
        store.clone(),
    );
    let mut kept = Vec::with_capacity(tokens.len());
    let before = ALLOC.allocated();
    for t in tokens {
        kept.push(
            verifier
                .verify_now(&VerifyRequest {
                    token: t,
                    ..VerifyRequest::default()
                })
                .expect("a valid token"),
        );
    }
    let after = ALLOC.allocated();
    drop(kept);
    after.saturating_sub(before) as f64 / tokens.len() as f64
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let count = if std::env::args().any(|a| a == "--test") {
        500
    } else {
        TOKENS
    };
    let key = SigningKey::generate().unwrap();
    let jwks = serde_json::to_vec(&json!({ "keys": [key.jwk()] })).unwrap();
    let keys = KeySet::from_jwks_json(&jwks).unwrap().0;
    let header = json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT", "cat": "cl_B7d4PD111AAA"});
    // A typical session token: an active organization with two permissions, an azp.
    let spec = TokenSpec {
        org: Some(OrgSpec {
            id: Some("org_2bench".into()),
            slug: Some("bench".into()),
            role: Some("admin".into()),
            permissions: vec!["org:invoices:read".into(), "org:invoices:write".into()],
        }),
        azp: Some("https://app.example".into()),
        expires_in: Some(3600),
        ..TokenSpec::default()
    };
    let tokens: Vec<String> = (0..count)
        .map(|_| {
            let claims = Value::Object(spec.claims("https://clerk.bench.example", now()));
            key.sign_jwt(&header, &claims, Alg::RS256)
        })
        .collect();
    let store = KeyStore::new(
        KeySource::Static(keys.into()),
        KeyStoreConfig::default(),
        reqwest::Client::new(),
    );
    let token_bytes = tokens[0].len();
    let off = retained(&store, &tokens, 0, false);
    let on = retained(&store, &tokens, count as u64, false);
    let claims = retained(&store, &tokens, count as u64, true);
    let per = |bytes: usize| bytes.saturating_sub(off) as f64 / count as f64;
    println!("tokens                                  {count} distinct, {token_bytes} bytes each");
    println!("verdict-cache bytes per entry           {:.0}", per(on));
    println!("per entry, every identity's claims read {:.0}", per(claims));
    println!(
        "cache off, bytes left per token         {:.0}",
        off as f64 / count as f64
    );
    println!(
        "of an entry, the identity (heap)         {:.0}",
        identities(&store, &tokens)
    );
    println!(
        "of which the Identity struct itself      {}",
        std::mem::size_of::<clerk_grpc_auth::Identity>()
    );
}
