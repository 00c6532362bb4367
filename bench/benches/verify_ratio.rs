//! Interleaved throughput of the verifier core against raw RSA-2048 and `openssl speed`.
//!
//! Shared machines drift by tens of percent from one second to the next, so the three figures
//! are measured in alternating rounds and each is the median of its rounds: raw aws-lc
//! RSA-2048/SHA-256 verification, the verifier core on distinct tokens (decode, checks, RSA,
//! claim decoding, identity), off-the-shelf `jsonwebtoken` on the same tokens, and — when
//! `openssl` is on the PATH — `openssl speed -seconds 1 rsa2048`'s verify/s. Run with
//! `cargo bench -p clerk-grpc-auth-bench --bench verify_ratio` (about a minute); with `-- --test`
//! one short round, to check that it runs.

use std::{hint::black_box, process::Command, time::Instant};

use base64::Engine as _;
use clerk_grpc_auth::{
    emulator::{OrgSpec, SigningKey, TokenSpec},
    token::{
        check::{Validation, Verifier, VerifyOptions},
        keys::{Alg, KeySet},
    },
};
use serde_json::{json, Value};

const DISTINCT: usize = 4096;
const ROUNDS: usize = 15;
/// About half a second of work per round and kind.
const PER_ROUND: usize = 20_000;
/// Rounds and work per round under `--test` (as criterion's: run everything once, quickly).
const TEST_ROUNDS: usize = 1;
const TEST_PER_ROUND: usize = 200;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn openssl_verify_per_sec() -> Option<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "1", "rsa2048"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("rsa 2048"))?;
    line.split_whitespace().last()?.parse().ok()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let test = std::env::args().any(|a| a == "--test");
    let (rounds, per_round) = if test {
        (TEST_ROUNDS, TEST_PER_ROUND)
    } else {
        (ROUNDS, PER_ROUND)
    };
    let key = SigningKey::generate().unwrap();
    let jwks = serde_json::to_vec(&json!({ "keys": [key.jwk()] })).unwrap();
    let keys = KeySet::from_jwks_json(&jwks).unwrap().0;
    let header = json!({"alg": "RS256", "kid": key.kid(), "typ": "JWT", "cat": "cl_B7d4PD111AAA"});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
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
    let tokens: Vec<String> = (0..DISTINCT)
        .map(|_| {
            let claims = Value::Object(spec.claims("https://clerk.bench.example", now));
            key.sign_jwt(&header, &claims, Alg::RS256)
        })
        .collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = key.jwk();
    let raw = aws_lc_rs::signature::RsaPublicKeyComponents {
        n: b64.decode(jwk["n"].as_str().unwrap()).unwrap(),
        e: b64.decode(jwk["e"].as_str().unwrap()).unwrap(),
    }
    .to_parsed_public_key(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256)
    .unwrap();
    let pre: Vec<(&str, Vec<u8>)> = tokens
        .iter()
        .map(|t| {
            let (input, sig) = t.rsplit_once('.').unwrap();
            (input, b64.decode(sig).unwrap())
        })
        .collect();
    let verifier = Verifier::new(Validation {
        authorized_parties: vec!["https://app.example".into()],
        ..Validation::default()
    });
    let opts = VerifyOptions::default();

    let jwt_key = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap(),
        jwk["e"].as_str().unwrap(),
    )
    .unwrap();
    let mut jwt_validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    jwt_validation.leeway = 5;
    jwt_validation.validate_aud = false;
    let (mut raw_ps, mut core_ps, mut openssl_ps) = (Vec::new(), Vec::new(), Vec::new());
    let mut jwt_ps = Vec::new();
    let mut i = 0;
    for round in 0..rounds {
        let t0 = Instant::now();
        for _ in 0..per_round {
            i = (i + 1) % DISTINCT;
            let (input, sig) = &pre[i];
            raw.verify_sig(input.as_bytes(), sig).unwrap();
        }
        raw_ps.push(per_round as f64 / t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for _ in 0..per_round {
            i = (i + 1) % DISTINCT;
            black_box(
                verifier
                    .verify(&tokens[i], &keys, &opts, now * 1000)
                    .unwrap(),
            );
        }
        core_ps.push(per_round as f64 / t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for _ in 0..per_round / 2 {
            i = (i + 1) % DISTINCT;
            black_box(
                jsonwebtoken::decode::<Value>(&tokens[i], &jwt_key, &jwt_validation).unwrap(),
            );
        }
        jwt_ps.push((per_round / 2) as f64 / t0.elapsed().as_secs_f64());
        if let Some(o) = openssl_verify_per_sec() {
            openssl_ps.push(o);
        }
        eprintln!(
            "round {round}: raw {:.0}/s, core {:.0}/s, jsonwebtoken {:.0}/s, openssl {:?}/s",
            raw_ps[round],
            core_ps[round],
            jwt_ps[round],
            openssl_ps.last()
        );
    }
    let paired = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(x, y)| x / y).collect());
    let core_raw_paired = paired(&core_ps, &raw_ps);
    let core_openssl_paired =
        (openssl_ps.len() == core_ps.len()).then(|| paired(&core_ps, &openssl_ps));
    let raw_per_s = median(raw_ps);
    let core_per_s = median(core_ps);
    println!("token size                     {} bytes", tokens[0].len());
    println!(
        "raw aws-lc RSA-2048 verify/s   {raw_per_s:>10.0}  (one core, median of {rounds} rounds)"
    );
    println!("verifier core verify/s         {core_per_s:>10.0}  (distinct tokens, same rounds)");
    let jwt_per_s = median(jwt_ps);
    println!("jsonwebtoken 11 verify/s       {jwt_per_s:>10.0}  (aws-lc-rs backend, same tokens and rounds)");
    println!(
        "core / raw                     {:>10.3}  (median of per-round ratios {core_raw_paired:.3})",
        core_per_s / raw_per_s
    );
    if openssl_ps.is_empty() {
        println!("openssl speed rsa2048: openssl not found");
    } else {
        let o = median(openssl_ps);
        println!("openssl speed rsa2048 verify/s {o:>10.0}  (same rounds)");
        println!(
            "core / openssl                 {:>10.3}  (median of per-round ratios {:.3})",
            core_per_s / o,
            core_openssl_paired.unwrap_or(f64::NAN)
        );
        println!("jsonwebtoken / openssl         {:>10.3}", jwt_per_s / o);
    }
}
